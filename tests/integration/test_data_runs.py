"""Data features in real runs: packed training resumes exactly, k-fold CV, `data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.cli import main

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config


def _packed(model: Path, data: Path, out: Path) -> dict:
    return base_config(
        model,
        data,
        out,
        data={"packing": True, "max_len": 96},
        deepspeed={"zero_stage": 2},
        train={"max_steps": 8, "micro_batch": 2},
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 3, "keep_last": 1, "export": False},
        logging={"every": 1},
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_packed_run_resumes_exactly(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    cfg = write_config(tmp_path / "a.yaml", _packed(tiny_model, tiny_data, straight))
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    stats = read_summary(straight)["data"]
    # rows of 96 tokens hold ~3-4 examples; best-fit leaves few slots empty
    assert stats["packed_rows"] < stats["train"] / 2
    assert stats["packing_efficiency"] > 0.85

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "b.yaml", _packed(tiny_model, tiny_data, out))
    killed = run_dsft(["train", str(cfg)], nproc=2, env={"DSFT_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    a = {r["step"]: r["loss"] for r in train_rows(straight)}
    b = {r["step"]: r["loss"] for r in train_rows(out)}
    assert all(b[s] == a[s] for s in range(4, 9))  # the same packed rows, in the same order


@pytest.mark.slow
def test_kfold_cross_validation(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    tree = base_config(
        tiny_model,
        tiny_data,
        out,
        data={"kfold": 3},
        train={"max_steps": 3},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    proc = run_dsft(["train", str(cfg)])
    assert proc.returncode == 0
    assert "| mean ± std |" in proc.stdout
    cv = json.loads((out / "cv.json").read_text())
    assert len(cv["folds"]) == 3
    losses = [f["loss"] for f in cv["folds"]]
    assert cv["mean_std"]["loss"]["mean"] == pytest.approx(sum(losses) / 3)
    assert len(set(losses)) == 3  # three different validation folds
    vals = [read_summary(out / f"fold_{f}")["data"]["val"] for f in range(3)]
    tests = {read_summary(out / f"fold_{f}")["data"]["test"] for f in range(3)}
    assert len(tests) == 1  # one test split shared by all folds
    assert sum(vals) == 200 - tests.pop()  # the folds partition the rest
    again = run_dsft(["train", str(cfg)])  # finished folds are not run again
    assert again.returncode == 0 and again.stdout.count("already done") == 3


def test_data_inspect(tiny_model: Path, tiny_data: Path, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in tiny_data.read_text().splitlines()]
    rows.append({"instruction": "broken"})  # no output: skipped under on_bad_row=skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tasks.parquet")
    tree = base_config(tiny_model, tmp_path / "tasks.parquet", tmp_path / "o")
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert main(["data", "inspect", str(cfg), "data.on_bad_row=skip", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "<|assistant|>[[" in out and "<|end|>]]" in out  # the response is marked trained
    assert "rows read            201 (1 skipped" in out and "tasks.parquet:row 201" in out
    assert "train length         p50" in out and "would fill" in out
    assert main(["data", "inspect", str(cfg)]) == 2  # without skip: the bad row is an error
    assert "tasks.parquet:row 201" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_prepare_several_chunks_with_a_real_bpe_tokenizer(tmp_path: Path) -> None:
    """The data-prep hang: 2 ranks, ~2.4 MB of chat rows (three 1 MB prep chunks, so the
    forked worker pool runs), a byte-level BPE tokenizer, the cache on. It hung in the
    pool's shutdown every time before the workers dropped the stop handlers."""
    from benchmarks.chat_data import build_tokenizer, generate_rows, write_jsonl
    from dsft.synthetic import build_model_dir

    rows = generate_rows(2600, seed=0)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert data.stat().st_size > 2 << 20  # several 1 MB chunks
    tok = build_tokenizer(tmp_path / "tok", rows[:500], vocab_size=1024)
    model = build_model_dir(tmp_path / "model", hidden=32, layers=1, tokenizer=tok)
    tree = base_config(
        model,
        data,
        tmp_path / "run",
        data={"max_len": 64, "val_fraction": 0.01, "test_fraction": 0.0, "workers": 2},
        train={"max_steps": 2, "grad_accum": 1},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    proc = run_dsft(["train", str(cfg)], nproc=2, timeout=300)
    assert proc.returncode == 0
    assert read_summary(tmp_path / "run")["data"]["train"] > 500
