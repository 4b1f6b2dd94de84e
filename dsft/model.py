"""Loading the model and tokenizer, LoRA, and optimizer parameter groups."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch

from dsft.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig

log = logging.getLogger("dsft")

# Parameters whose names contain these get no weight decay (norms, biases).
NO_DECAY = ("bias", "norm", "ln_")


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model directory's tokenizer; a pad token is borrowed from EOS if missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # A missing chat template is reported where one is needed (chat data without
    # data.template); raw-text and completion data do not need one.
    return tok


def load_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """Load the pretrained causal LM from its local directory.

    Under ZeRO-3 call this while a ``HfDeepSpeedConfig`` is alive, so that
    transformers partitions the weights as it loads them (zero.Init).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.path,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def build_model(cfg: ModelConfig, dtype: torch.dtype, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Load the model (partitioned as it loads under ZeRO-3) and add LoRA if configured."""
    hf_zero3 = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this lives, from_pretrained loads under deepspeed.zero.Init, so the
        # weights are partitioned as they load and never whole on one rank.
        hf_zero3 = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference
    model = load_model(cfg, dtype)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    # Released now: a later from_pretrained on rank 0 alone (the LoRA merge at export)
    # must not enter zero.Init, a collective the other ranks never join. Generation is
    # told about ZeRO-3 explicitly (synced_gpus).
    del hf_zero3
    return model


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters (base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


# Transformer block index in parameter names: model.layers.3., transformer.h.3., blocks.3.
LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
EMBED_RE = re.compile(r"embed|wte|wpe")


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks, from the model config."""
    return int(model.config.num_hidden_layers)


def freeze(model: torch.nn.Module, cfg: FreezeConfig) -> list[str]:
    """Stop gradients for the configured parameters; returns the frozen names.

    Frozen parameters are then left out of the optimizer (no state, no update).
    """
    patterns = [re.compile(p) for p in cfg.patterns]
    frozen: list[str] = []
    hits = dict.fromkeys(cfg.patterns, 0)
    for name, p in model.named_parameters():
        layer = LAYER_RE.search(name)
        by_pattern = [r.pattern for r in patterns if r.search(name)]
        for pat in by_pattern:
            hits[pat] += 1
        if (
            (cfg.embeddings and layer is None and EMBED_RE.search(name))
            or (layer is not None and int(layer.group(1)) < cfg.bottom_layers)
            or by_pattern
        ) and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    for pat, n in hits.items():
        if n == 0:
            log.warning("model.freeze.patterns: %r matches no parameter; nothing frozen by it", pat)
    if cfg.bottom_layers > num_layers(model):
        log.warning(
            "model.freeze.bottom_layers=%d exceeds the model's %d layers",
            cfg.bottom_layers,
            num_layers(model),
        )
    return frozen


def _depth(name: str, layers: int) -> int:
    """Depth from the top: head and final norm 0, block i -> layers - i, embeddings layers + 1."""
    m = LAYER_RE.search(name)
    if m:
        return layers - int(m.group(1))
    return layers + 1 if EMBED_RE.search(name) else 0


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups with their own LR and weight decay.

    A group is one (depth, lr_scale pattern, decay / no-decay) combination. Its LR is
    ``train.lr * layer_decay ** depth * lr_scale[pattern]``; the LR schedule multiplies
    each group's own LR. Biases, norms and other 1-D parameters get no weight decay.
    Frozen parameters are left out, so they get no optimizer state.
    """
    layers = num_layers(model)
    llrd = train.layer_decay != 1.0
    hits = dict.fromkeys(train.lr_scale, 0)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 flattens partitioned parameters; ds_shape keeps the real shape.
        shape = getattr(p, "ds_shape", p.shape)
        no_decay = len(shape) < 2 or any(k in name.lower() for k in NO_DECAY)
        scale, where = 1.0, "all"
        if llrd:
            depth = _depth(name, layers)
            scale = train.layer_decay**depth
            where = {0: "head", layers + 1: "embed"}.get(depth, f"layer{layers - depth:02d}")
        pattern = next((pat for pat in train.lr_scale if re.search(pat, name)), None)
        if pattern is not None:
            hits[pattern] += 1
            scale *= train.lr_scale[pattern]
            where += f"[{pattern}]"
        key = f"{where}/{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key,
            {
                "params": [],
                "name": key,
                "lr": train.lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else train.weight_decay,
            },
        )
        group["params"].append(p)
    for pat, n in hits.items():
        if n == 0:
            log.warning("train.lr_scale: %r matches no trainable parameter; it does nothing", pat)
    return list(groups.values())


def describe_groups(groups: list[dict[str, Any]]) -> str:
    """One line per optimizer group: name, parameters, LR, weight decay."""
    lines = []
    for g in groups:
        n = sum(getattr(p, "ds_numel", None) or p.numel() for p in g["params"])
        lines.append(
            f"  {g['name']:<28} {n:>14,} params  lr {g['lr']:.3g}  wd {g['weight_decay']:g}"
        )
    return "\n".join(lines)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; correct under ZeRO-3 partitioning too."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, min_ratio: float):
    """Multiplier of each group's base LR at an optimizer step: linear warmup, then decay."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return f


def torch_dtype(precision: str) -> torch.dtype:
    # Weights load in fp32 for fp32 runs; for bf16/fp16 DeepSpeed keeps fp32 masters
    # in the optimizer, so loading in 16 bit halves load-time memory at no cost.
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
