"""Checkpoints of the whole run state, resume, and export to a Hugging Face directory.

A checkpoint ``<output_dir>/checkpoints/step_N`` holds DeepSpeed's model, optimizer
and LR-scheduler states (every rank's shard), the run position (step, epoch, next
batch window, best-metric tracker), every rank's RNG state, the resolved config and
the dsft / DeepSpeed / torch versions (``dsft_state.json``).

Lean checkpoints: frozen parameters (the LoRA base model, ``model.freeze``) are left out
(DeepSpeed's ``exclude_frozen_parameters``) unless ``checkpoint.save_frozen``. They never
change, so resume and export take them from ``model.path``; the checkpoint records a
fingerprint of its weight files (:func:`base_fingerprint`) and a resume or export onto
other base weights is refused.

A checkpoint is data, never code (docs/long-jobs-guarantees.md): every ``.pt`` is read with
``weights_only=True`` and DeepSpeed's allowlisted globals (dsft/safe_load.py), RNG state is
safetensors, and ``manifest.json`` lists every file's size and sha256. Resume verifies the
manifest and falls back to the newest intact checkpoint when ``latest`` names a missing or
damaged one. Files and renames are fsynced before ``latest`` moves.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsft import distributed as dist
from dsft import faults, safe_load
from dsft.config import Config, config_from_dict
from dsft.errors import CheckpointError, ConfigError

log = logging.getLogger("dsft")


CHECKPOINTS = "checkpoints"
INCOMPLETE = ".incomplete"  # where a checkpoint is written before it becomes visible
MANIFEST = "manifest.json"  # every file of a checkpoint: size and sha256
_STEP = re.compile(r"^step_(\d+)$")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(p: Path) -> int:
    m = _STEP.match(p.name)
    return int(m.group(1)) if m else -1


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to the disk (a rename survives power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new content, never a torn file
    _fsync(path.parent)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_files(tag_dir: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of ``files`` (relative to ``tag_dir``), each fsynced on the way."""
    out = {}
    for rel in files:
        f = tag_dir / rel
        _fsync(f)
        out[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return out


def _write_manifest(tag_dir: Path) -> None:
    """``manifest.json``: every file's size and sha256; all ranks share the hashing."""
    files = sorted(
        str(f.relative_to(tag_dir))
        for f in tag_dir.rglob("*")
        if f.is_file() and f.name != MANIFEST
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = dist.all_gather_objects(_hash_files(tag_dir, files[rank::world]))
    if dist.is_main():
        merged = {k: v for part in parts for k, v in part.items()}
        _write_atomic(tag_dir / MANIFEST, json.dumps({"files": merged}, indent=1, sort_keys=True))


def damaged(tag_dir: Path, hashes: bool = True) -> str | None:
    """Why ``tag_dir`` is not a complete, intact checkpoint (None when it is): a missing
    ``dsft_state.json``, or a file missing, resized or changed against ``manifest.json``.
    A checkpoint written before manifests existed is judged by its ``dsft_state.json``."""
    if not (tag_dir / "dsft_state.json").is_file():
        return f"{tag_dir}: no dsft_state.json (not a complete checkpoint)"
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():  # older checkpoints: a truncated zip has lost its directory
        bad = [f for f in sorted(tag_dir.glob("*.pt")) if not zipfile.is_zipfile(f)]
        return f"{bad[0]}: truncated or not a torch file" if bad else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return f"{manifest}: unreadable"
    for rel, want in sorted(files.items()):
        f = tag_dir / rel
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: {size} bytes, {want['size']} when saved (truncated or changed)"
        if hashes and _sha256(f) != want["sha256"]:
            return f"{f}: its sha256 differs from the one saved (damaged or changed)"
    return None


_RNG = "rng_rank{}.safetensors"


def _save_rng(path: Path) -> None:
    """This rank's RNG streams as safetensors (tensors plus a few numbers: no pickle)."""
    from safetensors.torch import save_file

    state = rng_state()
    version, mt, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": state["torch"],
    }
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda{i}"] = s
    meta = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([name, pos, has_gauss, cached]),
    }
    save_file(tensors, str(path), metadata=meta)


