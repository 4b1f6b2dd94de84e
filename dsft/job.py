"""The job prelude that the commands which build an engine share (``dsft train``, ``dsft eval``):
ranks, the runtime checks, the resolved plan, the DeepSpeed JSON, the tokenizer and the data."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft import data, distributed, run_dir
from dsft.config import BatchShape, Config, DataConfig, batch_shape
from dsft.data.collate import ImageInputs
from dsft.ds_config import deepspeed_config
from dsft.eval.evaluator import Evaluator
from dsft.model import TowerTouch, load_tokenizer
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
    resume_from: Path | None = None  # training: the checkpoint to resume from (run_dir)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def tower_toucher(self, module: Any) -> TowerTouch | None:
        """ZeRO-3 with image rows: the dummy tower run (dsft.model.TowerTouch) that every
        forward of ``module`` without images needs, training's and ``dsft eval``'s alike (a
        rank whose shard has no image in a batch would otherwise skip the tower's gathers);
        None otherwise."""
        images = getattr(self.splits, "images", None)
        if images is None or self.cfg.deepspeed.zero_stage != 3:
            return None
        return TowerTouch(module, images.dummy(), distributed.device())

    def evaluator(self, engine: Any, monitor: Any, out: Path, router: Any = None) -> Evaluator:
        """The Evaluator of ``engine`` on this job's splits (predictions under ``out``);
        ``router``: a mixture of experts' router loss, validated too (dsft/moe.py)."""
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
            router=router,
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
    resume_from = None
    if training:
        # One run per output_dir (owner lock), no silent fresh start over an old run, the
        # resume point (newest intact checkpoint) and what the resume changes; config written.
        resume_from = run_dir.open_run(
            cfg,
            shape.global_batch,
            {
                "plan.json": json.dumps(plan.record(), indent=2, default=str),
                "ds_config.json": json.dumps(ds_config, indent=2),
            },
        )
        seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    # Each node's local rank 0 tokenises (into the cache); the others wait for it.
    splits = prepare(cfg.data, tokenizer, env.local_rank == 0)
    log.info("data: %s", splits.stats)
    # a multimodal model's processor: image rows get their pixels per batch
    splits.images = ImageInputs.of(tokenizer, cfg.data.max_image_pixels, cfg.train.precision)
    return Job(env, cfg, plan, shape, ds_config, tokenizer, splits, deepspeed, resume_from)
