"""Hugging Face export: from the live engine at the end of training, or from a checkpoint.

Both paths end in :func:`write_hf`: the weights (gathered from the engine's ZeRO
shards, or consolidated offline from a checkpoint by DeepSpeed's ``zero_to_fp32``)
are loaded strictly into a CPU copy of the model built from the base directory
(plus LoRA when the run used it), saved with ``save_pretrained`` (safetensors,
sharded past ``max_shard_size``), then loaded back and compared with the in-memory
model on a fixed batch. A missing tensor, an adapter that did not save, or logits
that differ is an error, never a silent bad export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dsft import distributed as dist
from dsft.checkpoint import check_base, consolidate, find, saved_config
from dsft.config import Config
from dsft.data.tokenize import apply_template
from dsft.errors import ExportError
from dsft.model import apply_lora, freeze, load_model, load_tokenizer

log = logging.getLogger("dsft")


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
    return sd


def export_hf(engine: Any, cfg: Config, out: Path) -> Path | None:
    """Export the engine's current weights to ``out`` (all ranks call; rank 0 writes)."""
    sd = gather_state_dict(engine.module, cfg.deepspeed.zero_stage == 3)
    if dist.is_main():
        write_hf(cfg, sd, out)
    dist.wait_for_main()  # rank 0 writes and reloads alone: may take long for big models
    return out if dist.is_main() else None


def export_checkpoint(path: str | Path, out: Path, merged: bool = True) -> Path:
    """``dsft export``: a checkpoint (or run directory) to a Hugging Face directory."""
    dist.configure_accelerator()  # zero_to_fp32 imports deepspeed
    tag_dir = find(path)
    cfg = saved_config(tag_dir)
    check_base(
        tag_dir, cfg.model.path, cfg.model.revision
    )  # a lean checkpoint takes frozen weights from there
    write_hf(cfg, consolidate(tag_dir), out, merged=merged)
    return out


def _build(cfg: Config) -> torch.nn.Module:
    """The run's model as training built it: base weights from model.path, LoRA, and the
    model.freeze parameters frozen (they keep model.path's values)."""
    model = load_model(cfg.model, torch.float32, training=False)
    model = apply_lora(model, cfg.model.lora) if cfg.model.lora.enabled else model
    freeze(model, cfg.model.freeze)
    return model


@torch.no_grad()
def _tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (as training loaded it), with the chat template it was trained
    with (data.template)."""
    tok = load_tokenizer(cfg.model)
    apply_template(tok, cfg.data.template)
    return tok


def _logits(model: torch.nn.Module) -> torch.Tensor:
    # A fixed batch of ids from the bottom of every vocabulary.
    ids = torch.arange(1, 17).remainder(model.config.vocab_size).unsqueeze(0)
    return model(input_ids=ids).logits.float()


def write_hf(
    cfg: Config, sd: dict[str, torch.Tensor], out: Path, merged: bool = True,
    max_shard_size: str = "5GB",
) -> None:  # fmt: skip
    """Save ``sd`` (the run's trained weights) as a verified Hugging Face directory.

    Full fine-tuning writes the model; LoRA writes the adapter to ``out/adapter``
    (loadable with peft on the base model) and, when ``merged``, the merged model to
    ``out``. Costs one CPU copy of the model on the calling rank.
    """
    model = _build(cfg).eval()
    lora = cfg.model.lora.enabled
    # Only trained parameters must come from the run (LoRA adapters + modules_to_save, or
    # everything model.freeze left trainable); frozen ones are the base on disk, and a
    # lean checkpoint does not hold them.
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(sd))
    if missing:
        raise ExportError(f"{len(missing)} trained tensors are missing, e.g. {missing[:3]}")
    model.load_state_dict({n: sd[n] for n in expected}, strict=False)
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    reference = _logits(model)
    if lora:
        model.save_pretrained(out / "adapter")
        _verify_adapter(cfg, out / "adapter", reference)
        if not merged:
            _tokenizer(cfg).save_pretrained(out / "adapter")
            log.info("exported LoRA adapter: %s", out / "adapter")
            return
        model = model.merge_and_unload()
    model = model.to(dtype)
    reference = _logits(model)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    _tokenizer(cfg).save_pretrained(out)
    again = load_model(cfg.model, dtype, path=out, training=False).eval()
    _compare(reference, _logits(again), f"{out} reloaded", dtype)
    log.info("exported Hugging Face model: %s (verified by reloading)", out)


def _verify_adapter(cfg: Config, adapter: Path, reference: torch.Tensor) -> None:
    from peft import PeftModel

    if not any(adapter.glob("adapter_model.*")):
        raise ExportError(f"{adapter}: peft wrote no adapter weights")
    base = load_model(cfg.model, torch.float32, training=False)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    _compare(reference, _logits(peft_model), str(adapter), torch.float32)


def _compare(expected: torch.Tensor, got: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    # Round-off of the saved dtype is allowed (a 16-bit reload recomputes e.g. rotary
    # tables in fp32); a missing or wrong tensor moves logits by far more.
    rel = max(1e-3, 4 * torch.finfo(dtype).eps)
    tol = rel * max(1.0, expected.abs().max().item())
    diff = (expected - got).abs().max().item()
    if diff > tol:
        raise ExportError(f"{what}: logits differ from the trained model by {diff:.3g} > {tol:.3g}")
