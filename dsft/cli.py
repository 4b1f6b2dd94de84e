"""``dsft`` command line: train (incl. k-fold), launch, plan, eval, export, demo, data
inspect, sweep, report, bench, ds-config.

User mistakes (bad config, bad data rows) end with a clear message and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dsft.config import load_config
from dsft.errors import USER_ERRORS, ConfigError


def _launch(nproc: int, args: list[str]) -> int:
    """Re-run ``dsft <args>`` as ``nproc`` local ranks under torchrun (argv list, no shell)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dsft",
        *args,
    ]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _in_launched_job() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cmd_train(ns: argparse.Namespace) -> int:
    if ns.resume:
        ns.overrides.append(f"checkpoint.resume_from={ns.resume}")
    if ns.no_resume:
        ns.overrides.append("checkpoint.resume=false")
    cfg = load_config(ns.config, ns.overrides)  # validate before spawning anything
    if cfg.data.kfold > 1 and cfg.data.fold < 0:
        return _cross_validate(ns, cfg)
    if ns.nproc > 1 and not _in_launched_job():
        return _launch(ns.nproc, ["train", ns.config, *ns.overrides])
    from dsft.train import run

    run(cfg)
    return 0


def _cross_validate(ns: argparse.Namespace, cfg: Any) -> int:
    """Every fold of data.kfold as its own run, then the per-fold and mean ± std table."""
    from dsft import cv

    def run_fold(f: int) -> int:
        overrides = [*ns.overrides, *cv.fold_overrides(cfg, f)]
        if ns.nproc > 1 and not _in_launched_job():
            return _launch(ns.nproc, ["train", ns.config, *overrides])
        from dsft.train import run  # inside a launched job every rank runs the folds

        run(load_config(ns.config, overrides))
        return 0

    rc = cv.run_folds(cfg, run_fold)
    if rc == 0 and int(os.environ.get("RANK", "0")) == 0:
        _, table = cv.summarize(Path(cfg.output_dir), cfg.data.kfold)
        print(f"{cfg.data.kfold}-fold cross-validation ({cfg.output_dir}/cv.md):\n{table}")
    return rc


def cmd_sweep(ns: argparse.Namespace) -> int:
    from dsft import sweep

    if ns.slurm:
        return sweep.submit_slurm(ns.config, ns.sweep, ns.slurm_script, ns.sbatch_args)
    return sweep.run_sweep(ns.config, ns.sweep, ns.trial)


def cmd_report(ns: argparse.Namespace) -> int:
    from dsft.report import write_report

    runs = [Path(r) for r in ns.runs]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"dsft: error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(ns.out) if ns.out else runs[0] / "report"
    print(f"report: {write_report(runs, out)}")
    return 0


def cmd_data_inspect(ns: argparse.Namespace) -> int:
    from dsft.data.inspect import report
    from dsft.model import load_tokenizer

    cfg = load_config(ns.config, ns.overrides)
    tokenizer = load_tokenizer(cfg.model)
    color = sys.stdout.isatty() and not ns.no_color
    print(report(cfg, tokenizer, ns.examples, ns.split, color))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    cfg = load_config(ns.config, ns.overrides)
    if ns.nproc > 1 and not _in_launched_job():
        extra = ["--checkpoint", ns.checkpoint] + (["--out", ns.out] if ns.out else [])
        return _launch(ns.nproc, ["eval", ns.config, *ns.overrides, *extra])
    from dsft.eval_checkpoint import run_eval

    run_eval(cfg, ns.checkpoint, ns.out)
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from dsft.export import export_checkpoint

    export_checkpoint(ns.checkpoint, Path(ns.out), merged=not ns.adapter_only)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from dsft import demo

    workdir = Path(ns.workdir or tempfile.mkdtemp(prefix="dsft-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo.build_model_dir(workdir / "model")
    cfg_path = workdir / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo.demo_config(workdir, ns.nproc), sort_keys=False))
    cfg = load_config(cfg_path, ns.overrides)
    print(f"demo work dir: {workdir} (config: {cfg_path})", flush=True)
    if ns.nproc > 1:
        rc = _launch(ns.nproc, ["train", str(cfg_path), *ns.overrides])
        if rc:
            return rc
        summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    else:
        from dsft.train import run

        summary = run(cfg)
    print(demo.format_report(summary), flush=True)
    return 0


