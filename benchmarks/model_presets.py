"""Llama shapes of the benchmark: ``1b`` is Llama-3.2-1B's (the planner's ``llama-1b``, tied
embeddings, 1.24B parameters), ``8b`` Llama-3.1-8B's (``llama-8b``); ``tiny`` runs on a CPU. Built by ``dsft.synthetic.build_model_dir``."""

from __future__ import annotations

from typing import Any

from dsft.planner import SHAPES

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        tie_word_embeddings=True,
        vocab_size=0,  # 0 = the tokenizer's vocabulary
    ),
    "1b": SHAPES["llama-1b"],
    "8b": SHAPES["llama-8b"],
}
