"""``dsft init MODEL DATA...``: a commented YAML config to start from.

The model is read on the meta device (its config.json; no weights), the data through dsft's
own readers, formats and chat template (a sample is tokenised with the model's tokenizer), and
every hyper-parameter is chosen by a rule of :func:`choose` (docs/start.md, "A config to start from"
table). The memory planner's choice for the hardware named by ``--gpus``/``--gpu-mem`` goes in
as a comment; ``deepspeed.zero_stage`` and ``train.micro_batch`` stay ``auto``, so ``dsft
train`` re-plans on the hardware it actually runs on.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dsft import planner
from dsft.config import LoraConfig, ModelConfig, is_hub_id, load_config
from dsft.data.formats import survey
from dsft.data.template import apply_template
from dsft.data.tokenize import encode
from dsft.errors import ConfigError, HubError
from dsft.model import load_tokenizer

# Files that describe a model without its weights (what init reads of a Hub repo).
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "*.model", "*.tiktoken", "vocab.*", "merges.txt", "chat_template.*"]  # fmt: skip


def model_dir(name: str) -> tuple[str, bool]:
    """(a local directory with config.json, whether ``name`` is a Hub id).

    A Hub name (``dsft.config.is_hub_id``, as ``model.path`` reads it) is read from the Hugging
    Face cache or downloaded, config and tokenizer only: unlike training (``dsft.hub``), init
    needs no weights. HF_HUB_OFFLINE=1 keeps it to the cache."""
    p = Path(name)
    if (p / "config.json").is_file():
        return str(p.resolve()), False
    if not is_hub_id(name):
        raise ConfigError([f"{name}: no config.json here; give a model directory or a Hub name"])
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=CONFIG_FILES), True
    except Exception as e:  # offline and not cached, unknown repo, gated repo
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise HubError(
            f"{name}: could not read the Hub repo's config and tokenizer ({type(e).__name__}: "
            f"{first}); with HF_HUB_OFFLINE=1 it must be in the Hugging Face cache "
            f"(`hf download {name} --include config.json 'tokenizer*'`)"
        ) from None


def _round_up(x: float, to: int) -> int:
    return int(math.ceil(max(x, 1) / to) * to)


@dataclass
class Rules:
    """The hyper-parameters chosen from the model's size and the method (the table in docs/start.md)."""

    lr: float
    lora_r: int
    epochs: int
    global_batch: int
    max_len: int
    packing: bool
    max_new_tokens: int


