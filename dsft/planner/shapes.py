"""Model presets to plan for without a model directory (`dsft plan --model llama-8b`, the
benchmarks and the tests): Llama shapes and two mixtures of experts."""

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
# Mixtures of experts (their config.json's shape fields; model_type picks the config class).
SHAPES["qwen3-30b-a3b"] = dict(  # Qwen3-30B-A3B: 30.5B params, 3.3B active
    model_type="qwen3_moe",
    hidden_size=2048,
    num_hidden_layers=48,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
)
SHAPES["gpt-oss-20b"] = dict(  # GPT-OSS-20B: 21B params, 3.6B active (input embedding aside)
    model_type="gpt_oss",
    hidden_size=2880,
    num_hidden_layers=24,
    intermediate_size=2880,
    num_local_experts=32,
    num_experts_per_tok=4,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=201088,
    tie_word_embeddings=False,
)


def shape_config(name: str) -> Any:
    """A Hugging Face config (``LlamaConfig`` unless a ``model_type`` says otherwise) for one
    of the built-in :data:`SHAPES`."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ConfigError([f"unknown model shape {name!r}; built-in shapes: {', '.join(SHAPES)}"])
    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
