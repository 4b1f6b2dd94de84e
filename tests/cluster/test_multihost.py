"""Two "hosts" without Slurm: network namespaces joined by a veth pair.

Each namespace gets one end of a veth pair and a private address (10.231.0.1/24 and
10.231.0.2/24, which exist only inside the namespaces this test creates). One torchrun
per namespace meets the other through the c10d rendezvous on 10.231.0.1, exactly as
slurm/multi_node_torchrun.sbatch starts one per node, and gloo talks over the veth
(GLOO_SOCKET_IFNAME): the multi-node path crosses a real network interface. The test
checks the world both sides agreed on, that the run matches a single process step for
step, and that the traffic went through the veth. Namespaces are removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, cpu_env, short_run_config, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.netns]

ADDRS = ("10.231.0.1", "10.231.0.2")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the network-namespace test must run in CI: {reason}")
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two namespaces joined by a veth pair: [(namespace, interface, address), ...]."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (apt-get install iproute2)")
    tag = f"{os.getpid() % 100000}"
    hosts = [
        (f"dsft-{tag}-{side}", f"dsft{tag}{side}", addr)
        for side, addr in zip("ab", ADDRS, strict=True)
    ]
    created = []
    try:
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, ifname, addr in hosts:
            _ip("link", "set", ifname, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _unavailable(f"cannot create network namespaces: {getattr(e, 'stderr', e)}")
    try:
        yield hosts
    finally:  # deleting a namespace deletes its end of the veth, and with it the pair
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _tx_bytes(ns: str, ifname: str) -> int:
    """Bytes sent through ``ifname``, read inside its namespace (its own /sys)."""
    path = f"/sys/class/net/{ifname}/statistics/tx_bytes"
    cmd = ["ip", "netns", "exec", ns, "cat", path]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def test_torchrun_rendezvous_across_two_namespaces(
    two_hosts, tiny_model: Path, tiny_data: Path, tmp_path: Path, reference_run: dict
) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", short_run_config(tiny_model, tiny_data, out, stage=2, accum=2)
    )
    head = ADDRS[0]
    procs = []
    t0 = time.time()
    try:
        for node, (ns, ifname, addr) in enumerate(two_hosts):
            env = {**cpu_env(), "GLOO_SOCKET_IFNAME": ifname}
            cmd = [
                "ip", "netns", "exec", ns,
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:29400", "--rdzv-id=netns",
                f"--rdzv-conf=join_timeout=120,is_host={int(node == 0)}",
                f"--local-addr={addr}", "--max-restarts=0",
                "-m", "dsft", "train", str(cfg),
            ]  # fmt: skip
            log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "ranks 2 (torchrun)" in logs[0]
    rows = train_rows(out)
    assert [r["loss"] for r in rows] == pytest.approx(reference_run["loss"], rel=1e-4)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference_run["grad_norm"], rel=1e-4)
    # both directions carried the job's traffic (rendezvous, gloo all-reduces)
    for ns, ifname, _ in two_hosts:
        assert _tx_bytes(ns, ifname) > 100_000, ns
    assert time.time() - t0 < 400
