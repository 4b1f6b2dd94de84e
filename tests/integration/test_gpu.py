"""CUDA paths: fp16 with dynamic loss scaling, bf16, fused AdamW, the memory planner's
prediction against the measured peak. Skipped without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

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


def _llama_1b_dir(out: Path) -> Path:
    """A randomly initialised Llama 3.2 1B shape with the demo's tokenizer (no download)."""
    from dsft.planner import SHAPES
    from dsft.synthetic import build_model_dir

    return build_model_dir(out, shape=SHAPES["llama-1b"], dtype=torch.bfloat16)


def test_planner_predicts_peak_memory_of_a_1b_llama(tmp_path: Path) -> None:
    """The planner's choice for a ~1B Llama runs on this GPU, and its predicted peak is within
    15 % of torch.cuda.max_memory_allocated (the CUDA-context allowance, invisible to the
    allocator, taken off the prediction). The numbers are written to memory_check.json."""
    import json
    import random

    from dsft.planner import CONTEXT_BYTES

    model = _llama_1b_dir(tmp_path / "llama-1b")
    rng = random.Random(0)
    data = tmp_path / "long.jsonl"
    with data.open("w") as f:  # every example fills max_len (the planner's worst case)
        for _ in range(400):
            text = "".join(rng.choice("abcdefghij") for _ in range(700))
            f.write(json.dumps({"instruction": "Copy", "input": text, "output": text}) + "\n")
    out = tmp_path / "run"
    tree = base_config(
        model,
        data,
        out,
        data={"max_len": 1024, "val_fraction": 0.01, "test_fraction": 0.01},
        train={"max_steps": 3, "micro_batch": "auto", "global_batch": 16, "precision": "bf16"},
        deepspeed={"zero_stage": "auto"},
        eval={"before_training": False, "generate": False, "micro_batch": 1},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)], gpu=True).returncode == 0
    plan = json.loads((out / "plan.json").read_text())
    measured = train_rows(out)[-1]["gpu_mem_gb"] * 2**30  # peak over the training steps
    predicted = plan["predicted_gpu_bytes"] - CONTEXT_BYTES
    error = (predicted - measured) / measured
    check = {
        "choice": f"ZeRO-{plan['zero_stage']}",
        "micro_batch": plan["micro_batch"],
        "grad_accum": plan["grad_accum"],
        "predicted_gib": predicted / 2**30,
        "measured_gib": measured / 2**30,
        "relative_error": error,
        "gpu": torch.cuda.get_device_name(),
    }
    # benchmarks/gpu_check.sh collects it from DSFT_CHECK_OUT
    folder = Path(os.environ.get("DSFT_CHECK_OUT") or tmp_path)
    (folder / "memory_check.json").write_text(json.dumps(check, indent=2))
    print("planner memory check:", json.dumps(check))
    assert abs(error) < 0.15, check
