"""Data: formats and row errors, chat-template masking, splits, rank sharding, collation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsft.config import DataConfig
from dsft.data import prepare
from dsft.data.collate import collate, collate_prompts
from dsft.data.formats import DataError, Example, read_jsonl
from dsft.data.sampler import eval_shard, steps_per_epoch, train_batches
from dsft.data.split import split_indices
from dsft.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_prompt
from dsft.synthetic import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_instruction_and_chat_records(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        '{"instruction": "Do", "input": "x", "output": "y"}\n'
        "\n"
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},'
        ' {"role": "assistant", "content": "a"}]}\n'
    )
    exs = read_jsonl(f)
    assert exs[0].messages == [
        {"role": "user", "content": "Do\n\nx"},
        {"role": "assistant", "content": "y"},
    ]
    assert exs[1].messages[0]["role"] == "system"
    assert exs[1].source.endswith("mixed.jsonl:3")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"instruction": "a"}', "bad.jsonl:2: missing field 'output'"),
        ('{"instruction": "a", "output": 3}', "bad.jsonl:2: field 'output' must be a string"),
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "bad.jsonl:2: messages[0].role: 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"question": "x"}', "cannot tell the format (fields: question)"),
    ],
)
def test_bad_rows_are_located(tmp_path: Path, line: str, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "ok", "output": "ok"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert needle in str(e.value)


def _trained_text(tok, t) -> str:
    return tok.decode(
        [i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != IGNORE_INDEX]
    )


def test_loss_only_on_responses(tok) -> None:
    ex = Example(
        [{"role": "user", "content": "Reverse\n\nabc"}, {"role": "assistant", "content": "cba"}],
        "t:1",
    )
    t = tokenize_example(tok, ex, max_len=128)
    assert tok.decode(t.input_ids) == "<s><|user|>Reverse\n\nabc<|end|><|assistant|>cba<|end|>"
    # the response and its end-of-turn token are trained on; the prompt is not
    assert _trained_text(tok, t) == "cba<|end|>"
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
    assert _trained_text(tok, t) == "a1<|end|>a2<|end|>"
    ids, ref = tokenize_prompt(tok, ex)
    assert ref == "a2"
    assert tok.decode(ids).endswith("q2<|end|><|assistant|>")


def test_truncation_and_all_masked_examples_dropped(tok, tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"instruction": "'
        + "x" * 40
        + '", "output": "yy"}\n'
        + '{"instruction": "a", "output": "b"}\n' * 9
    )
    s = prepare(DataConfig(path=[str(f)], max_len=20, val_fraction=0, test_fraction=0), tok)
    # the long prompt leaves no response token within 20 tokens: dropped, not fed all-masked
    assert s.stats["dropped_no_target"] == 1 and s.stats["truncated"] == 0
    assert len(s.train) == 9
    s = prepare(DataConfig(path=[str(f)], max_len=46, val_fraction=0, test_fraction=0), tok)
    assert s.stats["truncated"] == 1 and len(s.train) == 10  # cut, but a response token is left
    s = prepare(
        DataConfig(path=[str(f)], max_len=46, val_fraction=0, test_fraction=0, truncation="drop"),
        tok,
    )
    assert s.stats["dropped_too_long"] == 1 and len(s.train) == 9
    assert all(t.num_target_tokens > 0 for t in s.train)


def test_split_is_deterministic_and_disjoint() -> None:
    a = split_indices(1000, 0.1, 0.05, seed=3)
    assert a == split_indices(1000, 0.1, 0.05, seed=3)
    assert a != split_indices(1000, 0.1, 0.05, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    assert sorted(train + val + test) == list(range(1000))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_shards_disjoint_and_lockstep(world: int) -> None:
    n, mb, accum = 103, 4, 2
    per_rank = [
        train_batches(n, mb, world, r, epoch=1, seed=5, multiple=accum) for r in range(world)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {steps_per_epoch(n, mb, world, accum) * accum}  # same steps everywhere
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    assert len(seen) > n - mb * world * accum  # only less than one global batch dropped
    # a new epoch reshuffles, the same epoch is reproducible
    assert per_rank[0] == train_batches(n, mb, world, 0, epoch=1, seed=5, multiple=accum)
    assert per_rank[0] != train_batches(n, mb, world, 0, epoch=2, seed=5, multiple=accum)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 3), (7, 1), (13, 2)])
def test_eval_shards_cover_exactly(n: int, world: int) -> None:
    shards = [eval_shard(n, world, r) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))


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
