"""Every slurm/ script, submitted with ``sbatch --wait`` to a real Slurm on this machine.

The cluster (tests/slurm_cluster.py) has a one-node partition ``one`` (this host) and a
two-node partition ``two`` (emulated nodes n1, n2). Each job trains the tiny model on
CPU for a few steps; the checks are the job's exit code, its log (world size and
launcher), per-rank files in the checkpoint (every rank wrote its RNG state and its
ZeRO shard), the world size recorded in the checkpoint, and a falling loss. The
sbatch options given here override the scripts' #SBATCH lines (no GPUs, few CPUs),
which is how a user adapts them too.

Needs root and Debian's slurm-wlm / munge / OpenMPI / PMIx (installed when missing);
skipped without them, except under CI=true, where they must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, base_config, cpu_env, read_summary, train_rows, write_config
from .slurm_cluster import SlurmCluster, install, record

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.distributed]

SLURM = ROOT / "slurm"
VENV = Path(sys.prefix)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running test cluster; its daemons are stopped (by PID) whatever happens."""
    if os.geteuid() != 0:
        _unavailable("the test cluster runs its daemons as root")
    reason = install()
    if reason:
        _unavailable(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        _unavailable(f"could not start Slurm: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _config(model: Path, data: Path, out: Path, **sections: dict) -> dict:
    """ZeRO-2 (every rank saves its own optimizer shard), a checkpoint every 3 steps."""
    tree = base_config(
        model,
        data,
        out,
        deepspeed={"zero_stage": 2},
        train={"max_steps": 6},
        eval={"generate": False},
        checkpoint={"every": 3, "export": False},
        logging={"every": 1},
    )
    for name, values in sections.items():
        tree[name].update(values)
    return tree


def _env(**extra: str) -> dict[str, str]:
    return {**cpu_env(), "DSFT_VENV": str(VENV), **extra}


def _log(cwd: Path, job: int) -> str:
    path = cwd / f"dsft-{job}.out"
    return path.read_text() if path.is_file() else f"(no log {path})"


def _check_trained(out: Path, world: int, log: str, source: str) -> None:
    """The run trained on ``world`` ranks, all of which saved their part of the checkpoint."""
    assert f"ranks {world} ({source})" in log, log[-3000:]
    s = read_summary(out)
    assert s["world_size"] == world and s["steps"] == 6
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"]
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tag / "dsft_state.json").read_text())
    assert state["world_size"] == world and state["step"] == 6
    for rank in range(world):
        assert (tag / f"rng_rank{rank}.safetensors").is_file(), rank
        assert list(tag.glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), rank


CASES = {
    # script: (sbatch options, environment, world size, source dsft reports)
    "single_node": (["-p", "one", "--cpus-per-task=2"], {"DSFT_NPROC": "2"}, 2, "torchrun"),
    "multi_node_torchrun": (
        ["-p", "two", "--nodes=2", "--cpus-per-task=1"],
        {"DSFT_NPROC": "1"},
        2,
        "torchrun",
    ),
    "multi_node_srun": (
        ["-p", "two", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
        {},
        4,
        "slurm",
    ),
    "deepspeed": (
        ["-p", "two", "--nodes=2", "--cpus-per-task=1"],
        {"DSFT_NPROC": "1"},
        2,
        "deepspeed",
    ),
    "mpi": (
        ["-p", "two", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"],
        {},
        2,
        "mpi4py",
    ),
}
COMMON = ["--gpus-per-node=0", "--time=15"]


@pytest.mark.parametrize("script", list(CASES))
def test_script_trains_on_all_ranks(
    script: str, slurm: SlurmCluster, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    opts, env, world, source = CASES[script]
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", _config(tiny_model, tiny_data, out))
    rc, job = slurm.sbatch(
        SLURM / f"{script}.sbatch",
        [str(cfg), "train.lr=3e-3"],  # the scripts pass dotted overrides on
        [*COMMON, *opts],
        cwd=tmp_path,
        env=_env(**env),
        label=script,
    )
    log = _log(tmp_path, job)
    assert rc == 0, f"{log[-4000:]}\n{slurm.logs()}"
    _check_trained(out, world, log, source)
    (done,) = slurm.completions(job)
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0"
    nodes = 1 if "one" in opts else 2
    assert done["NodeCnt"] == str(nodes)  # the job really spanned both emulated nodes


def _wait_for(what, timeout: float, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    return None


def _last_step(out: Path) -> int:
    try:
        return max((r["step"] for r in train_rows(out)), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def _final_state(slurm: SlurmCluster, job: int) -> dict[str, str] | None:
    """The job's completion record once it has ended for good (a requeue logs PENDING)."""
    rows = [r for r in slurm.completions(job) if r.get("JobState") not in ("PENDING", "REQUEUED")]
    return rows[-1] if rows else None


@pytest.mark.parametrize("script", ["single_node", "multi_node_srun"])
def test_preempted_job_requeues_and_resumes(
    script: str, slurm: SlurmCluster, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """USR1 mid-run (what --signal=USR1@180 sends before the time limit): every rank
    saves at the same step, rank 0 requeues the job, the job runs again and resumes
    from that checkpoint to the end."""
    opts, env, world, _ = CASES[script]
    if script == "multi_node_srun":  # one rank per node is enough here
        opts, world = [o.replace("=2", "=1") if "per-node" in o else o for o in opts], 2
    out = tmp_path / "run"
    long = _config(tiny_model, tiny_data, out, train={"max_steps": 5000})
    cfg = write_config(tmp_path / "c.yaml", long)
    t0 = time.time()
    job = slurm.submit(
        SLURM / f"{script}.sbatch", [str(cfg)], [*COMMON, *opts], cwd=tmp_path, env=_env(**env)
    )
    step = _wait_for(lambda: _last_step(out) >= 3 and _last_step(out), timeout=240)
    assert step, f"no step 3 within 240s\n{_log(tmp_path, job)[-4000:]}\n{slurm.logs()}"
    # The requeued run reads the config again: let it end soon after the resume point.
    long["train"]["max_steps"] = step + 25
    write_config(cfg, long)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env(), check=True)
    requeued = _wait_for(
        lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job)["JobState"] == "PENDING",
        timeout=120,
    )
    assert requeued, f"not requeued\n{_log(tmp_path, job)[-4000:]}"
    # Slurm holds a requeued job back for two minutes; the test need not wait that long.
    slurm.scontrol("update", f"JobId={job}", "StartTime=now")
    final = _wait_for(lambda: _final_state(slurm, job), timeout=300, poll=0.5)
    record(f"job {script} preempted + requeued + resumed", time.time() - t0)
    log = _log(tmp_path, job)
    assert final, f"job did not finish\n{log[-4000:]}\n{slurm.logs()}"
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, log[-4000:])

    assert log.count("stopped by a signal at step") == world  # every rank stopped
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert step <= stopped < step + 25
    assert f"requeued Slurm job {job}" in log
    assert "(restart 1)" in log  # the script ran a second time, in the same job
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}: step {stopped}" in log
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, step + 26))  # each step once
    assert read_summary(out)["world_size"] == world


