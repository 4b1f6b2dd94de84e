"""``dsft demo``: a tiny Llama-style model learns four string tasks (see dsft.synthetic).

Nothing is downloaded: the demo writes the character-level tokenizer and a randomly
initialised tiny Llama into an ordinary ``from_pretrained`` directory, then runs the normal
``dsft train`` path on the bundled ``assets/demo_tasks.jsonl``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dsft import distributed
from dsft.config import load_config
from dsft.synthetic import (
    DEMO_DATA,
    build_model_dir,
    generate_hard_tasks,
    on_policy_pairs,
    synthetic_pairs,
    write_tasks,
)

# The preference stage's prompts: the tasks the SFT model gets wrong most often
# (dsft.synthetic.generate_hard_tasks), as many as the SFT data have of them, and a test set
# of fresh ones drawn the same way (unselected: its exact match is the model's on the family).
PAIR_PROMPTS = 3000
TEST_PROMPTS = 300


def demo_config(workdir: Path, nproc: int) -> dict[str, Any]:
    """The demo's run configuration (a normal dsft YAML config, written to the work dir)."""
    return {
        "output_dir": str(workdir / "run"),
        "model": {"path": str(workdir / "model")},
        "data": {
            "path": [str(DEMO_DATA)],
            "max_len": 64,
            # several short examples per 64-token row: 510 steps instead of 1,422 mostly
            # padded ones, 40% less time to the same exact match
            "packing": True,
            "val_fraction": 0.025,
            "test_fraction": 0.025,
        },
        "train": {
            "epochs": 6,
            "micro_batch": 32 // nproc,
            "grad_accum": 1,
            "lr": 1.5e-3,
            "warmup_steps": 30,
            "schedule": "cosine",
            "min_lr_ratio": 0.05,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "precision": "fp32",
        },
        "deepspeed": {"zero_stage": 0 if nproc == 1 else 2},
        "eval": {"every": 500, "micro_batch": 64, "max_generate": 200, "max_new_tokens": 12},
        "checkpoint": {"every": 0},
        "logging": {"every": 100, "progress": True},
    }


def format_report(summary: dict[str, Any]) -> str:
    """Before/after numbers of a demo run."""
    b, a = summary.get("before", {}), summary["after"]
    lines = [
        "",
        "dsft demo: tiny Llama on reverse / sort / capitalise / add",
        f"  ranks {summary['world_size']}, {summary['total_steps']} steps, "
        f"{summary['train_seconds']:.0f}s of training",
        f"  {'':22}{'before':>10}{'after':>10}",
    ]
    for label, split, key in (
        ("validation loss", "val", "loss"),
        ("validation perplexity", "val", "ppl"),
        ("test exact match", "test", "exact_match"),
        ("test token F1", "test", "f1"),
    ):
        if key not in a.get(split, {}):  # e.g. eval.generate=false: no exact match
            continue
        before = b.get(split, {}).get(key, float("nan"))
        lines.append(f"  {label:22}{before:>10.3f}{a[split][key]:>10.3f}")
    for s in a.get("test", {}).get("samples", [])[:4]:
        lines.append(f"  e.g. {s['reference']!r:>12} <- model said {s['prediction']!r}")
    lines.append(f"  exported model: {summary.get('export')}")
    return "\n".join(lines)


def preference_config(workdir: Path, nproc: int) -> dict[str, Any]:
    """The preference stage: DPO from the SFT demo's export on pairs of its own mistakes."""
    return {
        "output_dir": str(workdir / "dpo"),
        "model": {"path": str(workdir / "run" / "final")},
        "data": {
            "path": [str(workdir / "pairs.jsonl")],
            "test_path": [str(workdir / "pairs_test.jsonl")],
            "max_len": 64,
            "val_fraction": 0.1,
        },
        "train": {
            "objective": "dpo",
            "epochs": 2,
            "micro_batch": 16 // nproc,
            "grad_accum": 1,
            # a gentle step: 1e-4 to 5e-4 learnt the preference but cost exact match (0.913
            # -> 0.91 / 0.81); 1e-5 to 5e-5 raised it (0.94-0.95)
            "lr": 2e-5,
            "warmup_steps": 5,
            "schedule": "cosine",
            "max_grad_norm": 1.0,
            "precision": "fp32",
            "fused_loss": False,
        },
        # RPO's NLL on the chosen answers keeps their likelihood up: plain sigmoid DPO pushes
        # both sides down (it took exact match from 0.985 to 0.40 on made-up rejections)
        "preference": {"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": 1.0},
        "deepspeed": {"zero_stage": 0 if nproc == 1 else 2},
        "eval": {"every": 0, "micro_batch": 64, "max_generate": TEST_PROMPTS, "max_new_tokens": 12},
        "checkpoint": {"every": 0},
        "logging": {"every": 20, "progress": True},
    }


