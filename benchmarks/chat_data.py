"""The benchmark's data: generated SFT rows with a realistic length spread, and a tokenizer.

Rows are chat records (``{"messages": [...]}``), which dsft and TRL both read natively,
so neither side pays for a format conversion the other skips:

- 75 % instruction rows: an optional system prompt, one user turn, one assistant turn;
- 25 % multi-turn chats: 2-4 user/assistant exchanges.

Turn lengths in words are lognormal (median prompt ~40 words, median response ~90,
heavy right tail), the shape of public SFT mixes, so padding waste and packing gains
resemble real data. Words come from a fixed Zipf-distributed pseudo-vocabulary; a
byte-level BPE tokenizer is trained on a sample and saved with a ChatML template that
carries ``{% generation %}`` markers (TRL's assistant masks need them; rendering is
unchanged, so dsft's masks are the same tokens).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

# (median words, sigma) of the lognormal turn lengths
PROMPT_WORDS = (40.0, 1.0)
RESPONSE_WORDS = (90.0, 0.9)
CHAT_FRACTION = 0.25
SYSTEM_FRACTION = 0.3
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# ChatML with generation markers around each assistant turn (its <|im_end|> included, so the
# model learns to stop). Renders the same text as dsft's built-in "chatml".
CHATML_TRAINING = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vocabulary(rng: random.Random, n: int = 6000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ing", "er"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class _Words:
    """Zipf-distributed words with occasional punctuation and line breaks."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.vocab = _vocabulary(rng)
        ranks = np.arange(1, len(self.vocab) + 1)
        p = 1.0 / ranks**1.1
        self.p = p / p.sum()
        self.np_rng = np.random.default_rng(seed)

    def text(self, n: int) -> str:
        idx = self.np_rng.choice(len(self.vocab), size=max(n, 1), p=self.p)
        out = []
        for k, i in enumerate(idx, 1):
            w = self.vocab[i]
            out.append(w)
            if k % 13 == 0:
                out.append(".\n" if k % 52 == 0 else ",")
        return " ".join(out).replace(" ,", ",").replace(" .", ".")


def _length(rng: np.random.Generator, median_sigma: tuple[float, float], scale: float) -> int:
    median, sigma = median_sigma
    return max(1, round(rng.lognormal(math.log(median * scale), sigma)))


def generate_rows(n: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, Any]]:
    """``n`` chat records; ``scale`` multiplies every median length (CPU runs use < 1)."""
    words = _Words(seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < SYSTEM_FRACTION:
            messages.append({"role": "system", "content": words.text(int(rng.integers(5, 20)))})
        turns = int(rng.integers(2, 5)) if rng.random() < CHAT_FRACTION else 1
        for _ in range(turns):
            messages.append(
                {"role": "user", "content": words.text(_length(rng, PROMPT_WORDS, scale))}
            )
            messages.append(
                {"role": "assistant", "content": words.text(_length(rng, RESPONSE_WORDS, scale))}
            )
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_tokenizer(out: str | Path, rows: list[dict[str, Any]], vocab_size: int = 8192) -> Any:
    """Train a byte-level BPE on ``rows`` and save it (with the chat template) to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (m["content"] for r in rows for m in r["messages"])
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TRAINING
    fast.save_pretrained(out)
    return fast


def length_stats(lengths: list[int] | np.ndarray) -> dict[str, float]:
    """Percentiles of a length list (for the report and the generator's test)."""
    a = np.asarray(lengths)
    return {
        "mean": float(a.mean()),
        **{f"p{q}": float(np.percentile(a, q)) for q in (10, 50, 90, 99)},
        "max": float(a.max()),
    }
