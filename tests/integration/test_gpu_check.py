"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU with tiny shapes
(profile first: the old path and the defaults on both shapes, then the two benches, then the
gpu tests), each writing its result files into the one output folder. Its bench stages are
also the test of ``dsft bench --mode gpu --dry-run`` (the GPU defaults, measured on the CPU),
the second with LoRA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..conftest import CORES, ROOT, cpu_env
from .test_bench import _check_figures

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1600)  # eleven stages, each a fresh process; on 2 shared cores
def test_gpu_check_dry_run_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {k: v for k, v in cpu_env(threads=CORES).items() if k != "OUT"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)  # fmt: skip
    stages = (out / "stages.tsv").read_text() if (out / "stages.tsv").is_file() else ""
    assert proc.returncode == 0, stages + proc.stdout[-4000:] + proc.stderr[-3000:]
    status = dict(line.split("\t")[:2] for line in stages.splitlines())
    stages = ("inputs_1b", "inputs_8b", "profile_before", "profile_1b", "profile_8b",
              "bench_1b", "bench_8b", "pytest", "vlm", "loss_memory", "tiling")  # fmt: skip
    assert [s for s in status if s != "profile_1b_fast"] == list(stages)  # the profile first
    assert {s: status[s] for s in stages} == dict.fromkeys(stages, "ok")
    assert status["profile_1b_fast"].startswith("skipped (dry run")  # GPU only
    for f in ("summary.md", "environment.txt", "pytest.log", "pytest.xml", "bench-1b/bench.md",
              "bench-1b/bench.json", "bench-8b/bench.json", "loss_memory/loss_memory.md",
              "tiling/tiling.md", "vlm/vlm.md"):  # fmt: skip
        assert (out / f).is_file(), f
    for p in ("profile_before", "profile_1b", "profile_8b"):
        for f in ("summary.md", "kernels.json", "run/profile/top_kernels.md",
                  "run/profile/trace.json.gz"):  # fmt: skip
            assert (out / p / f).is_file(), (p, f)
        kernels = json.loads((out / p / "kernels.json").read_text())
        assert kernels["steps"] == 2 and sum(kernels["categories"].values()) > 0.9
    assert "attention sdpa" in (out / "profile_before" / "summary.md").read_text()
    summary = (out / "summary.md").read_text()
    for system in ("dsft", "dsft-packed", "trl-default", "trl-best"):
        assert f"| {system} |" in summary
    assert "fused / full" in summary and "Top kernels" in summary
    assert "| idle / host gaps |" in summary and "predicted vs measured" in summary
    assert "8B LoRA r=16" in summary and "LoRA r=16 all-linear" in summary
    # the Qwen families' image path needs torchvision: a CPU without it skips them, saying so
    assert "| qwen3_vl | skipped: no torchvision" in summary
    assert not list(out.rglob("*.safetensors"))  # weights are not results
    # the bench stages ran the GPU mode's defaults (bf16, one rank, H100 peak) on the CPU
    for name, lora in (("bench-1b", 0), ("bench-8b", 16)):
        result = json.loads((out / name / "bench.json").read_text())
        if not lora:
            _check_figures(result, mfu=True)
        else:  # the LoRA shape's dry run: the packed systems only (time)
            assert set(result["medians"]) == {"dsft-packed", "trl-best"}
            assert all(m["tokens_per_s"] > 0 and m["mfu_4nt"] > 0
                       for m in result["medians"].values())  # fmt: skip
        s = result["settings"]
        assert s["dry_run"] and s["preset"] == "tiny" and s["precision"] == "bf16"
        assert s["nproc"] == 1 and s["peak_tflops"] == 989.0 and s["lora_r"] == lora
        assert result["medians"]["dsft-packed"]["predicted_step_time"] > 0
    assert result["trainable_params"] < result["params"]  # LoRA
    assert "gpu mode (dry run)" in (out / "bench_1b.log").read_text()
