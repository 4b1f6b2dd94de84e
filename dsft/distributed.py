"""Everything that differs per rank: discovery, process-group init, rank-0 helpers.

Discovery order (first match wins):
  1. torchrun / the ``deepspeed`` launcher: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``
  2. ``DSFT_DISCOVERY=mpi``: MPI itself, through mpi4py (``srun --mpi=pmix``, any mpirun)
  3. Slurm ``srun`` tasks: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``
  4. OpenMPI ``mpirun``: ``OMPI_COMM_WORLD_*`` (or MPICH / Intel MPI: ``PMI_*``)
  5. nothing: a single process
The result is written back into the torch env-var convention, so that
``deepspeed.init_distributed`` (and anything else) sees one consistent world.

Timeouts: every collective of the job gives up after ``DSFT_DIST_TIMEOUT`` seconds
(default 600; torch/DeepSpeed would wait 30 minutes), so a rank that hangs or vanishes
ends the job instead of freezing it. Waiting for work that rank 0 does alone (writing
and verifying a Hugging Face export) uses a separate gloo group that allows
``LONG_TIMEOUT``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from dsft.errors import ConfigError

log = logging.getLogger("dsft")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    source: str  # which launcher the values came from
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict[str, str], key: str) -> int:
    return int(env[key])


def discover(env: dict[str, str] | None = None) -> DistEnv:
    """Find rank / local rank / world size from the launcher's environment."""
    env = dict(os.environ if env is None else env)
    how = env.get("DSFT_DISCOVERY", "auto")
    if how not in ("auto", "mpi"):
        raise ConfigError([f"DSFT_DISCOVERY={how!r}: use 'auto' (the default) or 'mpi'"])
    if how == "mpi" and not ("RANK" in env and "WORLD_SIZE" in env):
        return _discover_mpi()
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "deepspeed" if "CROSS_RANK" in env else "torchrun"
        local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or "1"
        return DistEnv(
            _int(env, "RANK"),
            int(env.get("LOCAL_RANK", 0)),
            _int(env, "WORLD_SIZE"),
            source,
            int(local),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # SLURM_TASKS_PER_NODE looks like "4(x2),3"; this node's count is not in it by
        # name, but SLURM_NTASKS_PER_NODE is set whenever --ntasks-per-node was given.
        local = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return DistEnv(
            _int(env, "SLURM_PROCID"),
            int(env.get("SLURM_LOCALID", 0)),
            _int(env, "SLURM_NTASKS"),
            "slurm",
            int(local.split("(")[0].split(",")[0]),
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(
            _int(env, "OMPI_COMM_WORLD_RANK"),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            _int(env, "OMPI_COMM_WORLD_SIZE"),
            "openmpi",
            int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)),
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI through mpi4py
        return DistEnv(
            _int(env, "PMI_RANK"),
            int(env.get("MPI_LOCALRANKID", 0)),
            _int(env, "PMI_SIZE"),
            "mpi",
            int(env.get("MPI_LOCALNRANKS", 1)),
        )
    return DistEnv(0, 0, 1, "single")


def _discover_mpi() -> DistEnv:
    """Rank, size and node-local rank from MPI's COMM_WORLD (MPI_Init through mpi4py)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this node's memory
    d = DistEnv(world.Get_rank(), node.Get_rank(), world.Get_size(), "mpi4py", node.Get_size())
    node.Free()
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slurm_head_node(env: dict[str, str]) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:  # argv list, never a shell string: the nodelist comes from the environment
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0] if "[" not in nodelist else None


def _mpi_broadcast_head() -> str | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None)


def export_torch_env(d: DistEnv) -> None:
    """Write the torch ``env://`` variables (rank, world, master address/port)."""
    os.environ["RANK"] = str(d.rank)
    os.environ["LOCAL_RANK"] = str(d.local_rank)
    os.environ["WORLD_SIZE"] = str(d.world_size)
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(d.local_world_size))
    if "MASTER_ADDR" not in os.environ:
        head = None
        if d.source == "slurm":
            head = _slurm_head_node(dict(os.environ))
        elif d.source in ("openmpi", "mpi", "mpi4py"):
            head = _mpi_broadcast_head()
        os.environ["MASTER_ADDR"] = head or "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if d.world_size > 1 and "SLURM_JOB_ID" in os.environ:
            # Every task of a job derives the same port without talking to the others.
            os.environ["MASTER_PORT"] = str(slurm_port(os.environ["SLURM_JOB_ID"]))
        elif d.world_size == 1:
            os.environ["MASTER_PORT"] = str(_free_port())
        else:
            os.environ["MASTER_PORT"] = "29500"


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a Slurm job (also what the slurm/ scripts compute)."""
    return 20000 + int(job_id) % 20000


DEFAULT_TIMEOUT = 600  # seconds; DSFT_DIST_TIMEOUT overrides
LONG_TIMEOUT = 3 * 3600  # seconds other ranks wait for rank 0's export (at least)


def dist_timeout(env: dict[str, str] | None = None) -> timedelta:
    """How long any collective may wait for the other ranks (``DSFT_DIST_TIMEOUT`` seconds).

    A rank that died or hangs then ends the job after at most this long. Raise it when
    one rank legitimately works alone for longer (e.g. a checkpoint of a very large
    model written to a slow filesystem: its save time is logged).
    """
    raw = (os.environ if env is None else env).get("DSFT_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ConfigError([f"DSFT_DIST_TIMEOUT={raw!r}: give a positive number of seconds"])
    return timedelta(seconds=seconds)


def configure_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported; return the dist backend.

    DeepSpeed chooses its accelerator once, at import. Without a GPU it must be told
    ``DS_ACCELERATOR=cpu`` (and then talks gloo), otherwise it assumes CUDA.
    """
    # JIT-built ops (DeepSpeed's shm comm, CPU Adam) are cached per environment, so
    # two virtualenvs with different torch builds never load each other's binaries.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if torch.cuda.is_available():
        return "nccl"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "gloo"


