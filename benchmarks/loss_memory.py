"""Peak memory and time of one training step with and without ``train.fused_loss``.

    python -m benchmarks.loss_memory [--device cpu|cuda] [--layers N] [--seq 4096] [--out DIR]

The Llama-3.2-1B shape (vocabulary 128,256, tied embeddings), with ``--layers`` blocks
(2 by default on a CPU so that it fits in time; all 16 with ``--layers 16``), one sequence
of ``--seq`` tokens of which ``--target-fraction`` carry loss (a response after a prompt,
as in SFT data). Each path runs in a fresh process: load, then forward + backward of the
step as the training loop does it (dsft.loss.logits_nll on the full logits, or
dsft.loss.fused_nll), ``--steps`` times. Memory: on CUDA ``torch.cuda.max_memory_allocated``
over the steps; on a CPU the process's peak RSS, and the same above the RSS before the
first step (weights and inputs are the same for both paths). Time: the median step.
Writes ``loss_memory.json`` and ``loss_memory.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATHS = ("full", "fused")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_path(ns: argparse.Namespace) -> dict[str, Any]:
    """Run ``ns.path`` in this process; returns its figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import loss
    from dsft.planner import SHAPES

    cuda = ns.device == "cuda"
    dev = torch.device(ns.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ns.precision]
    shape = dict(SHAPES["llama-1b"], num_hidden_layers=ns.layers)
    if ns.tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(ns.seq, 4096))
    with dev:
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, ns.seq), generator=g)
    labels = ids.clone()
    labels[:, : int(ns.seq * (1 - ns.target_fraction))] = -100  # the prompt
    inputs = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}
    index, targets = loss.target_index(labels)
    head = loss.output_head(model)
    chunks = loss.num_chunks(len(targets), head.vocab)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_now()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    times, losses = [], []
    for _ in range(ns.steps):
        t0 = time.perf_counter()
        if ns.path == "full":
            nll = loss.logits_nll(model(**inputs, use_cache=False).logits, labels.to(dev))
        else:
            nll, _ = loss.fused_nll(model, head, inputs, index.to(dev), targets.to(dev), chunks)
        (nll / len(targets)).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(nll.item() / len(targets))
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
    out = {
        "path": ns.path,
        "step_s": statistics.median(times),
        "loss": losses[-1],
        "targets": len(targets),
        "chunks": chunks if ns.path == "fused" else None,
    }
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["step_peak_gib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_gib"] = peak / 2**30
        out["step_peak_gib"] = (peak - base_rss) / 2**30
    return out


def table(result: dict[str, Any]) -> str:
    c = result["settings"]
    mem = "peak GPU mem GiB" if c["device"] == "cuda" else "peak RSS GiB"
    lines = [
        f"| loss path | {mem} | above the pre-step baseline GiB | step time s | loss |",
        "|---|---|---|---|---|",
    ]
    for p in PATHS:
        r = result[p]
        lines.append(
            f"| {'train.fused_loss=true' if p == 'fused' else 'train.fused_loss=false'} "
            f"| {r['peak_gib']:.2f} | {r['step_peak_gib']:.2f} | {r['step_s']:.3f} "
            f"| {r['loss']:.5f} |"
        )
    f, u = result["fused"], result["full"]
    lines.append(
        f"| **fused / full** | {f['peak_gib'] / u['peak_gib']:.2f}× "
        f"| {f['step_peak_gib'] / max(u['step_peak_gib'], 1e-9):.2f}× "
        f"| {f['step_s'] / u['step_s']:.2f}× | |"
    )
    lines += [
        "",
        f"Llama-3.2-1B shape with {c['layers']} layers{' (tiny dry run)' if c['tiny'] else ''}, "
        f"vocab 128,256, {c['precision']}, one sequence of {c['seq']} tokens, "
        f"{u['targets']} of them targets ({c['target_fraction']:.0%}), forward + backward "
        f"(median of {c['steps']}), fused in {f['chunks']} chunk(s); device: {result['device']}. "
        f"Peak memory reduction: {1 - f['peak_gib'] / u['peak_gib']:.0%} (whole process), "
        f"{1 - f['step_peak_gib'] / max(u['step_peak_gib'], 1e-9):.0%} (the step's own).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loss_memory", description=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any")
    p.add_argument("--layers", type=int, default=None, help="blocks (default: 2 CPU, 16 CUDA)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--target-fraction", type=float, default=0.25)
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="default: 1 CPU, 5 CUDA")
    p.add_argument("--tiny", action="store_true", help="64-wide layers (a quick rehearsal)")
    p.add_argument("--out", default="runs/loss_memory")
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # the child process
    ns = p.parse_args(argv)
    import torch

    if ns.device is None:
        ns.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = ns.device == "cuda"
    ns.layers = ns.layers or (16 if cuda else 2)
    ns.precision = ns.precision or ("bf16" if cuda else "fp32")
    ns.steps = ns.steps or (5 if cuda else 1)
    if ns.path:  # child: one path, its figures as the last line of stdout
        print(json.dumps(one_path(ns)))
        return 0
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "settings": {k: v for k, v in vars(ns).items() if k not in ("path", "out")},
        "device": torch.cuda.get_device_name() if cuda else "CPU",
    }
    for path in PATHS:  # each in a fresh process: peaks must not see the other path
        argv_child = [sys.executable, "-m", "benchmarks.loss_memory", *(argv or sys.argv[1:])]
        argv_child += ["--path", path, "--device", ns.device]
        proc = subprocess.run(argv_child, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        result[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{path}: {result[path]}", flush=True)
    text = table(result)
    result["table"] = text
    (out / "loss_memory.json").write_text(json.dumps(result, indent=2))
    (out / "loss_memory.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
