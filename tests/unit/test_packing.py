"""Packing: best-fit bins, packed rows, and packed == unpacked loss and gradients."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dsft.data.collate import collate
from dsft.data.formats import Example
from dsft.data.packing import collate_packed, efficiency, pack
from dsft.data.tokenize import IGNORE_INDEX, tokenize_example
from dsft.eval.evaluator import token_stats
from dsft.synthetic import build_tokenizer


def test_best_fit_decreasing_bins() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(500)]
    bins = pack(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every example once
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # near the lower bound ceil(total / capacity), far better than one example per row
    assert len(bins) <= 1.05 * sum(lengths) / 128 + 1
    assert efficiency(lengths, bins, 128) > 0.95
    assert pack(lengths, 128) == bins  # deterministic
    assert pack([200, 3], 128) == [[0], [1]]  # longer than a row: alone (truncated on read)


@pytest.fixture(scope="module")
def examples():
    tok = build_tokenizer()
    texts = [("Reverse", "abcdef"), ("Sort", "dcba"), ("Add", "3 4"), ("Capitalise", "hello x")]
    exs = [
        tokenize_example(
            tok,
            Example(
                [
                    {"role": "user", "content": f"{a}\n\n{b}"},
                    {"role": "assistant", "content": b[::-1]},
                ],
                "t:1",
            ),
            128,
        )
        for a, b in texts
    ]
    return tok, exs


def test_packed_row_layout(examples) -> None:
    tok, exs = examples
    b = collate_packed([[exs[0], exs[1]], [exs[2]]], tok.pad_token_id)
    n0, n1, n2 = (len(e.input_ids) for e in exs[:3])
    assert b["input_ids"].shape == (2, n0 + n1)
    pos = b["position_ids"]
    assert pos[0].tolist() == list(range(n0)) + list(range(n1))  # restarts per example
    assert pos[1, :n2].tolist() == list(range(n2)) and pos[1, n2] == 0  # pad is its own segment
    assert b["labels"][0, n0] == IGNORE_INDEX  # first token of an example is never a target
    assert (b["labels"][1, n2:] == IGNORE_INDEX).all()
    assert b["lengths"].tolist() == [n0, n1, n2]
    assert "attention_mask" not in b  # boundaries come from the position ids


def _loss_and_grads(model, batch: dict[str, torch.Tensor]):
    model.zero_grad()
    labels = batch.pop("labels")
    batch.pop("lengths")
    nll, _, count = token_stats(model(**batch, use_cache=False).logits, labels)
    loss = nll / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, count


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_unpacked(tiny_model: Path, examples, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    tok, exs = examples
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation=attn
    )
    ref_loss, ref_grads, ref_n = _loss_and_grads(model, collate(exs, tok.pad_token_id))
    packed = collate_packed([[exs[0], exs[3]], [exs[1], exs[2]]], tok.pad_token_id)
    loss, grads, n = _loss_and_grads(model, packed)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # and the test can fail: without restarting positions the examples see each other
    wrong = collate_packed([[exs[0], exs[3]], [exs[1], exs[2]]], tok.pad_token_id)
    wrong["position_ids"] = torch.arange(wrong["input_ids"].size(1)).expand_as(wrong["input_ids"])
    bad_loss, _, _ = _loss_and_grads(model, wrong)
    assert not torch.allclose(bad_loss, ref_loss, rtol=1e-4)
