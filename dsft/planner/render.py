"""The `dsft plan` tables: one plan's options, a family of models, the sequence-parallel
degrees for long rows; and the time per epoch they show."""

from __future__ import annotations

import dataclasses

from dsft.flops import DEFAULT_PEAK_TFLOPS, KERNEL_EFFICIENCY, train_flops
from dsft.planner.choose import Plan, smallest_sp
from dsft.planner.facts import GiB, Hardware, ModelFacts, _count, _gb
from dsft.planner.memory import Workload, activation_bytes, loss_bytes

DEFAULT_MFU = KERNEL_EFFICIENCY  # measured efficiency of dsft's step (dsft/flops.py)


def flops_per_token(f: ModelFacts, seq: int, checkpointing: bool = False) -> float:
    """Training FLOPs per token of full ``seq``-token sequences, by :func:`dsft.flops.train_flops`
    (the formula MFU uses), with the recomputation of activation checkpointing."""
    # the parameters a token uses: a MoE's idle experts and a multimodal model's tower are
    # left out (the tower runs per image, and the plan does not know the images per row)
    active, trainable = f.active
    per_seq = train_flops(active, trainable, f.layers, f.hidden, seq, seq * seq, checkpointing)
    return per_seq / seq


def epoch_seconds(
    f: ModelFacts, hw: Hardware, w: Workload, tokens: int, peak_tflops: float, mfu: float
) -> float:
    """Compute-bound time to train on ``tokens`` tokens at ``mfu`` of every GPU's peak."""
    flops = tokens * flops_per_token(f, w.seq, w.checkpointing)
    return flops / (hw.world_size * peak_tflops * 1e12 * mfu)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def render_plan(
    plan: Plan,
    tokens: int | None = None,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
) -> str:
    """The option table: memory per GPU and host, largest micro-batch, fit, time per epoch."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    act, logits = activation_bytes(f, w)
    lines = [
        f"model     {f.describe()}",
        f"hardware  {hw.describe()}",
        f"workload  seq {w.seq}, global batch {w.global_batch}, {w.precision}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}{_long_rows(w)}, "
        f"usable {w.headroom:.0%} of GPU memory",
        f"per sequence{' and rank' if w.sequence_parallel > 1 else ''}: activations {_gb(act)}, "
        f"logits {_gb(logits)}"
        + (f" (fused loss: {_gb(loss_bytes(f, w))} per micro-batch)" if w.chunked_loss else ""),
        "",
    ]
    head = f"  {'option':<34}{'states/GPU':>11}{'peak/GPU':>10}{'host/node':>11}{'micro':>7}  fits"
    if tokens:
        head += f"{'time/epoch':>12}"
    lines.append(head)
    seconds = epoch_seconds(f, hw, w, tokens, peak_tflops, mfu) if tokens else 0.0
    for e in plan.estimates:
        mark = "*" if e is plan.choice else " "
        fits = "yes" if e.fits else ("host" if e.micro_batch and not e.host_fits else "no")
        row = (
            f"{mark} {e.option!s:<34}{e.states / GiB:>11.1f}{e.peak / GiB:>10.1f}"
            f"{e.host / GiB:>11.1f}{e.micro_batch or '-':>7}  {fits:<4}"
        )
        if tokens:
            slow = "+" if e.option.offload_optimizer else ""
            row += f"{_duration(seconds) + slow:>12}"
        lines.append(row)
    lines.append("")
    if plan.choice:
        c = plan.choice
        dp = hw.world_size // w.sequence_parallel
        lines.append(
            f"* chosen: {c.option}, micro-batch {plan.micro_batch} × accumulation "
            f"{plan.grad_accum} × {dp} {'data-parallel ranks' if dp != hw.world_size else 'GPUs'}"
            f" = global batch {w.global_batch}; predicted peak {_gb(c.peak)} per GPU of "
            f"{_gb(hw.gpu_mem)}"
        )
    else:
        lines.append(plan.refusal())
    if tokens:
        lines.append(
            f"time/epoch: {_count(tokens)} tokens at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s "
            "per GPU (+: offload steps are host-bound, usually several times slower)"
        )
    return "\n".join(lines)


def _long_rows(w: Workload) -> str:
    parts = [f"sequence parallel {w.sequence_parallel}"] * (w.sequence_parallel > 1)
    parts += ["tiled MLP"] * w.tiled_mlp + ["chunked loss"] * w.chunked_loss
    return "".join(f", {p}" for p in parts)


def render_sequence_parallel(facts: list[ModelFacts], hw: Hardware, w: Workload) -> str:
    """The smallest sequence-parallel degree that fits each model, plain and with tiling
    (tiled MLP and a chunked loss), at micro-batch 1 (or the workload's)."""
    w = dataclasses.replace(w, micro_batch=w.micro_batch or 1)
    plain = dataclasses.replace(w, tiled_mlp=False, chunked_loss=False)
    tiled = dataclasses.replace(w, tiled_mlp=True, chunked_loss=True)
    lines = [
        f"sequence parallelism at seq {w.seq}, micro-batch {w.micro_batch}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}: the smallest degree that fits "
        f"(train.sequence_parallel) on {hw.describe()}",
        f"  {'model':<12}{'plain':<52}tiled (model.tiled_mlp + chunked loss)",
    ]

    def cell(p: Plan | None) -> str:
        if p is None or p.choice is None:
            return "does not fit"
        c = p.choice
        return f"SP {p.workload.sequence_parallel:<3}{c.option!s:<36}{c.peak / GiB:>5.1f} GB"

    for f in facts:
        row = cell(smallest_sp(f, hw, plain)), cell(smallest_sp(f, hw, tiled))
        lines.append(f"  {f.name:<12}{row[0]:<52}{row[1]}")
    return "\n".join(lines)


def render_family(
    plans: list[Plan],
    tokens: int | None = None,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
    epochs: int = 1,
    budget_hours: float | None = None,
) -> str:
    """One line per model size: whether and how it fits, and its training time."""
    hw, w = plans[0].hardware, plans[0].workload
    lines = [
        f"hardware  {hw.describe()}",
        f"workload  seq {w.seq}, global batch {w.global_batch}, {w.precision}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}",
        "",
    ]
    head = (
        f"  {'model':<14}{'params':>9}{'active':>9}{'trainable':>11}  {'choice':<34}{'micro':>6}"
        f"{'peak/GPU':>10}"
    )
    if tokens:
        head += f"{'train time':>12}"
    lines.append(head)
    for p in plans:
        c = p.choice
        row = (
            f"  {p.facts.name:<14}{_count(p.facts.total_params):>9}"
            f"{_count(p.facts.active[0]):>9}{_count(p.facts.trainable_params):>11}  "
        )
        if c is None:
            row += f"{'does not fit':<34}{'-':>6}{'-':>10}"
        else:
            row += f"{c.option!s:<34}{c.micro_batch:>6}{c.peak / GiB:>7.1f} GB"
        if tokens and c is not None:
            hours = epochs * epoch_seconds(p.facts, hw, w, tokens, peak_tflops, mfu) / 3600
            over = budget_hours is not None and hours > budget_hours
            slow = "+" if c.option.offload_optimizer or c.option.offload_params else ""
            row += f"{_duration(hours * 3600) + slow:>12}" + (" over budget" if over else "")
        lines.append(row)
    if tokens:
        lines.append("")
        lines.append(
            f"train time: {epochs} epoch(s) of {_count(tokens)} tokens at {mfu:.0%} MFU of "
            f"{peak_tflops:g} TFLOP/s per GPU"
            + (f"; budget {budget_hours:g} h" if budget_hours is not None else "")
            + " (+: offload, host-bound, usually several times slower)"
        )
    return "\n".join(lines)