def import_deepspeed() -> Any:
    """Import deepspeed with the accelerator configured (use instead of ``import deepspeed``)."""
    configure_accelerator()
    import deepspeed

    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at its first
        # init_distributed (80-95 s of g++ on 2 cores), though only inference_all_reduce uses
        # it, never a training step; and a compile killed midway leaves a lock file that every
        # later run waits on for ever. Training never builds it.
        import deepspeed.comm.torch as ds_comm_torch

        ds_comm_torch.build_shm_op = lambda: None
    return deepspeed


def setup() -> DistEnv:
    """Discover the world, initialise the process group, bind the local device."""
    d = discover()
    export_torch_env(d)
    backend = configure_accelerator()
    if backend == "nccl":
        # One GPU per task (srun --gpus-per-task / --gpu-bind) shows each rank a single
        # device 0; otherwise the node's GPUs are shared out by local rank.
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
    deepspeed = import_deepspeed()
    timeout = dist_timeout()
    if not torch.distributed.is_initialized():
        if d.world_size == 1:
            # One process needs no rendezvous: an in-memory store opens no port, so a stale
            # MASTER_ADDR/MASTER_PORT in the shell (or a port taken between choosing it and
            # binding it) cannot stall a plain `dsft train`. DeepSpeed adopts the group.
            torch.distributed.init_process_group(
                backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            init_method="env://",
            rank=d.rank,
            world_size=d.world_size,
            timeout=timeout,
        )
    # Groups made later without a timeout get torch's default (30 minutes), and DeepSpeed
    # makes ZeRO's that way (a clone of the world group): make the default ours too.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout
    global _long_group
    if d.world_size > 1 and _long_group is None:
        long = timedelta(seconds=max(timeout.total_seconds(), LONG_TIMEOUT))
        _long_group = torch.distributed.new_group(backend="gloo", timeout=long)
    _configure_logging(d)
    # DeepSpeed still calls a collective that torch deprecated; one warning per rank
    # per step would bury the log.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning
    )
    if not d.is_main:  # one progress bar per job, not one per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return d


_stop_signals: list[int] = []  # stop signals this rank received, in order
_long_group: Any = None  # gloo group with a long timeout, for waiting on rank 0


def _on_stop_signal(signum: int, _frame: Any) -> None:
    _stop_signals.append(signum)


def catch_stop_signals() -> None:
    """Turn SIGUSR1 (Slurm's ``--signal=USR1@N`` warning before the time limit) and
    SIGTERM (scancel, the time limit itself, Slurm's preemption, torchrun passing a stop
    on) into a request to stop at the next step boundary, instead of dying mid-step."""
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGUSR1, _on_stop_signal)


def stop_requested() -> int | None:
    """The first stop signal this rank received, if any (ranks agree through an all-reduce)."""
    return _stop_signals[0] if _stop_signals else None


