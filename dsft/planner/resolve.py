"""`auto` resolved for `dsft train`: the planner's decision for this job, as a typed record
(plan.json)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from dsft.config import Config, batch_shape, live_reference_copy
from dsft.errors import ConfigError
from dsft.planner.choose import choose, smallest_sp
from dsft.planner.facts import Hardware, ModelFacts, hidden_size, model_facts
from dsft.planner.memory import ESCALATION, Estimate, Option, Workload
from dsft.planner.render import render_plan

log = logging.getLogger("dsft")


@dataclass
class Decision:
    """What ``resolve`` decided and why: the resolved batch geometry and DeepSpeed setup, the
    facts it used, and (when it planned) the options it weighed. Written to
    ``<output_dir>/plan.json`` by :meth:`record`."""

    hardware: dict[str, Any]  # the Hardware the plan was made for (asdict)
    decided_by: str  # "config" (explicit stage), "planner" (CUDA) or "cpu" (the CPU rule)
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    grad_accum: int
    world_size: int
    sequence_parallel: int
    global_batch: int
    hidden: int | None  # the model's hidden size (DeepSpeed bucket sizes, tiled MLP tiles)
    warnings: list[str] = field(default_factory=list)
    # set when the planner ran (CUDA, or micro_batch auto):
    model: dict[str, Any] | None = None  # the ModelFacts used (without the HF config)
    workload: dict[str, Any] | None = None  # the Workload planned for (asdict)
    predicted_gpu_bytes: int | None = None
    predicted_host_bytes: int | None = None
    options: list[dict[str, Any]] | None = None  # every option's estimate
    table: str | None = None  # the option table (as `dsft plan` prints it)

    def record(self) -> dict[str, Any]:
        """plan.json: the fields that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def resolve(cfg: Config, hw: Hardware, facts: ModelFacts | None = None) -> tuple[Config, Decision]:
    """``cfg`` with ``deepspeed.zero_stage`` and ``train.micro_batch`` "auto" replaced by the
    plan for ``hw``, and the :class:`Decision` (written to ``<output_dir>/plan.json``).

    On CUDA the planner chooses; explicit values always win, with a warning when the plan
    predicts they will not fit. Without CUDA (CPU ranks, gloo) auto means ZeRO-0 on one rank
    and ZeRO-2 on several (ranks of a node share its RAM; ZeRO-2 divides gradients and
    optimizer states between them at the communication cost of plain data parallelism).
    ``train.sequence_parallel: auto`` takes the smallest degree at which a plan fits on CUDA
    (with the stage, when that is auto too), 1 without CUDA.
    """
    ds, t = cfg.deepspeed, cfg.train
    auto_stage, auto_micro = ds.zero_stage == "auto", t.micro_batch == "auto"
    auto_sp = t.sequence_parallel == "auto"
    warnings: list[str] = []
    planned_record: dict[str, Any] = {}
    planned = hw.device == "cuda" or auto_micro
    if planned and facts is None:
        facts = model_facts(
            cfg.model.path, cfg.model.lora, cfg.model.freeze, cfg.model.trust_remote_code
        )
    if auto_stage and hw.device == "cpu":
        stage = 3 if ds.offload_params else 2 if hw.world_size > 1 or ds.offload_optimizer else 0
        options = [Option(stage, ds.offload_optimizer, ds.offload_params)]
    elif auto_stage:  # offloads asked for are requirements; the planner may add them too
        options = [
            o
            for o in ESCALATION
            if o.offload_optimizer >= ds.offload_optimizer and o.offload_params >= ds.offload_params
        ]
    else:
        options = [Option(int(ds.zero_stage), ds.offload_optimizer, ds.offload_params)]
    world = hw.world_size

    def global_batch(sp: int) -> int:
        return t.global_batch or (t.micro_batch if not auto_micro else 0) * t.grad_accum * (
            world // sp
        )

    sp = 1 if auto_sp else int(t.sequence_parallel)
    option, micro = options[0], None if auto_micro else int(t.micro_batch)
    if planned:
        assert facts is not None
        work = Workload(
            seq=cfg.data.max_len,
            global_batch=global_batch(sp),
            micro_batch=micro,
            precision=t.precision,
            checkpointing=cfg.model.gradient_checkpointing,
            attention=cfg.model.attn_implementation,
            sequence_parallel=sp,
            tiled_mlp=cfg.model.tiled_mlp,
            chunked_loss=t.fused_loss,
            reference_copy=live_reference_copy(cfg),
        )
        plan = choose(facts, hw, work, options)
        if auto_sp and hw.device == "cuda":
            plan = smallest_sp(facts, hw, work, options, global_batch) or plan
            sp = plan.workload.sequence_parallel
            work = plan.workload
        chosen = plan.choice
        if chosen is None and (auto_stage or hw.device == "cpu"):
            if hw.device == "cuda":
                raise ConfigError([plan.refusal()])
            chosen = plan.estimates[0]  # CPU: host RAM is a soft limit (it swaps); say so
            warnings.append(plan.refusal())
        if chosen is None:  # an explicit stage: it wins, with a warning
            chosen = plan.estimates[0]
            warnings.append(f"deepspeed.zero_stage={ds.zero_stage} may not fit: " + plan.refusal())
        option = chosen.option
        micro = micro or chosen.micro_batch or 1
        planned_record = dict(
            model=_facts_record(facts),
            workload=dataclasses.asdict(work),
            predicted_gpu_bytes=chosen.gpu(micro),
            predicted_host_bytes=chosen.host,
            options=[_estimate_record(e) for e in plan.estimates],
            table=render_plan(plan),
        )
    resolved = dataclasses.replace(
        cfg,
        deepspeed=dataclasses.replace(
            ds,
            zero_stage=option.stage,
            offload_optimizer=option.offload_optimizer,
            offload_params=option.offload_params,
        ),
        train=dataclasses.replace(t, micro_batch=micro, sequence_parallel=sp),
    )
    bp = batch_shape(resolved.train, world)
    hidden = facts.hidden if facts is not None else None
    decision = Decision(
        hardware=dataclasses.asdict(hw),
        decided_by="config" if not auto_stage else "planner" if hw.device == "cuda" else "cpu",
        zero_stage=option.stage,
        offload_optimizer=option.offload_optimizer,
        offload_params=option.offload_params,
        micro_batch=bp.micro_batch,
        grad_accum=bp.grad_accum,
        world_size=world,
        sequence_parallel=bp.sequence_parallel,
        global_batch=bp.global_batch,
        hidden=hidden or hidden_size(cfg.model.path, cfg.model.trust_remote_code),
        warnings=warnings,
        **planned_record,
    )
    for warning in decision.warnings:
        log.warning("plan: %s", warning)
    return resolved, decision


def _facts_record(f: ModelFacts) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(f).items() if k != "config"}


def _estimate_record(e: Estimate) -> dict[str, Any]:
    return {
        "option": str(e.option),
        "micro_batch": e.micro_batch,
        "gpu_bytes": e.peak,
        "states_bytes": e.states,
        "per_sequence_bytes": e.per_sequence,
        "host_bytes": e.host,
        "fits": e.fits,
    }
