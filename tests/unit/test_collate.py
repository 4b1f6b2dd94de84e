"""Padded micro-batches and generation prompts (dsft/data/collate.py)."""

from __future__ import annotations

import pytest
import torch

from dsft.data.collate import collate, collate_prompts
from dsft.data.formats import Example
from dsft.data.tokenize import IGNORE_INDEX, tokenize_example
from dsft.synthetic import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_collate_pads_and_masks(tok) -> None:
    exs = [
        tokenize_example(
            tok,
            Example([{"role": "user", "content": u}, {"role": "assistant", "content": "z"}], "t"),
            64,
        )
        for u in ("a", "abcdef")
    ]
    b = collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    short = len(exs[0].input_ids)
    assert b["attention_mask"][0, short:].sum() == 0
    assert (b["labels"][0, short:] == IGNORE_INDEX).all()
    p = collate_prompts([[5, 6], [7, 8, 9]], pad_id=0)
    assert p["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert torch.equal(p["attention_mask"], torch.tensor([[0, 1, 1], [1, 1, 1]]))
