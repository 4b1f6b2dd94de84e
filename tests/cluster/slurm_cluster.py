"""A throwaway Slurm cluster on this machine, for running the slurm/ scripts for real.

One controller, three ``slurmd`` daemons, one ``munged``, all rooted in a scratch
directory (config, state, spool, logs, munge key and socket) and stopped by PID:

- partition ``one``: this machine under its own hostname, a plain ``slurmd``;
- partition ``two``: two emulated nodes ``n1`` and ``n2`` (``slurmd -N n1`` /
  ``slurmd -N n2`` on their own ports, each with its own spool and TmpFS), so a
  job can span "two nodes" on one machine; ``n1`` / ``n2`` resolve to 127.0.0.1
  through ``/etc/hosts`` (a tagged line, added if missing and left in place: another
  test cluster on this machine may be using it).

Clients find the cluster through ``SLURM_CONF`` (``env()``); jobs inherit it.
Debian's packages are installed by :func:`install` when missing (root + apt-get).

From a shell, to try the scripts by hand (as root)::

    python tests/slurm_cluster.py start /tmp/dsft-slurm   # prints the SLURM_CONF to export
    SLURM_CONF=/tmp/dsft-slurm/slurm.conf sbatch -p two -N 2 ... slurm/multi_node_srun.sbatch c.yaml
    python tests/slurm_cluster.py stop /tmp/dsft-slurm
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "openmpi-bin", "libopenmpi-dev", "libpmix-dev"]
BINARIES = ["sbatch", "srun", "scontrol", "squeue", "slurmctld", "slurmd", "munged"]
EMULATED = ["n1", "n2"]
HOSTS_TAG = "# dsft test cluster"

# (stage, seconds): install, start, every job; printed in pytest's summary.
TIMINGS: list[tuple[str, float]] = []


def record(stage: str, seconds: float) -> None:
    TIMINGS.append((stage, seconds))
    path = os.environ.get("DSFT_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(f"{stage}\t{seconds:.1f}\n")


def _missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:  # not Debian: judge by the binaries alone
        return [] if all(shutil.which(b) for b in BINARIES) else PACKAGES
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *PACKAGES],
        capture_output=True,
        text=True,
    ).stdout
    ok = {line.split()[0] for line in out.splitlines() if line.endswith("install ok installed")}
    return [p for p in PACKAGES if p not in ok]


def install() -> str | None:
    """Install Debian's Slurm, munge, OpenMPI and PMIx if missing; the reason if impossible."""
    missing = _missing_packages()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"not root: cannot install {' '.join(missing)}"
    if shutil.which("apt-get") is None:
        return f"no apt-get to install {' '.join(missing)}"
    t0 = time.time()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", *missing],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-500:]}"
    record("install " + " ".join(missing), time.time() - t0)
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class SlurmCluster:
    """The daemons of one test cluster, rooted in ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, *EMULATED]

    # ------------------------------------------------------------------ setup
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_"))]:
            env.pop(k)
        return env

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes),
                  *(f"tmp/{n}" for n in self.nodes)):  # fmt: skip
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld, *node_ports = _free_ports(1 + len(self.nodes))
        munge = r / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # dsft and the scripts derive ports from the job id: start the ids somewhere
        # random so that two test clusters on one machine rarely pick the same ones.
        first_job = random.randrange(1000, 15000)
        lines = [
            "ClusterName=dsfttest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            f"SlurmdPort={node_ports[0]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.sock'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            f"TmpFS={r / 'tmp'}/%n",  # per node, else the emulated nodes' PMIx collide
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmUser=root",
            "SlurmdUser=root",
            "MpiDefault=none",
            "MinJobAge=5",  # else `sbatch --wait` polls a finished job slowly
            "SchedulerParameters=batch_sched_delay=0",
            "EnforcePartLimits=ALL",  # reject an impossible job instead of pending forever
            "MailProg=/bin/true",
            "SlurmdParameters=config_overrides",  # declared CPUs need not exist
            "ReturnToService=2",
            "KillWait=10",
            f"FirstJobId={first_job}",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'jobcomp.txt'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=4 Port={node_ports[0]} State=UNKNOWN",
        ]
        for name, port in zip(EMULATED, node_ports[1:], strict=True):
            lines.append(
                f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=4 "
                f"Port={port} State=UNKNOWN"
            )
        lines += [
            f"PartitionName=one Nodes={self.host} Default=YES MaxTime=60 State=UP",
            f"PartitionName=two Nodes={','.join(EMULATED)} MaxTime=60 State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _ensure_hosts(self) -> None:
        if all(_resolves(n) for n in EMULATED):
            return
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(EMULATED)} {HOSTS_TAG}\n")

    def _run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        return proc.stdout

    def start(self, timeout: float = 60) -> None:
        """Write the config, start munged, slurmctld and the slurmds; wait for idle nodes."""
        t0 = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._ensure_hosts()
        m = self.root / "munge"
        self._run(
            "munged", "--force", f"--socket={m / 'munge.sock'}", f"--key-file={m / 'munge.key'}",
            f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
        )  # fmt: skip
        self._run("slurmctld", "-f", str(self.conf))
        self._run("slurmd", "-f", str(self.conf))  # this machine, found by its hostname
        for name in EMULATED:
            self._run("slurmd", "-f", str(self.conf), "-N", name)
        deadline = time.time() + timeout
        states: list[str] = []
        while time.time() < deadline:
            out = self._run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = sorted(set(out.split()))
            if out and all(line.split()[1] == "idle" for line in out.splitlines()):
                record("start (munged, slurmctld, 3 slurmd)", time.time() - t0)
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states}\n{self.logs()}")

    # ------------------------------------------------------------------ teardown
    def _pids(self) -> list[tuple[str, int]]:
        files = [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        files += [self.root / f"slurmd-{n}.pid" for n in self.nodes]
        out = []
        for f in files:
            with contextlib.suppress(OSError, ValueError, IndexError):
                out.append((f.name, int(f.read_text().split()[0])))
        return out

    def _job_processes(self) -> list[int]:
        """Processes of this cluster's jobs: their environment names this cluster's config."""
        needle = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                pass
        return pids

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started (by PID)."""
        if self.conf.is_file():
            try:
                self._run("scancel", "--full", "--user=root", check=False, timeout=20)
                deadline = time.time() + 20
                while time.time() < deadline and self._run("squeue", "-h", check=False).strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        pids = [pid for _, pid in self._pids()]
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        _wait_gone(pids, 15)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        strays = self._job_processes()  # a job that outlived scancel
        for pid in strays:
            _kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ jobs
    def sbatch(
        self,
        script: Path,
        args: list[str],
        sbatch_opts: list[str],
        cwd: Path,
        env: dict[str, str],
        timeout: float = 300,
        label: str | None = None,
    ) -> tuple[int, int]:
        """``sbatch --wait``: (exit code, job id); the time it took goes to the timings."""
        t0 = time.time()
        proc = subprocess.run(
            ["sbatch", "--wait", "--parsable", *sbatch_opts, str(script), *args],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        record(f"job {label or script.name}", time.time() - t0)
        job = int(proc.stdout.split(";")[0].split()[0]) if proc.stdout.strip() else -1
        return proc.returncode, job

    def submit(self, script: Path, args: list[str], sbatch_opts: list[str], cwd: Path,
               env: dict[str, str]) -> int:  # fmt: skip
        """``sbatch`` without waiting: the job id."""
        out = subprocess.run(
            ["sbatch", "--parsable", *sbatch_opts, str(script), *args],
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            check=True,
        ).stdout
        return int(out.split(";")[0])

    def scontrol(self, *args: str) -> str:
        return self._run("scontrol", *args)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the job has left the controller)."""
        out = self._run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def completions(self, job_id: int) -> list[dict[str, str]]:
        """Job-completion records (one per run of a requeued job), oldest first."""
        path = self.root / "jobcomp.txt"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if rec.get("JobId") == str(job_id):
                rows.append(rec)
        return rows

    def logs(self) -> str:
        """The tail of every daemon log (for failure messages)."""
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists()]:
            return
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(Path(argv[1]).resolve())
    if argv[0] == "start":
        reason = install()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        try:
            cluster.start()
        except Exception:
            cluster.stop()
            raise
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    for stage, seconds in TIMINGS:
        print(f"{stage}: {seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