def come_back_requested() -> bool:
    """True when the stop was the warning before the time limit (SIGUSR1) and nobody
    asked the job to end (SIGTERM: scancel, the limit itself), so it should requeue."""
    return signal.SIGUSR1 in _stop_signals and signal.SIGTERM not in _stop_signals


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (the only rank that logs and writes shared files)."""
    return get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def wait_for_main() -> None:
    """A barrier after work that rank 0 does alone and that may take long (an export):
    the other ranks wait up to ``LONG_TIMEOUT``, not ``DSFT_DIST_TIMEOUT``."""
    if torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier(group=_long_group)


@dataclass(frozen=True)
class SequenceParallelGroups:
    """Where this rank sits in a sequence-parallel x data-parallel job.

    Ranks ``[g*N, (g+1)*N)`` form sequence-parallel group ``g`` (neighbours, so that the
    per-layer all-to-all stays inside a node): they share one micro-batch, each its slice
    of the sequence. ``g`` is also the rank's data-parallel rank, the index the sampler
    shards by. ``mpu`` is DeepSpeed's parallel-state object for ``deepspeed.initialize``:
    ZeRO then partitions over all ranks and averages gradients over the data-parallel ones.
    """

    size: int  # N, ranks per sequence
    rank: int  # this rank's slice of the sequence
    dp_size: int
    dp_rank: int
    group: Any = None  # the sequence-parallel process group (None when size is 1)
    mpu: Any = None


def sequence_parallel_groups(size: int) -> SequenceParallelGroups:
    """Create (collectively, every rank calls it) the sequence-parallel groups of ``size``."""
    world, rank = get_world_size(), get_rank()
    if world % size:
        raise ConfigError([f"train.sequence_parallel: {size} does not divide the {world} ranks"])
    if size == 1:
        return SequenceParallelGroups(1, 0, world, rank)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    # DeepSpeed keeps these groups in module globals; a second run in this process (k-fold
    # folds) makes them afresh rather than tripping over the first run's.
    mpu._release_sequence_parallel_groups()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    return SequenceParallelGroups(
        size,
        mpu.get_sequence_parallel_rank(),
        world // size,
        rank // size,
        mpu.get_sequence_parallel_group(),
        mpu,
    )


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sum a vector of float64 counters over all ranks (exact metric aggregation).

    Sums and counts travel in float64 so that token counts up to 2**53 stay exact.
    """
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if torch.distributed.is_initialized() and get_world_size() > 1:
        dev = device()
        t = t.to(dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t = t.cpu()
    return t


def all_reduce_max(value: int) -> int:
    """The largest of an integer over all ranks."""
    t = torch.tensor([value], dtype=torch.int64)
    if torch.distributed.is_initialized() and get_world_size() > 1:
        t = t.to(device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_list(values: list[int]) -> list[int]:
    """The elementwise largest of an integer list over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.distributed.is_initialized() and get_world_size() > 1:
        t = t.to(device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank."""
    if not torch.distributed.is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above rank 0's progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main() or record.levelno >= logging.WARNING


def _configure_logging(d: DistEnv) -> None:
    """Rank 0 logs INFO; other ranks only warnings and errors, tagged with their rank."""
    log.setLevel(logging.INFO)
    if not log.handlers:
        h = _TqdmHandler(sys.stdout)
        tag = "" if d.world_size == 1 else f"[rank{d.rank}] "
        h.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", "%H:%M:%S"))
        h.addFilter(_RankFilter())
        log.addHandler(h)
        log.propagate = False


def print0(*args: Any) -> None:
    """``print`` on rank 0 only (for user-facing summaries)."""
    if is_main():
        print(*args, flush=True)


def cleanup() -> None:
    global _long_group
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _long_group = None


def in_launched_job() -> bool:
    """True inside a rank of a launched job (torchrun, deepspeed, Slurm/MPI after setup)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_launch_argv(nproc: int, module_args: list[str], python: str | None = None) -> list[str]:
    """The argv that runs ``python -m <module_args>`` as ``nproc`` local ranks: torchrun
    (standalone rendezvous) for several, a plain process for one. The one home of this list
    for the CLI, the benchmark and the tests."""
    python = python or sys.executable
    if nproc > 1:
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            *module_args,
        ]
    return [python, "-m", *module_args]


def launch_local(nproc: int, dsft_args: list[str]) -> int:
    """Run ``dsft <dsft_args>`` as ``nproc`` local ranks (argv list, no shell); exit code."""
    import subprocess

    cmd = local_launch_argv(nproc, ["dsft", *dsft_args])
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
