"""The job prelude that the commands which build an engine share (``dsft train``, ``dsft eval``):
ranks, the runtime checks, the resolved plan, the DeepSpeed JSON, the tokenizer and the data."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft import data, distributed
from dsft.config import BatchShape, Config, DataConfig, batch_shape, save_config
from dsft.data.collate import ImageInputs
from dsft.ds_config import deepspeed_config
from dsft.eval.evaluator import Evaluator
from dsft.model import load_tokenizer
from dsft.planner import Decision
from dsft.runtime import check_runtime, resolve_plan, seed_everything

log = logging.getLogger("dsft")

# an objective's data preparation: (data config, tokenizer, this rank builds the cache) -> Splits
Prepare = Callable[[DataConfig, Any, bool], data.Splits]


@dataclass
class Job:
    """Everything a command knows before it builds a model."""

    env: distributed.DistEnv
    cfg: Config  # resolved: "auto" replaced by the plan (saved, checkpointed, read by all)
    plan: Decision
    shape: BatchShape  # the batch geometry of one optimizer step
    ds_config: dict[str, Any]  # the DeepSpeed JSON derived from cfg
    tokenizer: Any
    splits: data.Splits
    deepspeed: Any  # the deepspeed module (imported once the ranks exist)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def evaluator(self, engine: Any, monitor: Any, out: Path) -> Evaluator:
        """The Evaluator of ``engine`` on this job's splits (predictions under ``out``)."""
        cfg = self.cfg
        return Evaluator(
            engine,
            self.tokenizer,
            self.splits,
            cfg.eval,
            monitor,
            out,
            synced=cfg.deepspeed.zero_stage == 3 and self.env.world_size > 1,
            fused_loss=cfg.train.fused_loss,
            images=getattr(self.splits, "images", None),
        )


def open_job(cfg: Config, training: bool, prepare: Prepare = data.prepare) -> Job:
    """Set up the ranks, check this machine, resolve "auto" by the planner, derive the
    DeepSpeed JSON and prepare the data (by the objective's ``prepare``). ``training``: also
    catch the stop signals, write config.yaml / plan.json / ds_config.json to the output
    directory and seed the RNGs."""
    env = distributed.setup()
    if training:
        # From here a SIGTERM/SIGUSR1 (preemption) is a request to save and stop after
        # the next step: the loop checks it at every step boundary.
        distributed.catch_stop_signals()
    deepspeed = distributed.import_deepspeed()
    check_runtime(cfg)
    # "auto" ZeRO stage / micro-batch -> the memory planner's choice; from here on cfg is
    # the resolved config (saved, checkpointed, and what every later decision reads).
    cfg, plan = resolve_plan(cfg, env)
    shape = batch_shape(cfg.train, env.world_size)
    ds_config = deepspeed_config(cfg, shape, plan.hidden)
    if training:
        out = Path(cfg.output_dir)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            (out / "plan.json").write_text(json.dumps(plan.record(), indent=2, default=str))
            (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        distributed.barrier()
        seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    # Each node's local rank 0 tokenises (into the cache); the others wait for it.
    splits = prepare(cfg.data, tokenizer, env.local_rank == 0)
    log.info("data: %s", splits.stats)
    # a multimodal model's processor: image rows get their pixels per batch
    splits.images = ImageInputs.of(tokenizer, cfg.data.max_image_pixels, cfg.train.precision)
    return Job(env, cfg, plan, shape, ds_config, tokenizer, splits, deepspeed)