def choose(
    params: int, method: str, examples: int, lengths: np.ndarray, targets: np.ndarray,
    context: int, world: int,
) -> Rules:  # fmt: skip
    """Every rule in one place (documented in docs/start.md, "A config to start from: dsft init")."""
    # LR ~ 1/sqrt(size): 1e-5 for an 8B model fully fine-tuned, 2e-4 for its LoRA.
    scale = math.sqrt(8e9 / params)
    lr = (
        min(max(1e-5 * scale, 2e-6), 2e-3)
        if method == "full"
        else min(max(2e-4 * scale, 5e-5), 2e-3)
    )
    r = 8 if params < 1e9 else 16 if params < 14e9 else 32
    epochs = 3 if examples < 10_000 else 2 if examples < 100_000 else 1
    # Long enough for 99% of examples (in 64-token steps), within the model's context.
    max_len = min(_round_up(np.percentile(lengths, 99), 64), context)
    p10, p90 = np.percentile(lengths, [10, 90])
    packing = bool(p90 >= 2 * p10)  # padding to the longest would waste about half
    units = train_units(examples, lengths, max_len, packing)
    batch = 2 ** int(math.log2(max(units // 100, 1)))
    batch = _round_up(min(max(batch, 8), 64), world)  # a multiple of the ranks
    new = min(max(_round_up(np.percentile(targets, 99) * 1.25, 16), 16), 512)
    return Rules(float(f"{lr:.2g}"), r, epochs, batch, max_len, packing, new)


def train_units(examples: int, lengths: np.ndarray, max_len: int, packing: bool) -> int:
    """What a batch counts: examples, or with packing the rows they pack into (~95% full)."""
    if not packing:
        return examples
    return max(
        1, math.ceil(examples * float(np.minimum(lengths, max_len).mean()) / (0.95 * max_len))
    )


def _yaml_value(v: Any) -> str:
    return (
        yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    )


def _emit(
    tree: dict[str, Any], notes: dict[str, str], prefix: str = "", indent: int = 0
) -> list[str]:
    lines = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        note = f"  # {notes[key]}" if key in notes else ""
        if isinstance(v, dict) and v:
            lines.append(" " * indent + f"{k}:{note}")
            lines += _emit(v, notes, key + ".", indent + 2)
        else:
            lines.append(" " * indent + f"{k}: {_yaml_value(v)}{note}")
    return lines


def main(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    if out.exists() and not ns.force:
        raise ConfigError([f"{out}: exists; choose another -o or pass --force"])
    path, hub = model_dir(ns.model)
    facts = planner.model_facts(path)
    params = facts.total_params
    context = int(getattr(facts.config, "max_position_embeddings", 0) or 4096)

    # The data, read and tokenised as training will (a sample, with the template to be used).
    data = [str(Path(d).resolve()) for d in ns.data]
    for d in data:
        if not Path(d).exists():
            raise ConfigError([f"{d}: data file not found"])
    found = survey(data)
    if not found.rows:
        raise ConfigError(
            [f"{', '.join(ns.data)}: no usable rows; first problems: {found.bad[:3]}"]
        )
    tokenizer = load_tokenizer(ModelConfig(path=path))
    chat = any(ex.kind == "chat" for ex in found.sample)
    template = ""
    if chat and not getattr(tokenizer, "chat_template", None):
        template = "chatml"  # a built-in; the export saves it with the tokenizer
    apply_template(tokenizer, template)
    enc = encode(tokenizer, found.sample)
    lengths = np.diff(enc.offsets)
    starts = enc.offsets[:-1]
    targets = np.add.reduceat(enc.trained.astype(np.int64), starts) if len(starts) else lengths

    # The hardware to plan for: the flags, else this machine's GPUs, else its CPU.
    cuda = torch.cuda.is_available()
    if ns.gpus or ns.gpu_mem or cuda:
        hw = planner.hardware_facts(ns.gpus, ns.gpu_mem or (None if cuda else "80GB"), ns.nodes)
        precision = "bf16"
    else:
        hw = planner.job_hardware(1, 1, None)  # CPU ranks: fp32 is the fast precision there
        precision = "fp32"
    world = hw.world_size
    n = found.rows
    n_eval = min(1000, max(10, n // 20))  # validation and test examples each
    rules = choose(params, ns.method, n - 2 * n_eval, lengths, targets, context, world)
    lora = LoraConfig(enabled=ns.method == "lora", r=rules.lora_r, alpha=2 * rules.lora_r)
    planned = planner.model_facts(facts.config, lora) if lora.enabled else facts
    units = train_units(n - 2 * n_eval, lengths, rules.max_len, rules.packing)
    per_epoch = max(1, units // rules.global_batch)
    steps = rules.epochs * per_epoch
    every = max(1, steps // 5)
    tokens = int(lengths.mean() * (n - 2 * n_eval))
    plan, ckpt = None, False
    for ckpt in (False, True):  # activation checkpointing only when needed to fit on the GPUs
        work = planner.Workload(
            seq=rules.max_len, global_batch=rules.global_batch, precision=precision,
            checkpointing=ckpt, attention="sdpa",
        )  # fmt: skip
        plan = planner.choose(planned, hw, work)
        offload = plan.choice and (
            plan.choice.option.offload_optimizer or plan.choice.option.offload_params
        )
        if plan.choice and not offload:
            break
    assert plan is not None
    name = Path(ns.model.rstrip("/")).name

    tree: dict[str, Any] = {
        "output_dir": f"runs/{name}-{ns.method}",
        "model": {"path": ns.model if hub else path, "gradient_checkpointing": ckpt},
        "data": {
            "path": data,
            "format": "auto",
            "template": template,
            "max_len": rules.max_len,
            "packing": rules.packing,
            "val_size": n_eval,
            "test_size": n_eval,
        },
        "train": {
            "epochs": rules.epochs,
            "micro_batch": "auto",
            "global_batch": rules.global_batch,
            "lr": rules.lr,
            "schedule": "cosine",
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "precision": precision,
        },
        "deepspeed": {"zero_stage": "auto"},
        "eval": {"every": every, "max_new_tokens": rules.max_new_tokens},
        "checkpoint": {"every": max(every, steps // 5), "keep_last": 2},
        "logging": {"every": max(1, min(10, steps // 50)), "report_to": ["tensorboard"]},
    }
    if lora.enabled:
        tree["model"]["lora"] = {
            "enabled": True,
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": ["all-linear"],
        }
    if found.bad:
        tree["data"]["on_bad_row"] = "skip"
    pct = {q: int(np.percentile(lengths, q)) for q in (10, 50, 90, 99)}
    formats = ", ".join(f"{k} {v}" for k, v in sorted(found.formats.items(), key=lambda x: -x[1]))
    fmt_note = f"found: {formats}"
    if template:
        tpl_note = "built-in ChatML: the tokenizer has no chat template of its own"
    elif chat:
        tpl_note = "'' = the tokenizer's own chat template (found in the model's tokenizer)"
    else:
        tpl_note = "no chat rows: completion/text rows need no template"
    kind = "LoRA" if lora.enabled else "full fine-tuning"
    notes = {
        "output_dir": "where checkpoints, metrics, exports go",
        "model.path": f"{params / 1e6:,.1f}M parameters (read on the meta device)",
        "model.gradient_checkpointing": (
            "on: the plan below needs it to fit without offload"
            if ckpt
            else "off: the plan fits without recomputing activations"
        ),
        "model.lora.r": "8 below 1B parameters, 16 below 14B, 32 above",
        "model.lora.alpha": "2 × r",
        "data.format": fmt_note,
        "data.template": tpl_note,
        "data.max_len": f"p99 of the tokenised lengths ({pct[99]}) rounded up to 64, at most "
        f"the context ({context})",
        "data.packing": f"p90/p10 of lengths = {pct[90]}/{pct[10]}: "
        + ("≥ 2, padding would waste about half" if rules.packing else "< 2, little padding"),
        "data.val_size": "5% of the examples, 10 to 1000",
        "data.test_size": "the same; test generation metrics at the end",
        "train.epochs": "3 below 10k examples, 2 below 100k, else 1",
        "train.micro_batch": "the planner's largest fit on the real GPUs at launch",
        "train.global_batch": ("packed rows/100" if rules.packing else "examples/100")
        + " as a power of two, 8 to 64, a multiple of the ranks",
        "train.lr": f"{'1e-5' if not lora.enabled else '2e-4'} × sqrt(8B / params) for {kind}",
        "train.warmup_ratio": "3% of the steps",
        "train.precision": "bf16 on GPUs" if precision == "bf16" else "fp32: planned for CPU",
        "deepspeed.zero_stage": "the planner picks stage and offload at launch (see above)",
        "eval.every": f"5 validations over the ~{steps} steps (each new best is exported)",
        "eval.max_new_tokens": "p99 of the response lengths × 1.25, 16 to 512",
        "checkpoint.every": "5 checkpoints over the run (resume after a crash)",
        "logging.report_to": "add wandb / mlflow (pip install 'dsft[trackers]')",
        "data.on_bad_row": f"{len(found.bad)} bad rows, e.g. {found.bad[0]}" if found.bad else "",
    }
    header = [
        f"# dsft config written by `dsft init {' '.join(map(shlex.quote, _argv(ns)))}` on "
        f"{datetime.date.today()}.",
        "# Every value is chosen by a documented rule (docs/start.md, 'A config to start from');",
        "# edit freely. Keys not written keep their defaults (dsft/config/schema.py).",
        "#",
        f"# model: {planned.describe()}",
        f"# data:  {n} examples in {len(data)} file(s); formats {formats}"
        + (f"; {len(found.bad)} bad rows" if found.bad else ""),
        f"#        tokenised lengths (sample of {len(lengths)}, template included): "
        f"p10 {pct[10]}, p50 {pct[50]}, p90 {pct[90]}, p99 {pct[99]}, max {int(lengths.max())}",
        f"# template: {tpl_note}",
        "#",
        "# memory plan (dsft plan) for the hardware given; at launch the planner decides again",
        "# on the real GPUs:",
        *(f"#   {line}".rstrip() for line in planner.render_plan(plan, tokens).splitlines()),
        "",
    ]
    text = "\n".join(header + _emit(tree, {k: v for k, v in notes.items() if v})) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_config(out)  # what was written loads and validates as `dsft train` will read it
    print(f"wrote {out}: {kind}, lr {rules.lr:g}, max_len {rules.max_len}, {steps} steps")
    if plan.choice is None:
        print(f"warning: nothing fits on {hw.describe()}; see the plan in {out}")
    return 0


def _argv(ns: argparse.Namespace) -> list[str]:
    args = [ns.model, *ns.data, "--method", ns.method]
    for flag, v in (("--gpus", ns.gpus), ("--gpu-mem", ns.gpu_mem), ("-o", ns.out)):
        if v:
            args += [flag, str(v)]
    if ns.nodes and ns.nodes != 1:
        args += ["--nodes", str(ns.nodes)]
    return args
