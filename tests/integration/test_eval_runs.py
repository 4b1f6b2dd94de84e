"""Evaluation on real runs: rank-count invariance, dsft eval, early stopping, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _eval_config(model: Path, data: Path, out: Path, stage: int) -> dict:
    # 25 validation and 21 test examples: divisible by neither 2 nor 3.
    return base_config(
        model,
        data,
        out,
        data={"val_fraction": 0.125, "test_fraction": 0.105},
        deepspeed={"zero_stage": stage},
        eval={"max_generate": 0, "max_new_tokens": 5, "micro_batch": 4},
    )


def test_eval_identical_on_one_two_three_ranks(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    results, preds = {}, {}
    for nproc in (1, 2, 3):
        out = tmp_path / f"eval{nproc}"
        cfg = write_config(
            tmp_path / f"c{nproc}.yaml",
            _eval_config(tiny_model, tiny_data, tmp_path / "run", 0 if nproc == 1 else 3),
        )
        proc = run_dsft(
            ["eval", str(cfg), "--checkpoint", str(tiny_model), "--out", str(out)], nproc=nproc
        )
        assert proc.returncode == 0
        results[nproc] = json.loads((out / "results.json").read_text())
        lines = (out / "predictions" / "test_step0.jsonl").read_text().splitlines()
        preds[nproc] = [json.loads(x) for x in lines]
    one = results[1]
    assert one["val"]["examples"] == 25 and one["test"]["examples"] == 21
    assert one["test_generation"]["examples"] == 21
    assert [p["index"] for p in preds[1]] == list(range(21))  # each example once, in order
    for n in (2, 3):
        r = results[n]
        for split in ("val", "test"):
            assert r[split]["tokens"] == one[split]["tokens"]
            assert r[split]["loss"] == pytest.approx(one[split]["loss"], rel=1e-5)
            assert r[split]["token_acc"] == pytest.approx(one[split]["token_acc"], rel=1e-9)
        for k in ("exact_match", "f1", "examples"):
            assert r["test_generation"][k] == one["test_generation"][k]
        # greedy decoding of the same model: the same text, sharded and gathered
        assert [p["prediction"] for p in preds[n]] == [p["prediction"] for p in preds[1]]


def test_early_stopping_best_model_and_tensorboard(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """min_delta no later evaluation can beat: best at the first, stop `patience` later."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            train={"max_steps": 20},
            eval={"every": 2, "patience": 2, "min_delta": 100.0},
            logging={"every": 1, "peak_tflops": 1.0},
        ),
    )
    assert run_dsft(["train", str(cfg)]).returncode == 0
    s = read_summary(out)
    assert s["early_stopped"] is True and s["steps"] == 6
    assert s["best"]["step"] == 2 and s["best"]["metric"] == "val/loss"
    assert (out / "best" / "model.safetensors").is_file()
    vals = train_rows(out, "val")
    assert [r["step"] for r in vals] == [0, 2, 4, 6, 6]  # before, 3 periodic, final
    assert all("gap" in r for r in vals[1:4])  # periodic ones: val loss - recent train loss
    assert (out / "predictions" / "test_step6.jsonl").is_file()

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss", "train/grad_norm", "train/lr/all/decay", "train/lr/all/no_decay",
        "train/tokens_per_s", "train/step_time", "train/tflops", "train/mfu",
        "train/skipped_steps", "train/bad_steps", "val/loss", "val/ppl", "val/token_acc",
        "val/gap", "test/exact_match", "test/f1",
    ):  # fmt: skip
        assert tag in scalars, tag
    assert "test/samples/text_summary" in acc.Tags()["tensors"]
    hparams = EventAccumulator(str(out / "tensorboard"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.summary_metadata


def test_eval_of_a_deepspeed_checkpoint(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", _eval_config(tiny_model, tiny_data, out, 3))
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    trained = read_summary(out)["after"]["val"]
    proc = run_dsft(["eval", str(cfg), "--checkpoint", str(out)], nproc=2)
    assert proc.returncode == 0
    r = json.loads((out / "eval" / "results.json").read_text())
    assert r["kind"] == "deepspeed"
    assert r["val"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    # consolidated weights: the same numbers on another number of ranks and ZeRO stage
    one = run_dsft(["eval", str(cfg), "--checkpoint", str(out), "deepspeed.zero_stage=0"])
    assert one.returncode == 0
    r1 = json.loads((out / "eval" / "results.json").read_text())
    assert r1["val"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
