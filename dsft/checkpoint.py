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
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsft import distributed as dist
from dsft import faults
from dsft.config import Config, config_from_dict
from dsft.errors import ConfigError

log = logging.getLogger("dsft")


CHECKPOINTS = "checkpoints"
INCOMPLETE = ".incomplete"  # where a checkpoint is written before it becomes visible


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new content, never a torn file


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

    Everything is first written under ``checkpoints/.incomplete/``; only when every
    rank has finished does rank 0 move it into place and then point ``latest`` at
    it (an atomic rename each), so a kill at any moment leaves ``latest`` naming a
    complete checkpoint. The ``keep_last`` newest are kept (0 = all).
    """
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
    torch.save(rng_state(), tmp / tag / f"rng_rank{dist.get_rank()}.pt")
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
        (tmp / tag / "dsft_state.json").write_text(json.dumps(meta, indent=2, default=str))
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(tmp / tag, root / tag)
        _write_atomic(root / "latest", tag)
        if keep_last:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    if dist.is_main():
        size = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
        log.info(
            "checkpoint saved: %s (%.1f MB in %.2f s)", root / tag, size / 2**20, time.time() - t0
        )
    return root / tag


def find(path: str | Path) -> Path:
    """The checkpoint tag directory that ``path`` names: a ``step_N`` tag, a
    ``checkpoints/`` folder or a run directory (both via their ``latest``)."""
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
    return p


def resume_point(out: Path, resume: bool, resume_from: str) -> Path | None:
    """The checkpoint to resume from: ``resume_from``, else the run's ``latest``, else None."""
    if resume_from:
        return find(resume_from)
    latest = out / CHECKPOINTS / "latest"
    if resume and latest.is_file():
        p = latest.parent / latest.read_text().strip()
        return p if (p / "dsft_state.json").is_file() else None
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


def consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, from any ZeRO stage and rank count."""
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name))
    # ZeRO-0 keeps the whole module in the model-states file.
    states = torch.load(
        tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def needs_reshard(path: Path, world_size: int, zero_stage: int) -> bool:
    """Whether DeepSpeed cannot load ``path`` as is: it was saved on another number of
    ranks with ZeRO >= 1 (optimizer states are partitioned per rank), or at another stage."""
    meta = _meta(path)
    saved_stage = (meta.get("config") or {}).get("deepspeed", {}).get("zero_stage", zero_stage)
    return saved_stage != zero_stage or (saved_stage > 0 and meta["world_size"] != world_size)


def load_weights(model: torch.nn.Module, path: Path, zero3: bool) -> None:
    """Load a checkpoint's consolidated fp32 weights into a model not yet in an engine."""
    sd = consolidate(path)
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


def read_state(path: Path) -> dict[str, Any]:
    """The run position saved in a checkpoint, and this rank's RNG streams if saved."""
    meta = _meta(path)
    _restore_rank_rng(path)
    return {k: meta[k] for k in ("step", "epoch", "window", "global_batch", "best") if k in meta}


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the run state."""
    t0 = time.time()
    # A lean checkpoint lacks the frozen parameters: the engine keeps those it was built
    # with (model.path, checked by check_base); every other tensor must be there.
    lean = bool(_meta(path).get("frozen_excluded"))
    load_path, state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_module_strict=not lean
    )
    if load_path is None:
        raise ConfigError([f"{path}: DeepSpeed could not load this checkpoint"])
    log.info("checkpoint loaded: %s in %.2f s", path, time.time() - t0)
    _restore_rank_rng(path)
    return state


def _restore_rank_rng(path: Path) -> None:
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # a checkpoint saved on fewer ranks has no stream for the others
        restore_rng(torch.load(rng, weights_only=False))
