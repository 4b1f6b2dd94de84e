"""The trained model as the loop sees it: the DeepSpeed engine with its optimizer and LR
schedule, the LM head of the fused loss, sequence parallelism, and the run position restored
from a checkpoint; and the two ways a run leaves the model behind (checkpoint, best export)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft import checkpoint, distributed, fastpath, flops, hf_export, loss, moe, tiled_mlp
from dsft import sequence_parallel as seqpar
from dsft.config import to_dict
from dsft.data.sampler import steps_per_epoch
from dsft.errors import ConfigError
from dsft.eval.evaluator import BestTracker
from dsft.job import Job
from dsft.model import (
    TowerTouch,
    build_model,
    count_params,
    freeze,
    part_params,
    torch_dtype,
    warn_beyond_context,
)
from dsft.optim import describe_groups, lr_lambda, make_optimizer, param_groups

log = logging.getLogger("dsft")


@dataclass
class RunState:
    """Where the run is: what a checkpoint needs beyond DeepSpeed's states to continue."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    window: int = 0  # the next window (optimizer step) of the epoch
    best: list[Any] = field(default_factory=lambda: [None, None, 0])  # BestTracker's state

    def record(self, global_batch: int, tracker: BestTracker) -> dict[str, Any]:
        """The checkpoint's run state (tracker: the best metric so far)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "window": self.window,
            "global_batch": global_batch,
            "best": [tracker.best, tracker.best_step, tracker.since_best],
        }


@dataclass
class Engine:
    """The DeepSpeed engine and what the step needs beside it."""

    ds: Any  # the DeepSpeed engine (ds.module: the model)
    optimizer: Any
    sp: seqpar.SequenceParallel  # this rank's part of its sequence-parallel group
    dp_rank: int  # the data-parallel rank (the sampler deals by it)
    data_parallel: int  # data-parallel ranks (world size / sequence_parallel)
    head: loss.Head | None  # train.fused_loss: the LM head the loss runs through
    grad_divisor: int  # what DeepSpeed divides the summed gradients by (see gradient_divisor)
    zero0_fp32: bool  # ZeRO-0 fp32: DeepSpeed keeps no grad norm, the step takes its own
    device: torch.device
    total_steps: int
    per_epoch: int  # optimizer steps per epoch
    params: int
    trainable_params: int
    frozen_tensors: int
    state: RunState  # restored from the resume point (else the start)
    resumed_from: Path | None = None
    # ZeRO-3 with image rows: micro-batches without images run the tower too (TowerTouch)
    toucher: TowerTouch | None = None
    # Mixture of experts (dsft/moe.py): parameters of the experts a token does not use (total,
    # trainable; FLOPs and MFU leave them out), and the router's load-balancing loss (None:
    # a dense model, a family without one, or train.router_aux_loss_coef=0).
    idle_params: int = 0
    idle_trainable: int = 0
    router: moe.RouterLoss | None = None
    # A multimodal model's vision tower and projector: their FLOPs count per image patch
    tower: flops.Tower | None = None

    @property
    def active(self) -> tuple[int, int]:
        """(total, trainable) parameters a token uses: all of them unless a MoE."""
        return self.params - self.idle_params, self.trainable_params - self.idle_trainable

    def tracker(self, cfg: Any) -> BestTracker:
        """eval.metric's best-so-far tracker, as the resume point left it."""
        t = BestTracker(cfg.eval.metric, cfg.eval.patience, cfg.eval.min_delta)
        t.best, t.best_step, t.since_best = self.state.best
        return t


