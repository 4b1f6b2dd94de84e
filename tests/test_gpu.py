"""CUDA paths: fp16 with dynamic loss scaling, bf16, fused AdamW. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import base_config, read_summary, run_dsft, train_rows, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("precision", "lora"), [("fp16", False), ("bf16", False), ("fp16", True), ("bf16", True)]
)
def test_cuda_precisions_converge(
    precision: str, lora: bool, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            model={"lora": {"enabled": lora, "r": 8, "alpha": 16}},
            train={"precision": precision, "max_steps": 30, "lr": 3e-2 if lora else 3e-3},
            deepspeed={"zero_stage": 2},
            logging={"every": 1},
        ),
    )
    assert run_dsft(["train", str(cfg)], gpu=True).returncode == 0
    s = read_summary(out)
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"] - 0.1
    rows = train_rows(out)
    if precision == "fp16":
        # dynamic loss scaling: the scale is logged; early overflows are skipped, not fatal
        assert all(r["loss_scale"] > 0 for r in rows)
        assert rows[-1]["bad_steps"] == 0
