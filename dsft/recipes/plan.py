"""``dsft plan``: every DeepSpeed option's memory for a model on some hardware, and the
choice; ``dsft ds-config``: the DeepSpeed JSON a config generates."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dsft import planner
from dsft.config import Config, batch_shape, live_reference_copy, load_config
from dsft.ds_config import deepspeed_config
from dsft.errors import ConfigError
from dsft.flops import peak_flops

LONG_SEQ = 8192  # from this length on, `dsft plan` also shows the sequence-parallel table


def main(ns: argparse.Namespace) -> int:
    return ds_config(ns) if ns.command == "ds-config" else plan(ns)


def plan(ns: argparse.Namespace) -> int:
    """Print every DeepSpeed option's memory for a model on some hardware, and the choice."""
    if sum(bool(x) for x in (ns.source, ns.shape, ns.family)) > 1:
        raise ConfigError(["dsft plan: give one of MODEL_DIR_OR_CONFIG, --shape NAME, --family"])
    ns.family = ns.family or not (ns.source or ns.shape)  # nothing named: the built-in shapes
    cfg, source = Config(), ns.shape or ns.source
    from_yaml = bool(ns.source) and Path(ns.source).suffix in (".yaml", ".yml")
    if from_yaml:
        cfg = load_config(ns.source, ns.overrides)
        source = cfg.model.path
    elif ns.overrides:
        raise ConfigError(["dsft plan: dotted overrides need a YAML config"])
    lora = dataclasses.replace(cfg.model.lora, enabled=cfg.model.lora.enabled or ns.lora)
    hw = planner.hardware_facts(ns.gpus, ns.gpu_mem, ns.nodes, ns.host_mem)
    t = cfg.train
    micro = ns.micro_batch or (t.micro_batch if from_yaml else "auto")
    micro = None if micro == "auto" else int(micro)
    if ns.global_batch:
        global_batch = ns.global_batch
    elif from_yaml and (t.global_batch or micro):
        global_batch = t.global_batch or micro * t.grad_accum * hw.world_size
    else:
        global_batch = 8 * hw.world_size  # 8 sequences per GPU
    sp = ns.sp or (t.sequence_parallel if from_yaml else 1)
    auto_sp = sp == "auto"
    work = planner.Workload(
        seq=ns.seq or cfg.data.max_len,
        global_batch=global_batch,
        micro_batch=micro,
        precision=ns.precision or t.precision,
        checkpointing=ns.grad_ckpt or cfg.model.gradient_checkpointing,
        attention=cfg.model.attn_implementation,
        headroom=ns.headroom,
        sequence_parallel=1 if auto_sp else int(sp),
        tiled_mlp=ns.tiled or cfg.model.tiled_mlp,
        chunked_loss=ns.tiled or t.fused_loss,
        reference_copy=live_reference_copy(cfg),
    )
    # Long rows (or sequence parallelism asked for): which degree each model needs.
    show_sp = auto_sp or work.sequence_parallel > 1 or work.seq > LONG_SEQ
    tokens = planner.parse_count(ns.tokens) if ns.tokens else None
    if tokens is None and from_yaml:  # the config's training split, tokenised as training does
        from dsft.data import prepare
        from dsft.model import load_tokenizer

        tokens = prepare(cfg.data, load_tokenizer(cfg.model)).stats["train_tokens"]
    peak = ns.peak_tflops or peak_flops(cfg.logging.peak_tflops) / 1e12
    peak = peak or planner.DEFAULT_PEAK_TFLOPS
    epochs = ns.epochs or t.epochs
    if ns.family:
        plans = [
            planner.choose(planner.model_facts(name, lora, cfg.model.freeze), hw, work)
            for name in planner.SHAPES
        ]
        print(
            planner.render_family(
                plans, tokens, peak, ns.mfu or planner.DEFAULT_MFU, epochs, ns.budget_hours
            )
        )
        if show_sp:
            print("\n" + planner.render_sequence_parallel([p.facts for p in plans], hw, work))
        return 0
    facts = planner.model_facts(source, lora, cfg.model.freeze, cfg.model.trust_remote_code)
    plan = planner.choose(facts, hw, work)
    if auto_sp:
        plan = planner.smallest_sp(facts, hw, work) or plan
    print(planner.render_plan(plan, tokens, peak, ns.mfu or planner.DEFAULT_MFU))
    if show_sp or plan.choice is None:
        print("\n" + planner.render_sequence_parallel([facts], hw, work))
    ds = cfg.deepspeed
    if from_yaml and ds.zero_stage != "auto":
        own = planner.Option(int(ds.zero_stage), ds.offload_optimizer, ds.offload_params)
        e = planner.estimate(facts, hw, work, own)
        verdict = "fits" if e.fits else "does NOT fit"
        print(f"the config asks for {own}: {verdict} ({e.peak / 2**30:.1f} GB per GPU)")
    return 0 if plan.choice else 2


def ds_config(ns: argparse.Namespace) -> int:
    """``dsft ds-config CONFIG``: the DeepSpeed JSON a config generates."""
    cfg = load_config(ns.config, ns.overrides)
    hw = planner.job_hardware(ns.world_size, ns.world_size, planner.free_gpu_memory())
    cfg, decision = planner.resolve(cfg, hw)  # "auto" as `dsft train` would resolve it here
    shape = batch_shape(cfg.train, ns.world_size)
    print(json.dumps(deepspeed_config(cfg, shape, decision.hidden), indent=2))
    return 0
