"""``dsft eval``: validation and test metrics of a saved model, without training.

The model can be an exported Hugging Face directory (``<run>/final``, ``<run>/best``)
or a DeepSpeed checkpoint: a run directory, its ``checkpoints/`` folder (the
``latest`` tag is used) or one ``checkpoints/step_N`` tag, whose consolidated
weights load on any number of ranks. The same sharded, exact metrics as during
training are computed, on the same split of the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from dsft import distributed
from dsft.checkpoint import find, load_weights
from dsft.config import Config, LoraConfig, load_config
from dsft.job import open_job
from dsft.model import build_model, torch_dtype
from dsft.monitor import Monitor

log = logging.getLogger("dsft")


def locate(path: str | Path) -> tuple[str, Path, str | None]:
    """What ``path`` holds: ("hf", dir, None) or ("deepspeed", checkpoints_dir, tag)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return "hf", p, None
    tag_dir = find(path)  # a run, its checkpoints/ folder, or a step_N tag
    return "deepspeed", tag_dir.parent, tag_dir.name


def run_eval(cfg: Config, checkpoint: str, out_dir: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the validation and test splits of ``cfg.data``."""
    kind, where, tag = locate(checkpoint)
    # Evaluation runs whole sequences on every rank (train.sequence_parallel is for training).
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sequence_parallel=1))
    if kind == "hf":
        # An export is a plain model (a LoRA run exports the adapter merged).
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, path=str(where), lora=LoraConfig())
        )
    job = open_job(cfg, training=False)
    cfg, env = job.cfg, job.env
    model = build_model(cfg.model, torch_dtype(cfg.train.precision), job.ds_config)
    if kind == "deepspeed":
        # Consolidated weights load on any number of ranks and any ZeRO stage.
        load_weights(model, where / str(tag), cfg.deepspeed.zero_stage == 3)
    engine, *_ = job.deepspeed.initialize(model=model, config=job.ds_config)
    log.info(
        "evaluating %s (%s%s) on %d ranks",
        where,
        kind,
        f", tag {tag}" if tag else "",
        env.world_size,
    )

    out = Path(out_dir or Path(cfg.output_dir) / "eval")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # TensorBoard only: an evaluation is not a new W&B / MLflow run of its own.
    logging_cfg = dataclasses.replace(
        cfg.logging,
        progress=False,
        report_to=[r for r in cfg.logging.report_to if r == "tensorboard"],
    )
    monitor = Monitor(out, logging_cfg, 0)
    evaluator = job.evaluator(engine, monitor, out)
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "kind": kind,
        "world_size": env.world_size,
        "val": evaluator.validation(0, split="val"),
        "test": evaluator.validation(0, split="test"),
        "test_generation": evaluator.test(0),
    }
    monitor.close()
    if env.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        log.info("results: %s", out / "results.json")
    distributed.barrier()
    return results


def main(ns: argparse.Namespace) -> int:
    """``dsft eval CONFIG --checkpoint PATH``: here, or on N local ranks."""
    cfg = load_config(ns.config, ns.overrides)
    if ns.nproc > 1 and not distributed.in_launched_job():
        extra = ["--checkpoint", ns.checkpoint] + (["--out", ns.out] if ns.out else [])
        return distributed.launch_local(ns.nproc, ["eval", ns.config, *ns.overrides, *extra])
    run_eval(cfg, ns.checkpoint, ns.out)
    return 0
