"""Rank discovery (dsft/distributed.py), pure: every launcher's environment, the Slurm job-id
port, DSFT_DISCOVERY, DSFT_DIST_TIMEOUT. Over real gloo groups:
tests/integration/test_distributed_runs.py."""

from __future__ import annotations

import os

import pytest
import torch

from dsft import distributed as dist
from dsft.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
            (3, 1, 8, "torchrun", 4),
        ),
        (
            {
                "RANK": "1",
                "LOCAL_RANK": "1",
                "WORLD_SIZE": "2",
                "CROSS_RANK": "0",
                "LOCAL_SIZE": "2",
            },
            (1, 1, 2, "deepspeed", 2),
        ),
        (
            {
                "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1",
                "SLURM_NTASKS": "6",
                "SLURM_TASKS_PER_NODE": "2(x3)",
            },
            (5, 1, 6, "slurm", 2),
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            (2, 0, 4, "openmpi", 2),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 0, 2, "mpi", 1)),
        ({}, (0, 0, 1, "single", 1)),
        # a launcher's explicit env wins over the Slurm allocation it runs inside
        (
            {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
            (1, 0, 2, "torchrun", 1),
        ),
    ],
)
def test_discover(env: dict[str, str], expected: tuple) -> None:
    d = dist.discover(env)
    assert (d.rank, d.local_rank, d.world_size, d.source, d.local_world_size) == expected


def test_slurm_port_is_derived_from_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    dist.export_torch_env(dist.DistEnv(1, 0, 4, "slurm"))
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("1", "4")


def test_mpi_discovery_is_asked_for_and_port_comes_from_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DSFT_DISCOVERY=mpi asks MPI (mpi4py) instead of Slurm's variables; under Slurm every
    multi-rank source uses the job-id port."""
    seen = []
    monkeypatch.setattr(dist, "_discover_mpi", lambda: seen.append(1) or dist.DistEnv(
        1, 0, 2, "mpi4py", 1))  # fmt: skip
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "DSFT_DISCOVERY": "mpi"}
    assert dist.discover(slurm).source == "mpi4py" and seen
    assert dist.discover({**slurm, "DSFT_DISCOVERY": "auto"}).source == "slurm"
    with pytest.raises(ConfigError, match="DSFT_DISCOVERY"):
        dist.discover({"DSFT_DISCOVERY": "pmix"})
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MASTER_ADDR", "n1")
    dist.export_torch_env(dist.DistEnv(1, 0, 2, "mpi4py"))
    assert os.environ["MASTER_PORT"] == str(dist.slurm_port(4242)) == "24242"


def test_dist_timeout() -> None:
    assert dist.dist_timeout({}).total_seconds() == dist.DEFAULT_TIMEOUT == 600
    assert dist.dist_timeout({"DSFT_DIST_TIMEOUT": "90"}).total_seconds() == 90
    for bad in ("0", "-5", "ten"):
        with pytest.raises(ConfigError, match="DSFT_DIST_TIMEOUT"):
            dist.dist_timeout({"DSFT_DIST_TIMEOUT": bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend's op")
def test_cpu_training_never_builds_deepspeeds_shm_op() -> None:
    """The shm all-reduce is a 90 s JIT compile (and a lock a killed build leaves for ever)."""
    ds = dist.import_deepspeed()
    import deepspeed.comm.torch as ds_comm_torch

    assert ds is not None
    assert ds_comm_torch.build_shm_op() is None
