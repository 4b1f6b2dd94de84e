"""A torch.profiler trace of dsft training steps, summarised as the kernel table.

    python -m benchmarks.gpu_profile [--shape 1b|8b] [--lora-r R] [--attn A] [--fast F]
        [--model DIR --data FILE] [--steps 5] [--out DIR] [--label L] [--dry-run]

Runs ``dsft train`` on a Llama shape (``1b``: Llama-3.2-1B, ``8b``: Llama-3.1-8B) at seq
4096, bf16, packed rows, with ``logging.profile_steps``: steps 3 to 2 + ``--steps`` are
profiled on rank 0. ``--lora-r``: LoRA on all linear layers (0 = full fine-tuning);
``--attn``: model.attn_implementation (default auto: the fast path; ``sdpa`` = before it);
``--fast``: DSFT_FAST_DEFAULTS for the run (e.g. ``liger,compile`` or ``none``).
``--model``/``--data`` reuse a model directory and a JSONL file (the GPU check passes the
benchmark's inputs); without them a random model with the demo tokenizer and long copy
examples are built here. ``--dry-run``: a tiny model on the CPU. Writes ``summary.md``
(the step figures and the kernel table: dsft.profiling), ``kernels.json`` and the run (its
Chrome trace in ``run/profile/trace.json.gz``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--shape", choices=("1b", "8b"), default="1b", help="Llama shape")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank, all linear (0 = full FT)")
    p.add_argument("--attn", default="auto", help="model.attn_implementation")
    p.add_argument("--fast", help="DSFT_FAST_DEFAULTS for the run (liger,compile / none)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--label", default="", help="title of the kernel table")
    p.add_argument("--model", help="model directory (default: build a random model)")
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

            shape = SHAPES["llama-8b" if ns.shape == "8b" else "llama-1b"]
            model = build_model_dir(out / "model", shape=shape, dtype=torch.bfloat16,
                                    device="cuda" if torch.cuda.is_available() else None,
                                    max_position_embeddings=max(ns.max_len, 4096))  # fmt: skip
    data = Path(ns.data) if ns.data and Path(ns.data).is_file() else None
    if data is None:
        data = _data(out / "train.jsonl", 400, min(ns.max_len, 2000) // 2)
    run = out / "run"
    tree = {
        "output_dir": str(run),
        "model": {"path": str(model), "attn_implementation": ns.attn,
                  **({"lora": {"enabled": True, "r": ns.lora_r, "alpha": 2 * ns.lora_r,
                               "target_modules": ["all-linear"]}} if ns.lora_r else {})},
        "data": {"path": [str(data)], "max_len": ns.max_len, "packing": True,
                 "val_fraction": 0.01, "test_fraction": 0.0, "cache_dir": str(out / "cache")},
        "train": {"max_steps": ns.steps + 3, "micro_batch": ns.micro_batch, "grad_accum": ns.grad_accum,
                  "precision": "fp32" if ns.dry_run else "bf16", "lr": 1e-4, "warmup_steps": 0},
        "deepspeed": {"zero_stage": 0 if ns.dry_run else 2},
        "eval": {"before_training": False, "generate": False, "micro_batch": 2},
        "checkpoint": {"save_final": False, "export": False},
        "logging": {"every": 1, "progress": False, "report_to": [],
                    "profile_steps": ns.steps},
    }  # fmt: skip
    cfg = out / "profile.yaml"
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ)
    if ns.fast is not None:
        env["DSFT_FAST_DEFAULTS"] = ns.fast
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "train", str(cfg), "--no-resume", "--overwrite"], env=env
    )
    if proc.returncode:
        return proc.returncode
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][2:]  # the profiled ones and after
    keys = ("step", "step_time", "tokens_per_s", "mfu", "gpu_mem_gb")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    top = run / "profile" / "kernels.json"
    resolved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    shape = (
        "tiny (dry run)" if ns.dry_run else f"Llama-{'3.1-8B' if ns.shape == '8b' else '3.2-1B'}"
    )
    kind = f"LoRA r={ns.lora_r}" if ns.lora_r else "full FT"
    title = ns.label or f"{shape}, {kind}"
    table = ""
    if top.is_file():
        from dsft.profiling import KernelRow, KernelTable

        data = json.loads(top.read_text())
        data["top"] = [KernelRow(**r) for r in data["top"]]
        table = KernelTable(**data).markdown(title)
        (out / "kernels.json").write_text(top.read_text())
    text = (
        f"dsft train, {shape}, {title}, seq {ns.max_len}, packed rows x {ns.micro_batch}, "
        f"accumulation {ns.grad_accum}, {tree['train']['precision']}; attention "
        f"{resolved['attn_implementation']}, kernels {resolved.get('kernels')}, compile "
        f"{resolved.get('compile')}; steps 3-{ns.steps + 2} profiled (the profiler's "
        "overhead is in their step times)\n\n"
        + "\n".join(lines)
        + "\n\n"
        + (table or "(no profile written)\n")
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