def _load_rng(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    version, gauss = json.loads(meta["python"])
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    state: dict[str, Any] = {
        "python": (version, tuple(int(x) for x in t["python"].tolist()), gauss),
        "numpy": (name, t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": t["torch"],
    }
    cuda = [t[k] for k in sorted((k for k in t if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda:
        state["cuda"] = cuda
    return state


def rng_state() -> dict[str, Any]:
    """This rank's random number generator states (Python, NumPy, torch, CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Files whose bytes are the model's weights (what a lean checkpoint relies on).
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_EDGE = 1 << 20  # bytes hashed at each end of a weight file


@functools.lru_cache(maxsize=8)
def base_fingerprint(model_path: str) -> dict[str, Any]:
    """A cheap identity of the weights in ``model_path``: per weight file its name, size
    and a SHA-256 of its first and last MiB (the safetensors header, which lists every
    tensor's name, shape and offset, and the values at both ends); plus the Hub revision
    when the directory is a Hub cache snapshot (``.../snapshots/<revision>``)."""
    root = Path(model_path)
    files: dict[str, Any] = {}
    for f in sorted({p for g in WEIGHT_GLOBS for p in root.glob(g)}):
        size = f.stat().st_size
        h = hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(_EDGE))
            if size > _EDGE:
                fh.seek(max(size - _EDGE, _EDGE))
                h.update(fh.read())
        files[f.name] = {"size": size, "sha256_edges": h.hexdigest()}
    revision = root.name if root.parent.name == "snapshots" else None
    return {"files": files, "revision": revision}


def _weights_dir(path: str, revision: str = "") -> str:
    """The local directory of ``model.path`` (a Hub name's snapshot), resolved."""
    from dsft.hub import model_path

    return str(Path(model_path(path, revision)).resolve())


def check_base(tag_dir: Path, model_path: str, revision: str = "") -> None:
    """Refuse to resume or export a lean checkpoint onto other base weights than its own."""
    meta = _meta(tag_dir)
    saved = meta.get("base")
    if not meta.get("frozen_excluded") or saved is None:
        return  # the checkpoint holds every weight itself
    now = base_fingerprint(_weights_dir(model_path, revision))
    if now["files"] == saved["files"]:
        return
    changed = sorted(
        set(saved["files"]) ^ set(now["files"])
        | {
            k
            for k in set(saved["files"]) & set(now["files"])
            if saved["files"][k] != now["files"][k]
        }
    )
    raise ConfigError(
        [
            f"model.path={model_path!r}: its weights differ from those {tag_dir} was trained on "
            f"(saved from {saved.get('path')!r}; differing files: {', '.join(changed)}). The "
            "checkpoint holds only the trained parameters (frozen ones are read from "
            "model.path), so it cannot be resumed or exported onto other base weights: point "
            "model.path at the original weights, or start afresh (checkpoint.resume=false or "
            "another output_dir)"
        ]
    )


def _drop_tied_frozen(engine: Any) -> None:
    """Make ``exclude_frozen_parameters`` drop every name of a frozen tensor.

    DeepSpeed drops the names ``named_parameters()`` yields, which lists a tied weight
    once: the tied head (``lm_head.weight`` = the embedding, vocabulary x hidden) stayed
    in lean checkpoints. Wraps the engine's ``module_state_dict`` once.
    """
    if getattr(engine, "_dsft_lean_sd", False):
        return
    original = engine.module_state_dict

    def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kw: Any) -> Any:
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kw)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = module_state_dict
    engine._dsft_lean_sd = True


def save(
    engine: Any,
    out: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int = 0,
    config: dict[str, Any] | None = None,
) -> Path:
    """Save the whole run state as ``checkpoints/step_N``; all ranks call this together.

    Everything is first written under ``checkpoints/.incomplete/``, with a manifest of
    every file's size and sha256, each file fsynced; only when every rank has finished
    does rank 0 move it into place and then point ``latest`` at it (an atomic, fsynced
    rename each), so a kill or a power loss at any moment leaves ``latest`` naming a
    complete checkpoint. The ``keep_last`` newest are kept (0 = all); the one just
    written, which ``latest`` names, never goes. A full disk is a one-line error.
    """
    try:
        return _save(engine, out, step, state, keep_last, config)
    except (OSError, RuntimeError) as e:
        where = out / CHECKPOINTS / INCOMPLETE
        # torch reports a full disk in words of its own ("unexpected pos", "file write
        # failed", "iostream error"): a failed write with (almost) no space left is one
        if getattr(e, "errno", None) == errno.ENOSPC or _disk_full(out):
            raise CheckpointError(
                f"no space left on device at {where} while saving the checkpoint of step "
                f"{step}; `latest` still names the last complete checkpoint. Free space (or "
                "lower checkpoint.keep_last) and run the same command to resume"
            ) from None
        raise


def _disk_full(out: Path, margin: int = 64 << 20) -> bool:
    try:
        return shutil.disk_usage(out).free < margin
    except OSError:
        return False


def _save(
    engine: Any,
    out: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    config: dict[str, Any] | None,
) -> Path:
    t0 = time.time()
    root = out / CHECKPOINTS
    tmp, tag = root / INCOMPLETE, _tag(step)
    if dist.is_main():  # leftovers of a save that was killed half-way
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    ckpt_cfg = (config or {}).get("checkpoint", {})
    lean = not ckpt_cfg.get("save_frozen", False)
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    _drop_tied_frozen(engine)
    engine.save_checkpoint(
        str(tmp), tag=tag, client_state=state, save_latest=False, exclude_frozen_parameters=lean
    )
    # DeepSpeed's client_state is written by rank 0 only; RNG streams differ per rank.
    _save_rng(tmp / tag / _RNG.format(dist.get_rank()))
    faults.kill_if("DSFT_FAULT_KILL_IN_SAVE", step, dist.get_rank())  # test: a torn save
    dist.barrier()
    if dist.is_main():
        import deepspeed

        from dsft import __version__

        meta = {
            **state,
            "config": config,
            "dsft_version": __version__,
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "world_size": dist.get_world_size(),
            # frozen parameters left out: resume/export read them from model.path
            "frozen_excluded": lean and frozen,
        }
        model_cfg = (config or {}).get("model") or {}
        if lean and frozen and model_cfg.get("path"):
            weights = _weights_dir(model_cfg["path"], model_cfg.get("revision", ""))
            meta["base"] = {**base_fingerprint(weights), "path": model_cfg["path"]}
        _write_atomic(tmp / tag / "dsft_state.json", json.dumps(meta, indent=2, default=str))
    dist.barrier()
    _write_manifest(tmp / tag)  # every rank hashes (and fsyncs) its share of the files
    if dist.is_main():
        _fsync(tmp / tag)
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(tmp / tag, root / tag)
        _fsync(root)
        _write_atomic(root / "latest", tag)
        if keep_last:
            for old in retired(root, tag, keep_last):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    if dist.is_main():
        size = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
        log.info(
            "checkpoint saved: %s (%.1f MB in %.2f s)", root / tag, size / 2**20, time.time() - t0
        )
    return root / tag


def retired(root: Path, current: str, keep_last: int) -> list[Path]:
    """The checkpoints ``keep_last`` retention removes after ``current`` was written.

    The newest are the ``keep_last`` highest steps, ``current`` counted as the newest of
    all (a folder may hold higher steps from an older run); ``current`` and the checkpoint
    ``latest`` names are never removed."""
    latest = root / "latest"
    keep = {current, latest.read_text().strip() if latest.is_file() else current}
    others = sorted((p for p in root.glob("step_*") if p.name != current), key=_step_of)
    ordered = [*others, root / current]
    return [p for p in ordered[:-keep_last] if p.name not in keep]


def find(path: str | Path) -> Path:
    """The checkpoint tag directory that ``path`` names: a ``step_N`` tag, a
    ``checkpoints/`` folder or a run directory (both via their ``latest``). A damaged
    checkpoint (against its manifest) is an error naming the file."""
    p = Path(path)
    if (p / CHECKPOINTS / "latest").is_file():  # a run directory
        p = p / CHECKPOINTS
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "dsft_state.json").is_file():
        raise ConfigError(
            [
                f"{path}: not a complete dsft checkpoint (no dsft_state.json); "
                "give a run directory, its checkpoints/ folder or checkpoints/step_N"
            ]
        )
    why = damaged(p)
    if why:
        raise CheckpointError(f"checkpoint {p} is damaged: {why}")
    return p


def choose_resume(out: Path, resume: bool, resume_from: str) -> Path | None:
    """The checkpoint to resume from: ``resume_from``, else the run's ``latest``, else None.

    A ``latest`` that names a missing or damaged checkpoint is a warning, and the newest
    intact ``step_N`` is used instead. No collectives: call it on one rank."""
    if resume_from:
        return find(resume_from)
    if not resume:
        return None
    found = _newest_intact(out / CHECKPOINTS)
    return Path(found) if found else None


def _newest_intact(root: Path) -> str | None:
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    steps = sorted(root.glob("step_*"), key=_step_of, reverse=True) if root.is_dir() else []
    candidates = ([named] if named is not None else []) + [p for p in steps if p != named]
    for i, p in enumerate(candidates):
        why = damaged(p) if p.is_dir() else f"{p}: missing"
        if why is None:
            return str(p)
        what = "`latest` names" if i == 0 and p == named else "checkpoint"
        log.warning("resume: %s %s, which cannot be used (%s); trying an older one", what, p, why)
    if named is not None:
        log.warning("resume: no intact checkpoint in %s; starting from step 0", root)
    return None


def _meta(path: Path) -> dict[str, Any]:
    """The checkpoint's ``dsft_state.json``: run position, world size, resolved config."""
    return json.loads((path / "dsft_state.json").read_text())


def saved_config(tag_dir: Path) -> Config:
    """The resolved run config a checkpoint was saved with."""
    state = _meta(tag_dir)
    if not state.get("config"):
        raise ConfigError([f"{tag_dir}: the checkpoint records no run config"])
    return config_from_dict(state["config"])


def consolidate(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, from any ZeRO stage and rank count.
    Every file is verified to unpickle no code first (unless ``trust``)."""
    safe_load.verify_dir(tag_dir, trust)
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name))
    # ZeRO-0 keeps the whole module in the model-states file.
    states = safe_load.load(tag_dir / "mp_rank_00_model_states.pt", "cpu", trust=trust)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def needs_reshard(path: Path, world_size: int, zero_stage: int) -> bool:
    """Whether DeepSpeed cannot load ``path`` as is: it was saved on another number of
    ranks with ZeRO >= 1 (optimizer states are partitioned per rank), or at another stage."""
    meta = _meta(path)
    saved_stage = (meta.get("config") or {}).get("deepspeed", {}).get("zero_stage", zero_stage)
    return saved_stage != zero_stage or (saved_stage > 0 and meta["world_size"] != world_size)


def load_weights(model: torch.nn.Module, path: Path, zero3: bool, trust: bool = False) -> None:
    """Load a checkpoint's consolidated fp32 weights into a model not yet in an engine."""
    sd = consolidate(path, trust)
    deepspeed = dist.import_deepspeed()
    # Frozen parameters keep the values loaded from model.path (a lean checkpoint has none).
    missing = [n for n, p in model.named_parameters() if n not in sd and p.requires_grad]
    if missing:
        raise ConfigError(
            [
                f"{path}: the checkpoint lacks {len(missing)} of this model's "
                f"tensors (e.g. {missing[0]}); was it saved with another model.*?"
            ]
        )
    for name, p in model.named_parameters():
        if name not in sd:
            continue
        # Under ZeRO-3 each parameter is a shard: gather it, set it, re-partition.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3):
            if not zero3 or dist.is_main():
                p.data.copy_(sd[name].to(p.dtype))


def read_state(path: Path, trust: bool = False) -> dict[str, Any]:
    """The run position saved in a checkpoint, and this rank's RNG streams if saved."""
    meta = _meta(path)
    _restore_rank_rng(path, trust)
    return {k: meta[k] for k in ("step", "epoch", "window", "global_batch", "best") if k in meta}


def load(engine: Any, path: Path, trust: bool = False) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the run state.

    Every file is verified to unpickle no code (unless ``trust``), and DeepSpeed reads
    them through the same verified loader."""
    t0 = time.time()
    safe_load.verify_dir(path, trust)
    safe_load.guard_engine(engine, trust)
    # A lean checkpoint lacks the frozen parameters: the engine keeps those it was built
    # with (model.path, checked by check_base); every other tensor must be there.
    lean = bool(_meta(path).get("frozen_excluded"))
    load_path, state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_module_strict=not lean
    )
    if load_path is None:
        raise ConfigError([f"{path}: DeepSpeed could not load this checkpoint"])
    log.info("checkpoint loaded: %s in %.2f s", path, time.time() - t0)
    _restore_rank_rng(path, trust)
    return state


def _restore_rank_rng(path: Path, trust: bool = False) -> None:
    # a checkpoint saved on fewer ranks has no stream for the others
    rng = path / _RNG.format(dist.get_rank())
    old = path / f"rng_rank{dist.get_rank()}.pt"  # written by dsft before safetensors
    if rng.is_file():
        restore_rng(_load_rng(rng))
    elif old.is_file():
        restore_rng(safe_load.load(old, trust=trust))