def write_pairs(workdir: Path, seed: int = 99) -> dict[str, int]:
    """On-policy pairs: the SFT export answers the preference prompts, greedily and once
    sampled (temperature 1); a prompt it got wrong either way becomes a pair with its own
    wrong answer rejected and the correct one chosen. The test prompts get made-up
    rejections (only their chosen answers are used: the exact-match references)."""
    import torch

    from dsft.config import ModelConfig
    from dsft.data.formats import Example
    from dsft.eval.evaluator import generate_predictions
    from dsft.model import load_model, load_tokenizer

    mcfg = ModelConfig(path=str(workdir / "run" / "final"))
    tok, model = load_tokenizer(mcfg), load_model(mcfg, torch.float32, training=False).eval()
    tasks = generate_hard_tasks(PAIR_PROMPTS, seed)
    examples = [
        Example(
            [
                {"role": "user", "content": f"{t['instruction']}\n\n{t['input']}"},
                {"role": "assistant", "content": t["output"]},
            ],
            f"prompt {i}",
        )
        for i, t in enumerate(tasks)
    ]
    torch.manual_seed(seed)
    answers = [
        [p["prediction"] for p in generate_predictions(model, tok, examples, 256, 12, False, s)[0]]
        for s in (None, {"temperature": 1.0})
    ]
    pairs = on_policy_pairs(tasks, answers)
    write_tasks(workdir / "pairs.jsonl", pairs)
    write_tasks(
        workdir / "pairs_test.jsonl",
        synthetic_pairs(generate_hard_tasks(TEST_PROMPTS, seed + 1), seed),
    )
    wrong = sum(a != t["output"] for a, t in zip(answers[0], tasks, strict=True))
    return {"prompts": len(tasks), "greedy_wrong": wrong, "pairs": len(pairs)}


def format_preference_report(summary: dict[str, Any]) -> str:
    """Before/after numbers of the preference stage."""
    b, a = summary.get("before", {}), summary["after"]
    lines = [
        "",
        "dsft demo --preference: DPO (sigmoid, beta 0.1, rpo_alpha 1) on the SFT model's mistakes",
        f"  ranks {summary['world_size']}, {summary['total_steps']} steps, "
        f"{summary['train_seconds']:.0f}s of training (+ the reference pass)",
        f"  {'':34}{'before':>10}{'after':>10}",
    ]
    for label, split, key in (
        ("val reward accuracy", "val", "rewards/accuracy"),
        ("val reward margin", "val", "rewards/margin"),
        ("val log p(chosen) - log p(rejected)", "val", "logp_gap"),
        ("test exact match (fresh prompts)", "test", "exact_match"),
    ):
        for d in (b.get(split, {}), a.get(split, {})):
            if key == "logp_gap" and "logps/chosen" in d:
                d["logp_gap"] = d["logps/chosen"] - d["logps/rejected"]
        if key not in a.get(split, {}):
            continue
        before = b.get(split, {}).get(key, float("nan"))
        lines.append(f"  {label:34}{before:>10.3f}{a[split][key]:>10.3f}")
    lines.append("  (rewards are beta * (log p - log p_ref): zero before training by definition)")
    lines.append(f"  exported model: {summary.get('export')}")
    return "\n".join(lines)


def run_preference(workdir: Path, ns: Any) -> int:
    """DPO on the SFT demo's exported model (run it first when the work dir has none)."""
    if not (workdir / "run" / "final" / "config.json").is_file():
        print("no SFT demo model in the work dir yet: running the SFT demo first", flush=True)
        rc = run_sft(workdir, ns, [])
        if rc:
            return rc
    made = write_pairs(workdir)
    print(
        f"on-policy pairs: the SFT model answered {made['prompts']} prompts, "
        f"{made['greedy_wrong']} wrongly (greedy); {made['pairs']} pairs of its own wrong "
        "answers (greedy or sampled) against the right ones",
        flush=True,
    )
    cfg_path = workdir / "dpo.yaml"
    cfg_path.write_text(yaml.safe_dump(preference_config(workdir, ns.nproc), sort_keys=False))
    cfg = load_config(cfg_path, ns.overrides)
    print(f"preference stage: {cfg_path}", flush=True)
    rc = distributed.launch_local(ns.nproc, ["train", str(cfg_path), *ns.overrides])
    if rc:
        return rc
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    print(format_preference_report(summary), flush=True)
    return 0


def main(ns: Any) -> int:
    """``dsft demo``: write the model and config, train on ``--nproc`` ranks, print the report."""
    workdir = Path(ns.workdir or tempfile.mkdtemp(prefix="dsft-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if getattr(ns, "preference", False):
        return run_preference(workdir, ns)
    return run_sft(workdir, ns, ns.overrides)


def run_sft(workdir: Path, ns: Any, overrides: list[str]) -> int:
    """The SFT demo in ``workdir``."""
    build_model_dir(workdir / "model")
    cfg_path = workdir / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(workdir, ns.nproc), sort_keys=False))
    cfg = load_config(cfg_path, overrides)  # validate before spawning anything
    print(f"demo work dir: {workdir} (config: {cfg_path})", flush=True)
    # The training recipe runs as its own process(es): commands do not import each other.
    rc = distributed.launch_local(ns.nproc, ["train", str(cfg_path), *overrides])
    if rc:
        return rc
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    print(format_report(summary), flush=True)
    return 0
