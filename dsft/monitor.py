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
from dsft.flops import peak_flops

log = logging.getLogger("dsft")


class Monitor:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` under the run directory."""

    def __init__(self, out_dir: Path, cfg: LoggingConfig, total_steps: int, resume_step: int = 0):
        self.main = dist.is_main()
        self.writer = None
        self.bar = None
        self.start = time.time()
        self.peak_flops = peak_flops(cfg.peak_tflops)
        if not self.main:
            return
        path = out_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.is_file():
            # A resumed run continues the record; rows past the checkpoint (written by
            # the run that died) are dropped, as they will be written again.
            kept = [
                r for r in path.read_text().splitlines() if json.loads(r)["step"] <= resume_step
            ]
        path.write_text("".join(r + "\n" for r in kept))
        self.jsonl = path.open("a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the dead run's events after the checkpoint in TensorBoard
            self.writer = SummaryWriter(
                log_dir=str(out_dir / "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )
        if cfg.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stdout is not a terminal (batch jobs, CI logs)
            self.bar = tqdm(
                initial=resume_step,
                total=total_steps,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=None,
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

    def hparams(self, config: dict[str, Any], final: dict[str, Any]) -> None:
        """The run's settings next to its final metrics (TensorBoard's HPARAMS tab)."""
        if not self.main or self.writer is None:
            return
        flat = _flatten(config)
        hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        metrics = {
            f"final/{k}": float(v)
            for k, v in _flatten(final).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.writer.add_hparams(hp, metrics, run_name=".")

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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


class StepProfiler:
    """``logging.profile_steps``: a torch.profiler trace of that many optimizer steps (after
    one skipped and one warm-up step) on rank 0, summarised as the top kernels by device
    time (CPU time without CUDA) in ``<out>/profile/top_kernels.md``, with the raw
    Chrome trace next to it (gzip). A no-op when the option is 0 or on other ranks."""

    def __init__(self, out_dir: Path, steps: int):
        self.prof = None
        self.folder = out_dir / "profile"
        if steps <= 0 or not dist.is_main():
            return
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.steps = steps
        self.prof = torch.profiler.profile(
            activities=acts,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
        )
        self.prof.start()

    def step(self) -> None:
        """Call once per optimizer step."""
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _write(self, prof: Any) -> None:
        import gzip
        import shutil

        self.folder.mkdir(parents=True, exist_ok=True)
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=30)
        except (AttributeError, KeyError):  # older torch: the CUDA name
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
        text = (
            f"# Top kernels of {self.steps} profiled optimizer steps (rank 0), by "
            f"{'device' if self.cuda else 'CPU'} self time\n\n```\n{table}\n```\n"
        )
        (self.folder / "top_kernels.md").write_text(text)
        trace = self.folder / "trace.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        log.info("profile of %d steps: %s", self.steps, self.folder / "top_kernels.md")
