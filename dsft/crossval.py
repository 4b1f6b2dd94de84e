"""k-fold cross-validation: ``dsft train cfg.yaml data.kfold=5`` runs every fold.

Each fold is a normal run in ``<output_dir>/fold_<f>`` with ``data.fold=f`` (the
fold is its validation split; the test split, if any, is the same for all folds).
A fold that already has a ``summary.json`` is not run again, so an interrupted
cross-validation continues where it stopped. At the end, ``cv.json`` and ``cv.md``
hold every fold's final validation metrics and their mean and sample standard
deviation.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsft.config import Config

METRICS = ("loss", "ppl", "token_acc", "exact_match", "f1")


def fold_overrides(cfg: Config, fold: int) -> list[str]:
    return [f"data.fold={fold}", f"output_dir={Path(cfg.output_dir) / f'fold_{fold}'}"]


def run_folds(cfg: Config, run_fold: Callable[[int], int]) -> int:
    """Run each unfinished fold with ``run_fold(f)`` (returns an exit code), then summarise."""
    out = Path(cfg.output_dir)
    for f in range(cfg.data.kfold):
        if (out / f"fold_{f}" / "summary.json").is_file():
            print(f"cv: fold {f} already done ({out / f'fold_{f}'})", flush=True)
            continue
        print(f"cv: fold {f + 1}/{cfg.data.kfold}", flush=True)
        rc = run_fold(f)
        if rc:
            return rc
    return 0


def summarize(out: Path, k: int) -> tuple[dict[str, Any], str]:
    """Per-fold and mean ± std final validation metrics; writes cv.json and cv.md."""
    folds = []
    for f in range(k):
        summary = json.loads((out / f"fold_{f}" / "summary.json").read_text())
        val = summary["after"]["val"]
        folds.append({m: val[m] for m in METRICS if m in val})
    names = [m for m in METRICS if all(m in f for f in folds)]
    agg = {
        m: {
            "mean": statistics.fmean(f[m] for f in folds),
            "std": statistics.stdev(f[m] for f in folds) if k > 1 else 0.0,
        }
        for m in names
    }
    result = {"kfold": k, "folds": folds, "mean_std": agg}
    rows = ["| fold | " + " | ".join(f"val/{m}" for m in names) + " |"]
    rows.append("|---" * (len(names) + 1) + "|")
    for i, f in enumerate(folds):
        rows.append(f"| {i} | " + " | ".join(f"{f[m]:.4f}" for m in names) + " |")
    rows.append(
        "| mean ± std | "
        + " | ".join(f"{agg[m]['mean']:.4f} ± {agg[m]['std']:.4f}" for m in names)
        + " |"
    )
    table = "\n".join(rows)
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    (out / "cv.md").write_text(f"# {k}-fold cross-validation\n\n{table}\n")
    return result, table
