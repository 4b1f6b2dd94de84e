"""Llama-shaped benchmark models: random init from a config, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# `1b` is Llama-3.2-1B's shape (tied embeddings, 1.24B parameters); `tiny` runs on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=0,  # 0 = the tokenizer's vocabulary
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    ),
}


def build_model_dir(
    out: str | Path, preset: str, tokenizer: Any, max_len: int, seed: int = 0
) -> Path:
    """Save a randomly initialised Llama of ``preset`` shape and ``tokenizer`` to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(PRESETS[preset])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = LlamaConfig(
        **shape,
        max_position_embeddings=max(max_len, 4096),
        rope_theta=500000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
