"""Rank-0 reporting: metrics.jsonl, the experiment trackers of ``logging.report_to``
(TensorBoard, Weights & Biases, MLflow), log lines, progress bar.

Every method is a no-op on ranks other than 0, so the training loop can call
them unconditionally. A tracker that cannot be imported or reached (or fails later) is
dropped with a warning: reporting never stops training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dsft import distributed as dist
from dsft import profiling
from dsft.config import LoggingConfig
from dsft.flops import peak_flops

log = logging.getLogger("dsft")


class Monitor:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` under the run directory."""

    def __init__(
        self,
        out_dir: Path,
        cfg: LoggingConfig,
        total_steps: int,
        resume_step: int = 0,
        config: dict[str, Any] | None = None,
    ):
        self.main = dist.is_main()
        self.trackers: list[Tracker] = []
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
        self.trackers = open_trackers(out_dir, cfg, resume_step, config or {})
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
        self._each("scalars", step, {f"{prefix}/{k}": v for k, v in nums.items()})
        row = {"step": step, "split": prefix, "time": round(time.time() - self.start, 3), **nums}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def hparams(self, config: dict[str, Any], final: dict[str, Any]) -> None:
        """The run's settings next to its final metrics (TensorBoard's HPARAMS tab, the W&B
        summary, MLflow metrics ``final/...``)."""
        if not self.main:
            return
        metrics = {
            f"final/{k}": float(v)
            for k, v in _flatten(final).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._each("final", config, metrics)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.main:
            self._each("text", step, tag, text)

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a tracker's failure (network, disk) must not stop training
                log.warning(
                    "%s failed (%s: %s); no longer reporting to it", t.name, type(e).__name__, e
                )
                self.trackers.remove(t)
                with contextlib.suppress(Exception):
                    t.close()

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
        self._each("close")
        self.trackers = []
        self.jsonl.close()


def _flatten(
    tree: dict[str, Any], prefix: str = "", sep: str = "/", lists: bool = False
) -> dict[str, Any]:
    """Nested dicts as one level of ``a/b/c`` keys (lists left out unless ``lists``)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}{sep}", sep, lists))
        elif lists or not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- trackers


class Tracker:
    """One experiment tracker: scalars by step, the config and final metrics, texts."""

    name = "tracker"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def final(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The resolved config next to the final metrics, at the end of the run."""

    def text(self, step: int, tag: str, text: str) -> None:
        """A text sample (only TensorBoard shows them; predictions are files anyway)."""

    def close(self) -> None:
        """Flush and end the run."""


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, out_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the dead run's events after the checkpoint in TensorBoard
        self.writer = SummaryWriter(
            log_dir=str(out_dir / "tensorboard"),
            purge_step=resume_step + 1 if resume_step else None,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def final(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        flat = _flatten(config)
        hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        self.writer.add_hparams(hp, metrics, run_name=".")

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """Weights & Biases. Offline (a run directory under <output_dir>/wandb, `wandb sync` it
    later) unless WANDB_MODE says otherwise or WANDB_API_KEY is set."""

    name = "wandb"

    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_id: str | None, config: dict) -> None:
        import wandb

        for key in ("WANDB_MODE", "WANDB_API_KEY"):  # set but empty means unset (wandb rejects it)
            if os.environ.get(key) == "":
                del os.environ[key]
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or cfg.project,
            group=cfg.group or None,
            name=cfg.run_name or out_dir.resolve().name,
            dir=str(out_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )
        self.id = self.run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def final(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    """MLflow through its client: the tracking URI from MLFLOW_TRACKING_URI, else a local
    file store in <output_dir>/mlruns; experiment = logging.group (a sweep) or project."""

    name = "mlflow"

    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_id: str | None, config: dict) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store behind this opt-in; it needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.group or cfg.project
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            tags = {"group": cfg.group} if cfg.group else {}
            run = self.client.create_run(
                exp_id, run_name=cfg.run_name or out_dir.resolve().name, tags=tags
            )
            run_id = run.info.run_id
            params = [
                Param(k, str(v)[:6000]) for k, v in _flatten(config, sep=".", lists=True).items()
            ]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.id, metrics=metrics)

    def final(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        self.scalars(0, metrics)

    def close(self) -> None:
        self.client.set_terminated(self.id)


TRACKERS_FILE = "trackers.json"  # the W&B / MLflow run ids, so a resumed run continues them


def open_trackers(
    out_dir: Path, cfg: LoggingConfig, resume_step: int, config: dict[str, Any]
) -> list[Tracker]:
    """The trackers of ``logging.report_to`` that could be started (the others warn)."""
    ids_path = out_dir / TRACKERS_FILE
    ids: dict[str, str] = {}
    if resume_step and ids_path.is_file():
        ids = json.loads(ids_path.read_text())
    out: list[Tracker] = []
    for name in cfg.report_to:
        try:
            if name == "tensorboard":
                out.append(TensorBoard(out_dir, resume_step))
            elif name == "wandb":
                out.append(WandB(out_dir, cfg, ids.get(name), config))
            else:
                out.append(MLflow(out_dir, cfg, ids.get(name), config))
        except ImportError:
            extra = "mlflow-skinny" if name == "mlflow" else name
            log.warning(
                "logging.report_to: %s is not installed (pip install %s, or dsft[trackers]); "
                "not reporting to it",
                name,
                extra,
            )
        except Exception as e:  # unreachable server, bad credentials, full disk
            log.warning(
                "logging.report_to: could not start %s (%s: %s); not reporting to it",
                name,
                type(e).__name__,
                e,
            )
    ids.update({t.name: t.id for t in out if hasattr(t, "id")})
    if ids:
        ids_path.write_text(json.dumps(ids))
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
        trace = self.folder / "trace.json"
        prof.export_chrome_trace(str(trace))
        # the kernel table (dsft.profiling): categories as shares of the step, top kernels
        try:
            kernels = profiling.kernel_table(profiling.load_trace(trace))
            (self.folder / "kernels.json").write_text(json.dumps(kernels.to_json(), indent=2))
            head = kernels.markdown(f"{self.steps} profiled optimizer steps (rank 0)") + "\n"
        except (ValueError, KeyError, OSError) as e:
            head = f"# Top kernels\n\n(no kernel table: {e})\n\n"
        text = (
            f"{head}## torch.profiler's key averages, by "
            f"{'device' if self.cuda else 'CPU'} self time\n\n```\n{table}\n```\n"
        )
        (self.folder / "top_kernels.md").write_text(text)
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        log.info("profile of %d steps: %s", self.steps, self.folder / "top_kernels.md")
