"""Mixtures of experts train end to end: full and LoRA, one rank and two ranks at ZeRO-3
(whose ranks route their different data to different experts), router loss logged, export
reloaded (dsft's export compares the reloaded model's logits with the trained one's).

CI runs the hardest case per family (LoRA, two ranks at ZeRO-3, packed rows); the whole
matrix: ``DSFT_MOE_RUNS=full-1,lora-1,full-z3,lora-z3``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from dsft.synthetic import build_moe_model_dir

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# family -> whether transformers gives it a router aux loss (DeepSeek-V3: bias balancing)
FAMILIES = {"qwen3_moe": True, "mixtral": True, "gpt_oss": True, "deepseek_v3": False}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_family_trains_and_exports(family: str, tiny_data: Path, tmp_path: Path) -> None:
    model_dir = build_moe_model_dir(tmp_path / "model", family)
    # GPT-OSS's attention sinks: eager (until model.attn_implementation=auto picks it)
    attn = {"attn_implementation": "eager"} if family == "gpt_oss" else {}
    runs = {  # (ranks, ZeRO stage, LoRA, packing, fused loss)
        "full-1": (1, 0, False, True, True),
        "lora-1": (1, 0, True, False, False),
        "full-z3": (2, 3, False, False, True),
        "lora-z3": (2, 3, True, True, False),
    }
    for name, (ranks, stage, lora, packing, fused) in runs.items():
        if name not in os.environ.get("DSFT_MOE_RUNS", "lora-z3").split(","):
            continue
        out = tmp_path / name
        cfg = base_config(
            model_dir,
            tiny_data,
            out,
            model={**attn, "lora": {"enabled": lora, "r": 4}},
            data={"packing": packing, "val_fraction": 0.05, "test_fraction": 0.0},
            deepspeed={"zero_stage": stage},
            train={"max_steps": 2, "grad_accum": 2, "micro_batch": 2, "fused_loss": fused},
            eval={"generate": False, "before_training": False, "micro_batch": 8},
            checkpoint={"save_final": False, "export": True},
            logging={"every": 1},
        )
        proc = run_dsft(["train", str(write_config(tmp_path / f"{name}.yaml", cfg))], nproc=ranks)
        assert proc.returncode == 0, f"{family} {name}"
        assert "Traceback" not in proc.stderr
        rows = train_rows(out)
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        if FAMILIES[family]:
            assert all(r["aux_loss"] > 0 for r in rows), rows
            assert read_summary(out)["after"]["val"]["aux_loss"] > 0
        else:
            assert "aux_loss" not in rows[0]
        assert (out / "final" / "config.json").is_file()  # exported, and verified by reloading


def test_router_loss_with_sequence_parallelism(tiny_data: Path, tmp_path: Path) -> None:
    """Two ranks each holding half of every (packed) row train like one rank with the whole
    rows: the router loss is computed on the gathered logits of the rows, gradients flow
    back to both halves. Loss, router loss and gradient norm per step equal the reference's."""
    model_dir = build_moe_model_dir(tmp_path / "model", "qwen3_moe", router_aux_loss_coef=0.1)
    steps = {}
    for name, ranks, sp in (("ref", 1, 1), ("sp2", 2, 2)):
        cfg = base_config(
            model_dir,
            tiny_data,
            tmp_path / name,
            data={"packing": True, "val_size": 8, "test_fraction": 0.0},
            deepspeed={"zero_stage": 2 if ranks > 1 else 0},
            train={"max_steps": 3, "global_batch": 2, "micro_batch": 2, "sequence_parallel": sp},
            eval={"generate": False, "before_training": False},
            checkpoint={"save_final": False, "export": False},
            logging={"every": 1},
        )
        proc = run_dsft(["train", str(write_config(tmp_path / f"{name}.yaml", cfg))], nproc=ranks)
        assert proc.returncode == 0
        steps[name] = train_rows(tmp_path / name)
    assert len(steps["sp2"]) == len(steps["ref"]) == 3
    for a, b in zip(steps["ref"], steps["sp2"], strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