def cmd_launch(ns: argparse.Namespace) -> int:
    """``dsft train`` on N local ranks under torchrun (default: one per visible GPU)."""
    load_config(ns.config, ns.overrides)  # validate before spawning anything
    if _in_launched_job():  # already a rank of a job: just train
        args = {**vars(ns), "nproc": 1, "resume": None, "no_resume": False}
        return cmd_train(argparse.Namespace(**args))
    import torch

    nproc = ns.nproc or torch.cuda.device_count() or 1
    return _launch(nproc, ["train", ns.config, *ns.overrides])


def cmd_ds_config(ns: argparse.Namespace) -> int:
    from dsft import planner
    from dsft.config import batch_plan
    from dsft.plan import deepspeed_config

    cfg = load_config(ns.config, ns.overrides)
    hw = planner.job_hardware(ns.world_size, ns.world_size, planner.free_gpu_memory())
    cfg, decision = planner.resolve(cfg, hw)  # "auto" as `dsft train` would resolve it here
    hidden = decision.get("model", {}).get("hidden") or planner.hidden_size(
        cfg.model.path, cfg.model.trust_remote_code
    )
    print(json.dumps(deepspeed_config(cfg, batch_plan(cfg.train, ns.world_size), hidden), indent=2))
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    """Print every DeepSpeed option's memory for a model on some hardware, and the choice."""
    from dsft import planner
    from dsft.config import Config
    from dsft.monitor import peak_flops

    if sum(bool(x) for x in (ns.source, ns.shape, ns.family)) != 1:
        raise ConfigError(["dsft plan: give one of MODEL_DIR_OR_CONFIG, --shape NAME, --family"])
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
    work = planner.Workload(
        seq=ns.seq or cfg.data.max_len,
        global_batch=global_batch,
        micro_batch=micro,
        precision=ns.precision or t.precision,
        checkpointing=ns.grad_ckpt or cfg.model.gradient_checkpointing,
        attention=cfg.model.attn_implementation,
        headroom=ns.headroom,
    )
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
        print(planner.render_family(plans, tokens, peak, ns.mfu, epochs, ns.budget_hours))
        return 0
    facts = planner.model_facts(source, lora, cfg.model.freeze, cfg.model.trust_remote_code)
    plan = planner.choose(facts, hw, work)
    print(planner.render_plan(plan, tokens, peak, ns.mfu))
    ds = cfg.deepspeed
    if from_yaml and ds.zero_stage != "auto":
        own = planner.Option(int(ds.zero_stage), ds.offload_optimizer, ds.offload_params)
        e = planner.estimate(facts, hw, work, own)
        verdict = "fits" if e.fits else "does NOT fit"
        print(f"the config asks for {own}: {verdict} ({e.peak / 2**30:.1f} GB per GPU)")
    return 0 if plan.choice else 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsft",
        description="Distributed supervised fine-tuning of Hugging Face causal LMs on DeepSpeed.",
    )
    # The deepspeed launcher appends --local_rank=N; the rank comes from the env anyway.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model (ranks from torchrun/deepspeed/Slurm/MPI)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    t.add_argument("--nproc", type=int, default=1, help="spawn N local ranks via torchrun")
    t.add_argument("--resume", metavar="PATH", help="resume from this checkpoint or run dir")
    t.add_argument(
        "--no-resume", action="store_true", help="start afresh even if output_dir has checkpoints"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics of a saved model on the val/test split, no training")
    e.add_argument("config", help="the run's YAML config (data, split, eval settings)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_generate=0")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="exported model dir, run dir, checkpoints/ dir or checkpoints/step_N",
    )
    e.add_argument(
        "--out", help="where results.json and predictions go (default: <output_dir>/eval)"
    )
    e.add_argument("--nproc", type=int, default=1, help="spawn N local ranks via torchrun")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="a checkpoint (any ZeRO stage) to a Hugging Face directory")
    x.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or checkpoints/step_N")
    x.add_argument("out", help="output directory (safetensors, config, tokenizer)")
    x.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA runs: write only the adapter, not the merged model",
    )
    x.set_defaults(func=cmd_export, overrides=[])

    d = sub.add_parser("demo", help="fine-tune a tiny model on the bundled tasks, no download")
    d.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    d.add_argument("--nproc", type=int, default=1, help="number of local ranks")
    d.add_argument("--workdir", help="where the model, config and run go (default: a temp dir)")
    d.set_defaults(func=cmd_demo)

    dp = sub.add_parser("data", help="look at the prepared data").add_subparsers(
        dest="data_command", required=True
    )
    di = dp.add_parser(
        "inspect", help="rendered examples with trained tokens marked, and data statistics"
    )
    di.add_argument("config")
    di.add_argument("overrides", nargs="*")
    di.add_argument("--examples", type=int, default=2, help="examples to show (default 2)")
    di.add_argument("--split", choices=("train", "val", "test"), default="train")
    di.add_argument("--no-color", action="store_true", help="mark trained tokens with [[ ]]")
    di.set_defaults(func=cmd_data_inspect)

    w = sub.add_parser("sweep", help="grid/random search over config keys, ranked by a metric")
    w.add_argument("config", help="the base YAML config")
    w.add_argument("sweep", help="the sweep YAML (parameters, method, metric, budget, prune)")
    w.add_argument("--trial", type=int, help="run only this trial (one Slurm array task)")
    w.add_argument(
        "--slurm", action="store_true", help="submit the trials as a Slurm job array instead"
    )
    w.add_argument(
        "--slurm-script",
        default=str(Path(__file__).resolve().parents[1] / "slurm" / "sweep_array.sbatch"),
        help="the array script (default: slurm/sweep_array.sbatch)",
    )
    w.add_argument(
        "--sbatch-args", default="", help="extra sbatch options, e.g. '--partition=gpu --wait'"
    )
    w.set_defaults(func=cmd_sweep, overrides=[])

    r = sub.add_parser("report", help="an HTML page of curves, metrics and samples of runs")
    r.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    r.add_argument("--out", help="an .html path or a directory (default: <first run>/report)")
    r.set_defaults(func=cmd_report, overrides=[])

    la = sub.add_parser("launch", help="dsft train on N local ranks, launched by torchrun")
    la.add_argument("config", help="YAML config file")
    la.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    la.add_argument("--nproc", type=int, help="ranks (default: one per visible GPU, else 1)")
    la.set_defaults(func=cmd_launch)

    pl = sub.add_parser(
        "plan", help="memory of every ZeRO stage / offload option, and the one dsft picks"
    )
    pl.add_argument("source", nargs="?", help="model directory (config.json) or a YAML config")
    pl.add_argument("overrides", nargs="*", help="dotted overrides of a YAML config")
    pl.add_argument("--shape", help="a built-in Llama shape: " + ", ".join(_shape_names()))
    pl.add_argument("--family", action="store_true", help="which built-in Llama sizes fit")
    pl.add_argument("--gpus", type=int, help="GPUs per node (default: this machine's)")
    pl.add_argument("--gpu-mem", help="free memory per GPU, e.g. 80GB (default: measured)")
    pl.add_argument("--nodes", type=int, help="nodes (default: from the launcher env, else 1)")
    pl.add_argument("--host-mem", help="host RAM per node, e.g. 1TB (default: this machine's)")
    pl.add_argument("--seq", type=int, help="sequence length (default: data.max_len)")
    pl.add_argument("--global-batch", type=int, help="sequences per step (default: 8 per GPU)")
    pl.add_argument("--micro-batch", help="N, or auto (default: auto; a config's own value)")
    pl.add_argument("--lora", action="store_true", help="plan for LoRA (model.lora defaults)")
    pl.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    pl.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    pl.add_argument("--headroom", type=float, default=0.9, help="usable share of GPU memory")
    pl.add_argument("--tokens", help="training tokens per epoch, e.g. 500M (default: the data)")
    pl.add_argument("--epochs", type=int, help="epochs, for --family's train time")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    pl.add_argument("--peak-tflops", type=float, help="per GPU (default: by name, else 989)")
    pl.add_argument("--budget-hours", type=float, help="--family: mark sizes over this time")
    pl.set_defaults(func=cmd_plan)

    from dsft.bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    c = sub.add_parser("ds-config", help="print the DeepSpeed JSON a config generates")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--world-size", type=int, default=1)
    c.set_defaults(func=cmd_ds_config)
    return p


def _shape_names() -> list[str]:
    from dsft.planner import SHAPES

    return list(SHAPES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--local_rank=N` may come after the subcommand's positionals (deepspeed launcher).
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    parser = build_parser()
    # Overrides may come before or after options (`train c.yaml --nproc 2 train.lr=1e-4`);
    # argparse leaves the later ones unparsed.
    ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown or (rest and not hasattr(ns, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        ns.overrides = [*ns.overrides, *rest]
    # dsft loads local directories only; never let a library reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return ns.func(ns)
    except USER_ERRORS as e:
        print(f"dsft: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
