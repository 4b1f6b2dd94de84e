"""Image-text SFT on the Qwen vision-language families, where their processors load: the
GPU machine (their video processors need torchvision, which the CPU machines lack).

    python -m benchmarks.vlm_gpu_check [--out DIR] [--families F,...] [--steps 6]
        [--timeout 45] [--dry-run]

For each family (Qwen2.5-VL, Qwen3-VL, Qwen3.5, Qwen3.5-MoE): a tiny random checkpoint
from transformers' own classes with its published processor (dsft.synthetic.build_vlm_dir),
the colour task with image and text rows in every form (write_colour_task), ``dsft train``
for a few steps (bf16 on the GPU; image rows unpacked: multimodal RoPE) with generation
EM/F1 on the image test rows; then its export must keep the architecture and the frozen
tower, reload with AutoModelForImageTextToText + AutoProcessor and answer about a picture.
The families train at once (tiny models, one GPU). Without torchvision every family is
skipped with the reason, exit 0 (``--dry-run``: CPU, fp32, as the GPU check's dry run).
Writes ``vlm.md`` (the per-family table) and ``vlm.json`` under ``--out``; exit 1 when a
family that ran failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dsft.synthetic import VLM_QWEN_FAMILIES


def _config(family_dir: Path, model: Path, data: Path, steps: int, gpu: bool) -> Path:
    tree = {
        "output_dir": str(family_dir / "run"),
        "model": {"path": str(model)},
        # 4 test rows of 40, image and text; multimodal RoPE: image rows are not packed
        "data": {"path": [str(data)], "max_len": 96, "val_fraction": 0.1,
                 "test_fraction": 0.1, "packing": False},
        "train": {"max_steps": steps, "micro_batch": 4, "grad_accum": 1, "lr": 5e-3,
                  "warmup_steps": 0, "precision": "bf16" if gpu else "fp32"},
        "deepspeed": {"zero_stage": 0},
        "eval": {"before_training": False, "generate": True, "max_generate": 4,
                 "max_new_tokens": 2, "micro_batch": 4},
        "logging": {"every": 1, "progress": False, "report_to": []},
    }  # fmt: skip
    path = family_dir / "train.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _check_export(base: Path, export: Path, gpu: bool) -> tuple[str, str]:
    """The export's checks (architecture, frozen tower, reload) and its answer about a
    picture; raises on a failed check."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dsft.model import part
    from dsft.synthetic import COLOURS

    arch = json.loads((base / "config.json").read_text())["architectures"]
    assert json.loads((export / "config.json").read_text())["architectures"] == arch, "arch"
    before, after = load_file(str(base / "model.safetensors")), {}
    for f in export.glob("*.safetensors"):
        after.update(load_file(str(f)))
    tower = [k for k in before if part(k) != "language"]
    assert tower and set(after) == set(before), "tensor names"
    # frozen by default: the base's tensors (in the export's dtype)
    assert all(torch.equal(before[k].to(after[k].dtype), after[k]) for k in tower), "tower"
    device = "cuda" if gpu else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        export, dtype=torch.bfloat16 if gpu else torch.float32
    )
    model = model.to(device).eval()
    assert type(model).__name__ == arch[0], type(model).__name__
    proc = AutoProcessor.from_pretrained(export)
    ask = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": "What colour is this?"}]}]  # fmt: skip
    text = proc.apply_chat_template(ask, add_generation_prompt=True, tokenize=False)
    img = Image.new("RGB", (40, 40), COLOURS["blue"])
    inputs = proc(text=[text], images=[[img]], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs.to(device), max_new_tokens=3, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) > 0, "no token generated"
    # special tokens shown: a few steps from random weights often answer "<|end|>"
    return type(proc).__name__, proc.tokenizer.decode(new).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vlm_gpu_check", description=__doc__)
    p.add_argument("--out", default="runs/vlm_gpu_check")
    p.add_argument("--families", default=",".join(VLM_QWEN_FAMILIES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=int, default=45, help="seconds for the trainings")
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32 (needs torchvision too)")
    ns = p.parse_args(argv)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    families = [f for f in ns.families.split(",") if f]
    rows: dict[str, dict[str, Any]] = {f: {"family": f} for f in families}
    if importlib.util.find_spec("torchvision") is None:
        why = "skipped: no torchvision here (the family's processor needs it)"
        for f in families:
            rows[f]["status"] = why
            print(f"{f}: {why}")
        return _report(out, rows)

    import torch

    from dsft.synthetic import build_vlm_dir, write_colour_task

    gpu = torch.cuda.is_available() and not ns.dry_run
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # each run its own
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    runs: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    for f in families:
        d = out / f
        d.mkdir(parents=True, exist_ok=True)
        base = build_vlm_dir(d / "model", f)
        data = write_colour_task(d / "data", n=40, seed=3, text_every=3)
        log = (d / "train.log").open("w")
        cmd = [sys.executable, "-m", "dsft", "train", str(_config(d, base, data, ns.steps, gpu)),
               "--no-resume", "--overwrite"]  # fmt: skip
        t0 = time.time()
        runs[f] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, t0)
    deadline = time.time() + ns.timeout
    for f, (proc, log, t0) in runs.items():
        row = rows[f]
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        log.close()
        row["train_s"] = round(time.time() - t0, 1)
        if rc != 0:
            tail = (out / f / "train.log").read_text().strip().splitlines()[-1:] or [""]
            row["status"] = "FAILED: " + ("train timed out" if rc is None else
                                          f"train exit {rc}: {tail[0][:160]}")  # fmt: skip
            continue
        summary = json.loads((out / f / "run" / "summary.json").read_text())
        loss = summary.get("after", {}).get("val", {}).get("loss")
        row["val_loss"] = None if loss is None else round(loss, 3)
        row["test_em"] = summary.get("after", {}).get("test", {}).get("exact_match")
        try:
            row["processor"], row["answer"] = _check_export(out / f / "model",
                                                            out / f / "run" / "final", gpu)  # fmt: skip
            row["status"] = "ok"
        except Exception as e:  # the table says which check failed
            row["status"] = f"FAILED: export check: {type(e).__name__}: {str(e)[:160]}"
    return _report(out, rows)


def _report(out: Path, rows: dict[str, dict[str, Any]]) -> int:
    keys = ("family", "status", "processor", "train_s", "val_loss", "test_em", "answer")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows.values():
        cells = (r.get(k) for k in keys)
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    text = (
        "Image-text `dsft train` on tiny Qwen vision-language checkpoints; the export "
        "reloaded with AutoModelForImageTextToText + AutoProcessor answers about a blue "
        "picture (`answer`; random weights, a few steps: any token). `val_loss`: validation "
        "loss after training; `test_em`: dsft's generation exact match on the test rows.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (out / "vlm.md").write_text(text)
    (out / "vlm.json").write_text(json.dumps(list(rows.values()), indent=2))
    print(text)
    return 1 if any(r["status"].startswith("FAILED") for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
