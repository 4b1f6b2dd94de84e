"""The training recipe: one explicit loop, read top to bottom.

setup (ranks, config, data, model, DeepSpeed engine)
  -> [validate before training]
  -> for each optimizer step: fetch grad_accum micro-batches, count the response
     tokens of the whole global batch, forward / backward each micro-batch,
     DeepSpeed clips and steps at the boundary, log, validate, checkpoint
  -> final validation, test generation, checkpoint, export, summary.json

Loss normalisation: the loss of an optimizer step is the sum of the token losses
of every response token in the global batch divided by the global number of such
tokens. Each micro-batch therefore contributes ``sum_nll * world / global_tokens``
(DeepSpeed averages gradients over the ``world`` data-parallel ranks and we tell
it not to divide by grad_accum again), so neither gradient accumulation nor the
number of ranks changes the step.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsft import checkpoint, data, distributed, evaluate
from dsft.config import Config, ConfigError, batch_plan, save_config
from dsft.data.collate import collate
from dsft.data.sampler import train_batches
from dsft.data.tokenize import IGNORE_INDEX
from dsft.model import (
    apply_lora,
    count_params,
    load_model,
    load_tokenizer,
    lr_lambda,
    param_groups,
    torch_dtype,
)
from dsft.monitor import Monitor
from dsft.plan import deepspeed_config

log = logging.getLogger("dsft")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_runtime(cfg: Config) -> None:
    """Refuse what cannot work on this machine before anything expensive starts."""
    if not torch.cuda.is_available():
        if cfg.train.precision == "fp16":
            raise ConfigError(
                [
                    "train.precision=fp16 needs a CUDA GPU (DeepSpeed has no fp16 "
                    "on CPU); use train.precision=bf16 or fp32"
                ]
            )
        if cfg.train.precision == "bf16":
            log.warning("train.precision=bf16 on CPU is correct but much slower than fp32 here")


def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune ``cfg.model.path`` on ``cfg.data``; returns the run summary (on every rank)."""
    # ---------------------------------------------------------------- setup
    env = distributed.setup()
    deepspeed = distributed.import_deepspeed()
    check_runtime(cfg)
    out = Path(cfg.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    distributed.barrier()
    seed_everything(cfg.train.seed)

    plan = batch_plan(cfg.train, env.world_size)
    ds_config = deepspeed_config(cfg, plan)
    if env.is_main:
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    zero3 = cfg.deepspeed.zero_stage == 3

    tokenizer = load_tokenizer(cfg.model)
    splits = data.prepare(cfg.data, tokenizer)
    log.info("data: %s", splits.stats)

    # Under ZeRO-3 transformers must see the DeepSpeed config while it builds the
    # model, so weights are partitioned as they load (never whole on one rank).
    keepalive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    model = load_model(cfg.model, torch_dtype(cfg.train.precision))
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    total_params, trainable_params = count_params(model)
    groups = param_groups(model, cfg.train)
    optimizer = _make_optimizer(cfg, groups)

    batches_per_epoch = len(
        train_batches(
            len(splits.train),
            plan.micro_batch,
            env.world_size,
            env.rank,
            0,
            cfg.train.seed,
            multiple=plan.grad_accum,
        )
    )
    steps_per_epoch = batches_per_epoch // plan.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(
            [
                f"train: {len(splits.train)} training examples do not fill one "
                f"global batch of {plan.global_batch}; lower train.micro_batch or "
                "train.grad_accum"
            ]
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio)
    )

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    del keepalive
    log.info(
        "model: %s params, %s trainable | ranks %d (%s) | ZeRO-%d | %s | micro-batch %d x "
        "accum %d x ranks %d = global batch %d | %d steps (%d per epoch)",
        f"{total_params:,}",
        f"{trainable_params:,}",
        env.world_size,
        env.source,
        cfg.deepspeed.zero_stage,
        cfg.train.precision,
        plan.micro_batch,
        plan.grad_accum,
        env.world_size,
        plan.global_batch,
        total_steps,
        steps_per_epoch,
    )

    monitor = Monitor(out, cfg.logging, total_steps)
    dev = distributed.device()
    pad_id = tokenizer.pad_token_id
    summary: dict[str, Any] = {
        "world_size": env.world_size,
        "global_batch": plan.global_batch,
        "total_steps": total_steps,
        "data": splits.stats,
        "params": total_params,
        "trainable_params": trainable_params,
    }

    def run_validation(step: int) -> dict[str, float]:
        engine.eval()
        metrics = evaluate.validate(engine, splits.val, cfg.eval.micro_batch, pad_id)
        engine.train()
        if metrics:
            monitor.scalars(step, "val", metrics)
            log.info(
                "step %d | val loss %.4f | ppl %.3f | token acc %.4f",
                step,
                metrics["loss"],
                metrics["ppl"],
                metrics["token_acc"],
            )
        return metrics

    def run_generation(step: int) -> dict[str, Any]:
        if not cfg.eval.generate:
            return {}
        engine.eval()
        n = cfg.eval.max_generate or len(splits.test_raw)
        t0 = time.time()
        metrics = evaluate.generate_metrics(
            engine.module,
            tokenizer,
            splits.test_raw[:n],
            cfg.eval.micro_batch,
            cfg.eval.max_new_tokens,
            synced=zero3 and env.world_size > 1,
        )
        engine.train()
        if metrics:
            metrics["seconds"] = round(time.time() - t0, 2)
            monitor.scalars(step, "test", {"exact_match": metrics["exact_match"]})
            monitor.text(
                step,
                "test/samples",
                "\n\n".join(
                    f"**ref** {s['reference']}  \n**pred** {s['prediction']}"
                    for s in metrics["samples"]
                ),
            )
            log.info(
                "step %d | test exact match %.4f on %d examples (%.1fs)",
                step,
                metrics["exact_match"],
                metrics["examples"],
                metrics["seconds"],
            )
        return metrics

    if cfg.eval.before_training:
        summary["before"] = {"val": run_validation(0), "test": run_generation(0)}

    # ---------------------------------------------------------------- loop
    engine.train()
    step, epoch = 0, 0
    t_start = time.time()
    tokens_seen = 0
    log_nll = log_targets = 0.0  # this rank's summed NLL / global target count since last log
    while step < total_steps:
        batches = train_batches(
            len(splits.train),
            plan.micro_batch,
            env.world_size,
            env.rank,
            epoch,
            cfg.train.seed,
            cfg.data.shuffle,
            plan.grad_accum,
        )
        for first in range(0, len(batches), plan.grad_accum):
            window = [
                collate([splits.train[i] for i in b], pad_id)
                for b in batches[first : first + plan.grad_accum]
            ]
            # Count the response tokens of the whole global batch before any backward,
            # so every micro-batch can be weighted by the same global denominator.
            local_targets = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in window)
            global_targets = distributed.all_reduce_sum([local_targets])[0].item()
            own_norm = None
            for i, micro in enumerate(window):
                micro = {k: v.to(dev) for k, v in micro.items()}
                logits = engine(
                    input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]
                ).logits
                nll, _, _ = evaluate.token_stats(logits, micro["labels"])
                engine.backward(nll * env.world_size / global_targets, scale_wrt_gas=False)
                if i == len(window) - 1 and cfg.deepspeed.zero_stage == 0:
                    # DeepSpeed's ZeRO-0 fp32 path clips without keeping the norm; the
                    # gradients are already averaged over ranks here, before the clip.
                    own_norm = grad_norm(engine.module)
                engine.step()  # clips and steps only at the accumulation boundary
                log_nll += nll.item()
                tokens_seen += int(micro["attention_mask"].sum())
            step += 1
            log_targets += global_targets

            if step % cfg.logging.every == 0 or step == total_steps:
                nll_sum, tokens_total = distributed.all_reduce_sum([log_nll, tokens_seen]).tolist()
                # token-weighted mean over every step since the last log line
                train_loss = nll_sum / log_targets
                log_nll = log_targets = 0.0
                lrs = {
                    f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)
                }
                norm = engine.get_global_grad_norm()
                if norm is None:  # ZeRO-0: DeepSpeed keeps no norm, ours was taken above
                    norm = own_norm if own_norm is not None else float("nan")
                norm = float(norm)
                monitor.scalars(
                    step,
                    "train",
                    {
                        "loss": train_loss,
                        "epoch": epoch,
                        **lrs,
                        "grad_norm": norm,
                        # real (non-pad) tokens of all ranks since the loop started
                        "tokens_per_s": tokens_total / max(time.time() - t_start, 1e-9),
                    },
                )
                monitor.progress(step, train_loss, optimizer.param_groups[0]["lr"], norm)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                run_validation(step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
                checkpoint.save(engine, out, step, {"step": step, "epoch": epoch})
            if step >= total_steps:
                break
        epoch += 1

    # ---------------------------------------------------------------- finish
    summary["train_seconds"] = round(time.time() - t_start, 2)
    summary["after"] = {"val": run_validation(step), "test": run_generation(step)}
    monitor.close()
    if cfg.checkpoint.save_final:
        summary["checkpoint"] = str(
            checkpoint.save(engine, out, step, {"step": step, "epoch": epoch})
        )
    if cfg.checkpoint.export:
        checkpoint.export_hf(engine, cfg, tokenizer, out / "final")
        summary["export"] = str(out / "final")
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    distributed.barrier()
    return summary


def grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients held by ``module`` (unsharded, i.e. ZeRO-0)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _make_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = {"lr": t.lr, "betas": tuple(t.betas), "eps": t.eps}
    if cfg.deepspeed.offload_optimizer:
        # Offloaded optimizer states are updated on the CPU by DeepSpeed's vectorised
        # CPU Adam (DeepSpeed refuses other optimizers with offload; JIT-built once).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)
