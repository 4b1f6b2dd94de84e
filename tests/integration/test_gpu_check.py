"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU with tiny shapes,
each writing its result files into the one output folder. Its bench stage is also the test of
``dsft bench --mode gpu --dry-run`` (the GPU defaults, measured on the CPU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT, cpu_env
from .test_bench import _check_figures

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {k: v for k, v in cpu_env(threads=2).items() if k != "OUT"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    stages = (out / "stages.tsv").read_text() if (out / "stages.tsv").is_file() else ""
    assert proc.returncode == 0, stages + proc.stdout[-4000:] + proc.stderr[-3000:]
    status = dict(line.split("\t")[:2] for line in stages.splitlines())
    stages = ("pytest", "bench", "profile", "loss_memory", "tiling")
    assert {s: status[s] for s in stages} == dict.fromkeys(stages, "ok")
    for f in ("summary.md", "environment.txt", "pytest.log", "pytest.xml", "bench/bench.md",
              "bench/bench.json", "profile/summary.md", "profile/run/profile/top_kernels.md",
              "profile/run/profile/trace.json.gz", "loss_memory/loss_memory.md",
              "tiling/tiling.md"):  # fmt: skip
        assert (out / f).is_file(), f
    summary = (out / "summary.md").read_text()
    for system in ("dsft", "dsft-packed", "trl-default", "trl-best"):
        assert f"| {system} |" in summary
    assert "fused / full" in summary and "Top kernels" in summary
    assert not list(out.rglob("*.safetensors"))  # weights are not results
    # the bench stage ran the GPU mode's defaults (bf16, one rank, H100 peak) on the CPU
    result = json.loads((out / "bench" / "bench.json").read_text())
    _check_figures(result, mfu=True)
    s = result["settings"]
    assert s["dry_run"] and s["preset"] == "tiny" and s["precision"] == "bf16" and s["nproc"] == 1
    assert s["peak_tflops"] == 989.0
    assert "gpu mode (dry run)" in (out / "bench.log").read_text()
