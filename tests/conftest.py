"""Shared fixtures: a tiny real model directory, small datasets, a multi-rank runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dsft.distributed import local_launch_argv
from dsft.synthetic import build_model_dir, generate_tasks, write_tasks

ROOT = Path(__file__).resolve().parents[1]
# `make test` runs several xdist workers: each gets its share of the cores, in process and
# in the runs it starts (OpenMP threads beyond the cores spin against each other: a small
# matmul took 8x longer with two threads per process on two busy cores).
CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(CORES)
torch.set_num_threads(CORES)


# Integration modules whose module fixture is a training run (or several).
_SHARED_RUNS = {
    "test_checkpoint_runs",
    "test_checkpoint_safety_runs",
    "test_sequence_parallel_runs",
}


# tryfirst: xdist's worker reads the xdist_group marks in its own modifyitems hook
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder is the level: unit (in-process, fast), integration (ranks, runs),
    # cluster (Slurm, namespaces). `make test-fast` runs `-m unit`.
    for item in items:
        level = Path(str(item.fspath)).parent.name
        if level in ("unit", "integration", "cluster"):
            item.add_marker(getattr(pytest.mark, level))
        # `make test` runs two xdist workers: a module whose tests share a trained run (a
        # module fixture) or one Slurm cluster stays on one worker, so it is built once.
        if level == "cluster" or item.module.__name__.rsplit(".", 1)[-1] in _SHARED_RUNS:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The tokenisation cache of the suite lives in a temp dir, not the user's ~/.cache;
    # child ranks inherit the variable.
    os.environ["DSFT_CACHE"] = str(tmp_path_factory.mktemp("dsft-cache"))


def cpu_env(threads: int = 1) -> dict[str, str]:
    """Environment for child ranks on a machine without GPU or network.

    One thread per rank by default: several ranks share the machine's few cores.
    GPUs are hidden, so the suite means the same on a GPU machine (CUDA tests use
    ``gpu_env``).
    """
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
    ):
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama with the demo's char tokenizer, saved by save_pretrained."""
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny", hidden=32, layers=2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    write_tasks(path, generate_tasks(n=200, seed=7))
    return path


def write_config(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def base_config(model_dir: Path, data_path: Path, out: Path, **sections: dict[str, Any]) -> dict:
    """A fast config for tests: fp32, a few steps, small eval, no progress bar."""
    tree: dict[str, Any] = {
        "output_dir": str(out),
        "model": {"path": str(model_dir)},
        "data": {
            "path": [str(data_path)],
            "max_len": 48,
            "val_fraction": 0.13,
            "test_fraction": 0.1,
        },
        "train": {
            "max_steps": 12,
            # the plain loss, the reference the equivalence tests compare against (the
            # fused-loss tests set it themselves)
            "fused_loss": False,
            "micro_batch": 4,
            "grad_accum": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "precision": "fp32",
            "max_grad_norm": 1.0,
        },
        "deepspeed": {"zero_stage": 0},
        "eval": {"micro_batch": 4, "max_generate": 8, "max_new_tokens": 6},
        "logging": {"every": 2, "progress": False},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def gpu_env() -> dict[str, str]:
    """Environment for a run on the machine's CUDA GPU (DeepSpeed picks CUDA itself)."""
    env = {
        k: v for k, v in cpu_env().items() if k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")
    }
    return env


def run_dsft(
    args: list[str],
    nproc: int = 1,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    gpu: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``dsft`` as ``nproc`` ranks via torchrun (or one plain process)."""
    cmd = local_launch_argv(nproc, ["dsft", *args])
    threads = max(1, CORES // nproc)
    proc = subprocess.run(
        cmd,
        env={**(gpu_env() if gpu else cpu_env(threads)), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    return proc


def read_summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def train_rows(out: Path, split: str = "train") -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` for one split."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def short_run_config(model_dir: Path, data: Path, out: Path, stage: int, accum: int) -> dict:
    """Six logged steps, micro-batch 4, no evaluation or saving: for comparing steps."""
    return base_config(
        model_dir,
        data,
        out,
        deepspeed={"zero_stage": stage},
        train={"max_steps": 6, "grad_accum": accum},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1},
    )


@pytest.fixture(scope="session")
def reference_run(tiny_model: Path, tiny_data: Path, tmp_path_factory) -> dict[str, list]:
    """Per-step loss and grad norm of one plain process, ZeRO-0, micro-batch 4 x accum 4."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "c.yaml", short_run_config(tiny_model, tiny_data, tmp / "run", 0, 4))
    assert run_dsft(["train", str(cfg)]).returncode == 0
    rows = train_rows(tmp / "run")
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def weights(model_dir: Path) -> dict[str, Any]:
    """The tensors of a saved (single-file) Hugging Face model."""
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def pytest_terminal_summary(terminalreporter) -> None:
    """The time each Slurm stage took (install, start, every job), when any ran."""
    from .cluster.slurm_cluster import TIMINGS

    if TIMINGS:
        terminalreporter.write_sep("-", "Slurm stage timings")
        for stage, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f}s  {stage}")
