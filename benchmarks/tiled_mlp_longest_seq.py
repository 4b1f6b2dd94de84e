"""The longest sequence a 1B model trains at on one GPU, ``model.tiled_mlp`` off and on.

    python -m benchmarks.tiled_mlp_longest_seq [--seqs 8192,32768] [--out DIR] [--dry-run]

A search by doubling would spend minutes on attention at hundreds of thousands of tokens, so
this measures and extrapolates instead: for each variant, one training step (forward +
backward of the fused loss, activation checkpointing on, bf16, one row) of the Llama-3.2-1B
shape at each of ``--seqs`` lengths, in this process, with ``torch.cuda.max_memory_allocated``.
The peak grows linearly with the row (activations, the tiles; the fused loss keeps no
per-token logits), so the longest row that fits is the last length plus the remaining memory
(90 % of the GPU's) over that slope. Model states for training with AdamW under DeepSpeed
(16 bytes per parameter: bf16 weights and gradients, fp32 master and moments) are added to
the measured peak, which holds the weights and gradients only. ``--dry-run``: a tiny model on
the CPU (peak RSS growth), to rehearse the script. Writes ``tiling.md`` and ``tiling.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def step(seq: int, tiled: bool, dry: bool) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsft import loss, tiled_mlp
    from dsft.planner import SHAPES

    dev = torch.device("cpu" if dry else "cuda")
    shape = dict(SHAPES["llama-1b"])
    if dry:
        shape.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 4096))
    with dev:
        model = LlamaForCausalLM(config).to(torch.float32 if dry else torch.bfloat16)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if tiled:
        tiled_mlp.tile_mlp(model, tiled_mlp.tiles_for(seq, 1, config.hidden_size))
    ids = torch.randint(0, config.vocab_size, (1, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    index, targets = loss.target_index(labels)
    inputs = {"input_ids": ids.to(dev), "position_ids": torch.arange(seq)[None].to(dev)}
    if not dry:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    nll, _ = loss.fused_nll(model, loss.output_head(model), inputs, index.to(dev), targets.to(dev))
    (nll / len(targets)).backward()
    if not dry:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    peak = (
        torch.cuda.max_memory_allocated()
        if not dry
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    del model
    if not dry:
        torch.cuda.empty_cache()
    return {"seq": seq, "tiled": tiled, "peak_gib": peak / 2**30, "step_s": seconds,
            "params": params}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tiled_mlp_longest_seq", description=__doc__
    )
    p.add_argument("--seqs", default="8192,32768", help="two or more row lengths")
    p.add_argument("--out", default="runs/tiling")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    ns = p.parse_args(argv)
    import torch

    dry = ns.dry_run or not torch.cuda.is_available()
    seqs = [int(s) for s in ns.seqs.split(",")] if not ns.dry_run else [256, 1024]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    total = (
        torch.cuda.get_device_properties(0).total_memory if not dry else 24 * 2**30
    )  # the dry run's "GPU": 24 GiB
    rows, result = [], {"device": "CPU (dry run)" if dry else torch.cuda.get_device_name()}
    for tiled in (False, True):
        points = [step(s, tiled, dry) for s in seqs]
        for pt in points:
            print(json.dumps(pt), flush=True)
        a, b = points[0], points[-1]
        slope = (b["peak_gib"] - a["peak_gib"]) / (b["seq"] - a["seq"])  # GiB per token
        states = 12 * b["params"] / 2**30  # fp32 master + Adam moments, beyond weights + grads
        room = 0.9 * total / 2**30 - states - b["peak_gib"]
        longest = int(b["seq"] + room / slope) if slope > 0 else None
        result["tiled" if tiled else "plain"] = {"points": points, "gib_per_1k_tokens":
                                                 slope * 1024, "longest_seq": longest}  # fmt: skip
        name = "model.tiled_mlp=true" if tiled else "model.tiled_mlp=false"
        rows.append(
            f"| {name} | "
            + " | ".join(f"{pt['peak_gib']:.2f} GiB / {pt['step_s']:.2f} s" for pt in points)
            + f" | {slope * 1024:.3f} | {longest or 'n/a':,} |"
        )
    plain, tiled_r = result["plain"]["longest_seq"], result["tiled"]["longest_seq"]
    text = "\n".join(
        [
            "| variant | "
            + " | ".join(f"seq {s}: peak / step" for s in seqs)
            + " | GiB per 1k tokens | longest seq (extrapolated) |",
            "|---" * (len(seqs) + 3) + "|",
            *rows,
            "",
            f"Llama-3.2-1B shape{' (tiny: dry run)' if dry else ''}, "
            f"{'fp32' if dry else 'bf16'}, activation "
            "checkpointing, fused loss, one row, forward + backward; longest = the row at which "
            "peak + AdamW states (12 B/param more) reach 90 % of "
            f"{total / 2**30:.0f} GiB on {result['device']}"
            + (f"; tiling: {tiled_r / plain:.2f}× longer" if plain and tiled_r else "")
            + ".",
        ]
    )
    result["table"] = text
    (out / "tiling.json").write_text(json.dumps(result, indent=2))
    (out / "tiling.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
