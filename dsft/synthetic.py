"""Synthetic models and data, built here with nothing downloaded: the character-level demo
tokenizer (with a chat template), randomly initialised Llama-shaped model directories (the
demo's tiny one, the tests' tinier ones, the benchmark's and the GPU check's 1B one), and the
demo's four string tasks:

  reverse     "Reverse" + "abcde"     -> "edcba"
  sort        "Sort" + "dbca"         -> "abcd"
  capitalise  "Capitalise" + "hello"  -> "HELLO"
  add         "Add" + "17+5"          -> "22"    (operands 0-19)
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
DEMO_DATA = ASSETS / "demo_tasks.jsonl"

SPECIAL = ["<pad>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> Any:
    """A character-level fast tokenizer: one token per character, plus chat markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without separators
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(
    out: str | Path,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 4,
    *,
    tokenizer: Any = None,
    shape: dict[str, Any] | None = None,
    dtype: Any = None,
    **config: Any,
) -> Path:
    """Save a randomly initialised Llama and a tokenizer (the demo's by default) to ``out``.

    The shape is the demo's (``hidden``, ``layers``) unless ``shape`` gives one (for example
    ``planner.SHAPES["llama-1b"]``); its vocabulary grows to the tokenizer's if smaller.
    ``config`` adds LlamaConfig fields (``rope_theta``, ``max_position_embeddings``...).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    fields = (
        dict(shape)
        if shape
        else {
            "hidden_size": hidden,
            "intermediate_size": hidden * 3,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        }
    )
    fields["vocab_size"] = max(fields.get("vocab_size", 0), len(tok))
    fields = {"max_position_embeddings": 256, **fields, **config}
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llama = LlamaConfig(**fields, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, **ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# Tiny mixtures of experts (hidden 32, 2 layers, 4 experts, top-2) of transformers' own
# config classes: model_type -> (config class, causal LM class, family-specific fields).
MOE_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 16, "head_dim": 8},
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "head_dim": 8,
            "sliding_window": 8,
            "max_position_embeddings": 131072,  # its YaRN rope's (4096 x 32)
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "n_routed_experts": 4,
            "num_key_value_heads": 4,  # multi-head latent attention: as many as heads
            "n_shared_experts": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 8,
            "q_lora_rank": 8,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
        },
    ),
}


def build_moe_model_dir(
    out: str | Path, family: str, seed: int = 0, tokenizer: Any = None, **config: Any
) -> Path:
    """Save a randomly initialised tiny mixture of experts of ``family`` (a key of
    :data:`MOE_FAMILIES`: hidden 32, 2 layers, 4 experts, top-2) and the demo's tokenizer."""
    import torch
    import transformers
    from transformers import GenerationConfig

    out = Path(out)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    cfg_name, model_name, own = MOE_FAMILIES[family]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    fields = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 256,
        **own,
        **config,
    }
    cfg = getattr(transformers, cfg_name)(**fields, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, **ids)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def generate_tasks(n: int = 8000, seed: int = 1234) -> list[dict[str, str]]:
    """``n`` instruction records, the four tasks in turn; deterministic in ``seed``.

    Instructions are single words to keep sequences short: the demo must learn
    four tasks from scratch in about two minutes on two CPU cores.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = i % 4
        if task == 0:
            w = _word(rng, 3, 6)
            rows.append({"instruction": "Reverse", "input": w, "output": w[::-1]})
        elif task == 1:
            w = _word(rng, 3, 6)
            rows.append({"instruction": "Sort", "input": w, "output": "".join(sorted(w))})
        elif task == 2:
            w = _word(rng, 3, 7)
            rows.append({"instruction": "Capitalise", "input": w, "output": w.upper()})
        else:
            a, b = rng.randint(0, 19), rng.randint(0, 19)
            rows.append({"instruction": "Add", "input": f"{a}+{b}", "output": str(a + b)})
    return rows


def write_tasks(path: str | Path, rows: list[dict[str, str]]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":  # `python -m dsft.synthetic`: regenerate the bundled demo dataset
    write_tasks(DEMO_DATA, generate_tasks())
