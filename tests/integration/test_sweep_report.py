"""Sweeps rank trials and resume; the report renders its plots in a headless browser."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsft.recipes.sweep import Sweep, load_sweep, should_prune, trial_settings

from ..conftest import ROOT, base_config, cpu_env, write_config


def test_grid_and_random_trials(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("parameters: {train.lr: [1.0e-4, 1.0e-3], model.lora.r: [8, 16]}\n")
    s = load_sweep(f)
    assert trial_settings(s) == [
        {"train.lr": 1e-4, "model.lora.r": 8},
        {"train.lr": 1e-4, "model.lora.r": 16},
        {"train.lr": 1e-3, "model.lora.r": 8},
        {"train.lr": 1e-3, "model.lora.r": 16},
    ]
    f.write_text(
        "method: random\ntrials: 5\nseed: 3\n"
        "parameters: {train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}, train.epochs: [1, 2]}\n"
    )
    r = trial_settings(load_sweep(f))
    assert len(r) == 5 and r == trial_settings(load_sweep(f))  # seeded: resumable
    assert all(1e-5 <= t["train.lr"] <= 1e-3 and t["train.epochs"] in (1, 2) for t in r)
    f.write_text("method: bayes\nparameters: {train.lr: 3}\nfoo: 1\n")
    with pytest.raises(Exception) as e:
        load_sweep(f)
    msg = str(e.value)
    assert "unknown key 'foo'" in msg and "method" in msg and "parameters.train.lr" in msg


def test_median_pruning_rule() -> None:
    s = Sweep(parameters={}, prune=True)
    others = [{2: 1.0, 4: 0.8}, {2: 1.2, 4: 0.9}, {2: 1.1}]
    assert should_prune(s, {2: 1.5}, others)  # worse than the median 1.1 at step 2
    assert not should_prune(s, {2: 1.05}, others)
    assert not should_prune(s, {2: 9.0, 4: 9.0}, [*others[:1], {}])  # too few peers at step 4
    assert not should_prune(Sweep(parameters={}, prune=False), {2: 9.0}, others)


def _sweep_files(tiny_model: Path, tiny_data: Path, tmp: Path) -> tuple[Path, Path]:
    tree = base_config(
        tiny_model,
        tiny_data,
        tmp / "sweep",
        train={"max_steps": 1000},  # the sweep budget cuts it
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 2, "export": False},
    )
    cfg = write_config(tmp / "base.yaml", tree)
    sw = tmp / "sweep.yaml"
    sw.write_text(
        yaml.safe_dump(
            {
                "metric": "val/loss",
                "budget": {"train.max_steps": 8, "eval.every": 4},
                "parameters": {"train.lr": [1.0e-5, 3.0e-3, 1.0e-6]},
            }
        )
    )
    return cfg, sw


def _dsft(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dsft", *args],
        cwd=ROOT,
        env={**cpu_env(2), **(env_extra or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sweep_ranks_trials_and_resumes(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    cfg, sw = _sweep_files(tiny_model, tiny_data, tmp_path)
    root = tmp_path / "sweep"
    # trial 0 finishes; trial 1 is interrupted (killed at step 5, after its step-4 checkpoint)
    out, _ = _dsft("sweep", str(cfg), str(sw), "--trial", "0").communicate(timeout=600)
    assert (root / "trials" / "000" / "summary.json").is_file(), out[-3000:]
    p = _dsft(
        "sweep", str(cfg), str(sw), "--trial", "1", env_extra={"DSFT_FAULT_KILL_AT_STEP": "5"}
    )
    p.communicate(timeout=600)
    assert not (root / "trials" / "001" / "summary.json").is_file()
    assert (root / "trials" / "001" / "checkpoints" / "latest").is_file()

    p = _dsft("sweep", str(cfg), str(sw))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "trial 0 already done" in out and "trial 1 {" in out and "trial 2 {" in out
    assert "resumed from" in (root / "trials" / "001" / "trial.log").read_text()  # not restarted
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["done"] * 3
    # ranked by final validation loss: the usable learning rate wins by far
    assert [float(r["train.lr"]) for r in rows] == [3e-3, 1e-5, 1e-6]
    losses = [float(r["final val/loss"]) for r in rows]
    assert losses == sorted(losses) and losses[0] < losses[1] - 0.1
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best["train"]["lr"] == 3e-3 and best["train"]["max_steps"] == 1000  # no budget
    assert "| rank |" in (root / "sweep.md").read_text()

    # the report of the three trials, overlaid
    trials = sorted((root / "trials").iterdir())
    p = _dsft("report", *map(str, trials), "--out", str(tmp_path / "report"))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    page = tmp_path / "report" / "report.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 4 and "Validation loss" in text
    assert len(list((tmp_path / "report").glob("report_plot*.png"))) >= 4
    _check_renders(page, text.count("data:image/png;base64,"))


def _check_renders(page: Path, n_plots: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (Debian's package) to check the report renders")
        pytest.skip("no chromium to render the report")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    # the page's load handler counted the images the browser decoded
    assert f'data-plots-loaded="{n_plots}"' in dom, dom[:500]
