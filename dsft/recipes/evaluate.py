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
import tempfile
from pathlib import Path
from typing import Any

from dsft import distributed
from dsft.checkpoint import find, load_weights
from dsft.config import Config, LoraConfig, load_config
from dsft.errors import ConfigError
from dsft.eval import harness
from dsft.job import open_job
from dsft.model import build_model, locate_trained, torch_dtype
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
        load_weights(model, where / str(tag), cfg.deepspeed.zero_stage == 3, cfg.checkpoint.trust)
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
    evaluator.toucher = job.tower_toucher(engine.module)  # ZeRO-3 image rows
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


def run_benchmarks(ns: argparse.Namespace) -> dict[str, Any] | None:
    """``dsft eval MODEL --tasks ...``: lm-eval tasks on an export, a run's best/final
    export, a LoRA adapter (on its base) or a Hub name; sharded over the ranks."""
    opts = harness.HarnessOptions(
        tasks=[t.strip() for t in ns.tasks.split(",") if t.strip()],
        limit=ns.limit,
        num_fewshot=ns.num_fewshot,
        batch_size=ns.batch_size,
        apply_chat_template=ns.apply_chat_template,
        include_path=ns.include_path,
        backend=ns.backend,
        max_new_tokens=ns.max_new_tokens,
    )
    harness.choose_backend(opts.backend)
    model_dir, adapter, tok_dir = locate_trained(ns.config, ns.base)
    out = Path(ns.out or (Path(ns.config) / "benchmarks" if Path(ns.config).is_dir() else "."))
    with tempfile.TemporaryDirectory(prefix="dsft-lmeval-") as work:
        # every task named before any rank joins the job or a model loads
        manager = harness.prepare_tasks(opts, Path(work))
        distributed.setup()
        results = harness.evaluate_dir(
            model_dir, opts, manager, adapter, tok_dir, trust_remote_code=ns.trust_remote_code
        )
    if results is not None:  # rank 0
        out.mkdir(parents=True, exist_ok=True)
        path = out / "lm_eval_results.json"
        path.write_text(json.dumps(results, indent=2, default=str))
        print(harness.table(harness.score_rows(harness.scores(results))))
        print(f"lm-eval results: {path}")
    distributed.barrier()
    return results


def main(ns: argparse.Namespace) -> int:
    """``dsft eval CONFIG --checkpoint PATH`` or ``dsft eval MODEL --tasks T``: here, or on N
    local ranks."""
    if ns.tasks:
        if ns.nproc > 1 and not distributed.in_launched_job():
            return distributed.launch_local(ns.nproc, _forwarded(ns))
        run_benchmarks(ns)
        return 0
    if not ns.checkpoint:
        raise ConfigError(
            [
                "dsft eval CONFIG needs --checkpoint (the model to evaluate on the run's "
                "splits); or run benchmarks: dsft eval MODEL --tasks mmlu,gsm8k"
            ]
        )
    if getattr(ns, "trust_checkpoint", False):
        ns.overrides.append("checkpoint.trust=true")
    cfg = load_config(ns.config, ns.overrides)
    if ns.nproc > 1 and not distributed.in_launched_job():
        extra = ["--checkpoint", ns.checkpoint] + (["--out", ns.out] if ns.out else [])
        return distributed.launch_local(ns.nproc, ["eval", ns.config, *ns.overrides, *extra])
    run_eval(cfg, ns.checkpoint, ns.out)
    return 0


def _forwarded(ns: argparse.Namespace) -> list[str]:
    """The ``dsft eval ... --tasks`` argv again, for the launched ranks."""
    argv = ["eval", ns.config, "--tasks", ns.tasks, "--batch-size", str(ns.batch_size)]
    for flag, value in (
        ("--limit", ns.limit),
        ("--num-fewshot", ns.num_fewshot),
        ("--include-path", ns.include_path),
        ("--max-new-tokens", ns.max_new_tokens),
        ("--base", ns.base),
        ("--out", ns.out),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--backend", ns.backend]
    if ns.apply_chat_template is not None:
        argv.append(
            "--apply-chat-template" if ns.apply_chat_template else "--no-apply-chat-template"
        )
    if ns.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv
