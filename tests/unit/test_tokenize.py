"""Tokenisation and loss masks (dsft/data/tokenize.py): which tokens are trained for each loss_on and example kind, truncation, prompts for generation."""

from __future__ import annotations

import pytest

from dsft.data.formats import Example
from dsft.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_prompt
from dsft.synthetic import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_loss_only_on_responses(tok) -> None:
    ex = Example(
        [{"role": "user", "content": "Reverse\n\nabc"}, {"role": "assistant", "content": "cba"}],
        "t:1",
    )
    t = tokenize_example(tok, ex, max_len=128)
    assert tok.decode(t.input_ids) == "<s><|user|>Reverse\n\nabc<|end|><|assistant|>cba<|end|>"
    # the response and its end-of-turn token are trained on; the prompt is not
    assert _trained(tok, t) == "cba<|end|>"
    assert t.labels[: len(t.labels) - 4] == [IGNORE_INDEX] * (len(t.labels) - 4)


def test_every_assistant_turn_trained_in_multi_turn(tok) -> None:
    ex = Example(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ],
        "t:1",
    )
    t = tokenize_example(tok, ex, max_len=128)
    assert _trained(tok, t) == "a1<|end|>a2<|end|>"
    ids, ref = tokenize_prompt(tok, ex)
    assert ref == "a2"
    assert tok.decode(ids).endswith("q2<|end|><|assistant|>")


CHAT = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]


def _trained(tok, t) -> str:
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100])


@pytest.mark.parametrize(
    ("loss_on", "expected"),
    [
        ("assistant", "a1<|end|>a2<|end|>"),
        ("last_assistant", "a2<|end|>"),
        # all tokens but the first (position 0 is never predicted)
        (
            "all",
            "<|system|>sys<|end|><|user|>q1<|end|><|assistant|>a1<|end|><|user|>q2<|end|>"
            "<|assistant|>a2<|end|>",
        ),
    ],
)
def test_loss_on(tok, loss_on: str, expected: str) -> None:
    t = tokenize_example(tok, Example(CHAT, "t:1"), 256, loss_on)
    assert _trained(tok, t).replace("<s>", "") == expected


def test_completion_and_text_examples(tok) -> None:
    c = Example(
        [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
        "t:1",
        "completion",
    )
    t = tokenize_example(tok, c, 64)
    assert tok.decode(t.input_ids) == "<s>2+2=4<|end|>"  # no template; EOS to learn stopping
    assert _trained(tok, t) == "4<|end|>"
    assert tok.decode(tokenize_prompt(tok, c)[0]) == "<s>2+2="
    x = tokenize_example(tok, Example([{"role": "assistant", "content": "abc"}], "t:2", "text"), 64)
    assert x.num_target_tokens == len(x.input_ids) - 1  # everything after the first token
