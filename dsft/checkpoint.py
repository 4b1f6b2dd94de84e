"""DeepSpeed checkpoints of the run and export to a Hugging Face directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dsft import distributed as dist
from dsft.config import Config

log = logging.getLogger("dsft")


def save(engine: Any, out_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Save model, optimizer and scheduler states (all ranks call this together)."""
    ckpt_dir = out_dir / "checkpoints"
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    log.info("checkpoint saved: %s", ckpt_dir / tag)
    return ckpt_dir / tag


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