@pytest.mark.parametrize(
    ("fault", "extra"),
    [("DSFT_FAULT_KILL_AT_STEP", {}), ("DSFT_FAULT_HANG_AT_STEP", {"DSFT_DIST_TIMEOUT": "10"})],
    ids=["killed", "hung"],
)
def test_failed_rank_ends_the_job(
    fault: str,
    extra: dict[str, str],
    slurm: SlurmCluster,
    tiny_model: Path,
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    """The last rank (on the second node) dies, or hangs, after step 3: the job ends
    non-zero within bounded time instead of waiting for the time limit."""
    opts = ["-p", "two", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    out = tmp_path / "run"
    tree = _config(tiny_model, tiny_data, out, train={"max_steps": 5000})
    cfg = write_config(tmp_path / "c.yaml", tree)
    t0 = time.time()
    rc, job = slurm.sbatch(
        SLURM / "multi_node_srun.sbatch",
        [str(cfg)],
        [*COMMON, *opts],
        cwd=tmp_path,
        env=_env(**{fault: "3", "DSFT_FAULT_RANK": "1", **extra}),
        timeout=300,
        label=f"multi_node_srun, rank 1 {'killed' if 'KILL' in fault else 'hung'}",
    )
    seconds = time.time() - t0
    log = _log(tmp_path, job)
    assert rc != 0, log[-4000:]
    assert _last_step(out) <= 4
    assert seconds < 120, (seconds, log[-4000:])
    final = _final_state(slurm, job)
    assert final and final["JobState"] == "FAILED", final


def test_scancel_saves_and_stays_cancelled(
    slurm: SlurmCluster, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """scancel (SIGTERM to every task) also saves a checkpoint, but the job is not
    requeued: a cancelled job must stay cancelled even with checkpoint.requeue=true."""
    opts = ["-p", "two", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", _config(tiny_model, tiny_data, out, train={"max_steps": 5000})
    )
    t0 = time.time()
    job = slurm.submit(
        SLURM / "multi_node_srun.sbatch", [str(cfg)], [*COMMON, *opts], cwd=tmp_path, env=_env()
    )
    assert _wait_for(lambda: _last_step(out) >= 3, timeout=240), _log(tmp_path, job)[-4000:]
    subprocess.run(["scancel", str(job)], env=slurm.env(), check=True)
    final = _wait_for(lambda: _final_state(slurm, job), timeout=120, poll=0.5)
    # the job is CANCELLED at once; its ranks are still saving and exiting
    _wait_for(lambda: _log(tmp_path, job).count("stopped by a signal at step") == 2, 60)
    record("job multi_node_srun, scancel", time.time() - t0)
    log = _log(tmp_path, job)
    assert final and final["JobState"] == "CANCELLED", (final, log[-4000:])
    assert "not requeueing Slurm job" in log and "requeued Slurm job" not in log
    assert [r for r in slurm.completions(job) if r["JobState"] == "PENDING"] == []
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"


def test_sweep_as_job_array(
    slurm: SlurmCluster, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """`dsft sweep --slurm`: one array task per trial, then the ranked table."""
    import csv

    import yaml

    root = tmp_path / "sweep"
    tree = _config(tiny_model, tiny_data, root, train={"max_steps": 1000})
    tree["eval"].update(before_training=False)
    cfg = write_config(tmp_path / "base.yaml", tree)
    sw = tmp_path / "sweep.yaml"
    sw.write_text(
        yaml.safe_dump(
            {
                "budget": {"train.max_steps": 4, "eval.every": 2, "deepspeed.zero_stage": 0},
                "parameters": {"train.lr": [1.0e-6, 3.0e-3]},
            }
        )
    )
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "sweep", str(cfg), str(sw), "--slurm",
         "--slurm-script", str(SLURM / "sweep_array.sbatch"),
         "--sbatch-args", f"--wait -p one {' '.join(COMMON)} --cpus-per-task=1"],
        env=slurm.env(_env()), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    record("job sweep_array (2 tasks)", time.time() - t0)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + slurm.logs()
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [float(r["train.lr"]) for r in rows] == [3e-3, 1e-6]  # ranked by val loss
    logs = sorted(tmp_path.glob("dsft-sweep-*_*.out"))
    assert len(logs) == 2, list(tmp_path.iterdir())  # one log per array task
