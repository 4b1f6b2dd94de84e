"""``python -m benchmarks.seq_parallel_scaling``: memory per rank and step time against sequence length, for
whole rows (one rank) and rows split over ranks by sequence parallelism, on the CPU.

Each point is one ``dsft train`` run: the demo's model shape (hidden 128, 4 layers, 4 heads;
``--hidden``/``--layers``), fp32, ZeRO-2, one thread per rank, micro-batch 1, one row per
optimizer step (the
ranks of a sequence-parallel group share it), ``--steps`` steps, no evaluation or saving. The
rows are raw text of exactly ``seq`` tokens, so every step computes ``seq`` tokens whatever
the degree. Reported per point:

  step s        median step time over the steps after the first (metrics.jsonl)
  peak GiB      the largest rank's peak RSS, sampled every 50 ms (as ``dsft bench`` does)
  growth GiB    peak RSS minus the same variant's peak at ``--base`` tokens: the memory that
                grows with the row (activations, logits), without Python, torch, DeepSpeed
                and the model states, which every rank holds whatever the length

and, per length, the growth of each variant over that of whole rows (1/N is the ideal).
Variants: ``sp1`` (whole rows), ``sp<N>`` for each ``--sp`` degree, and ``+tiled``
(``model.tiled_mlp``) versions with ``--tiled``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.vs_trl import child_env, watch
from dsft.distributed import local_launch_argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.seq_parallel_scaling", description=__doc__
    )
    p.add_argument("--seqs", default="2048,4096,8192,16384", help="row lengths in tokens")
    p.add_argument("--sp", default="2", help="sequence-parallel degrees besides 1")
    p.add_argument("--tiled", action="store_true", help="also each variant with model.tiled_mlp")
    p.add_argument("--base", type=int, default=256, help="the length whose peak is subtracted")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def write_rows(path: Path, seq: int, n: int) -> None:
    """``n`` raw-text examples of ``seq`` characters (one token each in the demo tokenizer)."""
    rng = random.Random(seq)
    with path.open("w") as f:
        for _ in range(n):
            text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(seq))
            f.write(json.dumps({"text": text}) + "\n")


def run_point(work: Path, model: Path, seq: int, sp: int, tiled: bool, steps: int) -> dict:
    name = f"sp{sp}{'-tiled' * tiled}-{seq}"
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    data = d / "rows.jsonl"
    write_rows(data, seq, steps)
    cfg = {
        "output_dir": str(d / "run"),
        "model": {"path": str(model), "tiled_mlp": tiled},
        "data": {
            "path": [str(data)],
            "format": "text",
            "max_len": seq,
            "val_fraction": 0.0,
            "test_fraction": 0.0,
            "shuffle": False,
        },
        "train": {
            "max_steps": steps,
            "micro_batch": 1,
            "grad_accum": 1,
            "lr": 1e-3,
            "precision": "fp32",
            "sequence_parallel": sp,
        },
        "deepspeed": {"zero_stage": 2},
        "eval": {"generate": False, "before_training": False},
        "checkpoint": {"save_final": False, "export": False},
        "logging": {"every": 1, "progress": False, "report_to": []},
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = local_launch_argv(sp, ["dsft", "train", str(path)])
    metrics = d / "run" / "metrics.jsonl"
    # One core per rank at any degree. glibc's malloc otherwise keeps freed blocks of tensor
    # memory in its heaps (RSS then reports allocator history, not live memory): a fixed
    # mmap threshold hands every block over 64 KiB back to the kernel when freed.
    env = {**child_env(True, sp), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    w = watch(cmd, env, metrics, d / "log.txt")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    times = [r["step_time"] for r in rows if r.get("split") == "train"][1:]
    return {"seq": seq, "sp": sp, "tiled": tiled, "step_s": statistics.median(times),
            "peak_gib": w["peak_rss_gb"]}  # fmt: skip


def table(points: list[dict], variants: list[tuple[int, bool]], base: int) -> str:
    """One line per length and variant; growth relative to whole rows at that length."""
    by = {(p["seq"], p["sp"], p["tiled"]): p for p in points}
    lines = [
        "| seq | variant | step s | peak RSS GiB | growth GiB | growth / whole rows |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for seq in sorted({p["seq"] for p in points if p["seq"] != base}):
        growth = {v: by[(seq, *v)]["peak_gib"] - by[(base, *v)]["peak_gib"] for v in variants}
        ref = growth[variants[0]]
        for sp, tiled in variants:
            p = by[(seq, sp, tiled)]
            g = growth[(sp, tiled)]
            name = f"SP={sp}" + " + tiled MLP" * tiled
            ratio = f"{g / ref:.2f}" if ref > 0 else "-"
            lines.append(
                f"| {seq} | {name} | {p['step_s']:.1f} | {p['peak_gib']:.2f} | {g:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    from dsft.synthetic import build_model_dir

    work = Path(ns.workdir or tempfile.mkdtemp(prefix="dsft-long-"))
    # (Llama's rotary embedding computes any position; max_position_embeddings is a label.)
    model = build_model_dir(work / "model", hidden=ns.hidden, layers=ns.layers)
    seqs = [ns.base, *(int(s) for s in ns.seqs.split(","))]
    variants = [(sp, False) for sp in [1, *(int(s) for s in ns.sp.split(","))]]
    if ns.tiled:
        variants += [(sp, True) for sp, _ in variants]
    points = []
    for seq in seqs:
        for sp, tiled in variants:
            p = run_point(work, model, seq, sp, tiled, ns.steps)
            print(json.dumps(p), file=sys.stderr, flush=True)
            points.append(p)
    print(f"model hidden {ns.hidden}, {ns.layers} layers; fp32 CPU, ZeRO-2, one row per step; "
          f"growth = peak RSS minus the peak at {ns.base} tokens")  # fmt: skip
    print(table(points, variants, ns.base))
    if ns.json:
        Path(ns.json).write_text(json.dumps(points, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
