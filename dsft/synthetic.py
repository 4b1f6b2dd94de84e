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
    device: str | None = None,
    **config: Any,
) -> Path:
    """Save a randomly initialised Llama and a tokenizer (the demo's by default) to ``out``.

    The shape is the demo's (``hidden``, ``layers``) unless ``shape`` gives one (for example
    ``planner.SHAPES["llama-1b"]``); its vocabulary grows to the tokenizer's if smaller.
    ``config`` adds LlamaConfig fields (``rope_theta``, ``max_position_embeddings``...).
    ``device="cuda"`` initialises the weights there, in ``dtype`` (an 8B model in seconds).
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
    if device is None:
        model = LlamaForCausalLM(llama)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or default)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(llama)
        finally:
            torch.set_default_dtype(default)
    if dtype is not None:
        model = model.to(dtype)
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
