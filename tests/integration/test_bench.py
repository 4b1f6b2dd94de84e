"""dsft bench: the data generator, the FLOP accounting both systems share, and end-to-end runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.chat_data import CHATML_TRAINING, build_tokenizer, generate_rows
from benchmarks.vs_trl import FIGURES, SYSTEMS, _param_count
from tests.conftest import CORES, ROOT, cpu_env


def test_generator_length_spread() -> None:
    rows = generate_rows(3000, seed=3)
    assert rows == generate_rows(3000, seed=3)  # deterministic in the seed
    multi = [r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert 0.21 < len(multi) / len(rows) < 0.29  # 25 % multi-turn chats
    responses = np.array(
        [len(m["content"].split()) for r in rows for m in r["messages"] if m["role"] == "assistant"]
    )
    prompts = np.array(
        [len(m["content"].split()) for r in rows for m in r["messages"] if m["role"] == "user"]
    )
    # lognormal: medians near 90 / 40 words, spread sigma ~0.9 / 1.0, a long right tail
    assert 75 < np.median(responses) < 110
    assert 32 < np.median(prompts) < 50
    assert 0.75 < np.log(responses).std() < 1.05
    assert np.percentile(responses, 99) > 6 * np.median(responses)
    short = generate_rows(1000, seed=3, scale=0.25)  # CPU mode: every median a quarter
    words = [len(m["content"].split()) for r in short for m in r["messages"]]
    assert 8 < np.median(words) < 30


def test_tokenizer_renders_dsft_chatml(tmp_path: Path) -> None:
    from dsft.data.template import TEMPLATES

    rows = generate_rows(200, seed=1, scale=0.25)
    tok = build_tokenizer(tmp_path / "tok", rows, vocab_size=600)
    assert tok.chat_template == CHATML_TRAINING
    msgs = rows[0]["messages"]
    dsft_text = tok.apply_chat_template(msgs, tokenize=False, chat_template=TEMPLATES["chatml"])
    assert tok.apply_chat_template(msgs, tokenize=False) == dsft_text
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert 0 < sum(out["assistant_masks"]) < len(out["input_ids"])


def test_mfu_formula_is_dsft_flop_counter() -> None:
    """The TRL runner's token and segment counts give the FLOPs dsft's counter gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft.data.collate import collate
    from dsft.data.packing import collate_packed
    from dsft.data.tokenize import Tokenized
    from dsft.flops import FlopCounter
    from dsft.model import count_params

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    n = count_params(LlamaForCausalLM(config))[0]
    assert _param_count(config) == n
    counter = FlopCounter(n, n, config, 989e12)
    ex = [Tokenized(list(range(1, k + 1)), list(range(1, k + 1))) for k in (5, 17, 9, 30)]
    tokens, sq = 61, 25 + 289 + 81 + 900
    assert counter.flops(tokens, sq) == 6 * n * tokens + 12 * 3 * 32 * sq
    # dsft's padded and packed batches report the real lengths, not the padded width
    assert int(collate(ex, 0)["lengths"].sum()) == tokens
    packed = collate_packed([ex[:2], ex[2:]], 0)["lengths"]
    assert int(packed.sum()) == tokens and int((packed**2).sum()) == sq
    scalars = counter.scalars(tokens, sq, 2.0)
    assert math.isclose(scalars["mfu"], counter.flops(tokens, sq) / 2.0 / 989e12)

    pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from benchmarks.trl_run import segment_lengths

    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in ex]
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(feats)
        lengths = segment_lengths(batch)
        assert int(lengths.sum()) == tokens and int((lengths**2).sum()) == sq
    # TRL's packed rows (bfd) carry seq_lengths; flattened, each segment counts on its own
    packed_feats = [
        {"input_ids": ex[0].input_ids + ex[1].input_ids, "seq_lengths": [5, 17]},
        {"input_ids": ex[2].input_ids + ex[3].input_ids, "seq_lengths": [9, 30]},
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(packed_feats)
    lengths = segment_lengths(batch)
    assert lengths.tolist() == [5, 17, 9, 30]
    assert isinstance(lengths, torch.Tensor)


def _bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "bench", "--out", str(tmp_path / "b"), *args],
        env=cpu_env(threads=CORES),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / "b" / "bench.json").read_text()), proc.stdout


def _check_figures(result: dict, mfu: bool) -> None:
    skipped = {"val_loss"} if not result["settings"].get("val_loss", True) else set()
    for s in SYSTEMS:
        m = result["medians"][s]
        for k in FIGURES:
            if (k == "mfu" and not mfu) or k in skipped:
                continue
            assert isinstance(m[k], float) and math.isfinite(m[k]), (s, k, m[k])
        assert m["tokens_per_s"] > 0 and m["startup_s"] > 0 and m["peak_mem_gb"] > 0
        assert len(result["runs"][s]) == result["settings"]["repeats"]
    for ratio in ("dsft / trl-default", "dsft / trl-best", "dsft-packed / trl-best"):
        assert result["ratios"][ratio]["tokens_per_s"] > 0
    env = result["environment"]
    for pkg in ("torch", "transformers", "deepspeed", "trl", "peft", "datasets"):
        assert env["versions"][pkg]
    assert env["device"]


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_bench_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    result, out = _bench(
        tmp_path,
        *("--mode", "cpu", "--steps", "5", "--skip-steps", "2", "--repeats", "1"),
        *("--prep-examples", "300", "--train-examples", "400", "--no-warmup"),
        *("--peak-tflops", "0.05"),
    )
    _check_figures(result, mfu=True)
    assert result["settings"]["nproc"] == 2 and result["settings"]["precision"] == "fp32"
    prep = result["prep"]
    assert prep["dsft"] > 0 and prep["trl"] > 0 and prep["tokens_identical"]
    assert "| **dsft / trl-default** |" in out and "×" in out and "MFU = (6·N·T" in out
    assert (tmp_path / "b" / "bench.md").read_text().strip() == result["table"].strip()


def test_vlm_bench_gives_trl_the_rows_dsft_trains_on(tmp_path: Path) -> None:
    """dsft bench --mode vlm (its one cheap check, no training): TRL's prompt-completion rows
    render to the very text of dsft's rows, image and answer included."""
    import argparse

    from transformers import AutoProcessor
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    from benchmarks.vlm import VlmBench

    ns = argparse.Namespace(out=str(tmp_path), micro_batch=2, grad_accum=1, nproc=1,
                            train_examples=6, jitter=20)  # fmt: skip
    bench = VlmBench(ns)
    bench.build_inputs()
    proc = AutoProcessor.from_pretrained(bench.model_dir)
    dsft_rows = [json.loads(x) for x in bench.data.read_text().splitlines()]
    trl_rows = [json.loads(x) for x in bench.trl_data.read_text().splitlines()]
    assert len(dsft_rows) == len(trl_rows) == 6
    for ours, theirs in zip(dsft_rows, trl_rows, strict=True):
        (image,) = theirs["images"]
        assert Path(image).is_file()
        text = proc.apply_chat_template(ours["messages"], tokenize=False)
        theirs["prompt"] = prepare_multimodal_messages(theirs["prompt"], images=[image])
        rendered = apply_chat_template(theirs, proc)
        assert rendered["prompt"] + rendered["completion"] == text
