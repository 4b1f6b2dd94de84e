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
def test_two_ranks_zero3_equal_one_rank(tiny_model: Path, pairs: Path, tmp_path: Path) -> None:
    """Precomputed references under ZeRO-3 on 2 ranks (each rank's share, assembled by one
    all-reduce), micro-batch 1 x accumulation 2: every step's loss, rewards, log-probs and
    gradient norm, and the validation rewards, equal one process at ZeRO-0 with micro-batch
    4 (the same 4 pairs per step)."""
    runs = {}
    for name, nproc, stage, micro, accum in (("one", 1, 0, 4, 1), ("two", 2, 3, 1, 2)):
        out = tmp_path / name
        tree = dpo_config(
            tiny_model,
            pairs,
            out,
            train={"micro_batch": micro, "grad_accum": accum},
            deepspeed={"zero_stage": stage},
            data={"cache_dir": str(tmp_path / f"cache_{name}")},  # each computes its own
        )
        cfg = write_config(tmp_path / f"{name}.yaml", tree)
        assert run_dsft(["train", str(cfg)], nproc=nproc).returncode == 0
        runs[name] = (train_rows(out), read_summary(out)["after"]["val"])
    (one, one_val), (two, two_val) = runs["one"], runs["two"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for k in METRICS:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    for k in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert one_val[k] == pytest.approx(two_val[k], rel=1e-5, abs=1e-6), k


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
