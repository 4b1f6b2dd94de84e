"""``dsft sweep cfg.yaml sweep.yaml``: hyper-parameter search ranked by validation metrics.

A sweep file names the keys to vary and how::

    method: grid                 # or random (then `trials: N` and `seed`)
    metric: val/loss             # what ranks the trials (min for loss/ppl, else max); or
                                 # bench/<task>/<metric> (eval.benchmarks, the tuned score)
    budget: {train.max_steps: 200, eval.every: 50}   # applied to every trial
    parameters:
      train.lr: [1.0e-5, 3.0e-5, 1.0e-4]             # a list: grid values / random choices
      model.lora.r: [8, 16]
      train.warmup_ratio: {low: 0.0, high: 0.1}       # random only: uniform
      train.weight_decay: {low: 1.0e-4, high: 0.1, log: true}
    prune: true                  # stop a trial whose validation metric is worse than the
                                 # median of earlier trials at the same step (median rule)
    parallel: 1                  # trials at once (each on its own GPUs if there are any)

Each trial is a normal ``dsft train`` run in ``<output_dir>/trials/<id>`` with its
overrides, so it checkpoints, resumes and logs like any run. The sweep state is
the trial directories themselves: a trial with a ``summary.json`` is finished, one
with a ``pruned`` marker was pruned, anything else is (re)started and resumes
from its own checkpoints. Pruning reuses preemption: the trial gets SIGTERM, saves
a checkpoint and exits 75.

Outputs in ``<output_dir>``: ``sweep.md`` and ``sweep.csv`` (trials ranked by the
metric with their settings, final and best validation metrics, tokens/s and wall
time) and ``best.yaml`` (the base config with the best trial's settings and without
the budget, to re-run at full length).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsft.config import load_config, to_dict
from dsft.errors import ConfigError

LOWER_IS_BETTER = ("val/loss", "val/ppl")


@dataclass
class Sweep:
    """A parsed sweep file."""

    parameters: dict[str, Any]
    method: str = "grid"
    trials: int = 0  # random: how many
    seed: int = 0
    metric: str = "val/loss"
    budget: dict[str, Any] = field(default_factory=dict)
    prune: bool = False
    prune_warmup: int = 1  # validations before a trial may be pruned
    parallel: int = 1
    nproc: int = 1  # ranks per trial

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem is reported at once."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of sweep settings"])
    known = set(Sweep.__dataclass_fields__)
    for k in raw:
        if k not in known:
            problems.append(f"{path}: unknown key {k!r} (valid: {', '.join(sorted(known))})")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        problems.append(f"{path}: parameters: give at least one key, e.g. train.lr: [1e-5, 1e-4]")
        params = {}
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        problems.append(f"{path}: method: {method!r} must be grid or random")
    for key, spec in params.items():
        if isinstance(spec, list) and spec:
            continue
        if isinstance(spec, dict) and method == "random" and {"low", "high"} <= set(spec):
            continue
        problems.append(
            f"{path}: parameters.{key}: expected a non-empty list"
            + (" or {low, high, log}" if method == "random" else " (grid needs lists)")
        )
    metric = str(raw.get("metric", "val/loss"))
    if metric.startswith("bench/") and metric.count("/") < 2:
        problems.append(
            f"{path}: metric: {metric!r}: a benchmark metric is bench/<task>/<metric>, e.g. "
            "bench/gsm8k/exact_match,strict-match (the run needs eval.benchmarks.tasks)"
        )
    if method == "random" and int(raw.get("trials", 0)) < 1:
        problems.append(f"{path}: trials: random search needs trials >= 1")
    if problems:
        raise ConfigError(problems)
    s = Sweep(**{k: v for k, v in raw.items() if k in known})
    s.parameters = params
    return s


def trial_settings(s: Sweep) -> list[dict[str, Any]]:
    """The settings of every trial, in a fixed order (the same on every invocation)."""
    if s.method == "grid":
        keys = list(s.parameters)
        return [
            dict(zip(keys, vals, strict=True)) for vals in itertools.product(*s.parameters.values())
        ]
    rng = random.Random(s.seed)
    out = []
    for _ in range(s.trials):
        t = {}
        for k, spec in s.parameters.items():
            if isinstance(spec, list):
                t[k] = rng.choice(spec)
            elif spec.get("log"):
                t[k] = math.exp(rng.uniform(math.log(spec["low"]), math.log(spec["high"])))
            else:
                t[k] = rng.uniform(spec["low"], spec["high"])
        out.append(t)
    return out


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def trial_overrides(s: Sweep, settings: dict[str, Any], out: Path) -> list[str]:
    return [
        *(_override(k, v) for k, v in s.budget.items()),
        *(_override(k, v) for k, v in settings.items()),
        f"output_dir={out}",
        # the trials of one sweep are one W&B group / MLflow experiment: the sweep's directory
        f"logging.group={out.parent.parent.name}",
    ]


def _val_curve(run: Path, metric: str) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    name = metric.split("/", 1)[1]
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "val" and name in r and r["step"] > 0:
            out[r["step"]] = r[name]
    return out


def should_prune(s: Sweep, curve: dict[int, float], others: list[dict[int, float]]) -> bool:
    """Median rule: the latest validation is worse than the median of earlier trials there."""
    if not s.prune or len(curve) < s.prune_warmup:
        return False
    step = max(curve)
    peers = [c[step] for c in others if step in c]
    if len(peers) < 2:
        return False
    median = statistics.median(peers)
    return curve[step] > median if s.lower_is_better else curve[step] < median


def prune_if_worse(s: Sweep, t: Trial, trials: list[Trial]) -> None:
    """Stop running trial ``t`` (SIGTERM: it saves and exits) when the median rule says so."""
    assert t.proc is not None
    curve = _val_curve(t.out, s.metric)
    others = [_val_curve(o.out, s.metric) for o in trials if o is not t and o.out.is_dir()]
    if should_prune(s, curve, others):
        (t.out / "pruned").write_text(json.dumps({"step": max(curve), **curve}))
        print(f"sweep: pruning trial {t.index} at step {max(curve)}", flush=True)
        os.killpg(t.proc.pid, signal.SIGTERM)


def make_trials(s: Sweep, root: Path) -> list[Trial]:
    """Every trial of the sweep, each in ``<root>/trials/NNN`` (the same on every invocation)."""
    return [Trial(i, st, root / "trials" / f"{i:03d}") for i, st in enumerate(trial_settings(s))]


@dataclass
class Trial:
    index: int
    settings: dict[str, Any]
    out: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0


def trial_status(out: Path) -> str:
    if (out / "summary.json").is_file():
        return "done"
    if (out / "pruned").is_file():
        return "pruned"
    return "todo"


def _launch(config: str, s: Sweep, t: Trial, gpus: list[str] | None) -> subprocess.Popen:
    t.out.mkdir(parents=True, exist_ok=True)
    (t.out / "trial.json").write_text(json.dumps({"index": t.index, "settings": t.settings}))
    cmd = [sys.executable, "-m", "dsft", "train", config, *trial_overrides(s, t.settings, t.out)]
    if s.nproc > 1:
        cmd += ["--nproc", str(s.nproc)]
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    log = (t.out / "trial.log").open("a")
    # its own session: a pruning SIGTERM reaches torchrun and all its ranks
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _gpu_slots(s: Sweep) -> list[list[str] | None]:
    """Disjoint GPU sets for parallel trials (None = no GPUs to split)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # no usable CUDA: the common CPU case
        n = 0
    ids = visible.split(",") if visible else [str(i) for i in range(n)]
    if not n or not ids:
        return [None] * s.parallel
    per = max(len(ids) // s.parallel, 1)
    return [ids[i * per : (i + 1) * per] for i in range(min(s.parallel, len(ids)))]


def run_sweep(config: str, sweep_path: str, only: int | None = None) -> int:
    """Run (or continue) every unfinished trial, then write the ranked table.

    ``only``: run just this trial (a Slurm array task) and skip the table.
    """
    cfg = load_config(config)  # validate the base before any trial starts
    s = load_sweep(sweep_path)
    root = Path(cfg.output_dir)
    trials = make_trials(s, root)
    if only is not None:
        trials = [trials[only]]
    todo = [t for t in trials if trial_status(t.out) == "todo"]
    for t in trials:
        if t not in todo:
            print(f"sweep: trial {t.index} already {trial_status(t.out)}", flush=True)
    slots = _gpu_slots(s)
    free = list(range(len(slots)))
    running: dict[int, Trial] = {}
    stop: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        # Slurm's time limit (or a user) stops the sweep: each running trial saves a
        # checkpoint and exits; no new trial starts. The next invocation resumes them.
        stop.append(signum)
        for t in running.values():
            if t.proc is not None and t.proc.poll() is None:
                os.killpg(t.proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    while (todo and not stop) or running:
        while todo and free and not stop:
            t = todo.pop(0)
            slot = free.pop(0)
            print(f"sweep: trial {t.index} {t.settings}", flush=True)
            t.proc, t.started = _launch(config, s, t, slots[slot]), time.time()
            running[slot] = t
        time.sleep(1.0)
        for slot, t in list(running.items()):
            assert t.proc is not None
            if s.prune and t.proc.poll() is None:
                prune_if_worse(s, t, trials)
            rc = t.proc.poll()
            if rc is None:
                continue
            wall = time.time() - t.started
            (t.out / "wall.json").write_text(json.dumps({"seconds": round(wall, 1), "rc": rc}))
            status = trial_status(t.out)
            print(f"sweep: trial {t.index} {status} (exit {rc}, {wall:.0f}s)", flush=True)
            if status == "todo":
                print(f"sweep: trial {t.index} failed; see {t.out / 'trial.log'}", flush=True)
            del running[slot]
            free.append(slot)
    if stop:
        requeue_own_task(stop[0])
        return 75  # like a preempted run: the same command continues the sweep
    if only is not None:
        return 0
    table = write_results(config, s, root, trials)
    print(table, flush=True)
    return 0


def requeue_own_task(signum: int) -> None:
    """A Slurm array task stopped by its time-limit signal (USR1) puts itself back in the queue.

    SIGTERM (scancel) does not requeue: a cancelled sweep stays cancelled.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if signum != signal.SIGUSR1 or not job:
        return
    try:  # argv list: the job id comes from the environment
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        print(f"sweep: requeued Slurm job {job}", flush=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"sweep: could not requeue Slurm job {job}: {e}", flush=True)


def _final(summary: dict[str, Any], metric: str) -> float | None:
    """The trial's final value of ``metric``: ``val/<name>`` from its last validation, or
    ``bench/<task>/<metric>`` from its eval.benchmarks scores (the fine-tuned model's)."""
    if metric.startswith("bench/"):
        _, task, name = metric.split("/", 2)
        v = ((summary.get("benchmarks") or {}).get("tuned") or {}).get(task, {}).get(name)
    else:
        v = (summary.get("after") or {}).get("val", {}).get(metric.split("/", 1)[1])
    return float(v) if isinstance(v, int | float) else None


def _tokens_per_s(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [
        r["tokens_per_s"]
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("split") == "train" and "tokens_per_s" in r
    ]
    return statistics.median(vals) if vals else None


def results(s: Sweep, trials: list[Trial]) -> list[dict[str, Any]]:
    """One row per trial, ranked by the final metric (pruned and failed trials last)."""
    rows = []
    for t in trials:
        status = trial_status(t.out)
        summary = json.loads((t.out / "summary.json").read_text()) if status == "done" else {}
        curve = _val_curve(t.out, s.metric)
        best = min(curve.values()) if s.lower_is_better else max(curve.values()) if curve else None
        wall = (
            json.loads((t.out / "wall.json").read_text()) if (t.out / "wall.json").is_file() else {}
        )
        rows.append(
            {
                "trial": t.index,
                "status": status if status != "todo" else "failed",
                **t.settings,
                f"final {s.metric}": _final(summary, s.metric),
                f"best {s.metric}": best,
                "tokens/s": _tokens_per_s(t.out),
                "wall s": wall.get("seconds"),
            }
        )
    sign = 1 if s.lower_is_better else -1

    def rank_key(r: dict[str, Any]) -> tuple:
        v = r[f"final {s.metric}"]
        return (r["status"] != "done", sign * v if v is not None else math.inf)

    return sorted(rows, key=rank_key)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_results(config: str, s: Sweep, root: Path, trials: list[Trial]) -> str:
    """sweep.md, sweep.csv and best.yaml; returns the markdown table."""
    rows = results(s, trials)
    cols = list(rows[0])
    md = ["| rank | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [
        f"| {i + 1} | " + " | ".join(_fmt(r[c]) for c in cols) + " |" for i, r in enumerate(rows)
    ]
    table = "\n".join(md)
    (root / "sweep.md").write_text(f"# dsft sweep ({s.metric}, {s.method})\n\n{table}\n")
    with (root / "sweep.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    best = rows[0]
    if best["status"] == "done":
        # the resolved base config (absolute paths), so best.yaml works from anywhere
        base = to_dict(load_config(config))
        for key, value in trials[best["trial"]].settings.items():
            node = base
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        base["output_dir"] = str(root / "best_full")
        (root / "best.yaml").write_text(
            f"# best trial {best['trial']} of {sweep_label(s)}; the budget overrides are not"
            " applied: this is the full-length run\n" + yaml.safe_dump(base, sort_keys=False)
        )
    return table


def sweep_label(s: Sweep) -> str:
    return f"{s.method} sweep over {', '.join(s.parameters)} by {s.metric}"


def submit_slurm(config: str, sweep_path: str, script: str, sbatch_args: str = "") -> int:
    """Submit one array task per trial with ``script``; with ``--wait``, then write the table."""
    import shlex

    s = load_sweep(sweep_path)
    n = len(trial_settings(s))
    extra = shlex.split(sbatch_args)  # argv list: nothing goes through a shell
    cmd = ["sbatch", "--parsable", f"--array=0-{n - 1}", *extra, script, config, sweep_path]
    print("sweep: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    print(f"sweep: submitted array job {proc.stdout.strip()} ({n} trials)", flush=True)
    if "--wait" in extra or "-W" in extra:
        root = Path(load_config(config).output_dir)
        trials = make_trials(s, root)
        print(write_results(config, s, root, trials), flush=True)
    return 0


def main(ns: Any) -> int:
    """``dsft sweep BASE SWEEP`` (``--trial N``: one trial; ``--slurm``: a job array)."""
    if ns.slurm:
        return submit_slurm(ns.config, ns.sweep, ns.slurm_script, ns.sbatch_args)
    return run_sweep(ns.config, ns.sweep, ns.trial)
