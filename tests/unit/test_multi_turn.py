"""data.multi_turn: per-turn examples train each assistant turn as it is generated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsft.config import config_from_dict
from dsft.data import prepare
from dsft.data.tokenize import IGNORE_INDEX

from .test_template import _write, conversation, family_tokenizer


def _prepared(tmp_path: Path, tok: Any, multi_turn: str, path: Path):
    data = {
        "path": [str(path)],
        "val_fraction": 0.0,
        "test_fraction": 0.0,
        "max_len": 4096,
        "cache": False,
        "multi_turn": multi_turn,
        "shuffle": False,
    }
    return prepare(config_from_dict({"model": {"path": "unused"}, "data": data}).data, tok)


def _trained(tok: Any, t) -> str:
    return tok.decode(
        [i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE_INDEX]
    )


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_per_turn_trains_each_turn_as_generated(tmp_path: Path, family: str) -> None:
    """Example i's trained text is render(turns[:i+1]) minus the inference prompt
    render(turns[:i], add_generation_prompt=True): the turn as the model would produce it,
    reasoning included (as_rendered drops the first turn's reasoning on these templates)."""
    tok = family_tokenizer(family)
    row = conversation("reasoning")
    path = _write(tmp_path, [row])
    splits = _prepared(tmp_path, tok, "per_turn", path)
    messages = row["messages"]
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(splits.train) == len(ends) == 2
    by_source = {splits.train.example(k).source: k for k in range(len(splits.train))}
    for n, end in enumerate(ends, 1):
        k = by_source[f"{path}:1 turn {n}"]
        full = tok.apply_chat_template(messages[: end + 1], tokenize=False)
        prompt = tok.apply_chat_template(messages[:end], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        expected = full[len(prompt) :]
        got = _trained(tok, splits.train[k])
        # the template's whitespace after the turn's end token is not generated
        assert got == expected.rstrip("\n"), (family, n, got, expected)
        assert tok.decode(splits.train[k].input_ids).startswith(prompt)
        assert messages[end]["reasoning_content"] in got  # reasoning trained on every turn
    # as rendered (the default), the history-rewriting template drops turn 1's reasoning
    whole = _prepared(tmp_path, tok, "as_rendered", path)
    assert len(whole.train) == 1
    assert messages[ends[0]]["reasoning_content"] not in _trained(tok, whole.train[0])
    # last_turn: the final turn only
    last = _prepared(tmp_path, tok, "last_turn", path)
    assert len(last.train) == 1
    got = _trained(tok, last.train[0])
    assert messages[ends[1]]["content"] in got and messages[ends[0]]["content"] not in got


def test_multi_turn_needs_loss_on_assistant() -> None:
    from dsft.config import DataConfig, validate_data

    problems = validate_data(DataConfig(path=["x"], multi_turn="per_turn", loss_on="all"))
    assert any("data.multi_turn=per_turn" in p for p in problems)
