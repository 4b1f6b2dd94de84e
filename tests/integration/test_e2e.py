"""End-to-end runs of the real path: torchrun -> dsft train -> DeepSpeed over gloo.

Each run trains a 2-layer model for a few steps and checks that the loss fell,
the checkpoint was written, and the exported directory loads with transformers
and reproduces the run's final validation loss (so the export holds the trained
weights, gathered correctly even under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsft.config import DataConfig
from dsft.data import prepare
from dsft.eval.evaluator import validate

from ..conftest import (
    ROOT,
    base_config,
    cpu_env,
    read_summary,
    run_dsft,
    short_run_config,
    train_rows,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _check_run(out: Path, data: Path, lora: bool = False, min_drop: float = 0.3) -> dict:
    s = read_summary(out)
    before, after = s["before"]["val"], s["after"]["val"]
    assert after["loss"] < before["loss"] - min_drop, (before, after)
    assert s["before"]["val"]["examples"] == s["data"]["val"]  # nothing dropped or duplicated
    ckpt = Path(s["checkpoint"])
    assert ckpt.is_dir() and any(ckpt.iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert (out / "config.yaml").is_file() and (out / "plan.json").is_file()
    zero = json.loads((out / "ds_config.json").read_text())["zero_optimization"]
    if zero["stage"]:  # bucket sizes follow the model's hidden size (32)
        assert zero["reduce_bucket_size"] == 32 * 32
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(train_losses) >= 5 and all(map(torch.isfinite, torch.tensor(train_losses)))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The exported model loads with plain transformers and gives the run's final val loss.
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(final)
    if lora:
        assert (final / "adapter" / "adapter_config.json").is_file()
    cfg = DataConfig(path=[str(data)], max_len=48, val_fraction=0.13, test_fraction=0.1)
    val = prepare(cfg, tok).val
    metrics = validate(model, val, micro_batch=4, pad_id=tok.pad_token_id)
    assert metrics["tokens"] == after["tokens"]
    assert metrics["loss"] == pytest.approx(after["loss"], rel=1e-4)
    return s


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_fp32(stage: int, tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(tiny_model, tiny_data, out, deepspeed={"zero_stage": stage}),
    )
    proc = run_dsft(["train", str(cfg)], nproc=2)
    assert proc.returncode == 0
    s = _check_run(out, tiny_data)
    assert s["world_size"] == 2 and s["global_batch"] == 16
    assert s["after"]["test"]["examples"] == 8


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_bf16(stage: int, tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": stage},
            train={"precision": "bf16", "max_steps": 10},
            eval={"generate": False},
        ),
    )
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    s = read_summary(out)
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_lora_zero3(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": 3},
            model={"lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}},
            train={"lr": 3e-2, "max_steps": 20},
        ),
    )
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    s = _check_run(out, tiny_data, lora=True, min_drop=0.1)
    # only the adapters train: r * (in + out) per linear layer, 7 linears in each of 2 layers
    hidden, inter, r = 32, 96, 8
    per_layer = 4 * r * (hidden + hidden) + 3 * r * (hidden + inter)
    assert s["trainable_params"] == 2 * per_layer


def test_single_process_matches_two_rank_validation(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """The same model and data give the same validation numbers on 1 and 2 ranks."""
    results = {}
    for nproc, stage in ((1, 0), (2, 3)):
        out = tmp_path / f"run{nproc}"
        cfg = write_config(
            tmp_path / f"c{nproc}.yaml",
            base_config(
                tiny_model,
                tiny_data,
                out,
                deepspeed={"zero_stage": stage},
                train={"max_steps": 1},
                eval={"generate": False},
                checkpoint={"save_final": False, "export": False},
            ),
        )
        assert run_dsft(["train", str(cfg)], nproc=nproc).returncode == 0
        results[nproc] = read_summary(out)["before"]["val"]
    one, two = results[1], results[2]
    assert one["examples"] == two["examples"] == 26 and one["tokens"] == two["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["token_acc"] == pytest.approx(one["token_acc"], rel=1e-6)


def _launch(launcher: str, cfg: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The launch/ wrapper of ``launcher`` on 2 ranks, and its environment: this venv's
    launchers first on PATH; for mpirun, a shim adding what a CI container needs (root,
    2 ranks on fewer cores, the CPU settings exported to the ranks), so the wrapper itself
    runs as a user runs it."""
    env = cpu_env()
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable  # launch/mpirun.sh, launch/srun.sh: the ranks' python
    if launcher == "deepspeed":
        env["MASTER_PORT"] = str(29600 + os.getpid() % 1000)  # 29500 clashes between runs
    if launcher == "mpirun":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            pytest.skip("OpenMPI's mpirun is not installed (apt-get install openmpi-bin)")
        shim = tmp_path / "bin" / "mpirun"
        shim.parent.mkdir()
        shim.write_text(
            "#!/bin/sh\n"
            f'exec "{mpirun}" --allow-run-as-root --oversubscribe '
            '-x DS_ACCELERATOR -x OMP_NUM_THREADS "$@"\n'
        )
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    return ["bash", str(ROOT / "launch" / f"{launcher}.sh"), "2", str(cfg)], env


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_launchers_discover_the_same_world(
    launcher: str, tiny_model: Path, tiny_data: Path, tmp_path: Path, reference_run: dict
) -> None:
    """launch/torchrun.sh, launch/deepspeed.sh and launch/mpirun.sh give the same 2-rank run,
    step for step."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", short_run_config(tiny_model, tiny_data, out, stage=2, accum=2)
    )
    cmd, env = _launch(launcher, cfg, tmp_path)
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    source = {"torchrun": "torchrun", "deepspeed": "deepspeed", "mpirun": "openmpi"}[launcher]
    assert f"ranks 2 ({source})" in proc.stdout
    rows = train_rows(out)
    # Same global batches as the 1-rank run with 4 accumulation steps: same steps.
    assert [r["loss"] for r in rows] == pytest.approx(reference_run["loss"], rel=1e-4)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference_run["grad_norm"], rel=1e-4)
