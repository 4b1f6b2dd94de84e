"""Checkpoints of the whole run state, resume, and export to a Hugging Face directory.

A checkpoint ``<output_dir>/checkpoints/step_N`` holds DeepSpeed's model, optimizer
and LR-scheduler states (every rank's shard), the run position (step, epoch, next
batch window, best-metric tracker), every rank's RNG state, the resolved config and
the dsft / DeepSpeed / torch versions (``dsft_state.json``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsft import distributed as dist
from dsft import faults
from dsft.config import Config
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


def save(engine: Any, out: Path, step: int, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Save the whole run state as ``checkpoints/step_N``; all ranks call this together.

    Everything is first written under ``checkpoints/.incomplete/``; only when every
    rank has finished does rank 0 move it into place and then point ``latest`` at
    it (an atomic rename each), so a kill at any moment leaves ``latest`` naming a
    complete checkpoint. The ``keep_last`` newest are kept (0 = all).
    """
    root = out / CHECKPOINTS
    tmp, tag = root / INCOMPLETE, _tag(step)
    engine.save_checkpoint(str(tmp), tag=tag, client_state=state, save_latest=False)
    # DeepSpeed's client_state is written by rank 0 only; RNG streams differ per rank.
    torch.save(rng_state(), tmp / tag / f"rng_rank{dist.get_rank()}.pt")
    faults.kill_if("DSFT_FAULT_KILL_IN_SAVE", step, dist.is_main())  # test: a torn save
    dist.barrier()
    if dist.is_main():
        import deepspeed

        from dsft import __version__

        meta = {
            **state,
            "dsft_version": __version__,
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "world_size": dist.get_world_size(),
        }
        (tmp / tag / "dsft_state.json").write_text(json.dumps(meta, indent=2, default=str))
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(tmp / tag, root / tag)
        _write_atomic(root / "latest", tag)
        if keep_last:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    log.info("checkpoint saved: %s", root / tag)
    return root / tag


def resume_point(out: Path, resume: bool, resume_from: str) -> Path | None:
    """The checkpoint to resume from: ``resume_from``, else the run's ``latest``, else None."""
    if resume_from:
        p = Path(resume_from)
        if (p / CHECKPOINTS / "latest").is_file():  # a run directory
            p = p / CHECKPOINTS
        if (p / "latest").is_file():
            p = p / (p / "latest").read_text().strip()
        if not (p / "dsft_state.json").is_file():
            raise ConfigError(
                [
                    f"checkpoint.resume_from: {resume_from} is not a complete dsft "
                    "checkpoint (no dsft_state.json); give checkpoints/step_N or a run"
                ]
            )
        return p
    latest = out / CHECKPOINTS / "latest"
    if resume and latest.is_file():
        p = latest.parent / latest.read_text().strip()
        return p if (p / "dsft_state.json").is_file() else None
    return None


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the run state."""
    _, state = engine.load_checkpoint(str(path.parent), tag=path.name)
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # a checkpoint saved on another number of ranks has no stream for us
        restore_rng(torch.load(rng, weights_only=False))
    return state


def gather_state_dict(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (other ranks get {}); parameters gathered one at a time.

    Under ZeRO-3 each parameter is only a shard per rank; gathering them one by
    one keeps the peak extra memory at a single full parameter per rank.
    """
    sd: dict[str, torch.Tensor] = {}
    main = dist.is_main()
    if zero3:
        deepspeed = dist.import_deepspeed()
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if main:
                    sd[name] = p.detach().to("cpu", copy=True).contiguous()
    elif main:
        sd = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in module.named_parameters()}
    if main:  # persistent buffers (rare in causal LMs, but part of the model)
        names = {n for n, _ in module.named_parameters()}
        for n, b in module.state_dict().items():
            if n not in names and n not in sd and b.numel() > 0:
                sd[n] = b.detach().to("cpu", copy=True).contiguous()
    return sd


def export_hf(engine: Any, cfg: Config, tokenizer: Any, out: Path) -> Path | None:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Full fine-tuning: the gathered weights as safetensors plus the model config.
    LoRA: the adapter (``adapter/``) and the base model with the adapter merged.
    All ranks must call this; rank 0 writes.
    """
    module = engine.module
    sd = gather_state_dict(module, cfg.deepspeed.zero_stage == 3)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model.lora.enabled:
            _save_merged_lora(cfg, sd, out)
        else:
            _save_full(module, sd, out)
        tokenizer.save_pretrained(out)
        log.info("exported Hugging Face model: %s", out)
    dist.barrier()
    return out if dist.is_main() else None


def _save_full(module: torch.nn.Module, sd: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    module.config.save_pretrained(out)
    if getattr(module, "generation_config", None) is not None:
        module.generation_config.save_pretrained(out)


def _save_merged_lora(cfg: Config, sd: dict[str, torch.Tensor], out: Path) -> None:
    # Rebuild the peft model on CPU from the original base weights, load the trained
    # adapter (and modules_to_save) into it, then merge. Costs one CPU copy of the model.
    from transformers import AutoModelForCausalLM

    from dsft.model import apply_lora

    base = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code
    )
    peft_model = apply_lora(base, cfg.model.lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = trainable - set(sd)
    assert not missing, f"adapter weights missing from the gathered state: {sorted(missing)[:3]}"
    peft_model.load_state_dict({n: sd[n] for n in trainable}, strict=False)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
