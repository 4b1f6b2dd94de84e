"""From the typed config to the DeepSpeed JSON.

The DeepSpeed config is *derived* here and nowhere else: batch geometry comes
from :func:`dsft.config.batch_plan`, precision and clipping from ``train``,
sharding from ``deepspeed``. Users never hand-write a DeepSpeed JSON for dsft.
(The memory-based choice of ZeRO stage and micro-batch will also live here.)
"""

from __future__ import annotations

from typing import Any

from dsft.config import BatchPlan, Config


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` at the given batch geometry."""
    ds, t = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if ds.zero_stage == 3:
        # Gathering 16-bit weights on save lets export work without zero_to_fp32.
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        # DeepSpeed's own default is 1.0; 0 means off, and we always say which.
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": ds.loss_scale_window,
            "min_loss_scale": ds.min_loss_scale,
        },
        # dsft builds torch's AdamW itself (fused on CUDA); DeepSpeed supports it at
        # every ZeRO stage but asks for this flag. Offload needs DeepSpeed's CPU Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # dsft logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def write_presets(directory: str) -> None:
    """Regenerate ``ds_configs/zero{0..3}.json`` from dsft's defaults (one GPU, no overrides)."""
    import dataclasses
    import json
    from pathlib import Path

    from dsft.config import DeepSpeedConfig, batch_plan

    for stage in range(4):
        cfg = dataclasses.replace(Config(), deepspeed=DeepSpeedConfig(zero_stage=stage))
        text = json.dumps(deepspeed_config(cfg, batch_plan(cfg.train, 1)), indent=2) + "\n"
        (Path(directory) / f"zero{stage}.json").write_text(text)


if __name__ == "__main__":
    import sys

    write_presets(sys.argv[1] if len(sys.argv) > 1 else "ds_configs")
