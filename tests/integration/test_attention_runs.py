"""model.attn_implementation through `dsft train`: auto trains GPT-OSS (no sdpa) with eager
on the CPU, an explicit choice the family lacks is a one-line error, and the varlen path's
cu_seqlens reach the model through DeepSpeed and the fused loss (the same losses as sdpa)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-OSS (attention sinks, sliding-window layers, 4 experts) with the demo's
    tokenizer."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from dsft.synthetic import build_tokenizer

    out = tmp_path_factory.mktemp("gpt-oss") / "m"
    tok = build_tokenizer()
    cfg = GptOssConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GptOssForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(tmp_path: Path, model: Path, data: Path, name: str, **model_keys) -> Path:
    tree = base_config(
        model, data, tmp_path / name,
        model=model_keys,
        data={"packing": True},
        train={"max_steps": 2, "grad_accum": 1, "micro_batch": 2},
        eval={"before_training": False, "generate": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1, "progress": False},
    )  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", tree)


def test_gpt_oss_trains_with_auto_attention_on_cpu(tmp_path: Path, gpt_oss: Path, tiny_data):
    proc = run_dsft(["train", str(_config(tmp_path, gpt_oss, tiny_data, "auto"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["model"]["attn_implementation"] == "eager"  # resolved, and saved so
    rows = train_rows(tmp_path / "auto")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert read_summary(tmp_path / "auto")["steps"] == 2


def test_attention_a_family_lacks_is_one_line(tmp_path: Path, gpt_oss: Path, tiny_data):
    cfg = _config(tmp_path, gpt_oss, tiny_data, "sdpa", attn_implementation="sdpa")
    proc = run_dsft(["train", str(cfg)])
    assert proc.returncode == 2
    assert "GptOssForCausalLM does not support it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_varlen_run_equals_sdpa_run(tmp_path: Path, tiny_model: Path, tiny_data: Path):
    """Two packed runs, fused loss on: varlen (the CPU reference kernel, segments from the
    collated cu_seqlens) and sdpa (the 4-D mask) log the same losses and gradient norms."""
    losses = {}
    for impl in ("varlen", "sdpa"):
        cfg = _config(tmp_path, tiny_model, tiny_data, impl, attn_implementation=impl)
        tree = yaml.safe_load(cfg.read_text())
        tree["train"].update(max_steps=3, fused_loss=True)
        cfg.write_text(yaml.safe_dump(tree))
        proc = run_dsft(["train", str(cfg)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = train_rows(tmp_path / impl)
        losses[impl] = [r["loss"] for r in rows] + [r["grad_norm"] for r in rows]
    assert len(losses["varlen"]) == 6
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-4)
