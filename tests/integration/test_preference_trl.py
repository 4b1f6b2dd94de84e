"""TRL as the oracle: dsft's DPO-family steps equal TRL's trainers' on the same work.

Same tiny model, same pairs in file order, batch 4, constant LR, torch AdamW, fp32, one
process at ZeRO-0: per step, the loss, the rewards, the log-probs and the gradient norm
agree to 1e-5 (relative), for DPO's sigmoid, ipo and hinge losses (trl.DPOTrainer with
precomputed references, as dsft's default) and SimPO (trl's CPOTrainer, loss_type=simpo).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.trl_dpo import run_trl
from dsft.data.split import carve_arrays
from dsft.synthetic import generate_preference_pairs, write_tasks

from ..conftest import base_config, run_dsft, train_rows, write_config

STEPS, BATCH, LR = 3, 4, 1e-3
KEYS = {  # dsft's metric: TRL's
    "loss": "loss",
    "grad_norm": "grad_norm",
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margin": "rewards/margins",
    "rewards/accuracy": "rewards/accuracies",
    "logps/chosen": "logps/chosen",
    "logps/rejected": "logps/rejected",
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The pairs for dsft, and the same in dsft's training order for TRL (dsft's split
    shuffles once with data.split_seed even without a validation split)."""
    rows = generate_preference_pairs(BATCH * STEPS, seed=5)
    d = tmp_path_factory.mktemp("pairs")
    write_tasks(d / "pairs.jsonl", rows)
    order, _, _ = carve_arrays(len(rows), 0, 0, seed=0)
    write_tasks(d / "in_order.jsonl", [rows[i] for i in order])
    return d / "pairs.jsonl", d / "in_order.jsonl"


def dsft_config(model: Path, data: Path, out: Path, loss_type: str, **pref: float) -> dict:
    return base_config(
        model,
        data,
        out,
        data={"val_fraction": 0.0, "test_fraction": 0.0, "shuffle": False},
        train={
            "objective": "dpo",
            "max_steps": STEPS,
            "micro_batch": BATCH,
            "grad_accum": 1,
            "lr": LR,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1e6,  # reported, never clipping (the two clip formulas differ)
        },
        preference={"loss_type": loss_type, **pref},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1, "report_to": []},
    )


def compare(dsft_rows: list[dict], trl_rows: list[dict], keys: dict[str, str]) -> float:
    assert len(dsft_rows) == len(trl_rows) == STEPS
    worst = 0.0
    for step, (d, t) in enumerate(zip(dsft_rows, trl_rows, strict=True), 1):
        for ours, theirs in keys.items():
            a, b = float(d[ours]), float(t[theirs])
            err = abs(a - b) / max(1.0, abs(b))
            worst = max(worst, err)
            assert err < 1e-5, f"step {step} {ours}: dsft {a!r} vs TRL {b!r}"
    return worst


@pytest.mark.parametrize(
    "loss_type,pref",
    [
        ("sigmoid", {"beta": 0.1}),
        pytest.param("ipo", {"beta": 0.5}, marks=pytest.mark.slow),
        pytest.param("hinge", {"beta": 0.3}, marks=pytest.mark.slow),
        pytest.param("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, marks=pytest.mark.slow),
    ],
)
def test_steps_equal_trl(tiny_model: Path, pairs, tmp_path: Path, loss_type, pref) -> None:
    ours_data, trl_data = pairs
    cfg = write_config(
        tmp_path / "c.yaml",
        dsft_config(tiny_model, ours_data, tmp_path / "run", loss_type, **pref),
    )
    assert run_dsft(["train", str(cfg)]).returncode == 0
    ours = train_rows(tmp_path / "run")
    extra = {k: v for k, v in pref.items() if k != "beta"}
    theirs = run_trl(
        tiny_model,
        trl_data,
        tmp_path / "trl",
        loss_type=loss_type,
        beta=pref["beta"],
        steps=STEPS,
        batch=BATCH,
        lr=LR,
        **extra,
    )["rows"]
    keys = dict(KEYS)
    if loss_type == "simpo":  # CPOTrainer logs per-token mean log-probs; dsft logs sums
        del keys["logps/chosen"], keys["logps/rejected"]
    worst = compare(ours, theirs, keys)
    print(f"{loss_type}: worst relative difference to TRL over {STEPS} steps: {worst:.2e}")
