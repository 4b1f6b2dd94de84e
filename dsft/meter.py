"""What the training loop counts between log lines and validations: the token-weighted loss,
the tokens and seconds of the steps, the bad-step guard, and the objective's own metrics."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from dsft import distributed
from dsft.errors import TrainingDiverged
from dsft.flops import FlopCounter
from dsft.step import StepResult

log = logging.getLogger("dsft")


@dataclass
class StepMeter:
    """Sums of the steps since the last log line (and since the last validation)."""

    flops: FlopCounter
    precision: str  # train.precision: fp16 overflows are the loss scaler's business
    max_bad_steps: int  # train.max_bad_steps: this many bad steps in a row end the run (0: never)
    loss_sum: float = 0.0  # global summed NLL / target count since the last log line
    targets: float = 0.0
    val_loss_sum: float = 0.0  # ... since the last validation (for the train/val gap)
    val_targets: float = 0.0
    tokens: int = 0  # this rank's real tokens since the last log line (and their squares)
    sq_tokens: int = 0
    patches: int = 0  # ... image patches (a multimodal tower's FLOPs) and their squares
    sq_patches: int = 0
    seconds: float = 0.0  # time spent in training steps since the last log line
    bad_steps: int = 0
    bad_in_a_row: int = 0
    grad_norm: float | None = None  # the last step's own norm (ZeRO-0 fp32)
    metrics: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    good_steps: int = 0  # good steps since the last log line (the metrics' denominator)

    def add(self, step: int, r: StepResult, seconds: float) -> None:
        """Count one step. A step is bad when its global loss is not finite or DeepSpeed
        skipped it for non-finite gradients (fp16 overflows are the loss scaler's business).
        Bad steps update nothing; too many in a row end the run (TrainingDiverged)."""
        self.tokens += r.tokens
        self.sq_tokens += r.sq_tokens
        self.patches += r.patches
        self.sq_patches += r.sq_patches
        self.grad_norm = r.grad_norm
        if not math.isfinite(r.loss) or (r.skipped and self.precision != "fp16"):
            self.bad_steps += 1
            self.bad_in_a_row += 1
            log.warning(
                "step %d skipped: non-finite loss or gradient norm (%d in a row)",
                step,
                self.bad_in_a_row,
            )
            if self.max_bad_steps and self.bad_in_a_row >= self.max_bad_steps:
                raise TrainingDiverged(
                    f"stopped at step {step}: {self.bad_in_a_row} steps in a row had a non-finite "
                    "loss or gradient norm (all skipped, weights untouched); lower train.lr, "
                    "check the data, or raise train.max_bad_steps"
                )
        else:
            self.bad_in_a_row = 0
            self.loss_sum += r.loss * r.targets
            self.targets += r.targets
            self.val_loss_sum += r.loss * r.targets
            self.val_targets += r.targets
            self.good_steps += 1
            for k, v in r.metrics.items():
                self.metrics[k] += v
        self.seconds += seconds

    def scalars(self, steps: int, engine: Any) -> dict[str, float]:
        """The log line's scalars over the last ``steps`` steps (all ranks call this: the
        token counts are summed over them); resets the log-line sums."""
        tokens, sq_tokens, patches, sq_patches = distributed.all_reduce_sum(
            [self.tokens, self.sq_tokens, self.patches, self.sq_patches]
        ).tolist()
        norm = engine.ds.get_global_grad_norm()
        if norm is None:  # ZeRO-0 fp32: DeepSpeed keeps no norm, the step took its own
            norm = self.grad_norm if self.grad_norm is not None else float("nan")
        scalars = {
            # token-weighted mean over the good steps since the last log line
            "loss": self.loss_sum / self.targets if self.targets else float("nan"),
            "epoch": engine.state.epoch,
            **{f"lr/{g['name']}": g["lr"] for g in engine.optimizer.param_groups},
            "grad_norm": float(norm),
            "step_time": self.seconds / steps,
            # real (non-pad) tokens of all ranks per second of training steps
            "tokens_per_s": tokens / max(self.seconds, 1e-9),
            "skipped_steps": engine.ds.skipped_steps,
            "bad_steps": self.bad_steps,
            **self.flops.scalars(tokens, sq_tokens, self.seconds, patches, sq_patches),
            # the objective's own metrics: means over the good steps
            **{k: v / max(self.good_steps, 1) for k, v in self.metrics.items()},
        }
        if self.precision == "fp16":
            scalars["loss_scale"] = float(getattr(engine.ds.optimizer, "cur_scale", "nan"))
        if torch.cuda.is_available():
            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.loss_sum = self.targets = self.seconds = 0.0
        self.tokens = self.sq_tokens = self.patches = self.sq_patches = self.good_steps = 0
        self.metrics.clear()
        return scalars

    def val_train_loss(self) -> float | None:
        """The token-weighted train loss since the last validation (for the train/val gap);
        resets it."""
        loss = self.val_loss_sum / self.val_targets if self.val_targets else None
        self.val_loss_sum = self.val_targets = 0.0
        return loss
