"""k-fold cross-validation (dsft/crossval.py): each fold's overrides, finished folds skipped,
a failing fold stops the rest, and the mean ± sample std table by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.config import Config
from dsft.crossval import fold_overrides, run_folds, summarize


def _fold(out: Path, f: int, loss: float, acc: float) -> None:
    (out / f"fold_{f}").mkdir(parents=True)
    val = {"loss": loss, "token_acc": acc}
    (out / f"fold_{f}" / "summary.json").write_text(json.dumps({"after": {"val": val}}))


def test_folds_run_once_and_a_failure_stops(tmp_path: Path) -> None:
    cfg = Config()
    cfg.output_dir = str(tmp_path)
    cfg.data.kfold = 3
    assert fold_overrides(cfg, 2) == ["data.fold=2", f"output_dir={tmp_path / 'fold_2'}"]
    _fold(tmp_path, 0, 1.0, 0.5)  # done before an interruption
    ran: list[int] = []
    assert run_folds(cfg, lambda f: ran.append(f) or 0) == 0
    assert ran == [1, 2]
    ran.clear()
    assert run_folds(cfg, lambda f: ran.append(f) or 7) == 7
    assert ran == [1]


def test_summary_is_mean_and_sample_std(tmp_path: Path) -> None:
    for f, (loss, acc) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.6)]):
        _fold(tmp_path, f, loss, acc)
    result, table = summarize(tmp_path, 3)
    assert result["mean_std"]["loss"] == {"mean": 2.0, "std": 1.0}
    assert result["mean_std"]["token_acc"]["mean"] == pytest.approx(0.6)
    assert result["mean_std"]["token_acc"]["std"] == pytest.approx(0.1)
    assert "| mean ± std | 2.0000 ± 1.0000 | 0.6000 ± 0.1000 |" in table
    assert json.loads((tmp_path / "cv.json").read_text()) == result
    assert table in (tmp_path / "cv.md").read_text()
