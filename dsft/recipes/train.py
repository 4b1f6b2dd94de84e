"""The training recipe: one explicit loop, read top to bottom.

setup (ranks, config, data, model, resume point, DeepSpeed engine, restored state)
  -> [validate before training]
  -> for each optimizer step: fetch grad_accum micro-batches, count the response
     tokens of the whole global batch, forward / backward each micro-batch,
     DeepSpeed clips and steps at the boundary; skip bad steps, log, validate
     (early stopping, best export), checkpoint, stop on SIGTERM/SIGUSR1
  -> final validation, test generation, checkpoint, export, summary.json

Loss normalisation: the loss of an optimizer step is the sum of the token losses
of every response token in the global batch divided by the global number of such
tokens. Each micro-batch therefore contributes ``sum_nll * D / global_tokens``,
where D is what DeepSpeed divides the gradients summed over all ranks by (the
data-parallel size: dsft.sequence_parallel.gradient_divisor), and we tell it not to
divide by grad_accum again, so neither gradient accumulation nor the number of ranks
changes the step. With sequence parallelism (dsft/sequence_parallel.py) each rank's
``sum_nll`` covers its slice of the rows and the target count is taken once per row,
by the first rank of its group.

Host syncs: target counts come from the collated CPU batch; the micro-batch losses
add up on the device; the host waits for the device twice per optimizer step (the
global target count before the first forward, the global loss and stop flag after
the step), plus the logging steps' grad norm. With ``train.fused_loss`` (dsft/loss.py)
no full-vocabulary logits exist: the loss comes from the target positions' hidden
states through the LM head in chunks (on a sequence-parallel rank: its slice's).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsft import attention, checkpoint, crossval, data, distributed, export, fastpath, faults, loss
from dsft import sequence_parallel as seqpar
from dsft.config import Config, batch_shape, load_config, save_config, to_dict
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.sampler import Mixer, mixed_batches, steps_per_epoch, train_batches
from dsft.data.tokenize import IGNORE_INDEX
from dsft.ds_config import deepspeed_config
from dsft.errors import ConfigError, Preempted, TrainingDiverged
from dsft.eval import evaluator as evaluate
from dsft.flops import FlopCounter
from dsft.model import build_model, count_params, freeze, load_tokenizer, torch_dtype
from dsft.monitor import Monitor, StepProfiler
from dsft.optim import (
    describe_groups,
    guard_zero0_fp32_step,
    lr_lambda,
    make_optimizer,
    param_groups,
)
from dsft.runtime import check_runtime, hardware_name, resolve_plan, seed_everything

log = logging.getLogger("dsft")


def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune ``cfg.model.path`` on ``cfg.data``; returns the run summary (on every rank)."""
    # ---------------------------------------------------------------- setup
    env = distributed.setup()
    # From here a SIGTERM/SIGUSR1 (preemption) is a request to save and stop after
    # the next step: the loop checks it at every step boundary.
    distributed.catch_stop_signals()
    deepspeed = distributed.import_deepspeed()
    check_runtime(cfg)
    # "auto" ZeRO stage / micro-batch -> the memory planner's choice; from here on cfg is
    # the resolved config (saved, checkpointed, and what every later decision reads).
    cfg, decision = resolve_plan(cfg, env)
    out = Path(cfg.output_dir)
    shape = batch_shape(cfg.train, env.world_size)
    ds_config = deepspeed_config(cfg, shape, decision["hidden"])
    # train.sequence_parallel: the ranks of a group share each micro-batch (the sampler
    # deals by data-parallel rank), each computing its slice of the rows.
    sp_groups = distributed.sequence_parallel_groups(shape.sequence_parallel)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "plan.json").write_text(json.dumps(decision, indent=2, default=str))
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    distributed.barrier()
    seed_everything(cfg.train.seed)
    zero3 = cfg.deepspeed.zero_stage == 3

    tokenizer = load_tokenizer(cfg.model)
    # Each node's local rank 0 tokenises (into the cache); the others wait for it.
    splits = data.prepare(cfg.data, tokenizer, builder=env.local_rank == 0)
    log.info("data: %s", splits.stats)
    # The sampler deals out units: examples, or packed rows of examples (data.packing).
    units = splits.packs or [[i] for i in range(len(splits.train))]
    # data.mix: units drawn from the files in fixed proportions (else: each epoch a permutation)
    mixer = (
        Mixer(splits.unit_source, cfg.data.mix, cfg.train.seed, cfg.data.shuffle)
        if cfg.data.mix
        else None
    )

    model = build_model(cfg.model, torch_dtype(cfg.train.precision), ds_config)
    # Resume from the latest complete checkpoint (or the one asked for). One saved on
    # another number of ranks or ZeRO stage cannot be loaded by DeepSpeed: its weights
    # are consolidated and loaded here, before the engine exists; moments start afresh.
    resume_from = checkpoint.resume_point(out, cfg.checkpoint.resume, cfg.checkpoint.resume_from)
    if resume_from is not None:  # a lean checkpoint needs the base weights it was trained on
        checkpoint.check_base(resume_from, cfg.model.path, cfg.model.revision)
    reshard = resume_from is not None and checkpoint.needs_reshard(
        resume_from, env.world_size, cfg.deepspeed.zero_stage
    )
    frozen = freeze(model, cfg.model.freeze)
    if reshard:  # after freezing: frozen parameters keep model.path's values
        checkpoint.load_weights(model, resume_from, zero3)
    if cfg.model.tiled_mlp:
        tiles = seqpar.tiles_for(cfg.data.max_len, shape.sequence_parallel, decision["hidden"])
        log.info("tiled MLP: %d blocks, %d tiles per row", seqpar.tile_mlp(model, tiles), tiles)
    sp = seqpar.SequenceParallel(sp_groups, model)
    total_params, trainable_params = count_params(model)
    groups = param_groups(model, cfg.train)
    optimizer = make_optimizer(cfg, groups)

    per_epoch = steps_per_epoch(
        len(units), shape.micro_batch, shape.data_parallel, shape.grad_accum
    )
    if per_epoch == 0:
        raise ConfigError(
            [
                f"train: {len(units)} training {'rows' if splits.packs else 'examples'} do not "
                f"fill one global batch of {shape.global_batch}; lower train.micro_batch or "
                "train.grad_accum"
            ]
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio)
    )

    start = {"step": 0, "epoch": 0, "window": 0}
    if reshard:
        start = checkpoint.read_state(resume_from)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            for _ in range(start["step"]):
                scheduler.step()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=sp_groups.mpu,  # sequence parallelism: ZeRO over all ranks, averaging over dp
    )
    if cfg.model.compile:  # "regional": each decoder layer; true: the whole model (DeepSpeed's)
        log.info(
            "torch.compile: %d regions",
            fastpath.compile_model(engine, engine.module, cfg.model.compile),
        )
    log.info(
        "model: %s params, %s trainable | ranks %d (%s)%s | ZeRO-%d | %s | micro-batch %d x "
        "accum %d x data-parallel ranks %d = global batch %d | %d steps (%d per epoch)",
        f"{total_params:,}",
        f"{trainable_params:,}",
        env.world_size,
        env.source,
        f", sequence parallel {shape.sequence_parallel}" if sp.enabled else "",
        cfg.deepspeed.zero_stage,
        cfg.train.precision,
        shape.micro_batch,
        shape.grad_accum,
        shape.data_parallel,
        shape.global_batch,
        total_steps,
        per_epoch,
    )

    log.info(
        "optimizer groups (%d frozen parameter tensors):\n%s",
        len(frozen),
        describe_groups(optimizer.param_groups),
    )
    if resume_from is not None:
        if not reshard:
            start = checkpoint.load(engine, resume_from)
        saved_batch = start.get("global_batch", shape.global_batch)
        if saved_batch != shape.global_batch:
            # Same examples consumed, counted in the new global batches (rounded down:
            # at most one global batch of the epoch is seen twice).
            start["window"] = start["window"] * saved_batch // shape.global_batch
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
    monitor = Monitor(out, cfg.logging, total_steps, resume_step=start["step"], config=to_dict(cfg))
    dev = distributed.device()
    pad_id = tokenizer.pad_token_id
    evaluator = evaluate.Evaluator(
        engine,
        tokenizer,
        splits,
        cfg.eval,
        monitor,
        out,
        synced=zero3 and env.world_size > 1,
        fused_loss=cfg.train.fused_loss,
    )
    head = loss.output_head(engine.module) if cfg.train.fused_loss else None
    tracker = evaluate.BestTracker(cfg.eval.metric, cfg.eval.patience, cfg.eval.min_delta)
    if "best" in start:
        tracker.best, tracker.best_step, tracker.since_best = start["best"]
    model_cfg = getattr(engine.module, "config", None)
    flops = FlopCounter(
        total_params, trainable_params, model_cfg, monitor.peak_flops * env.world_size
    )
    summary: dict[str, Any] = {
        "world_size": env.world_size,
        "sequence_parallel": shape.sequence_parallel,
        "global_batch": shape.global_batch,
        "total_steps": total_steps,
        "data": splits.stats,
        "params": total_params,
        "trainable_params": trainable_params,
        "frozen_tensors": len(frozen),
        "hardware": hardware_name(env.world_size),
    }

    def keep_if_best(metrics: dict[str, Any], step: int) -> None:
        # The best model so far (by eval.metric) is exported when it appears, so a run
        # that later overfits or dies still leaves it behind.
        if tracker.update(metrics, step) and cfg.eval.save_best and cfg.eval.every:
            best = {"metric": tracker.metric, "value": tracker.best, "step": step}
            card = {**summary, "after": {"val": metrics}, "best": best, "steps": step}
            export.export_hf(engine, cfg, out / "best", card)
            log.info(
                "step %d | new best %s %.4f -> %s", step, tracker.metric, tracker.best, out / "best"
            )

    if cfg.eval.before_training and resume_from is None:
        summary["before"] = {"val": evaluator.validation(0), "test": evaluator.test(0)}

    def run_state() -> dict[str, Any]:
        # What a checkpoint needs beyond DeepSpeed's states to continue exactly.
        return {
            "step": step,
            "epoch": epoch,
            "window": next_window,
            "global_batch": shape.global_batch,
            "best": [tracker.best, tracker.best_step, tracker.since_best],
        }

    # ---------------------------------------------------------------- loop
    # data.mix: samples drawn per source so far (slots [0, upto) of the run), kept up to date
    # at each log line; a pure function of the step, so exact after a resume too.
    mix_seen: dict[str, Any] = {"upto": 0, "count": np.zeros(len(splits.sources), np.int64)}
    profiler = StepProfiler(out, cfg.logging.profile_steps)  # logging.profile_steps
    engine.train()
    step, epoch, next_window = start["step"], start["epoch"], start["window"]
    t_start = time.time()
    log_loss_sum = log_targets = 0.0  # global summed NLL / target count since the last log line
    eval_loss_sum = eval_targets = 0.0  # ... since the last validation (for the train/val gap)
    tokens_seen = 0  # this rank's real tokens since the last log line (and their squares)
    sq_tokens = 0
    step_seconds = 0.0
    bad_steps = bad_in_a_row = 0
    fault_steps = faults.steps("DSFT_FAULT_NAN_STEPS")
    zero0_fp32 = cfg.deepspeed.zero_stage == 0 and cfg.train.precision == "fp32"
    # DeepSpeed sums the ranks' gradients and divides by this (dp; see gradient_divisor)
    grad_divisor = seqpar.gradient_divisor(
        shape.data_parallel, shape.sequence_parallel, cfg.deepspeed.zero_stage
    )
    stopped_early = False
    saved_step = -1  # the step of the last periodic checkpoint
    deal = functools.partial(mixed_batches, mixer) if mixer is not None else train_batches
    segments = attention.wants_segments(cfg.model.attn_implementation)  # varlen: cu_seqlens
    while step < total_steps and not stopped_early:
        batches = deal(
            len(units),
            shape.micro_batch,
            shape.data_parallel,
            sp_groups.dp_rank,
            epoch,
            cfg.train.seed,
            cfg.data.shuffle,
            shape.grad_accum,
        )
        # a resumed epoch starts at the window after the checkpoint's step
        for first in range(next_window * shape.grad_accum, len(batches), shape.grad_accum):
            next_window = first // shape.grad_accum + 1
            t_step = time.time()
            window = [
                micro_batch(splits, units, b, pad_id, segments)
                for b in batches[first : first + shape.grad_accum]
            ]
            # Count the response tokens of the whole global batch before any backward,
            # so every micro-batch can be weighted by the same global denominator
            # (counted on the host, from the CPU tensors: no device sync). The ranks of a
            # sequence-parallel group hold the same rows: the first counts them.
            local_targets = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in window)
            local_targets *= sp.rank == 0
            global_targets = distributed.all_reduce_sum([local_targets])[0].item()
            own_norm = None
            step_nll = torch.zeros((), dtype=torch.float64, device=dev)  # summed on device
            skipped_before = engine.skipped_steps
            for i, micro in enumerate(window):
                lengths = micro.pop("lengths")  # real tokens per example (for throughput)
                # This rank's slice of the rows (all of them without sequence parallelism)
                # and its targets, shifted before the split (on the host: no device sync).
                micro, targets = sp.shard(micro, micro.pop("labels"))
                micro = {k: v.to(dev) for k, v in micro.items()}
                with sp.sharded():  # forward and backward (checkpointing recomputes in it)
                    # No KV cache in training; transformers would also ignore packed-row
                    # boundaries (restarting position_ids) when given one.
                    if head is not None:  # train.fused_loss: no full logits
                        index, ids = loss.target_index(targets, shifted=True)
                        nll, _ = loss.fused_nll(engine, head, micro, index.to(dev), ids.to(dev))
                    else:
                        logits = engine(**micro, use_cache=False).logits
                        nll = loss.logits_nll(logits, targets.to(dev), shifted=True)
                    if step + 1 in fault_steps and env.is_main:
                        nll = nll * float("nan")  # test hook: a step whose loss blows up
                    engine.backward(nll * grad_divisor / global_targets, scale_wrt_gas=False)
                if i == len(window) - 1 and zero0_fp32:
                    own_norm = guard_zero0_fp32_step(engine)
                engine.step()  # clips and steps only at the accumulation boundary
                step_nll += nll.detach().double()
                if sp.rank == 0:  # a group's rows are counted once
                    tokens_seen += int(lengths.sum())
                    sq_tokens += int((lengths**2).sum())
            step += 1
            profiler.step()

            # A step is bad when its global loss is not finite or DeepSpeed skipped it for
            # non-finite gradients (fp16 overflows are the loss scaler's business). Bad
            # steps update nothing; too many in a row end the run.
            # One all-reduce (and the step's one wait for the device) gives the global loss
            # and whether any rank was asked to stop.
            stop = float(distributed.stop_requested() is not None)
            nll_sum, stops = distributed.all_reduce_sum(
                torch.stack([step_nll, torch.tensor(stop, dtype=torch.float64, device=dev)])
            ).tolist()
            step_loss = nll_sum / global_targets
            skipped = engine.skipped_steps > skipped_before
            if not math.isfinite(step_loss) or (skipped and cfg.train.precision != "fp16"):
                bad_steps += 1
                bad_in_a_row += 1
                log.warning(
                    "step %d skipped: non-finite loss or gradient norm (%d in a row)",
                    step,
                    bad_in_a_row,
                )
                if cfg.train.max_bad_steps and bad_in_a_row >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"stopped at step {step}: {bad_in_a_row} steps in a row had a non-finite "
                        "loss or gradient norm (all skipped, weights untouched); lower train.lr, "
                        "check the data, or raise train.max_bad_steps"
                    )
            else:
                bad_in_a_row = 0
                log_loss_sum += step_loss * global_targets
                log_targets += global_targets
                eval_loss_sum += step_loss * global_targets
                eval_targets += global_targets
            step_seconds += time.time() - t_step

            if step % cfg.logging.every == 0 or step == total_steps:
                steps_logged = step % cfg.logging.every or cfg.logging.every
                tokens_total, sq_total = distributed.all_reduce_sum(
                    [tokens_seen, sq_tokens]
                ).tolist()
                # token-weighted mean over the good steps since the last log line
                train_loss = log_loss_sum / log_targets if log_targets else float("nan")
                norm = engine.get_global_grad_norm()
                if norm is None:  # ZeRO-0 fp32: DeepSpeed keeps no norm, ours was taken above
                    norm = own_norm if own_norm is not None else float("nan")
                scalars = {
                    "loss": train_loss,
                    "epoch": epoch,
                    **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups},
                    "grad_norm": float(norm),
                    "step_time": step_seconds / steps_logged,
                    # real (non-pad) tokens of all ranks per second of training steps
                    "tokens_per_s": tokens_total / max(step_seconds, 1e-9),
                    "skipped_steps": engine.skipped_steps,
                    "bad_steps": bad_steps,
                    **flops.scalars(tokens_total, sq_total, step_seconds),
                }
                if mixer is not None:
                    scalars.update(
                        mix_report(mixer, mix_seen, splits.sources, step * shape.global_batch)
                    )
                if cfg.train.precision == "fp16":
                    scalars["loss_scale"] = float(getattr(engine.optimizer, "cur_scale", "nan"))
                if torch.cuda.is_available():
                    scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                monitor.scalars(step, "train", scalars)
                monitor.progress(step, train_loss, optimizer.param_groups[0]["lr"], float(norm))
                log_loss_sum = log_targets = step_seconds = 0.0
                tokens_seen = sq_tokens = 0
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                train_loss = eval_loss_sum / eval_targets if eval_targets else None
                eval_loss_sum = eval_targets = 0.0
                keep_if_best(evaluator.validation(step, train_loss), step)
                if tracker.should_stop:
                    log.info(
                        "early stop at step %d: %s has not improved for %d evaluations "
                        "(best %.4f at step %d)",
                        step,
                        tracker.metric,
                        tracker.since_best,
                        tracker.best,
                        tracker.best_step,
                    )
                    stopped_early = True
                    break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
                path = checkpoint.save(
                    engine, out, step, run_state(), cfg.checkpoint.keep_last, to_dict(cfg)
                )
                saved_step = step
            faults.kill_if("DSFT_FAULT_KILL_AT_STEP", step, env.rank)  # test: a crash
            faults.hang_if("DSFT_FAULT_HANG_AT_STEP", step, env.rank)  # test: a stuck rank
            if stops:  # preemption: every rank saves at this same step, then all exit
                if saved_step != step:
                    path = checkpoint.save(
                        engine, out, step, run_state(), cfg.checkpoint.keep_last, to_dict(cfg)
                    )
                monitor.close()
                requeue_if_asked(cfg)
                # No rank exits before rank 0 has requeued: under `srun --kill-on-bad-exit`
                # the first rank to exit (75) takes the others down with it.
                distributed.barrier()
                raise Preempted(
                    f"stopped by a signal at step {step}; saved {path}. Run the "
                    "same command to resume."
                )
            if step >= total_steps:
                break
        else:
            epoch, next_window = epoch + 1, 0

    # ---------------------------------------------------------------- finish
    if mixer is not None:
        mix_report(mixer, mix_seen, splits.sources, step * shape.global_batch)
        total = max(int(mix_seen["count"].sum()), 1)
        summary["mix"] = {
            name: {"target": w / sum(cfg.data.mix), "drawn": int(c), "share": round(c / total, 4)}
            for name, w, c in zip(splits.sources, cfg.data.mix, mix_seen["count"], strict=True)
        }
    profiler.close()
    summary["train_seconds"] = round(time.time() - t_start, 2)
    summary["steps"] = step
    train_loss = eval_loss_sum / eval_targets if eval_targets else None
    summary["after"] = {"val": evaluator.validation(step, train_loss)}
    keep_if_best(summary["after"]["val"], step)
    summary["after"]["test"] = evaluator.test(step)
    summary["early_stopped"] = stopped_early
    if tracker.best is not None:
        summary["best"] = {
            "metric": tracker.metric,
            "value": tracker.best,
            "step": tracker.best_step,
        }
        if (out / "best").is_dir():
            summary["best"]["export"] = str(out / "best")
    monitor.hparams(to_dict(cfg), summary["after"])
    monitor.close()
    if cfg.checkpoint.save_final:
        summary["checkpoint"] = str(
            checkpoint.save(engine, out, step, run_state(), cfg.checkpoint.keep_last, to_dict(cfg))
        )
    if cfg.checkpoint.export:
        export.export_hf(engine, cfg, out / "final", summary)
        summary["export"] = str(out / "final")
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    distributed.barrier()
    return summary


