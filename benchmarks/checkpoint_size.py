"""Bytes of a LoRA checkpoint, lean (default) against one that also stores the frozen base.

A randomly initialised model of SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3
heads, vocabulary 49,152, tied embeddings) gets peft LoRA r=16 on every linear layer
(4.9M trainable parameters, as the issue measured), trains 2 steps with ZeRO-2 on one
CPU rank in fp32 and saves; once with ``checkpoint.save_frozen=false`` (lean) and once
with ``true`` (DeepSpeed's default, the whole base in every checkpoint). The target: the
lean checkpoint <= 3x the bytes of the trainable parameters and their two Adam moments.

    python -m benchmarks.checkpoint_size [--out runs/bench-ckpt] [--zero-stage 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(out: Path, model: Path, data: Path, save_frozen: bool, stage: int) -> dict:
    run_dir = out / ("full" if save_frozen else "lean")
    cfg = {
        "output_dir": str(run_dir),
        "model": {"path": str(model), "lora": {"enabled": True, "r": 16, "alpha": 32}},
        "data": {"path": [str(data)], "max_len": 64, "val_fraction": 0.0, "test_fraction": 0.0},
        "train": {"max_steps": 2, "micro_batch": 2, "precision": "fp32", "lr": 1e-4},
        "deepspeed": {"zero_stage": stage},
        "eval": {"generate": False, "before_training": False, "every": 0},
        "checkpoint": {"save_final": True, "export": False, "save_frozen": save_frozen},
        "logging": {"every": 1, "progress": False, "tensorboard": False},
    }
    path = out / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "dsft", "train", str(path)], check=True, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    tag = Path(summary["checkpoint"])
    return {
        "save_frozen": save_frozen,
        "checkpoint_bytes": _tree_bytes(tag),
        "files": {f.name: f.stat().st_size for f in sorted(tag.iterdir()) if f.is_file()},
        "trainable_params": summary["trainable_params"],
        "params": summary["params"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_size", description=__doc__)
    p.add_argument("--out", default="runs/bench-ckpt")
    p.add_argument("--zero-stage", type=int, default=2)
    ns = p.parse_args(argv)
    from dsft.synthetic import build_model_dir, generate_tasks, write_tasks

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "smollm2-135m-shape"
    if not (model / "config.json").is_file():
        build_model_dir(model, shape=SMOLLM2_135M)
    data = out / "tasks.jsonl"
    write_tasks(data, generate_tasks(n=64, seed=3))
    lean = run(out, model, data, False, ns.zero_stage)
    full = run(out, model, data, True, ns.zero_stage)
    t = lean["trainable_params"]
    budget = t * 4 * 3  # fp32 parameters + the two Adam moments
    lines = [
        f"SmolLM2-135M shape, {lean['params'] / 1e6:.1f}M params, LoRA r=16 all-linear: "
        f"{t / 1e6:.2f}M trainable; ZeRO-{ns.zero_stage}, 1 rank, fp32",
        f"trainable params + Adam moments (fp32): {budget / 2**20:.1f} MiB",
        f"checkpoint with frozen weights (save_frozen=true): {full['checkpoint_bytes'] / 2**20:.1f} MiB",
        f"lean checkpoint (default):                         {lean['checkpoint_bytes'] / 2**20:.1f} MiB "
        f"= {lean['checkpoint_bytes'] / budget:.2f}x the trainable state (target <= 3x), "
        f"{full['checkpoint_bytes'] / lean['checkpoint_bytes']:.0f}x smaller",
    ]
    text = "\n".join(lines)
    (out / "checkpoint_size.json").write_text(json.dumps({"lean": lean, "full": full}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
