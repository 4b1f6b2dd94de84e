"""The choice: the first option of the escalation that fits, the smallest sequence-parallel
degree that does, and what to change when none does."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dsft.config import LoraConfig
from dsft.planner.facts import Hardware, ModelFacts, _count, _gb, model_facts
from dsft.planner.memory import ESCALATION, Estimate, Option, Workload, estimate


@dataclass(frozen=True)
class Plan:
    """Every option's estimate and the one chosen (None: nothing fits)."""

    facts: ModelFacts
    hardware: Hardware
    workload: Workload
    estimates: list[Estimate]
    choice: Estimate | None

    @property
    def micro_batch(self) -> int:
        return self.choice.micro_batch if self.choice else 0

    @property
    def grad_accum(self) -> int:
        per_step = self.micro_batch * self.hardware.world_size // self.workload.sequence_parallel
        return self.workload.global_batch // per_step if per_step else 0

    def refusal(self) -> str:
        """Why nothing fits, and what would."""
        return refusal_message(self)


def choose(
    f: ModelFacts, hw: Hardware, w: Workload, options: Sequence[Option] = ESCALATION
) -> Plan:
    """Estimate every option and pick one.

    Without offload: the option that fits the largest micro-batch, the earliest in the
    escalation order among equals (ZeRO-0/1/2 communicate as much as plain data parallelism,
    ZeRO-3 half as much again, which a larger micro-batch amortises). Offload only when
    nothing else fits, and then the least of it (host transfers bound the step time).
    """
    estimates = [estimate(f, hw, w, o) for o in options]
    on_gpu = [
        e
        for e in estimates
        if e.fits and not (e.option.offload_optimizer or e.option.offload_params)
    ]
    offloaded = [e for e in estimates if e.fits and e not in on_gpu]
    if on_gpu:
        choice = max(on_gpu, key=lambda e: e.micro_batch)  # max keeps the first of equals
    else:
        choice = offloaded[0] if offloaded else None
    return Plan(f, hw, w, estimates, choice)


def sp_degrees(f: ModelFacts, hw: Hardware, seq: int) -> list[int]:
    """Possible sequence-parallel degrees: divisors of the ranks that also divide the
    attention heads, the key/value heads and the sequence length (each rank owns whole heads
    and an equal slice)."""
    kv = f.kv_heads or f.heads
    return [
        n
        for n in range(1, hw.world_size + 1)
        if hw.world_size % n == 0 and f.heads % n == 0 and kv % n == 0 and seq % n == 0
    ]


def smallest_sp(
    f: ModelFacts,
    hw: Hardware,
    w: Workload,
    options: Sequence[Option] = ESCALATION,
    global_batch: Any = None,
) -> Plan | None:
    """The plan at the smallest sequence-parallel degree that fits: the first whose choice
    stays on the GPUs, else the first that fits with offload; None when none does.

    ``global_batch(n)`` gives the global batch at degree ``n`` (default: the workload's).
    """
    fallback = None
    for n in sp_degrees(f, hw, w.seq):
        wn = dataclasses.replace(w, sequence_parallel=n)
        if global_batch is not None:
            wn = dataclasses.replace(wn, global_batch=global_batch(n))
        plan = choose(f, hw, wn, options)
        c = plan.choice
        if c is not None and not (c.option.offload_optimizer or c.option.offload_params):
            return plan
        if c is not None and fallback is None:
            fallback = plan
    return fallback


def refusal_message(plan: Plan) -> str:
    """What does not fit, by how much, and the changes that would make something fit."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    smallest = min(plan.estimates, key=lambda e: e.peak)
    mb = w.micro_batch or 1
    lines = [
        f"no DeepSpeed setup fits {f.name} ({_count(f.total_params)} params, "
        f"{_count(f.trainable_params)} trainable) on {hw.describe()} at micro-batch {mb}, "
        f"sequence length {w.seq}: the smallest, {smallest.option}, needs "
        f"{_gb(smallest.gpu(mb))} per GPU (usable: {_gb(smallest.budget)})"
        + ("" if smallest.host_fits else f" and {_gb(smallest.host)} host RAM per node")
    ]
    fixes = suggestions(plan)
    if fixes:
        lines.append("what would fit: " + "; ".join(fixes))
    return "\n".join(lines)


def suggestions(plan: Plan) -> list[str]:
    """Changes that would make the plan fit: a smaller micro-batch, activation checkpointing,
    shorter sequences, LoRA, more GPUs."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    out: list[str] = []

    def first_fit(f2: ModelFacts, hw2: Hardware, w2: Workload) -> Estimate | None:
        options = [e.option for e in plan.estimates]
        w2 = dataclasses.replace(w2, micro_batch=w2.micro_batch or 1)
        return choose(f2, hw2, w2, options).choice

    if w.micro_batch and w.micro_batch > 1:
        e = first_fit(f, hw, dataclasses.replace(w, micro_batch=1))
        if e:
            out.append(f"train.micro_batch=auto or 1 ({e.option})")
    if not w.checkpointing:
        e = first_fit(f, hw, dataclasses.replace(w, checkpointing=True))
        if e:
            out.append(f"model.gradient_checkpointing=true ({e.option})")
    for tiled in (False, True):
        w2 = dataclasses.replace(w, micro_batch=w.micro_batch or 1)
        if tiled:
            w2 = dataclasses.replace(w2, tiled_mlp=True, chunked_loss=True)
        sp = smallest_sp(f, hw, w2, [e.option for e in plan.estimates])
        n = sp.workload.sequence_parallel if sp else 0
        if sp and n > w.sequence_parallel:
            extra = ", model.tiled_mlp=true and a chunked loss" if tiled else ""
            out.append(f"train.sequence_parallel={n}{extra} ({sp.choice.option})")  # type: ignore[union-attr]
            break
    seq = w.seq // 2
    while seq >= 256:
        e = first_fit(f, hw, dataclasses.replace(w, seq=seq))
        if e:
            out.append(f"data.max_len={seq} ({e.option})")
            break
        seq //= 2
    if not f.lora and f.config is not None:
        lf = model_facts(f.config, lora=LoraConfig(enabled=True))
        e = first_fit(dataclasses.replace(lf, name=f.name), hw, w)
        if e:
            out.append(f"LoRA, model.lora.enabled=true ({e.option})")
    for more in _bigger(hw):
        e = first_fit(f, more, dataclasses.replace(w, global_batch=more.world_size))
        if e:
            out.append(f"{more.world_size} GPUs ({more.nodes} × {more.gpus_per_node}, {e.option})")
            break
    return out


def _bigger(hw: Hardware) -> Iterator[Hardware]:
    """Larger machines of the same GPU: a fuller node (up to 8 GPUs), then more nodes."""
    for gpus in (2, 4, 8):
        if hw.nodes == 1 and gpus > hw.gpus_per_node:
            yield dataclasses.replace(hw, gpus_per_node=gpus)
    per_node = max(hw.gpus_per_node, 8) if hw.nodes == 1 else hw.gpus_per_node
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes > hw.nodes:
            yield dataclasses.replace(hw, gpus_per_node=per_node, nodes=nodes)