def build_engine(job: Job, units: int) -> Engine:
    """Build the model, optimizer and schedule for ``units`` training units per epoch, wrap
    them in DeepSpeed, and restore the run from the latest checkpoint (or the one asked for).

    A checkpoint saved on another number of ranks or ZeRO stage cannot be loaded by DeepSpeed:
    its weights are consolidated and loaded before the engine exists; moments start afresh.
    """
    cfg, env, shape = job.cfg, job.env, job.shape
    zero3 = cfg.deepspeed.zero_stage == 3
    # train.sequence_parallel: the ranks of a group share each micro-batch (the sampler
    # deals by data-parallel rank), each computing its slice of the rows.
    sp_groups = distributed.sequence_parallel_groups(shape.sequence_parallel)
    model = build_model(cfg.model, torch_dtype(cfg.train.precision), job.ds_config)
    warn_beyond_context(model.config, cfg.data.max_len)
    resume_from = job.resume_from  # the newest intact checkpoint (dsft/run_dir.py)
    if resume_from is not None:  # a lean checkpoint needs the base weights it was trained on
        checkpoint.check_base(resume_from, cfg.model.path, cfg.model.revision)
    reshard = resume_from is not None and checkpoint.needs_reshard(
        resume_from, env.world_size, cfg.deepspeed.zero_stage
    )
    frozen = freeze(model, cfg.model.freeze)
    if reshard:  # after freezing: frozen parameters keep model.path's values
        checkpoint.load_weights(model, resume_from, zero3, cfg.checkpoint.trust)
    if cfg.model.tiled_mlp:
        tiles = tiled_mlp.tiles_for(cfg.data.max_len, shape.sequence_parallel, job.plan.hidden)
        log.info("tiled MLP: %d blocks, %d tiles per row", tiled_mlp.tile_mlp(model, tiles), tiles)
    sp = seqpar.SequenceParallel(sp_groups, model)
    total_params, trainable_params = count_params(model)
    idle, idle_trainable = moe.idle_params(model)  # MoE: experts a token does not use
    optimizer = make_optimizer(cfg, param_groups(model, cfg.train))

    per_epoch = steps_per_epoch(units, shape.micro_batch, shape.data_parallel, shape.grad_accum)
    if per_epoch == 0:
        raise ConfigError(
            [
                f"train: {units} training {'rows' if job.splits.packs else 'examples'} do not "
                f"fill one global batch of {shape.global_batch}; lower train.micro_batch or "
                "train.grad_accum"
            ]
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio)
    )

    start: dict[str, Any] = {"step": 0, "epoch": 0, "window": 0}
    if reshard:
        start = checkpoint.read_state(resume_from, cfg.checkpoint.trust)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            for _ in range(start["step"]):
                scheduler.step()
    ds, optimizer, _, scheduler = job.deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=job.ds_config,
        mpu=sp_groups.mpu,  # sequence parallelism: ZeRO over all ranks, averaging over dp
    )
    if cfg.model.compile:  # "regional": each decoder layer; true: the whole model (DeepSpeed's)
        log.info(
            "torch.compile: %d regions", fastpath.compile_model(ds, ds.module, cfg.model.compile)
        )
    _describe(job, sp.enabled, total_params, trainable_params, total_steps, per_epoch)
    log.info(
        "optimizer groups (%d frozen parameter tensors):\n%s",
        len(frozen),
        describe_groups(optimizer.param_groups),
    )
    if resume_from is not None:
        start = _restored(job, ds, resume_from, reshard, start)
    state = RunState(start["step"], start["epoch"], start["window"])
    if "best" in start:
        state.best = list(start["best"])
    return Engine(
        ds=ds,
        optimizer=optimizer,
        sp=sp,
        dp_rank=sp_groups.dp_rank,
        data_parallel=shape.data_parallel,
        head=loss.output_head(ds.module) if cfg.train.fused_loss else None,
        # DeepSpeed sums the ranks' gradients and divides by this (dp; see gradient_divisor)
        grad_divisor=seqpar.gradient_divisor(
            shape.data_parallel, shape.sequence_parallel, cfg.deepspeed.zero_stage
        ),
        zero0_fp32=cfg.deepspeed.zero_stage == 0 and cfg.train.precision == "fp32",
        device=distributed.device(),
        total_steps=total_steps,
        per_epoch=per_epoch,
        params=total_params,
        trainable_params=trainable_params,
        frozen_tensors=len(frozen),
        state=state,
        resumed_from=resume_from,
        toucher=job.tower_toucher(ds.module),
        idle_params=idle,
        idle_trainable=idle_trainable,
        tower=flops.tower(model.config, part_params(model)),
        # mixture of experts: the router's load-balancing loss (dsft/moe.py), None when none
        router=moe.router_loss(ds.module, cfg.train.router_aux_loss_coef),
    )


def _describe(
    job: Job, sp: bool, params: int, trainable: int, total_steps: int, per_epoch: int
) -> None:
    cfg, env, shape = job.cfg, job.env, job.shape
    log.info(
        "model: %s params, %s trainable | ranks %d (%s)%s | ZeRO-%d | %s | micro-batch %d x "
        "accum %d x data-parallel ranks %d = global batch %d | %d steps (%d per epoch)",
        f"{params:,}",
        f"{trainable:,}",
        env.world_size,
        env.source,
        f", sequence parallel {shape.sequence_parallel}" if sp else "",
        cfg.deepspeed.zero_stage,
        cfg.train.precision,
        shape.micro_batch,
        shape.grad_accum,
        shape.data_parallel,
        shape.global_batch,
        total_steps,
        per_epoch,
    )


def _restored(
    job: Job, ds: Any, resume_from: Path, reshard: bool, start: dict[str, Any]
) -> dict[str, Any]:
    """The run position of the resume point (loading DeepSpeed's states unless the
    weights were already loaded for another rank count or stage: ``reshard``)."""
    global_batch = job.shape.global_batch
    if not reshard:
        start = checkpoint.load(ds, resume_from, job.cfg.checkpoint.trust)
    saved_batch = start.get("global_batch", global_batch)
    if saved_batch != global_batch:
        # Same examples consumed, counted in the new global batches (rounded down:
        # at most one global batch of the epoch is seen twice).
        start["window"] = start["window"] * saved_batch // global_batch
    log.info(
        "resumed from %s: step %d, epoch %d%s",
        resume_from,
        start["step"],
        start["epoch"],
        " (saved on another rank count or ZeRO stage: weights, LR schedule and data "
        "position restored, optimizer moments reset)"
        if reshard
        else "",
    )
    return start


def save(job: Job, engine: Engine, tracker: BestTracker) -> Path:
    """Checkpoint the run at its current step (every rank calls this together)."""
    cfg = job.cfg
    state = engine.state.record(job.shape.global_batch, tracker)
    return checkpoint.save(
        engine.ds, job.out, engine.state.step, state, cfg.checkpoint.keep_last, to_dict(cfg)
    )


def export_if_best(
    job: Job, engine: Engine, tracker: BestTracker, metrics: dict[str, Any], card: dict[str, Any]
) -> None:
    """Record a validation in ``tracker``; a new best (by eval.metric) is exported to
    ``<output_dir>/best`` when it appears, so a run that later overfits or dies still leaves
    it behind. ``card``: the run summary so far (the model card)."""
    cfg, step = job.cfg, engine.state.step
    if tracker.update(metrics, step) and cfg.eval.save_best and cfg.eval.every:
        best = {"metric": tracker.metric, "value": tracker.best, "step": step}
        card = {**card, "after": {"val": metrics}, "best": best, "steps": step}
        hf_export.export_hf(engine.ds, cfg, job.out / "best", card)
        log.info(
            "step %d | new best %s %.4f -> %s", step, tracker.metric, tracker.best, job.out / "best"
        )
