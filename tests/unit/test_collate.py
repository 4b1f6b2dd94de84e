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


def test_window_loader_builds_the_next_window_ahead_in_a_thread() -> None:
    """Image rows: the next window is built in the loader thread while the step runs, and
    every window equals the in-line one; an error surfaces when its window is asked for."""
    import threading

    from dsft.step import WindowLoader

    built: list[tuple[int, str]] = []

    def build(b: list[int]) -> dict[str, torch.Tensor]:
        if b == [99]:
            raise ValueError("bad image in row 99")
        built.append((b[0], threading.current_thread().name))
        return {"input_ids": torch.tensor(b)}

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    inline, ahead = WindowLoader(build, ahead=False), WindowLoader(build, ahead=True)
    for first in (0, 2):
        window, following = batches[first : first + 2], batches[first + 2 : first + 4]
        want = inline.window(window, following)
        built.clear()
        got = ahead.window(window, following)
        assert [m["input_ids"].tolist() for m in got] == [m["input_ids"].tolist() for m in want]
        ahead._next[1].result()  # wait for the following window, built meanwhile
        threads = {b: name for b, name in built}
        assert threads[following[0][0]].startswith("dsft-loader")
    with pytest.raises(ValueError, match="row 99"):
        ahead.window([[99]], [])
    ahead.close()