def mix_report(
    mixer: Mixer, seen: dict[str, Any], sources: list[str], upto: int
) -> dict[str, float]:
    """data.mix: the samples (units) drawn from each source in the run's first ``upto``
    slots, as ``mix/<source>`` scalars (counted from where ``seen`` was left)."""
    seen["count"] += mixer.counts(seen["upto"], upto)
    seen["upto"] = upto
    return {f"mix/{name}": int(c) for name, c in zip(sources, seen["count"], strict=True)}


def micro_batch(
    splits: data.Splits,
    units: list[list[int]],
    batch: list[int],
    pad_id: int,
    segments: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of one micro-batch: padded examples, or packed rows (data.packing), with
    their segments' cu_seqlens for the varlen attention when ``segments``."""
    if splits.packs:
        rows = [[splits.train[i] for i in units[u]] for u in batch]
        return collate_packed(rows, pad_id, cu_seqlens=segments)
    return collate([splits.train[units[u][0]] for u in batch], pad_id)


def requeue_if_asked(cfg: Config) -> None:
    """Under Slurm with checkpoint.requeue, put the job back in the queue (rank 0).

    Only for SIGUSR1, the warning the slurm/ scripts ask for before the time limit.
    A SIGTERM means the job should end: ``scancel`` (requeueing would bring a
    cancelled job back), the time limit itself, or Slurm's own preemption (which
    requeues by itself when the partition says so).
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not (cfg.checkpoint.requeue and job and distributed.is_main()):
        return
    if not distributed.come_back_requested():
        log.info("not requeueing Slurm job %s: stopped by SIGTERM (scancel or the limit)", job)
        return
    try:  # argv list: the job id comes from the environment, never a shell string
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        log.info("requeued Slurm job %s", job)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not requeue Slurm job %s: %s", job, e)


def main(ns: argparse.Namespace) -> int:
    """``dsft train`` (``dsft launch``): validate, then train here, on N local ranks, or every
    fold of data.kfold."""
    if getattr(ns, "resume", None):
        ns.overrides.append(f"checkpoint.resume_from={ns.resume}")
    if getattr(ns, "no_resume", False):
        ns.overrides.append("checkpoint.resume=false")
    cfg = load_config(ns.config, ns.overrides)  # validate before spawning anything
    nproc = ns.nproc
    if ns.command == "launch" and not distributed.in_launched_job():
        import torch

        nproc = nproc or torch.cuda.device_count() or 1
    nproc = nproc or 1
    if cfg.data.kfold > 1 and cfg.data.fold < 0:
        return _cross_validate(ns, cfg, nproc)
    if nproc > 1 and not distributed.in_launched_job():
        return distributed.launch_local(nproc, ["train", ns.config, *ns.overrides])
    run(cfg)
    return 0


def _cross_validate(ns: argparse.Namespace, cfg: Config, nproc: int) -> int:
    """Every fold of data.kfold as its own run, then the per-fold and mean ± std table."""

    def run_fold(f: int) -> int:
        overrides = [*ns.overrides, *crossval.fold_overrides(cfg, f)]
        if nproc > 1 and not distributed.in_launched_job():
            return distributed.launch_local(nproc, ["train", ns.config, *overrides])
        run(load_config(ns.config, overrides))  # inside a launched job every rank runs them
        return 0

    rc = crossval.run_folds(cfg, run_fold)
    if rc == 0 and int(os.environ.get("RANK", "0")) == 0:
        _, table = crossval.summarize(Path(cfg.output_dir), cfg.data.kfold)
        print(f"{cfg.data.kfold}-fold cross-validation ({cfg.output_dir}/cv.md):\n{table}")
    return rc
