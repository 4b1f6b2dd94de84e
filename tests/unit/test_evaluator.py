"""Generation metrics against hand-computed values, and the best-model tracker."""

from __future__ import annotations

import pytest
import torch

from dsft.eval.evaluator import BestTracker, generation_scores, normalize_answer, token_f1


def test_normalisation_is_squad_style() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple") == "apple"


def test_token_f1_by_hand() -> None:
    # pred "cat sat down" vs ref "the cat sat": common {cat, sat} = 2, P = 2/3, R = 2/2
    assert token_f1("cat sat down", "the cat sat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0


def test_free_text_scores_by_hand() -> None:
    pairs = [("Paris", "paris"), ("the big dog", "big cat"), ("x", "y")]
    s = generation_scores(pairs)
    assert s["exact_match"] == pytest.approx(1 / 3)
    # F1: 1, then {big}: P=1/2, R=1/2 -> 1/2, then 0
    assert s["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert "macro_f1" not in s  # three distinct one-off references are not labels


def test_label_scores_by_hand() -> None:
    # references: pos x3, neg x2; predictions: pos, pos, neg | neg, maybe
    pairs = [("pos", "pos"), ("pos", "pos"), ("neg", "pos"), ("neg", "neg"), ("maybe", "neg")]
    s = generation_scores(pairs)
    assert s["label_accuracy"] == pytest.approx(3 / 5)
    # pos: tp 2, predicted 2, actual 3 -> P 1, R 2/3, F1 0.8
    # neg: tp 1, predicted 2, actual 2 -> P 1/2, R 1/2, F1 0.5
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5) / 2)
    assert s["labels"] == 2
    assert "macro_f1" not in generation_scores(pairs, label_metrics="off")


def test_best_tracker_patience_and_direction() -> None:
    t = BestTracker("val/loss", patience=2, min_delta=0.1)
    assert t.update({"loss": 2.0}, 10)
    assert not t.update({"loss": 1.95}, 20)  # within min_delta: not an improvement
    assert not t.should_stop
    assert not t.update({"loss": 2.5}, 30)
    assert t.should_stop and (t.best, t.best_step) == (2.0, 10)
    up = BestTracker("val/exact_match", patience=1)
    assert up.maximize and up.update({"exact_match": 0.2}, 1) and up.update({"exact_match": 0.3}, 2)


def test_validation_reports_each_mixed_dataset() -> None:
    from dsft.data.tokenize import Tokenized
    from dsft.eval.evaluator import validate

    from ..integration.test_distributed_runs import _ToyLM

    g = torch.Generator().manual_seed(3)

    def ex(ds: str, n: int) -> Tokenized:
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        return Tokenized(ids, [-100] * 2 + ids[2:], dataset=ds)

    a = [ex("alpaca", 6) for _ in range(5)]
    b = [ex("chats", 9) for _ in range(3)]
    model = _ToyLM()
    both = validate(model, a + b, micro_batch=3, pad_id=0)
    only_a, only_b = validate(model, a, 3, 0), validate(model, b, 3, 0)
    for k in ("loss", "token_acc", "tokens", "examples"):
        assert both[f"alpaca/{k}"] == pytest.approx(only_a[k])
        assert both[f"chats/{k}"] == pytest.approx(only_b[k])
    # the overall loss is token-weighted, not the mean of the two datasets
    weighted = (only_a["loss"] * only_a["tokens"] + only_b["loss"] * only_b["tokens"]) / (
        only_a["tokens"] + only_b["tokens"]
    )
    assert both["loss"] == pytest.approx(weighted)
    assert "alpaca/loss" not in only_a  # a single dataset gets no per-dataset keys
