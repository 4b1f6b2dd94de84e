"""One run per output_dir: the owner lock, a fresh start into an old run, the resume point,
and what a resume may change (docs/long-jobs-guarantees.md).

:func:`open_run` is called by every rank at the start of ``dsft train``; rank 0 does the work
and every rank gets its answer (the checkpoint to resume from) or raises its error:

- ``output_dir`` must be a writable folder (created if missing);
- an owner lock (``<output_dir>/.dsft-owner.lock``, dsft/locks.py) is held for the life of
  the run: a second run into the same folder is refused with the holder's host and pid; a
  lock left by a dead run on this host is taken over;
- ``checkpoint.resume=false`` (``--no-resume``) into a folder that holds a run asks for
  ``checkpoint.overwrite`` (``--overwrite``), which clears the old run's files;
- on resume, the resolved config is compared with the checkpoint's: settings that change
  the meaning of the run (:func:`meaningful`) are refused unless ``checkpoint.allow_changes``
  (``--allow-changes``); the others are logged. ``config.yaml`` stays the first segment's,
  each resume writes ``config.resume-N.yaml``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

from dsft import checkpoint, locks
from dsft import distributed as dist
from dsft.config import Config, config_from_dict, save_config, to_dict
from dsft.errors import CheckpointError, ConfigError

log = logging.getLogger("dsft")

LOCK = ".dsft-owner.lock"
# What a finished or interrupted run leaves in its output_dir (cleared by --overwrite).
RUN_DIRS = ("checkpoints", "best", "final", "tensorboard", "profile", "predictions", "eval")
RUN_FILES = ("summary.json", "metrics.jsonl", "plan.json", "ds_config.json")

# Settings a resume may change: how the run is computed, logged, evaluated and saved, and
# how long it lasts, but not what it learns from and how (data, model, objective, batch,
# schedule, seed). The global batch is compared as a number (micro-batch x accumulation
# x ranks may be refactored freely).
HARMLESS = (
    "output_dir",
    "logging.",
    "eval.",
    "checkpoint.",
    "deepspeed.",
    "data.workers",
    "data.cache",
    "data.cache_dir",
    "data.wait_timeout",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch",
    "train.grad_accum",
    "train.global_batch",
    "train.sequence_parallel",
    "train.fused_loss",
    "train.max_bad_steps",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.compile",
    "model.kernels",
    "model.tiled_mlp",
    "model.trust_remote_code",
)

_held: set[Path] = set()


def _release() -> None:
    for lock in list(_held):
        if locks.owner(lock) == f"{socket.gethostname()}:{os.getpid()}":
            lock.with_suffix(".job").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        _held.discard(lock)


atexit.register(_release)


def _same_slurm_job(lock: Path) -> bool:
    """The lock was taken by an earlier run of this Slurm job (requeued, maybe on another
    node after a crash: its lock cannot be judged stale from here)."""
    job = os.environ.get("SLURM_JOB_ID")
    try:
        return bool(job) and lock.with_suffix(".job").read_text().strip() == job
    except OSError:
        return False


def acquire(out: Path) -> None:
    """Hold ``out``'s owner lock until this process exits; refuse a folder in use."""
    lock = out / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    if lock in _held and locks.owner(lock) == me:
        return
    took = locks.take(lock)
    if not took and _same_slurm_job(lock):
        log.info(
            "taking over the lock of an earlier run of Slurm job %s", os.environ["SLURM_JOB_ID"]
        )
        lock.unlink(missing_ok=True)
        took = locks.take(lock)
    if not took:
        raise CheckpointError(
            f"output_dir {out} is in use by another dsft run (process {locks.owner(lock)}); "
            "wait for it to end or choose another output_dir. If that process is gone (a "
            f"crashed node), remove {lock}"
        )
    job = lock.with_suffix(".job")
    if os.environ.get("SLURM_JOB_ID"):
        job.write_text(os.environ["SLURM_JOB_ID"])
    else:
        job.unlink(missing_ok=True)
    _held.add(lock)


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a previous run's checkpoints, metrics or summary."""
    ckpts = out / "checkpoints"
    return (
        any(ckpts.glob("step_*"))
        or (ckpts / "latest").exists()
        or any((out / f).exists() for f in ("summary.json", "metrics.jsonl"))
    )


