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


@pytest.mark.parametrize("init", ["default", "loftq"])
def test_qlora_trains_resumes_and_exports_the_adapter(
    init: str, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """QLoRA (4-bit NF4 base through bitsandbytes, LoRA on top; LoftQ init too): trains, resumes
    from its checkpoint, and exports the adapter only (merging into a 16-bit base is refused);
    the trainable count equals peft's on the same quantised model."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    tree = base_config(
        tiny_model,
        tiny_data,
        out,
        model={"quantization": "nf4", "lora": {"enabled": True, "r": 8, "alpha": 16, "init": init}},
        train={"precision": "bf16", "max_steps": 4, "lr": 1e-2},
        deepspeed={"zero_stage": 2},
        eval={"generate": False, "before_training": False},
        checkpoint={"export": False},
        logging={"every": 1},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)], gpu=True).returncode == 0
    resumed = run_dsft(["train", str(cfg), "train.max_steps=8", "checkpoint.export=true"], gpu=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert "adapter only" in resumed.stdout + resumed.stderr
    final = out / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert not (final / "config.json").exists()  # no merged model
    assert "Why the adapter only" in (final / "README.md").read_text()
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["loss"] == r["loss"] for r in rows)  # finite

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if init == "default":
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=q)
        ref = get_peft_model(
            prepare_model_for_kbit_training(base),
            PeftLoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.05,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
        want = sum(p.numel() for p in ref.parameters() if p.requires_grad)
        assert read_summary(out)["trainable_params"] == want
