"""Loading the model and tokenizer, LoRA, and optimizer parameter groups."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dsft.config import ConfigError, LoraConfig, ModelConfig, TrainConfig

log = logging.getLogger("dsft")

# Parameters whose names contain these get no weight decay (norms, biases).
NO_DECAY = ("bias", "norm", "ln_")


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model directory's tokenizer; a pad token is borrowed from EOS if missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            [
                f"model.path: the tokenizer in {cfg.path} has no chat template; add "
                "one (tokenizer.chat_template) so prompts and responses can be "
                "rendered"
            ]
        )
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
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters split into decay / no-decay optimizer groups.

    Frozen parameters are left out, so they get no optimizer state.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name.lower() for k in NO_DECAY) or p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


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
