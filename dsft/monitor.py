"""Rank-0 reporting: TensorBoard scalars, metrics.jsonl, log lines, progress bar.

Every method is a no-op on ranks other than 0, so the training loop can call
them unconditionally.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dsft import distributed as dist
from dsft.config import LoggingConfig

log = logging.getLogger("dsft")


class Monitor:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` under the run directory."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, total_steps: int):
        self.main = dist.is_main()
        self.writer = None
        self.bar = None
        self.start = time.time()
        if not self.main:
            return
        self.jsonl = (out_dir / "metrics.jsonl").open("w", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if cfg.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stdout is not a terminal (batch jobs, CI logs)
            self.bar = tqdm(
                total=total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None
            )

    def scalars(self, step: int, prefix: str, values: dict[str, Any]) -> None:
        """Record numeric ``values`` as ``prefix/name`` at ``step``."""
        if not self.main:
            return
        nums = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        if self.writer is not None:
            for k, v in nums.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        row = {"step": step, "split": prefix, "time": round(time.time() - self.start, 3), **nums}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.main and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        """Advance the progress bar; without a terminal (batch jobs) log a line instead."""
        if not self.main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()
        else:
            log.info(
                "step %d | train loss %.4f | lr %.3g | grad norm %.3f", step, loss, lr, grad_norm
            )

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
