"""Preference runs through ``dsft train``: ranks and ZeRO-3, LoRA + packing + resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsft.synthetic import generate_preference_pairs, write_tasks

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

METRICS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_tasks(path, generate_preference_pairs(48, seed=11))
    return path


def dpo_config(model_dir: Path, data_path: Path, out: Path, **sections: dict) -> dict:
    tree = base_config(
        model_dir,
        data_path,
        out,
        data={"val_fraction": 0.1, "test_fraction": 0.0},
        train={"objective": "dpo", "max_steps": 3, "lr": 1e-3, "max_grad_norm": 1e6},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1, "report_to": []},
    )
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


@pytest.mark.slow
def test_one_two_three_ranks_equal(tiny_model: Path, pairs: Path, tmp_path: Path) -> None:
    """The same 6 pairs per step on 1 rank (ZeRO-0, micro-batch 6), 2 ranks (ZeRO-3 with
    precomputed references: each rank's share assembled by one all-reduce; micro-batch 1 x
    accumulation 3) and 3 ranks (ZeRO-3 with the live reference: a second copy of the
    weights, partitioned; micro-batch 2; log-probs through train.fused_loss's chunks): every
    step's loss, rewards, log-probs and gradient norm, and the validation rewards, are equal.
    eval.micro_batch 2 leaves the ranks uneven last batches in the reference pass and in
    validation."""
    runs = {}
    for name, nproc, stage, micro, accum, reference, fused in (
        ("one", 1, 0, 6, 1, "precomputed", False),
        ("two", 2, 3, 1, 3, "precomputed", False),
        ("three", 3, 3, 2, 1, "live", True),
    ):
        out = tmp_path / name
        tree = dpo_config(
            tiny_model,
            pairs,
            out,
            train={"micro_batch": micro, "grad_accum": accum, "fused_loss": fused},
            deepspeed={"zero_stage": stage},
            data={"cache_dir": str(tmp_path / f"cache_{name}")},  # each computes its own
            eval={"micro_batch": 2},
            preference={"reference": reference},
        )
        cfg = write_config(tmp_path / f"{name}.yaml", tree)
        assert run_dsft(["train", str(cfg)], nproc=nproc).returncode == 0
        runs[name] = (train_rows(out), read_summary(out)["after"]["val"])
    one, one_val = runs.pop("one")
    assert len(one) == 3 and one_val["rewards/margin"] != 0.0
    for name, (rows, val) in runs.items():
        assert len(rows) == 3, name
        for a, b in zip(one, rows, strict=True):
            for k in METRICS:
                if k == "rewards/accuracy" and a["step"] == 1:
                    continue  # policy = reference: the sign of round-off, not a metric
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (name, a["step"], k)
        for k in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
            assert one_val[k] == pytest.approx(val[k], rel=1e-5, abs=1e-6), (name, k)


def test_lora_packed_run_resumes_with_stored_reference(
    tiny_model: Path, pairs: Path, tmp_path: Path
) -> None:
    """LoRA (reference = the adapter switched off) with packed pairs; the reference pass is
    stored beside the token cache and a resumed run reuses it; rewards move off zero."""
    out = tmp_path / "run"
    tree = dpo_config(
        tiny_model,
        pairs,
        out,
        model={
            "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
        },
        data={"packing": True},
        train={"max_steps": 4, "micro_batch": 2, "lr": 5e-3},
        checkpoint={"every": 2, "save_final": True},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    first = run_dsft(["train", str(cfg), "train.max_steps=2"])
    assert first.returncode == 0
    assert "reference log-probs of" in first.stderr + first.stdout
    second = run_dsft(["train", str(cfg)])
    assert second.returncode == 0
    log = second.stderr + second.stdout
    assert "resumed from" in log and "reference log-probs reused" in log
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["rewards/margin"] != 0.0
    assert read_summary(out)["data"]["packed_rows"] < read_summary(out)["data"]["train"]
