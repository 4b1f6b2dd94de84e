"""``dsft`` command line: parse the arguments and dispatch to a recipe in ``dsft/recipes/``.

Commands: train (incl. k-fold), launch, eval, export, init, chat, demo, data inspect, sweep,
report, plan, ds-config, bench. Each runs ``dsft.recipes.<name>.main(ns)``, imported only when its
command runs, so a plain command imports neither another command nor the benchmark (TRL).
User mistakes (bad config, bad data rows) end with a clear message and exit code 2, never
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dsft.errors import USER_ERRORS


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
    t.add_argument(
        "--overwrite", action="store_true", help="with --no-resume: clear output_dir's old run"
    )
    t.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume although data/model/batch/schedule/seed differ from the checkpoint's",
    )
    _trust_flag(t)
    t.set_defaults(recipe="train")

    e = sub.add_parser(
        "eval",
        help="metrics of a saved model on the val/test split, or lm-eval benchmarks (--tasks)",
    )
    e.add_argument(
        "config",
        metavar="CONFIG_OR_MODEL",
        help="the run's YAML config (data, split, eval settings); with --tasks: the model "
        "(an export, a run dir, a LoRA adapter or a Hub name)",
    )
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.max_generate=0")
    e.add_argument(
        "--checkpoint", help="exported model dir, run dir, checkpoints/ dir or checkpoints/step_N"
    )
    e.add_argument(
        "--out", help="where results.json and predictions go (default: <output_dir>/eval)"
    )
    e.add_argument("--nproc", type=int, default=1, help="spawn N local ranks via torchrun")
    h = e.add_argument_group("benchmarks (lm-evaluation-harness; pip install 'dsft[eval]')")
    h.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. mmlu,gsm8k,ifeval")
    h.add_argument("--limit", type=float, help="documents per task (a fraction when < 1)")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    h.add_argument("--batch-size", type=int, default=8, help="requests per batch (default 8)")
    h.add_argument(
        "--apply-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prompt through the model's chat template (default: when it has one)",
    )
    h.add_argument("--include-path", help="a folder of your own lm-eval YAML tasks")
    h.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto")
    h.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per request")
    h.add_argument("--base", help="the base model of a LoRA adapter (default: its config's)")
    h.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code"
    )
    _trust_flag(e)
    e.set_defaults(recipe="evaluate")

    x = sub.add_parser("export", help="a checkpoint (any ZeRO stage) to a Hugging Face directory")
    x.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or checkpoints/step_N")
    x.add_argument("out", help="output directory (safetensors, config, tokenizer)")
    x.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA runs: write only the adapter, not the merged model",
    )
    x.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload the export (the merged model, or the adapter) and its model card",
    )
    x.add_argument(
        "--public",
        action="store_true",
        help="with --push-to-hub: make a new repo public (default: private)",
    )
    x.add_argument("--private", action="store_true", help=argparse.SUPPRESS)  # the default now
    x.add_argument(
        "--model-path",
        help="the base model (default: the checkpoint's model.path; required with "
        "--trust-remote-code)",
    )
    x.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the base model repo's own Python (never taken from the checkpoint)",
    )
    _trust_flag(x)
    x.set_defaults(recipe="export", overrides=[])

    it = sub.add_parser(
        "init", help="write a commented config to start from, for a model and data files"
    )
    it.add_argument("model", help="model directory (config.json) or Hub name")
    it.add_argument("data", nargs="+", help="training data files")
    it.add_argument("--method", choices=("full", "lora"), default="lora", help="default: lora")
    it.add_argument("--gpus", type=int, help="GPUs per node to plan for (default: this machine's)")
    it.add_argument("--gpu-mem", help="memory per GPU, e.g. 80GB (default: measured, else 80GB)")
    it.add_argument("--nodes", type=int, default=1, help="nodes to plan for (default 1)")
    it.add_argument("-o", "--out", default="config.yaml", help="where to write it (config.yaml)")
    it.add_argument("--force", action="store_true", help="overwrite an existing file")
    it.set_defaults(recipe="init", overrides=[])

    ch = sub.add_parser("chat", help="talk to an exported model, adapter or run in the terminal")
    ch.add_argument("model", help="export dir, LoRA adapter dir, or run dir (best/, else final/)")
    ch.add_argument("--prompt", help="answer this one message and exit")
    ch.add_argument("--system", help="system message")
    ch.add_argument(
        "--image", action="append", metavar="PATH", help="a picture for a multimodal model "
        "(repeatable; shown with the first question)"
    )  # fmt: skip
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--top-k", type=int, default=50)
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--base", help="an adapter's base model (default: from adapter_config.json)")
    ch.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    ch.add_argument("--trust-remote-code", action="store_true")
    ch.set_defaults(recipe="chat", overrides=[])

    d = sub.add_parser("demo", help="fine-tune a tiny model on the bundled tasks, no download")
    d.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    d.add_argument("--nproc", type=int, default=1, help="number of local ranks")
    d.add_argument("--workdir", help="where the model, config and run go (default: a temp dir)")
    d.add_argument(
        "--preference",
        action="store_true",
        help="then DPO on preference pairs of the same tasks (reuses the workdir's SFT demo)",
    )
    d.set_defaults(recipe="demo")

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
    di.set_defaults(recipe="inspect")

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
    w.set_defaults(recipe="sweep", overrides=[])

    r = sub.add_parser("report", help="an HTML page of curves, metrics and samples of runs")
    r.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    r.add_argument("--out", help="an .html path or a directory (default: <first run>/report)")
    r.set_defaults(recipe="report", overrides=[])

    la = sub.add_parser("launch", help="dsft train on N local ranks, launched by torchrun")
    la.add_argument("config", help="YAML config file")
    la.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5")
    la.add_argument("--nproc", type=int, help="ranks (default: one per visible GPU, else 1)")
    la.set_defaults(recipe="train")

    pl = sub.add_parser(
        "plan", help="memory of every ZeRO stage / offload option, and the one dsft picks"
    )
    pl.add_argument("source", nargs="?", help="model directory (config.json) or a YAML config")
    pl.add_argument("overrides", nargs="*", help="dotted overrides of a YAML config")
    pl.add_argument("--shape", help="a built-in Llama shape: " + ", ".join(_shape_names()))
    pl.add_argument(
        "--family", action="store_true", help="which built-in Llama sizes fit (the default)"
    )
    pl.add_argument("--gpus", type=int, help="GPUs per node (default: this machine's)")
    pl.add_argument("--gpu-mem", help="free memory per GPU, e.g. 80GB (default: measured)")
    pl.add_argument("--nodes", type=int, help="nodes (default: from the launcher env, else 1)")
    pl.add_argument("--host-mem", help="host RAM per node, e.g. 1TB (default: this machine's)")
    pl.add_argument("--seq", type=int, help="sequence length (default: data.max_len)")
    pl.add_argument("--global-batch", type=int, help="sequences per step (default: 8 per GPU)")
    pl.add_argument("--micro-batch", help="N, or auto (default: auto; a config's own value)")
    pl.add_argument("--lora", action="store_true", help="plan for LoRA (model.lora defaults)")
    pl.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on")
    pl.add_argument(
        "--sp", help="sequence-parallel degree N, or auto (default: a config's, else 1)"
    )
    pl.add_argument("--tiled", action="store_true", help="tiled MLP and a chunked loss on")
    pl.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    pl.add_argument("--headroom", type=float, default=0.9, help="usable share of GPU memory")
    pl.add_argument("--tokens", help="training tokens per epoch, e.g. 500M (default: the data)")
    pl.add_argument("--epochs", type=int, help="epochs, for --family's train time")
    pl.add_argument(
        "--mfu",
        type=float,
        help="assumed model FLOPs utilisation (default: dsft.flops.KERNEL_EFFICIENCY, 0.4)",
    )
    pl.add_argument("--peak-tflops", type=float, help="per GPU (default: by name, else 989)")
    pl.add_argument("--budget-hours", type=float, help="--family: mark sizes over this time")
    pl.set_defaults(recipe="plan")

    b = sub.add_parser(
        "bench",
        help="dsft vs TRL SFTTrainer on identical work (from a source checkout: benchmarks/)",
        add_help=False,
    )
    b.add_argument("args", nargs=argparse.REMAINDER, help="benchmarks/vs_trl.py's options")
    b.set_defaults(recipe="bench", overrides=[])

    c = sub.add_parser("ds-config", help="print the DeepSpeed JSON a config generates")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--world-size", type=int, default=1)
    c.set_defaults(recipe="plan")
    return p


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle checkpoint files that name any Python code (only checkpoints you made)",
    )


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
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        ns, rest = parser.parse_args(argv[:1]), []
        ns.args = argv[1:]
    else:
        ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown or (rest and not hasattr(ns, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        ns.overrides = [*ns.overrides, *rest]
    # Hub names resolve through the HF cache (dsft/hub.py): downloaded when the Hub is
    # reachable, read from the cache otherwise; HF_HUB_OFFLINE=1 forbids any network access.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return importlib.import_module(f"dsft.recipes.{ns.recipe}").main(ns)
    except USER_ERRORS as e:
        print(f"dsft: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
