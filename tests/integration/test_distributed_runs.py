"""Real gloo process groups: the collective timeout reaches every group, and metric
aggregation is exact across world sizes. Rank discovery: tests/unit/test_distributed.py."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from dsft import distributed as dist
from dsft.data.collate import collate
from dsft.eval.evaluator import validate


@pytest.mark.distributed
def test_timeout_reaches_every_group(tmp_path) -> None:
    """The world group and groups made later without a timeout (DeepSpeed's ZeRO groups)
    all give up after DSFT_DIST_TIMEOUT."""
    code = (
        "import torch, torch.distributed as t\n"
        "from dsft import distributed as d\n"
        "d.setup()\n"
        "cpu = torch.device('cpu')\n"
        "for g in (t.group.WORLD, t.new_group([0])):\n"
        "    print(g._get_backend(cpu).options._timeout.total_seconds())\n"
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "DSFT_DIST_TIMEOUT": "17",
           "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["17.0", "17.0"]  # after DeepSpeed's own lines


class _ToyLM(torch.nn.Module):
    """Deterministic 'model' whose logits depend only on the input ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 50)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def _examples():
    from dsft.data.tokenize import Tokenized

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(13):  # not divisible by 2 or 3
        n = 3 + i % 5
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]
        out.append(Tokenized(ids, labels))
    return out


def _worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = validate(_ToyLM(), _examples(), micro_batch=2, pad_id=0)
        total = dist.all_reduce_sum([rank + 1.0, 1.0])
        q.put((rank, metrics, total.tolist(), dist.all_gather_objects(rank)))
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference() -> dict[str, float]:
    model, exs = _ToyLM(), _examples()
    b = collate(exs, pad_id=0)
    logits = model(b["input_ids"], b["attention_mask"]).logits[:, :-1]
    target = b["labels"][:, 1:]
    mask = target != -100
    nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="mean")
    acc = (logits.argmax(-1)[mask] == target[mask]).float().mean()
    return {"loss": nll.item(), "token_acc": acc.item(), "tokens": int(mask.sum())}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_validation_metrics_exact_across_world_sizes(world: int) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = _reference()
    for _rank, metrics, total, gathered in results:
        # every rank gets the same, exact, token-weighted result
        assert metrics["tokens"] == ref["tokens"]
        assert metrics["examples"] == 13
        assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert metrics["token_acc"] == pytest.approx(ref["token_acc"], rel=1e-6)
        assert metrics["ppl"] == pytest.approx(math.exp(ref["loss"]), rel=1e-6)
        assert total == [world * (world + 1) / 2, world]
        assert gathered == list(range(world))