def clear(out: Path) -> None:
    """Remove an old run's files from ``out`` (``--overwrite``); other files stay."""
    for d in RUN_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
    for f in [*RUN_FILES, *(p.name for p in out.glob("config.resume-*.yaml"))]:
        (out / f).unlink(missing_ok=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key: (saved, now)`` for every setting that differs (saved normalised through
    today's schema, so a field added since is at its default, not a difference)."""
    with contextlib.suppress(ConfigError):  # a field removed since: compare as saved
        saved = to_dict(config_from_dict(saved))
    a, b = _flat(saved), _flat(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def meaningful(key: str) -> bool:
    """Whether changing ``key`` on resume changes what the run is (refused by default)."""
    return not any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def check_resume(cfg: Config, tag_dir: Path, global_batch: int) -> list[str]:
    """Compare this run's resolved config with the checkpoint's. Returns the harmless
    changes (``key: old -> new``); raises CheckpointError for meaningful ones unless
    ``checkpoint.allow_changes``."""
    meta = json.loads((tag_dir / "dsft_state.json").read_text())
    diff = differences(meta.get("config") or {}, to_dict(cfg))
    lines = {k: f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()}
    # A lean checkpoint records a fingerprint of its base weights: another path to the same
    # weights is fine, other weights are refused by checkpoint.check_base with the files.
    fingerprinted = {"model.path", "model.revision"} if meta.get("base") else set()
    bad = [lines[k] for k in diff if meaningful(k) and k not in fingerprinted]
    saved_batch = meta.get("global_batch", global_batch)
    if saved_batch != global_batch:
        bad.append(f"global batch: {saved_batch} -> {global_batch} sequences per step")
    ok = [lines[k] for k in diff if not meaningful(k) or k in fingerprinted]
    if bad and not cfg.checkpoint.allow_changes:
        raise CheckpointError(
            f"resume from {tag_dir}: {len(bad)} setting(s) that change the run differ from the "
            f"checkpoint's: {'; '.join(bad)}. Restore them, start afresh (--no-resume "
            "--overwrite, or another output_dir), or pass --allow-changes "
            "(checkpoint.allow_changes=true) to continue with the new settings"
        )
    if bad:
        log.warning("resume with changed settings (--allow-changes): %s", "; ".join(bad))
    if ok:
        log.info("resume: changed settings: %s", "; ".join(ok))
    return bad + ok


def _writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir: {out} is a file, not a folder"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            [f"output_dir: cannot create {out} ({e.strerror or type(e).__name__})"]
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError([f"output_dir: {out} is not writable by this user"])


def _write_config(cfg: Config, out: Path, resumed: Path | None, changes: list[str]) -> None:
    first = out / "config.yaml"
    if resumed is None or not first.exists():
        save_config(cfg, first)
        return
    n = 1
    while (out / f"config.resume-{n}.yaml").exists():
        n += 1
    head = [f"# resumed from {resumed}"] + [f"# changed: {c}" for c in changes]
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (out / f"config.resume-{n}.yaml").write_text("\n".join(head) + "\n" + body)


def _open_main(cfg: Config, global_batch: int, files: dict[str, str]) -> Path | None:
    out = Path(cfg.output_dir)
    _writable(out)
    acquire(out)
    ck = cfg.checkpoint
    if not ck.resume and not ck.resume_from and holds_run(out):
        if not ck.overwrite:
            raise CheckpointError(
                f"output_dir {out} already holds a run (checkpoints, metrics or a summary) and "
                "--no-resume (checkpoint.resume=false) starts afresh: pass --overwrite "
                "(checkpoint.overwrite=true) to clear it, or choose another output_dir"
            )
        log.info("--overwrite: clearing the previous run in %s", out)
        clear(out)
    resumed = checkpoint.choose_resume(out, ck.resume, ck.resume_from)
    changes = check_resume(cfg, resumed, global_batch) if resumed is not None else []
    _write_config(cfg, out, resumed, changes)
    for name, text in files.items():
        (out / name).write_text(text)
    return resumed


def open_run(cfg: Config, global_batch: int, files: dict[str, str]) -> Path | None:
    """Check and take ``cfg.output_dir`` for this run (see the module docstring); write the
    config and ``files`` (name: text) there. Returns the checkpoint to resume from.
    Every rank calls it; rank 0 decides."""
    result: Any = None
    if dist.is_main():
        try:
            found = _open_main(cfg, global_batch, files)
            result = ("ok", str(found) if found else None)
        except ConfigError as e:
            result = ("config", e.problems)
        except CheckpointError as e:
            result = ("checkpoint", str(e))
    kind, value = dist.broadcast_object(result)
    if kind == "config":
        raise ConfigError(value)
    if kind == "checkpoint":
        raise CheckpointError(value)
    return Path(value) if value else None
