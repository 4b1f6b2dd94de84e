"""dsft DPO against TRL's DPOTrainer on identical work: tokens/s and peak memory, one run.

    python -m benchmarks.dpo_bench --workdir /tmp/dpo-bench [--hidden 256 --layers 4
        --pairs 512 --batch 8 --steps 24]

The same randomly initialised Llama (the demo's character tokenizer), the same pairs in the
same order, batch size, fp32, one process on the CPU, sigmoid loss with beta 0.1, and
precomputed reference log-probs on both sides. Each system runs as its own process,
alternating (``--repeats``, medians reported);
tokens/s counts the real (non-pad) tokens of both sides of every pair over the wall-clock
time from the log of step 2 (warm-up) to the last, on both sides alike; peak memory is the process's peak RSS (sampled every 50 ms, so
the reference pass is included). Not a timed test: a measurement (docs/preference.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from benchmarks.vs_trl import child_env, watch
from dsft.data.split import carve_arrays
from dsft.synthetic import build_model_dir, generate_preference_pairs, write_tasks

WARMUP = 2


def dsft_rate(metrics: Path) -> float:
    """Real tokens per wall-clock second from the log of step WARMUP to the last, as
    :func:`trl_rate` measures TRL (logging, batching and all between them)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train" and r["step"] >= WARMUP]
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in rows[1:])
    return tokens / (rows[-1]["time"] - rows[0]["time"])


def trl_rate(metrics: Path) -> float:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    a = next(r for r in rows if r["step"] == WARMUP)
    b = rows[-1]
    return (float(b["num_tokens"]) - float(a["num_tokens"])) / (b["wall"] - a["wall"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dpo_bench", description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs; medians reported")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of both runs (0: the cores); 1 on a shared, loaded machine, where "
        "two OpenMP threads spin against other jobs (a small matmul 8x slower)",
    )
    ns = ap.parse_args(argv)
    w = Path(ns.workdir)
    w.mkdir(parents=True, exist_ok=True)
    model = build_model_dir(w / "model", hidden=ns.hidden, layers=ns.layers)
    rows = generate_preference_pairs(ns.pairs, seed=1)
    write_tasks(w / "pairs.jsonl", rows)
    order, _, _ = carve_arrays(len(rows), 0, 0, seed=0)  # dsft's training order
    write_tasks(w / "in_order.jsonl", [rows[i] for i in order])
    env = child_env(cpu=True, nproc=1)
    if ns.threads:
        env["OMP_NUM_THREADS"] = str(ns.threads)
    lr = 1e-4
    cfg = {
        "output_dir": str(w / "dsft"),
        "model": {"path": str(model)},
        "data": {
            "path": [str(w / "pairs.jsonl")],
            "max_len": 256,
            "val_fraction": 0.0,
            "test_fraction": 0.0,
            "shuffle": False,
            "cache_dir": str(w / "cache"),
        },
        "train": {
            "objective": "dpo",
            "max_steps": ns.steps,
            "micro_batch": ns.batch,
            "lr": lr,
            "schedule": "constant",
            "precision": "fp32",
        },
        "deepspeed": {"zero_stage": 0},
        "eval": {"generate": False, "before_training": False},
        "checkpoint": {"save_final": False, "export": False},
        "logging": {"every": 1, "progress": False, "report_to": []},
    }
    (w / "dsft.yaml").write_text(yaml.safe_dump(cfg))
    spec = {
        "out": str(w / "trl"),
        "model": str(model),
        "data": str(w / "in_order.jsonl"),
        "steps": ns.steps,
        "batch": ns.batch,
        "lr": lr,
    }
    runs: dict[str, list[dict[str, float]]] = {"dsft": [], "trl": []}
    for r in range(ns.repeats):  # alternating, so a change of machine load hits both
        for d in (w / "dsft", w / "trl"):
            shutil.rmtree(d, ignore_errors=True)
        (w / "trl.json").write_text(json.dumps(spec))
        ours = watch(
            [sys.executable, "-m", "dsft", "train", str(w / "dsft.yaml")],
            env,
            w / "dsft" / "metrics.jsonl",
            w / f"dsft{r}.log",
        )
        ours["tokens_per_s"] = dsft_rate(w / "dsft" / "metrics.jsonl")
        theirs = watch(
            [sys.executable, "-m", "benchmarks.trl_dpo", str(w / "trl.json")],
            env,
            w / "trl" / "metrics.jsonl",
            w / f"trl{r}.log",
        )
        theirs["tokens_per_s"] = trl_rate(w / "trl" / "metrics.jsonl")
        runs["dsft"].append(ours)
        runs["trl"].append(theirs)
    ours, theirs = (
        {k: statistics.median(x[k] for x in runs[n]) for k in runs[n][0]} for n in ("dsft", "trl")
    )
    result: dict = {"dsft": ours, "trl": theirs, "runs": runs}
    result["tokens_per_s_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    result["peak_rss_ratio"] = ours["peak_rss_gb"] / theirs["peak_rss_gb"]
    (w / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{'':10}{'tokens/s':>12}{'peak RSS GB':>14}{'wall s':>10}")
    for name in ("dsft", "trl"):
        r = result[name]
        print(f"{name:10}{r['tokens_per_s']:>12.0f}{r['peak_rss_gb']:>14.2f}{r['wall_s']:>10.1f}")
    print(
        f"dsft / TRL: tokens/s x{result['tokens_per_s_ratio']:.2f}, "
        f"peak memory x{result['peak_rss_ratio']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
