"""``dsft bench --mode vlm``: image-text SFT, dsft against TRL's SFTTrainer VLM path, in one run.

The task (``dsft.synthetic.write_colour_task`` with ``jitter``): "What colour is this?" about
a picture of one of four colours (every row its own picture: a random size, the colour moved
by up to ±jitter per channel), answered with the colour's initial; chance is 1 in 4. The
model: the tiny Gemma 3 of the tests (``dsft.synthetic.build_vlm_dir``: transformers'
``Gemma3Config`` classes, a SigLIP tower, saved as published, with its processor).

Systems, at equal samples (micro-batch × accumulation × ranks per step) and steps, the same
learning rate, schedule (cosine, no warm-up), clipping, precision, data-order seed and the
DeepSpeed JSON dsft writes; the tower and projector frozen in both (dsft's default; TRL's
runner freezes the same parameters, ``dsft.model.part``), or trained in both
(``--train-tower``):

  dsft          dsft train, padded micro-batches (image rows are rendered by the processor)
  dsft-packed   data.packing=true, rows of ``--packed-max-len`` tokens (default 4 × max_len),
                one packed row per micro-batch: the same steps, as many examples as fit
                (its samples/s counts them: real tokens / the mean example length). Refused
                while dsft does not pack image rows; the table says so (with dsft's reason)
                and the run goes on
  trl           trl.SFTTrainer on a prompt-completion dataset with an ``images`` column
                (TRL's VLM path: AutoProcessor, DataCollatorForVisionLanguageModeling,
                loss on the completion). TRL refuses packing and padding-free for vision
                data, so it has no packed variant

Figures: exact match of each run's saved model on held-out pictures (sizes and shades drawn
with another seed; ``dsft.synthetic.colour_accuracy``: the same loading and greedy decoding
for every system), samples/s (median over the steps after the first ``--skip-steps``, from
each system's per-step wall times), peak RSS (largest process, sampled every 50 ms), the
time from launch to the first step and the final training loss. Ratios are dsft / TRL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.vs_trl import _fmt, child_env, environment, log, watch, write_result
from dsft.distributed import local_launch_argv

SYSTEMS = ("dsft", "dsft-packed", "trl")


class VlmBench:
    """Workspace, the shared model and data, and one run of each system."""

    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.work = Path(ns.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.samples_per_step = ns.micro_batch * ns.grad_accum * ns.nproc
        self.ds_config: Path | None = None

    def build_inputs(self) -> None:
        from dsft.synthetic import build_vlm_dir, write_colour_task

        ns, w = self.ns, self.work
        self.model_dir = build_vlm_dir(w / "model", "gemma3", seed=0)
        self.data = write_colour_task(
            w / "data", n=ns.train_examples, seed=1, forms=False, jitter=ns.jitter
        )
        # TRL's form of the same rows: prompt / completion messages and the image files
        # (TRL puts the image before the user's text, as the dsft rows have it)
        trl_rows = []
        for line in self.data.read_text().splitlines():
            user, answer = json.loads(line)["messages"]
            (image,) = [p["path"] for p in user["content"] if p["type"] == "image"]
            (text,) = [p["text"] for p in user["content"] if p["type"] == "text"]
            trl_rows.append({
                "prompt": [{"role": "user", "content": text}],
                "completion": [{"role": "assistant", "content": answer["content"]}],
                "images": [str(self.data.parent / image)],
            })  # fmt: skip
        self.trl_data = w / "trl.jsonl"
        self.trl_data.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
        log(f"inputs: tiny Gemma 3 at {self.model_dir}, {ns.train_examples} image rows")

    # ------------------------------------------------------------------ systems
    def _dsft_config(self, out: Path, packed: bool, seed: int, steps: int) -> Path:
        ns = self.ns
        tree = {
            "output_dir": str(out),
            "model": {
                "path": str(self.model_dir),
                "freeze": {"vision": not ns.train_tower, "projector": not ns.train_tower},
            },
            "data": {
                "path": [str(self.data)],
                "val_fraction": 0.0,
                "test_fraction": 0.0,
                "max_len": (ns.packed_max_len or 4 * ns.max_len) if packed else ns.max_len,
                "packing": packed,
                "cache_dir": str(self.work / "dsft-cache"),
            },
            "train": {
                "max_steps": steps,
                "micro_batch": 1 if packed else ns.micro_batch,
                "grad_accum": ns.grad_accum,
                "lr": ns.lr,
                "warmup_steps": 0,  # as vs_trl: only w=0 gives both the same schedule
                "schedule": "cosine",
                "precision": "fp32",
                "max_grad_norm": 1.0,
                "seed": seed,
            },
            "deepspeed": {"zero_stage": ns.zero_stage},
            "eval": {"generate": False, "before_training": False},
            "checkpoint": {"save_final": False, "export": True},
            "logging": {"every": 1, "progress": False, "report_to": []},
        }
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    def run_dsft(self, out: Path, packed: bool, seed: int, steps: int) -> dict[str, Any]:
        cfg = self._dsft_config(out, packed, seed, steps)
        cmd = local_launch_argv(
            self.ns.nproc, ["dsft", "train", str(cfg), "--no-resume", "--overwrite"]
        )
        log_path = out.parent / f"{out.name}.log"
        try:
            w = watch(cmd, child_env(True, self.ns.nproc), out / "metrics.jsonl", log_path)
        except RuntimeError:
            if not packed:
                raise
            # dsft's own refusal (a located config error), not a crash: report it
            why = [x for x in log_path.read_text().splitlines() if "data.packing" in x]
            return {"refused": why[-1].strip() if why else "failed: see " + str(log_path)}
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["split"] == "train"]
        if not packed:  # TRL gets the padded run's JSON (a packed run's micro-batch is 1 row)
            self.ds_config = out / "ds_config.json"
        data = json.loads((out / "summary.json").read_text())["data"]
        mean_len = data["train_tokens"] / data["train"]  # real tokens of an example
        return {
            **w,
            # examples per step: exact for padded rows, from real tokens for packed ones
            "samples": [
                r["tokens_per_s"] * r["step_time"] / mean_len if packed else self.samples_per_step
                for r in rows[1:]
            ],
            "dt": [b["time"] - a["time"] for a, b in itertools.pairwise(rows)],
            "steps": [r["step"] for r in rows[1:]],
            "final": out / "final",
        }

    def run_trl(self, out: Path, seed: int, steps: int) -> dict[str, Any]:
        ns = self.ns
        spec = {
            "vlm": True,
            "train_tower": ns.train_tower,
            "out": str(out),
            "model": str(self.model_dir),
            "train": str(self.trl_data),
            "precision": "fp32",
            "attn_implementation": "sdpa",
            "mode": "default",  # TRL refuses packing for vision data
            "max_len": ns.max_len,
            "micro_batch": ns.micro_batch,
            "grad_accum": ns.grad_accum,
            "steps": steps,
            "lr": ns.lr,
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "seed": seed,
            "deepspeed": str(self._ds_config()),
            "lora": None,
        }
        out.mkdir(parents=True, exist_ok=True)
        spec_path = out.parent / f"{out.name}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cmd = local_launch_argv(ns.nproc, ["benchmarks.trl_run", str(spec_path)])
        env = child_env(True, ns.nproc)
        w = watch(cmd, env, out / "metrics.jsonl", out.parent / f"{out.name}.log")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {
            **w,
            "dt": [b["wall"] - a["wall"] for a, b in itertools.pairwise(rows)],
            "samples": [self.samples_per_step] * (len(rows) - 1),
            "steps": [r["step"] for r in rows[1:]],
            "final": out / "final",
        }

    def _ds_config(self) -> Path:
        """The DeepSpeed JSON of dsft's run (written by it; by dsft's own code when TRL runs
        alone)."""
        if self.ds_config is None or not self.ds_config.is_file():
            from dsft.config import batch_shape, load_config
            from dsft.ds_config import deepspeed_config

            self.ds_config = self.work / "ds_config.json"
            cfg = load_config(self._dsft_config(self.work / "runs" / "plan", False, 0, 1))
            plan = batch_shape(cfg.train, self.ns.nproc)
            self.ds_config.write_text(json.dumps(deepspeed_config(cfg, plan), indent=2))
        return self.ds_config

    def run_system(self, name: str, seed: int, warmup: bool = False) -> dict[str, Any]:
        """One run of ``name``; ``warmup``: two steps, untimed (the first run of a machine
        builds DeepSpeed's JIT ops and fills the OS file cache)."""
        from dsft.synthetic import colour_accuracy, colour_probes

        out = self.work / "runs" / f"{name}-{'warmup' if warmup else f's{seed}'}"
        shutil.rmtree(out, ignore_errors=True)  # a stale metrics.jsonl would fake the start-up
        out.parent.mkdir(parents=True, exist_ok=True)
        steps = 2 if warmup else self.ns.steps
        if name == "trl":
            res = self.run_trl(out, seed, steps)
        else:
            res = self.run_dsft(out, "packed" in name, seed, steps)
        if "refused" in res:
            log(f"{name}: refused: {res['refused']}")
        if warmup or "refused" in res:
            return res
        skip = min(self.ns.skip_steps, max(len(res["dt"]) - 2, 0))
        dt = np.array(res["dt"][skip:])
        probes = colour_probes(self.ns.eval_per_colour, seed=1000, jitter=self.ns.jitter)
        res["exact_match"] = colour_accuracy(res["final"], probes)
        res["samples_per_s"] = float(np.median(np.array(res["samples"][skip:]) / dt))
        res["steps_done"] = len(res["dt"]) + 1
        log(
            f"{name} seed {seed}: exact match {res['exact_match']:.3f}, "
            f"{res['samples_per_s']:.1f} samples/s, peak RSS {res['peak_rss_gb']:.2f} GiB, "
            f"ran {res['wall_s']:.0f}s"
        )
        return res


FIGURES = ("exact_match", "samples_per_s", "peak_rss_gb", "startup_s")


def table(result: dict[str, Any]) -> str:
    med, s = result["medians"], result["settings"]
    lines = [
        "| system | exact match (held-out) | samples/s | peak RSS GiB | start → 1st step s |",
        "|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        m = med.get(name)
        if m is None:
            continue
        if "refused" in m:
            lines.append(f"| {name} | refused: {m['refused']} | | | |")
            continue
        lines.append(
            f"| {name} | {_fmt(m['exact_match'], '.3f')} | {_fmt(m['samples_per_s'], '.2f')} "
            f"| {_fmt(m['peak_rss_gb'], '.2f')} | {_fmt(m['startup_s'], '.1f')} |"
        )
    for a, r in result["ratios"].items():
        lines.append(
            f"| **{a} / trl** | {_fmt(r['exact_match'], '+.3f')} (diff) "
            f"| {_fmt(r['samples_per_s'], '.2f')}× | {_fmt(r['peak_rss_gb'], '.2f')}× "
            f"| {_fmt(r['startup_s'], '.2f')}× |"
        )
    env = result["environment"]
    lines += [
        "",
        f"Task: colour of a picture (4 colours, chance 0.25), {s['train_examples']} training rows "
        f"(each its own picture, ±{s['jitter']} per channel), exact match on "
        f"{4 * s['eval_per_colour']} held-out pictures. Model: tiny Gemma 3 "
        f"({result['params']:,} params, tower and projector "
        f"{'trained' if s['train_tower'] else 'frozen'}), fp32, ZeRO-{s['zero_stage']} "
        f"(the same DeepSpeed JSON for both), {s['nproc']} rank(s), micro-batch "
        f"{s['micro_batch']} × accumulation {s['grad_accum']}, {s['steps']} steps, lr {s['lr']} "
        f"cosine; medians over data-order seeds {s['seeds']}; samples/s over the steps after "
        f"the first {s['skip_steps']}. Device: {env['device']}, {env['cpu_cores']} cores, load "
        f"average at start {', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}.",
        "Exact match per seed: "
        + "; ".join(
            f"{n} " + ", ".join(f"{x:.3f}" for x in med[n]["exact_match_runs"])
            for n in SYSTEMS
            if n in med and "exact_match_runs" in med[n]
        )
        + ".",
        "Ratios: exact match as the difference; samples/s > 1 favours dsft; memory and "
        "start-up < 1 favour dsft.",
    ]
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    from benchmarks.vs_trl import _has

    systems = [s for s in SYSTEMS if s in ns.systems.split(",")]
    if "trl" in systems and not _has("trl"):
        print("dsft bench: TRL is not installed (pip install 'trl>=1.16,<2')")
        return 2
    import datasets

    datasets.disable_progress_bars()
    bench = VlmBench(ns)
    bench.build_inputs()
    seeds = list(range(ns.first_seed, ns.first_seed + ns.repeats))
    settings = {k: v for k, v in vars(ns).items() if k not in ("mode",)}
    result: dict[str, Any] = {
        "settings": {**settings, "seeds": seeds},
        "environment": environment(False),
    }
    from dsft import planner

    result["params"] = planner.model_facts(bench.model_dir).total_params
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for s in systems if ns.warmup else []:
        log(f"warm-up: {s}")
        res = bench.run_system(s, 0, warmup=True)
        if "refused" in res:  # (dsft-packed, while image rows are not packed)
            runs[s].append(res)
    for seed in seeds:  # alternate the systems, the same data-order seed for all in a round
        for s in systems:
            if not (runs[s] and "refused" in runs[s][0]):
                runs[s].append(bench.run_system(s, seed))
    med: dict[str, dict[str, Any]] = {}
    for s, rs in runs.items():
        if rs and "refused" in rs[0]:
            med[s] = {"refused": rs[0]["refused"]}
            continue
        med[s] = {k: float(np.median([r[k] for r in rs])) for k in FIGURES}
        med[s]["exact_match_runs"] = [r["exact_match"] for r in rs]
    result["medians"] = med
    result["ratios"] = {
        a: {
            k: med[a][k] - med["trl"][k] if k == "exact_match" else med[a][k] / med["trl"][k]
            for k in FIGURES
        }
        for a in ("dsft", "dsft-packed")
        if a in med and "trl" in med and "refused" not in med[a] and "refused" not in med["trl"]
    }
    write_result(bench.work, result, table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dsft bench --mode vlm",
        description="image-text SFT: dsft vs TRL SFTTrainer's VLM path (exact match, samples/s)",
    )
    p.add_argument("--mode", choices=("vlm",), default="vlm")
    p.add_argument("--out", default="runs/bench-vlm", help="work directory (bench.json, bench.md)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps not timed")
    p.add_argument("--repeats", type=int, default=3, help="rounds, one data-order seed each")
    p.add_argument("--first-seed", type=int, default=0, help="the first round's seed")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="ranks per system")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--packed-max-len", type=int, help="dsft-packed's row length (4 × max-len)")
    p.add_argument("--train-examples", type=int, default=240, help="training rows")
    p.add_argument("--jitter", type=int, default=20, help="± per colour channel of each picture")
    p.add_argument("--eval-per-colour", type=int, default=8, help="held-out pictures per colour")
    p.add_argument("--train-tower", action="store_true", help="train tower and projector (both)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up runs")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    return run(p.parse_args(argv))
