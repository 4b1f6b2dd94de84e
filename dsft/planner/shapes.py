"""Llama-shaped model presets to plan for without a model directory (`dsft plan --model
llama-8b`, the benchmarks and the tests)."""

from __future__ import annotations

from typing import Any

from dsft.errors import ConfigError

# Llama-shaped models to plan for without a directory (there is no hub access to read their
# config.json): hidden, layers, MLP width, heads, key/value heads, vocabulary, tied embeddings.
_LLAMA_SHAPES = {
    "llama-1b": (2048, 16, 8192, 32, 8, 128256, True),  # Llama 3.2 1B
    "llama-3b": (3072, 28, 8192, 24, 8, 128256, True),  # Llama 3.2 3B
    "llama-7b": (4096, 32, 11008, 32, 32, 32000, False),  # Llama 2 7B
    "llama-8b": (4096, 32, 14336, 32, 8, 128256, False),  # Llama 3.1 8B
    "llama-13b": (5120, 40, 13824, 40, 40, 32000, False),  # Llama 2 13B
    "llama-34b": (8192, 48, 22016, 64, 8, 32000, False),  # Code Llama 34B
    "llama-70b": (8192, 80, 28672, 64, 8, 32000, False),  # Llama 2 70B
}
SHAPES: dict[str, dict[str, Any]] = {
    name: dict(
        hidden_size=h,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    for name, (h, layers, ffn, heads, kv, vocab, tied) in _LLAMA_SHAPES.items()
}


def shape_config(name: str) -> Any:
    """A Hugging Face ``LlamaConfig`` for one of the built-in :data:`SHAPES`."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ConfigError([f"unknown model shape {name!r}; built-in shapes: {', '.join(SHAPES)}"])
    return LlamaConfig(**SHAPES[name])
