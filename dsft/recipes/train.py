"""The training recipe: one explicit loop, read top to bottom.

setup (dsft.job: ranks, config, plan, data; dsft.engine: model, resume point, DeepSpeed
engine, restored state)
  -> [validate before training]
  -> for each optimizer step: fetch the window of grad_accum micro-batches, run the
     objective's step on it (dsft.step: SFT today), count it (dsft.meter: skips bad steps),
     log, validate (early stopping, best export), checkpoint, stop on SIGTERM/SIGUSR1
  -> final validation, test generation, checkpoint, export, summary.json

The loss normalisation and the host syncs of a step are described in dsft.step.sft_step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from dsft import crossval, distributed, faults, hf_export
from dsft.config import Config, load_config, to_dict
from dsft.data.sampler import Dealer, Mixer
from dsft.engine import build_engine, export_if_best, save
from dsft.errors import Preempted
from dsft.eval import harness
from dsft.flops import FlopCounter
from dsft.job import open_job
from dsft.meter import StepMeter
from dsft.monitor import Monitor, StepProfiler
from dsft.objectives import objective_for
from dsft.runtime import hardware_name
from dsft.step import Window, WindowLoader, with_segments

log = logging.getLogger("dsft")


def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune ``cfg.model.path`` on ``cfg.data``; returns the run summary (on every rank)."""
    objective = objective_for(cfg)  # what the loop trains for: SFT or DPO (dsft.objectives)
    job = open_job(cfg, training=True, prepare=objective.prepare)
    cfg, env, shape, splits, out = job.cfg, job.env, job.shape, job.splits, job.out
    objective = with_segments(objective, cfg.model.attn_implementation)  # varlen: cu_seqlens
    # The sampler deals out units: examples, or packed rows of examples (data.packing).
    units = splits.packs or [[i] for i in range(len(splits.train))]
    engine = build_engine(job, len(units))
    if objective.start is not None:  # preference: reference log-probs, with the initial weights
        objective = objective.start(job, engine)
    state, total_steps = engine.state, engine.total_steps
    dealer = Dealer(
        units=len(units),
        micro_batch=shape.micro_batch,
        data_parallel=shape.data_parallel,
        rank=engine.dp_rank,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        grad_accum=shape.grad_accum,
        # data.mix: units drawn from the files in fixed proportions
        mixer=Mixer(splits.unit_source, cfg.data.mix, cfg.train.seed, cfg.data.shuffle)
        if cfg.data.mix
        else None,
        sources=splits.sources,
    )
    monitor = Monitor(out, cfg.logging, total_steps, resume_step=state.step, config=to_dict(cfg))
    evaluator = job.evaluator(engine.ds, monitor, out, router=engine.router)  # MoE: + aux loss
    evaluator.extra = objective.validation  # the objective's own validation metrics
    evaluator.toucher = engine.toucher  # ZeRO-3 image rows: validation runs the tower alike
    tracker = engine.tracker(cfg)
    model_cfg = getattr(engine.ds.module, "config", None)
    peak = monitor.peak_flops * env.world_size
    meter = StepMeter(
        # MoE: the parameters a token uses; a multimodal model's tower: per image patch
        FlopCounter(*engine.active, model_cfg, peak, engine.tower),
        cfg.train.precision,
        cfg.train.max_bad_steps,
    )
    summary: dict[str, Any] = {
        "world_size": env.world_size,
        "sequence_parallel": shape.sequence_parallel,
        "global_batch": shape.global_batch,
        "total_steps": total_steps,
        "data": splits.stats,
        "params": engine.params,
        "trainable_params": engine.trainable_params,
        **({"active_params": engine.active[0]} if engine.idle_params else {}),
        "frozen_tensors": engine.frozen_tensors,
        "hardware": hardware_name(env.world_size),
    }
    if cfg.eval.before_training and engine.resumed_from is None:
        summary["before"] = {"val": evaluator.validation(0), "test": evaluator.test(0)}

    # ---------------------------------------------------------------- loop
    profiler = StepProfiler(out, cfg.logging.profile_steps)  # logging.profile_steps
    fault_steps = faults.steps("DSFT_FAULT_NAN_STEPS")
    pad_id, accum = job.tokenizer.pad_token_id, shape.grad_accum
    # image rows: pixels are decoded one window ahead, in a loader thread
    loader = WindowLoader(
        lambda b: objective.batch(splits, units, b, pad_id),
        getattr(splits, "images", None) is not None,
    )
    engine.ds.train()
    t_start = time.time()
    stopped_early = False
    saved_step = -1  # the step of the last periodic checkpoint
    while state.step < total_steps and not stopped_early:
        batches = dealer.epoch(state.epoch)
        # a resumed epoch starts at the window after the checkpoint's step
        for first in range(state.window * accum, len(batches), accum):
            state.window = first // accum + 1
            t_step = time.time()
            window = Window(
                loader.window(
                    batches[first : first + accum], batches[first + accum : first + 2 * accum]
                ),
                nan_fault=state.step + 1 in fault_steps and env.is_main,
            )
            result = objective.step(engine, window)
            state.step += 1
            profiler.step()
            meter.add(state.step, result, time.time() - t_step)
            step = state.step

            if step % cfg.logging.every == 0 or step == total_steps:
                scalars = meter.scalars(step % cfg.logging.every or cfg.logging.every, engine)
                scalars.update(dealer.mix_scalars(step * shape.global_batch))
                monitor.scalars(step, "train", scalars)
                lr = engine.optimizer.param_groups[0]["lr"]
                monitor.progress(step, scalars["loss"], lr, scalars["grad_norm"])
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                metrics = evaluator.validation(step, meter.val_train_loss())
                export_if_best(job, engine, tracker, metrics, summary)
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
                path = save(job, engine, tracker)
                saved_step = step
            faults.kill_if("DSFT_FAULT_KILL_AT_STEP", step, env.rank)  # test: a crash
            faults.hang_if("DSFT_FAULT_HANG_AT_STEP", step, env.rank)  # test: a stuck rank
            if result.stop:  # preemption: every rank saves at this same step, then all exit
                if saved_step != step:
                    path = save(job, engine, tracker)
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
            state.epoch, state.window = state.epoch + 1, 0

    # ---------------------------------------------------------------- finish
    step = state.step
    loader.close()
    if dealer.mixer is not None:
        summary["mix"] = dealer.mix_summary(step * shape.global_batch, cfg.data.mix)
    profiler.close()
    summary["train_seconds"] = round(time.time() - t_start, 2)
    summary["steps"] = step
    summary["after"] = {"val": evaluator.validation(step, meter.val_train_loss())}
    export_if_best(job, engine, tracker, summary["after"]["val"], summary)
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
        summary["checkpoint"] = str(save(job, engine, tracker))
    if cfg.checkpoint.export:
        hf_export.export_hf(engine.ds, cfg, out / "final", summary)
        summary["export"] = str(out / "final")
    if cfg.eval.benchmarks.tasks:  # lm-eval tasks: the base model vs the best/final export
        summary["benchmarks"] = harness.benchmark_run(cfg, out, summary)
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    distributed.barrier()
    return summary


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
    for flag, override in (
        ("no_resume", "checkpoint.resume=false"),
        ("overwrite", "checkpoint.overwrite=true"),
        ("allow_changes", "checkpoint.allow_changes=true"),
        ("trust_checkpoint", "checkpoint.trust=true"),
    ):
        if getattr(ns, flag, False):
            ns.overrides.append(override)
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
