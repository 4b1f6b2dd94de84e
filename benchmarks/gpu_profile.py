"""A torch.profiler trace of dsft training steps, summarised as the top kernels by time.

    python -m benchmarks.gpu_profile [--model DIR --data FILE] [--steps 5] [--out DIR] [--dry-run]

Runs ``dsft train`` on the Llama-3.2-1B shape at seq 4096, bf16, packed rows (dsft's best
setting), with ``logging.profile_steps``: steps 3 to 2 + ``--steps`` are profiled on rank 0.
``--model``/``--data`` reuse a model directory and a JSONL file (the GPU check passes the
benchmark's); without them a random 1B Llama with the demo tokenizer and long copy
examples are built here. ``--dry-run``: a tiny model on the CPU. Writes ``summary.md``
(the step figures and the top-kernel table) and the run under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml


def _data(path: Path, n: int, chars: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            text = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(chars // 2, chars)))
            f.write(json.dumps({"instruction": "Copy", "input": text, "output": text}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__)
    p.add_argument("--model", help="model directory (default: build a random 1B Llama)")
    p.add_argument("--data", help="training JSONL (default: generated copy examples)")
    p.add_argument("--steps", type=int, default=5, help="profiled optimizer steps")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2, help="packed rows per micro-batch")
    p.add_argument("--out", default="runs/gpu_profile")
    p.add_argument("--dry-run", action="store_true", help="tiny model, CPU, fp32")
    ns = p.parse_args(argv)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if ns.dry_run:
        ns.max_len, ns.micro_batch = 128, 2
    model = Path(ns.model) if ns.model else None
    if model is None or not (model / "config.json").is_file():
        from dsft.synthetic import build_model_dir

        if ns.dry_run:
            model = build_model_dir(out / "model", hidden=64, layers=2)
        else:
            import torch

            from dsft.planner import SHAPES

            model = build_model_dir(out / "model", shape=SHAPES["llama-1b"], dtype=torch.bfloat16,
                                    max_position_embeddings=max(ns.max_len, 4096))  # fmt: skip
    data = Path(ns.data) if ns.data and Path(ns.data).is_file() else None
    if data is None:
        data = _data(out / "train.jsonl", 400, min(ns.max_len, 2000) // 2)
    run = out / "run"
    tree = {
        "output_dir": str(run),
        "model": {"path": str(model)},
        "data": {"path": [str(data)], "max_len": ns.max_len, "packing": True,
                 "val_fraction": 0.01, "test_fraction": 0.0, "cache_dir": str(out / "cache")},
        "train": {"max_steps": ns.steps + 3, "micro_batch": ns.micro_batch, "grad_accum": 1,
                  "precision": "fp32" if ns.dry_run else "bf16", "lr": 1e-4, "warmup_steps": 0},
        "deepspeed": {"zero_stage": 0 if ns.dry_run else 2},
        "eval": {"before_training": False, "generate": False, "micro_batch": 2},
        "checkpoint": {"save_final": False, "export": False},
        "logging": {"every": 1, "progress": False, "report_to": [],
                    "profile_steps": ns.steps},
    }  # fmt: skip
    cfg = out / "profile.yaml"
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "train", str(cfg), "--no-resume", "--overwrite"]
    )
    if proc.returncode:
        return proc.returncode
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][2:]  # the profiled ones and after
    keys = ("step", "step_time", "tokens_per_s", "mfu", "gpu_mem_gb")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    top = run / "profile" / "top_kernels.md"
    text = (
        f"dsft train, {'tiny (dry run)' if ns.dry_run else 'Llama-3.2-1B shape'}, seq "
        f"{ns.max_len}, packed rows x {ns.micro_batch}, "
        f"{tree['train']['precision']}; steps 3-{ns.steps + 2} profiled (the profiler's "
        "overhead is in their step times)\n\n"
        + "\n".join(lines)
        + "\n\n"
        + (top.read_text() if top.is_file() else "(no profile written)\n")
    )
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if top.is_file() else 1


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


if __name__ == "__main__":
    sys.exit(main())
