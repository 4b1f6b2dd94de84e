"""What the commands that build an engine share: the seed, the runtime checks that refuse what
this machine cannot do, and the resolution of "auto" settings by the memory planner."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import random
from typing import Any

import numpy as np
import torch

from dsft import attention, distributed, fastpath, planner
from dsft.config import Config
from dsft.errors import ConfigError, HubError
from dsft.hub import model_path

log = logging.getLogger("dsft")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_runtime(cfg: Config) -> None:
    """Refuse what cannot work on this machine before anything expensive starts."""
    problems = []
    cuda = torch.cuda.is_available()
    if cfg.train.precision == "fp16" and not cuda:
        problems.append(
            "train.precision=fp16 needs a CUDA GPU (DeepSpeed has no fp16 on CPU); "
            "use train.precision=bf16 or fp32"
        )
    if cfg.model.attn_implementation == "flash_attention_2" and (
        not cuda or importlib.util.find_spec("flash_attn") is None
    ):
        problems.append(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the "
            "flash-attn package; use sdpa (PyTorch's fused attention) instead"
        )
    if cfg.model.attn_implementation == "flex_attention" and not cuda:
        problems.append(
            "model.attn_implementation=flex_attention needs a CUDA GPU (FlexAttention trains "
            "through Triton kernels); use sdpa"
        )
    if cfg.model.kernels == "liger":
        if not cuda:
            problems.append(
                "model.kernels=liger needs a CUDA GPU (Liger's kernels are Triton); "
                "use model.kernels=none"
            )
        elif importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                "model.kernels=liger: the liger-kernel package is not installed; "
                "pip install 'dsft[gpu]' (or liger-kernel>=0.8), or use model.kernels=none"
            )
    if cfg.model.compile in (True, "regional") and not cuda:
        log.warning("model.compile on CPU works but is rarely faster; it is meant for CUDA")
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    for what, asked in (
        ("model.quantization=nf4 (QLoRA)", cfg.model.quantization == "nf4"),
        ("model.lora.init=loftq", cfg.model.lora.init == "loftq"),
    ):
        if asked and not (cuda and bnb):
            problems.append(
                f"{what} needs a CUDA GPU and the bitsandbytes package (pip install "
                "'dsft[qlora]'); on this machine use plain LoRA (model.quantization=none, "
                "model.lora.init=default or pissa)"
            )
    if problems:
        raise ConfigError(problems)
    if cfg.train.precision == "bf16" and not cuda:
        log.warning("train.precision=bf16 on CPU is correct but much slower than fp32 here")


def hardware_name(world_size: int) -> str:
    """The job's hardware in words (for summaries and model cards)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        return f"{world_size} × {name} ({mem:.0f} GB)"
    return f"{world_size} CPU rank{'s' * (world_size > 1)} ({torch.get_num_threads()} threads each)"


def resolve_plan(cfg: Config, env: distributed.DistEnv) -> tuple[Config, planner.Decision]:
    """Resolve "auto" (attention and kernels: dsft.attention, dsft.fastpath; ZeRO stage,
    offload, micro-batch) for this job's hardware.

    Rank 0 plans and the others receive its decision, so every rank builds the same engine;
    the free GPU memory that bounds the plan is the smallest of all ranks'.
    """
    free = planner.free_gpu_memory()
    if free is not None:
        free = -distributed.all_reduce_max(-free)
    result: Any = None
    if env.is_main:
        try:
            hw = planner.job_hardware(env.world_size, env.local_world_size, free)
            # A Hub name is read from its cache snapshot (dsft/hub.py: one-line error if
            # neither cached nor reachable); the resolved config keeps the name.
            local = model_path(cfg.model.path, cfg.model.revision)
            on_disk = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=local))
            cuda = torch.cuda.is_available()
            on_disk = attention.resolve_config(on_disk, cuda)  # "auto" attention
            on_disk = fastpath.resolve_config(on_disk, cuda)  # "auto" kernels and compile
            resolved, decision = planner.resolve(on_disk, hw)
            resolved = dataclasses.replace(
                resolved, model=dataclasses.replace(resolved.model, path=cfg.model.path)
            )
            result = (resolved, decision)
        except ConfigError as e:  # refused: every rank raises it (problems pickle, errors not)
            result = e.problems
        except HubError as e:
            result = [str(e)]
    result = distributed.broadcast_object(result)
    if isinstance(result, list):
        raise ConfigError(result)
    resolved, decision = result
    if decision.table is not None:
        log.info("memory plan (%s):\n%s", decision.decided_by, decision.table)
    ds = resolved.deepspeed
    log.info(
        "plan: ZeRO-%d%s%s, micro-batch %d x accum %d (decided by %s)",
        ds.zero_stage,
        " + optimizer offload" if ds.offload_optimizer else "",
        " + param offload" if ds.offload_params else "",
        decision.micro_batch,
        decision.grad_accum,
        decision.decided_by,
    )
    return resolved, decision
