"""``dsft bench``: dsft against TRL's SFTTrainer on identical work, in one run.

Both systems train the same randomly initialised Llama-shaped model on the same
tokens (dsft's tokenisation of the bundled generator's data, handed to TRL
pre-tokenised with its assistant mask), at the same max length, micro-batch, gradient
accumulation, precision, attention implementation and DeepSpeed JSON (the file dsft
writes for the run). Four systems:

  dsft          padded micro-batches (dsft's default)
  dsft-packed   data.packing=true (dsft's best)
  trl-default   SFTTrainer defaults (padded)
  trl-best      packing=True, packing_strategy="bfd" (implies padding_free=True)

After one warm-up run of each, rounds of [dsft, trl-default, dsft-packed, trl-best]
alternate ``--repeats`` times; each run's per-step figures skip its first
``--skip-steps`` steps, and the table shows medians over runs of per-run medians.

Per optimizer step and device: real (non-pad) tokens / wall time between consecutive
step ends; model FLOP/s = ((4·N + 2·N_t)·T + 12·L·d·Σtᵢ²) / step time (dsft.flops, the formula dsft logs: N
parameters, N_t trainable (= N here), T real tokens, L layers, d hidden size, tᵢ each sequence's real length —
per packed segment, not per row); MFU = that / peak (``--peak-tflops``, default 989 for
H100/H200 bf16, none on CPU). Peak memory: ``torch.cuda.max_memory_allocated`` on GPU,
the largest rank's peak RSS on CPU (sampled every 50 ms). Start-up: from launching the
command to its first optimizer step. Validation loss: the final weights of each run,
loaded here, token-weighted mean NLL over the response tokens of a fixed validation
file (the same code for every system).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dsft.distributed import local_launch_argv
from dsft.flops import PEAK_TFLOPS

SYSTEMS = ("dsft", "trl-default", "dsft-packed", "trl-best")
RATIOS = (("dsft", "trl-default"), ("dsft", "trl-best"), ("dsft-packed", "trl-best"))
FIGURES = (
    "tokens_per_s",
    "step_time",
    "tflops",
    "mfu",
    "peak_mem_gb",
    "startup_s",
    "val_loss",
)


def defaults(mode: str, dry_run: bool) -> dict[str, Any]:
    """Settings of a mode; ``--dry-run`` keeps the GPU path but substitutes tiny shapes."""
    if mode == "cpu":
        return dict(
            preset="tiny",
            max_len=512,
            scale=0.25,
            vocab=4096,
            precision="fp32",  # bf16 on CPU is emulated differently by dsft and Trainer
            nproc=2,
            micro_batch=4,
            packed_micro_batch=1,
            grad_accum=2,
            steps=30,
            repeats=3,
            prep_examples=20000,
            peak_tflops=0.0,
            train_examples=4000,
        )
    gpu = dict(
        preset="1b",
        max_len=4096,
        scale=1.0,
        vocab=32000,
        precision="bf16",
        nproc=1,
        micro_batch=4,
        packed_micro_batch=1,
        grad_accum=4,
        steps=40,
        repeats=3,
        prep_examples=100000,
        peak_tflops=PEAK_TFLOPS["H100"],
        train_examples=20000,
    )
    if dry_run:
        # bf16 stays (the DeepSpeed JSON and Trainer must agree on it), but bf16 on a CPU
        # is slow: few, short sequences.
        gpu.update(
            preset="tiny",
            max_len=128,
            micro_batch=2,
            grad_accum=2,
            scale=0.25,
            vocab=2048,
            steps=3,
            repeats=1,
            prep_examples=300,
            train_examples=400,
        )
    return gpu


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(cpu: bool, nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # the TRL runner is `python -m benchmarks.trl_run`: the checkout must be importable
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), *filter(None, [env.get("PYTHONPATH")])]
        ),
        # Same JIT-op cache for both systems (dsft sets this default itself).
        TORCH_EXTENSIONS_DIR=env.get(
            "TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")
        ),
    )
    if cpu:
        env.update(
            CUDA_VISIBLE_DEVICES="",
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)),
        )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def watch(cmd: list[str], env: dict[str, str], metrics: Path, log_path: Path) -> dict[str, float]:
    """Run ``cmd``; sample the peak RSS of its processes and when the first step row appears."""
    import psutil

    t0 = time.time()
    first_step = None
    peak: dict[int, int] = {}
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for p in [parent, *parent.children(recursive=True)]:
                    peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
            if first_step is None and _has_step(metrics):
                first_step = time.time() - t0
            time.sleep(0.05)
    if proc.returncode:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return {
        "wall_s": time.time() - t0,
        "startup_s": first_step if first_step is not None else float("nan"),
        "peak_rss_gb": max(peak.values(), default=0) / 2**30,
    }


def _has_step(metrics: Path) -> bool:
    try:
        text = metrics.read_text()
    except OSError:
        return False
    # dsft rows carry "split": "train"; the TRL runner writes only step rows
    return '"split": "train"' in text or ('"wall"' in text)


class Bench:
    """One benchmark: workspace, shared inputs, and a run of each system."""

    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.cfg = defaults(ns.mode, ns.dry_run)
        for key in (
            "steps",
            "repeats",
            "prep_examples",
            "nproc",
            "micro_batch",
            "packed_micro_batch",
            "grad_accum",
            "max_len",
            "train_examples",
        ):
            if getattr(ns, key, None) is not None:
                self.cfg[key] = getattr(ns, key)
        if ns.peak_tflops is not None:
            self.cfg["peak_tflops"] = ns.peak_tflops
        self.cfg["zero_stage"] = ns.zero_stage
        if ns.preset:
            self.cfg["preset"] = ns.preset
        self.cfg["lora_r"] = ns.lora_r  # 0: full fine-tuning; else LoRA r, all linear layers
        self.cfg["skip_steps"] = min(ns.skip_steps, max(self.cfg["steps"] - 2, 1))
        self.work = Path(ns.out)
        self.work.mkdir(parents=True, exist_ok=True)
        import torch

        self.cuda = torch.cuda.is_available() and ns.mode == "gpu" and not ns.dry_run
        self.cfg["attn_implementation"] = self._attention()
        # dsft's own choice (model.attn_implementation=auto: varlen on CUDA for packed rows)
        # unless --attn names one for both systems
        self.cfg["dsft_attn_implementation"] = ns.attn or "auto"
        self.dsft_attention: dict[str, str] = {}  # what each dsft system resolved to

    def _attention(self) -> str:
        """TRL's attention: its best available (flash-attn's varlen when installed)."""
        import importlib.util

        if self.ns.attn:
            return self.ns.attn
        if self.cuda and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"

    def lora(self) -> dict[str, Any] | None:
        """model.lora of the dsft runs (and the same adapters for TRL), or None."""
        r = self.cfg["lora_r"]
        if not r:
            return None
        return {"enabled": True, "r": r, "alpha": 2 * r, "dropout": 0.0,
                "target_modules": ["all-linear"]}  # fmt: skip

    # ------------------------------------------------------------------ inputs
    def build_inputs(self) -> None:
        """Data files, tokenizer, model, the pre-tokenised dataset for TRL."""
        from benchmarks.chat_data import build_tokenizer, generate_rows, write_jsonl

        c, w = self.cfg, self.work
        n_train, n_val = c["train_examples"], 200 if not self.ns.dry_run else 40
        rows = generate_rows(n_train + n_val, seed=1, scale=c["scale"])
        self.train_path = write_jsonl(w / "train.jsonl", rows[:n_train])
        self.val_path = write_jsonl(w / "val.jsonl", rows[n_train:])
        if self.ns.reuse_model and (w / "model" / "config.json").is_file():
            from transformers import AutoTokenizer

            # the model (and its tokenizer) an earlier --inputs-only run built here
            tok = AutoTokenizer.from_pretrained(w / "model")
            self.model_dir = w / "model"
        else:
            tok = build_tokenizer(w / "tokenizer", rows[:2000], c["vocab"])
            self.model_dir = self._build_model(tok)
        self.tokenizer = tok
        self._pretokenize(tok)

    def _build_model(self, tok: Any) -> Path:
        import torch

        from benchmarks.model_presets import PRESETS
        from dsft.synthetic import build_model_dir

        c = self.cfg
        return build_model_dir(
            self.work / "model",
            tokenizer=tok,
            shape=PRESETS[c["preset"]],
            max_position_embeddings=max(c["max_len"], 4096),
            rope_theta=500000.0,
            # on a GPU: initialised there, saved in bf16 (an 8B model in seconds, 16 GB)
            device="cuda" if self.cuda else None,
            dtype=torch.bfloat16 if self.cuda else None,
        )

    def _pretokenize(self, tok: Any) -> None:
        c, w = self.cfg, self.work
        n_train, n_val = c["train_examples"], 200 if not self.ns.dry_run else 40
        import pyarrow as pa
        from datasets import Dataset

        from benchmarks.chat_data import length_stats
        from dsft.data.formats import load_examples
        from dsft.data.tokenize import encode

        enc = encode(tok, load_examples([str(self.train_path)], "auto", {}, "error").examples)
        spans = list(zip(enc.offsets[:-1], enc.offsets[1:], strict=True))
        lengths = np.diff(enc.offsets)
        table = pa.table(
            {
                "input_ids": pa.array(
                    [enc.ids[a:b].tolist() for a, b in spans], pa.list_(pa.int64())
                ),
                "assistant_masks": pa.array(
                    [enc.trained[a:b].astype(np.int8).tolist() for a, b in spans],
                    pa.list_(pa.int8()),
                ),
            }
        )
        # A given fingerprint: Dataset.from_dict would hash the table with dill, which fails
        # on Python 3.12 with pyarrow 24 ("Can't pickle <class 'MonthDayNano'>"); TRL's own
        # map calls fall back to random fingerprints when hashing fails.
        Dataset(table, fingerprint="dsft-bench-pretokenized").save_to_disk(str(w / "pretokenized"))
        self.data_stats = {
            "train_examples": n_train,
            "val_examples": n_val,
            "token_lengths": length_stats(lengths),
            "trained_fraction": float(enc.trained.mean()),
            "truncated_fraction": float((lengths > c["max_len"]).mean()),
        }
        self.val_examples = [
            x
            for x in (
                _tokenized(tok, e, c["max_len"])
                for e in load_examples([str(self.val_path)], "auto", {}, "error").examples
            )
            if x.num_target_tokens
        ]
        from transformers import AutoConfig

        from dsft import planner
        from dsft.config import LoraConfig
        from dsft.flops import FlopCounter

        mc = AutoConfig.from_pretrained(self.model_dir)
        lora = self.lora()
        self.facts = planner.model_facts(self.model_dir, lora=LoraConfig(**lora) if lora else None)
        self.n_params = self.facts.total_params
        self.n_trainable = self.facts.trainable_params
        self.model_config = mc
        self.flops = FlopCounter(self.n_params, self.n_trainable, mc, 0.0)
        log(
            f"inputs: {n_train} train / {n_val} val examples, model {c['preset']} "
            f"({self.n_params / 1e6:.2f}M params), tokens p50 "
            f"{self.data_stats['token_lengths']['p50']:.0f} p90 "
            f"{self.data_stats['token_lengths']['p90']:.0f}, max_len {c['max_len']}"
        )

    # ------------------------------------------------------------------ systems
    def _dsft_config(self, out: Path, packed: bool, seed: int = 0) -> Path:
        c = self.cfg
        tree = {
            "output_dir": str(out),
            "model": {
                "path": str(self.model_dir),
                "attn_implementation": c["dsft_attn_implementation"],
                **({"lora": self.lora()} if self.lora() else {}),
            },
            "data": {
                "path": [str(self.train_path)],
                "val_path": [str(self.val_path)],
                "test_fraction": 0.0,
                "max_len": c["max_len"],
                "packing": packed,
                "cache_dir": str(self.work / "dsft-cache"),
            },
            "train": {
                "max_steps": c["steps"],
                "micro_batch": c["packed_micro_batch"] if packed else c["micro_batch"],
                "grad_accum": c["grad_accum"],
                "lr": self.ns.lr,
                # No warmup: dsft's warmup gives step i the LR (i+1)/w, transformers' i/w (its
                # first step has LR 0), so only w=0 gives both the same schedule.
                "warmup_steps": 0,
                "schedule": "cosine",
                "precision": c["precision"],
                "max_grad_norm": 1.0,
                "seed": seed,
            },
            "deepspeed": {"zero_stage": c["zero_stage"]},
            "eval": {"generate": False, "before_training": False, "micro_batch": 8},
            # the export is what the validation loss is measured on
            "checkpoint": {"save_final": False, "export": self.ns.val_loss},
            "logging": {
                "every": 1,
                "progress": False,
                "report_to": [],
                "peak_tflops": c["peak_tflops"],
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    def run_dsft(self, out: Path, packed: bool, seed: int) -> dict[str, Any]:
        cfg = self._dsft_config(out, packed, seed)
        cmd = local_launch_argv(
            self.cfg["nproc"], ["dsft", "train", str(cfg), "--no-resume", "--overwrite"]
        )
        env = child_env(not self.cuda, self.cfg["nproc"])
        w = watch(cmd, env, out / "metrics.jsonl", out.parent / f"{out.name}.log")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["split"] == "train"]
        world = self.cfg["nproc"]
        steps = []
        for prev, r in itertools.pairwise(rows):
            dt = r["time"] - prev["time"]
            tokens = r["tokens_per_s"] * r["step_time"] / world
            flops = r["tflops"] * 1e12 * r["step_time"] / world
            steps.append({"step": r["step"], "dt": dt, "tokens": tokens, "flops": flops})
        summary = json.loads((out / "summary.json").read_text())
        mem = rows[-1].get("gpu_mem_gb") if self.cuda else w["peak_rss_gb"]
        resolved = yaml.safe_load((out / "config.yaml").read_text())["model"]
        self.dsft_attention["dsft-packed" if packed else "dsft"] = (
            f"{resolved['attn_implementation']}"
            + (f" + {resolved['kernels']}" if resolved.get("kernels") not in (None, "none") else "")
            + (f" + compile {resolved['compile']}" if resolved.get("compile") else "")
        )
        return {
            **w,
            "steps": steps,
            "peak_mem_gb": mem,
            "final": str(out / "final"),
            "own_val_loss": summary["after"]["val"].get("loss"),
            "ds_config": str(out / "ds_config.json"),
        }

    def run_trl(self, out: Path, best: bool, ds_config: Path, seed: int) -> dict[str, Any]:
        c = self.cfg
        spec = {
            "out": str(out),
            "model": str(self.model_dir),
            "train": str(self.work / "pretokenized"),
            "precision": c["precision"],
            "attn_implementation": c["attn_implementation"],
            "mode": "best" if best else "default",
            "max_len": c["max_len"],
            "micro_batch": c["packed_micro_batch"] if best else c["micro_batch"],
            "grad_accum": c["grad_accum"],
            "steps": c["steps"],
            "lr": self.ns.lr,
            "warmup_steps": 0,  # as dsft's config (see there)
            "max_grad_norm": 1.0,
            "seed": seed,
            "deepspeed": None if self.ns.trl_no_deepspeed else str(ds_config),
            "lora": self.lora(),
            # trl-best: TRL's own best settings, Liger's kernels included where they run
            "liger": best and self.cuda and _has("liger_kernel"),
        }
        out.mkdir(parents=True, exist_ok=True)
        spec_path = out.parent / f"{out.name}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cmd = local_launch_argv(c["nproc"], ["benchmarks.trl_run", str(spec_path)])
        env = child_env(not self.cuda, c["nproc"])
        w = watch(cmd, env, out / "metrics.jsonl", out.parent / f"{out.name}.log")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [
            {
                "step": r["step"],
                "dt": r["wall"] - prev["wall"],
                "tokens": r["tokens"],
                "flops": self.flops.flops(r["tokens"], r["sq"]),
            }
            for prev, r in itertools.pairwise(rows)
        ]
        summary = json.loads((out / "summary.json").read_text())
        mem = summary.get("gpu_mem_gb") if self.cuda else w["peak_rss_gb"]
        return {**w, "steps": steps, "peak_mem_gb": mem, "final": str(out / "final"), **summary}

    def run_system(self, name: str, tag: str, seed: int = 0) -> dict[str, Any]:
        """One run of ``name``; ``seed`` sets the data order (the same for every system)."""
        out = self.work / "runs" / f"{name}-{tag}"
        shutil.rmtree(out, ignore_errors=True)  # a stale metrics.jsonl would fake the start-up
        if name.startswith("dsft"):
            res = self.run_dsft(out, name == "dsft-packed", seed)
            self.ds_config = Path(res["ds_config"])
        else:
            res = self.run_trl(out, name == "trl-best", self._ds_config(), seed)
        t = time.time()
        res["val_loss"] = self.val_loss(Path(res["final"])) if self.ns.val_loss else None
        log(f"{name} {tag}: ran {res['wall_s']:.1f}s, validation {time.time() - t:.1f}s")
        return res

    def _ds_config(self) -> Path:
        if getattr(self, "ds_config", None) is None:  # TRL first: have dsft write its JSON
            self.ds_config = self.work / "ds_config.json"
            from dsft.config import batch_shape, load_config
            from dsft.ds_config import deepspeed_config

            cfg = load_config(self._dsft_config(self.work / "runs" / "plan", False))
            plan = batch_shape(cfg.train, self.cfg["nproc"])
            self.ds_config.write_text(json.dumps(deepspeed_config(cfg, plan), indent=2))
        return self.ds_config

    def val_loss(self, model_dir: Path) -> float:
        """Token-weighted mean NLL over the response tokens of the validation file."""
        import torch
        from transformers import AutoModelForCausalLM

        from dsft.data.collate import collate
        from dsft.eval.evaluator import token_stats

        dev = "cuda" if self.cuda else "cpu"
        dtype = torch.bfloat16 if self.cfg["precision"] == "bf16" and self.cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=self.cfg["attn_implementation"]
        ).to(dev)
        model.eval()
        nll_sum, count = 0.0, 0
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for i in range(0, len(self.val_examples), 8):
                batch = collate(self.val_examples[i : i + 8], pad)
                batch.pop("lengths")
                batch = {k: v.to(dev) for k, v in batch.items()}
                labels = batch.pop("labels")
                nll, _, n = token_stats(model(**batch, use_cache=False).logits, labels)
                nll_sum += float(nll)
                count += n
        del model
        if self.cuda:
            torch.cuda.empty_cache()
        return nll_sum / max(count, 1)

    # ------------------------------------------------------------------ figures
    def figures(self, res: dict[str, Any]) -> dict[str, Any]:
        """Per-run medians over the measured steps (the first skip_steps are warm-up)."""
        steps = [s for s in res["steps"] if s["step"] > self.cfg["skip_steps"]] or res["steps"]
        dt = np.array([s["dt"] for s in steps])
        tokens = np.array([s["tokens"] for s in steps])
        flops = np.array([s["flops"] for s in steps])
        peak = self.cfg["peak_tflops"] * 1e12
        return {
            "tokens_per_s": float(np.median(tokens / dt)),
            "step_time": float(np.median(dt)),
            "tflops": float(np.median(flops / dt)) / 1e12,
            "mfu": float(np.median(flops / dt)) / peak if peak else None,
            "peak_mem_gb": res["peak_mem_gb"],
            "startup_s": res["startup_s"],
            "val_loss": res["val_loss"],
            "tokens_per_step": float(np.median(tokens)),
            # NeMo AutoModel's count for LoRA: 4·N·T (no weight gradients, no attention term)
            "mfu_4nt": float(np.median(4 * self.n_params * tokens / dt)) / peak if peak else None,
            "predicted_step_time": self.predicted_step_time(float(np.median(tokens))),
        }

    def predicted_step_time(self, tokens: float) -> float | None:
        """The planner's time for ``tokens`` tokens per device at dsft.flops.KERNEL_EFFICIENCY
        (what `dsft plan` and the "auto" plan assume), for the measured step to check it."""
        from dsft import planner
        from dsft.flops import KERNEL_EFFICIENCY

        peak = self.cfg["peak_tflops"]
        if not peak:
            return None
        hw = planner.Hardware(gpus_per_node=1, nodes=1, gpu_mem=0)
        w = planner.Workload(seq=self.cfg["max_len"], global_batch=1)
        return planner.epoch_seconds(self.facts, hw, w, int(tokens), peak, KERNEL_EFFICIENCY)


def _tokenized(tok: Any, example: Any, max_len: int) -> Any:
    from dsft.data.tokenize import tokenize_example

    return tokenize_example(tok, example, max_len)


def _param_count(config: Any) -> int:
    """Parameters of the model ``config`` describes (built on the meta device, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsft.model import count_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)[0]


def environment(cuda: bool) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in (
        "dsft",
        "torch",
        "transformers",
        "deepspeed",
        "trl",
        "peft",
        "datasets",
        "accelerate",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "versions": versions,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({cpu})",
        "flash_attn": _has("flash_attn"),
    }
    if cuda:
        env["cuda"] = torch.version.cuda
    return env


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return format(v, spec)


MFU_FORMULA = (
    "MFU = (6·N·T + 12·L·d·Σtᵢ²) / step time / (peak × devices); N parameters, T real "
    "(non-pad) tokens of the step, L layers, d hidden size, tᵢ the real length of each "
    "sequence (each packed segment)"
)


def table(result: dict[str, Any]) -> str:
    """The markdown table of medians and ratios."""
    med, c = result["medians"], result["settings"]
    per = "per device" if c["nproc"] == 1 else f"per rank ({c['nproc']} ranks each)"
    mem = "peak GPU mem GiB" if result["cuda"] else "peak RSS GiB (largest rank)"
    head = (
        f"| system | tokens/s {per} | step time s | TFLOP/s | MFU | {mem} "
        "| start → 1st step s | val loss |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name in SYSTEMS:
        if name not in med:
            continue
        m = med[name]
        lines.append(
            f"| {name} | {_fmt(m['tokens_per_s'], ',.0f')} | {_fmt(m['step_time'], '.3f')} "
            f"| {_fmt(m['tflops'], '.4g')} | {_fmt(m['mfu'], '.1%')} "
            f"| {_fmt(m['peak_mem_gb'], '.2f')} | {_fmt(m['startup_s'], '.1f')} "
            f"| {_fmt(m['val_loss'], '.4f')} |"
        )
    for a, b in RATIOS:
        r = result["ratios"].get(f"{a} / {b}")
        if r is None:
            continue
        x = {k: _fmt(r[k], ".2f") + ("×" if r[k] is not None else "") for k in FIGURES}
        lines.append(
            f"| **{a} / {b}** | {x['tokens_per_s']} | {x['step_time']} | {x['tflops']} "
            f"| {x['mfu']} | {x['peak_mem_gb']} | {x['startup_s']} "
            f"| {_fmt(r['val_loss'], '+.4f')} (diff) |"
        )
    prep = result.get("prep")
    lora = c.get("lora_r")
    notes = [
        "",
        "Planner check (`dsft.flops.KERNEL_EFFICIENCY` = "
        f"{result.get('kernel_efficiency', 'n/a')}): predicted vs measured step time",
        "",
        "| system | measured s | predicted s | error |" + (" MFU (4·N·T) |" if lora else ""),
        "|---|---|---|---|" + ("---|" if lora else ""),
    ]
    for name in SYSTEMS:
        if name not in med:
            continue
        m = med[name]
        meas, pred = m.get("step_time"), m.get("predicted_step_time")
        err = (pred - meas) / meas if meas and pred else None
        notes.append(
            f"| {name} | {_fmt(meas, '.4g')} | {_fmt(pred, '.4g')} | {_fmt(err, '+.0%')} |"
            + (f" {_fmt(m.get('mfu_4nt'), '.1%')} |" if lora else "")
        )
    notes += [
        "",
        f"{c['mode']} mode{' (dry run)' if c['dry_run'] else ''}: model {c['preset']} "
        f"({result['params'] / 1e6:.2f}M params"
        f"{f', LoRA r={lora} all-linear' if lora else ', full fine-tuning'}), {c['precision']}, "
        f"max_len {c['max_len']}, attention: {result.get('dsft_attention') or 'auto'}; "
        f"TRL {c['attn_implementation']}; ZeRO-{c['zero_stage']} (the same DeepSpeed JSON for both), "
        f"{c['nproc']} rank(s) each, micro-batch {c['micro_batch']} (packed: "
        f"{c['packed_micro_batch']} rows) × accumulation {c['grad_accum']}; {c['steps']} steps "
        f"per run, first {c['skip_steps']} skipped; medians of {c['repeats']} alternating runs; "
        f"device: {result['environment']['device']}.",
        MFU_FORMULA + f"; peak {c['peak_tflops'] or 'n/a'} TFLOP/s per device.",
        "Val loss over the rounds (data-order seed r in round r, the same for every system), "
        "min–max: "
        + ", ".join(
            f"{n} {med[n]['val_loss_range'][0]:.4f}–{med[n]['val_loss_range'][1]:.4f}"
            for n in SYSTEMS
            if n in med and med[n].get("val_loss_range")
        )
        + ".",
        "Ratios: tokens/s, TFLOP/s, MFU > 1 favour dsft; step time, memory, start-up < 1 "
        "favour dsft (step times compare different tokens per step across modes); val loss: "
        "the difference.",
    ]
    if prep:
        from benchmarks.prep import table as prep_table

        notes += ["", prep_table(prep)]
    return "\n".join(lines + notes)


def run(ns: argparse.Namespace) -> int:
    import torch

    if ns.mode == "gpu" and not ns.dry_run and not torch.cuda.is_available():
        print(
            "dsft bench: --mode gpu needs a CUDA GPU; on a CPU use --mode gpu --dry-run "
            "(the GPU path with tiny shapes) or --mode cpu",
            file=sys.stderr,
        )
        return 2
    bench = Bench(ns)
    c = bench.cfg
    systems = [s for s in SYSTEMS if s in ns.systems.split(",")]
    if any(s.startswith("trl") for s in systems) and not _has("trl"):
        print(
            "dsft bench: TRL is not installed (pip install 'trl>=1.16,<2'); "
            "or run --systems dsft,dsft-packed",
            file=sys.stderr,
        )
        return 2
    import datasets

    datasets.disable_progress_bars()
    result: dict[str, Any] = {
        "settings": {
            **c,
            "mode": ns.mode,
            "dry_run": ns.dry_run,
            "lr": ns.lr,
            "val_loss": ns.val_loss,
        },
        "cuda": bench.cuda,
        "environment": environment(bench.cuda),
        "mfu_formula": MFU_FORMULA,
    }
    bench.build_inputs()
    if ns.inputs_only:  # the GPU check builds them once, profiles, then benches on them
        log(f"inputs only: {bench.model_dir}, {bench.train_path}")
        return 0
    result["params"] = bench.n_params
    result["trainable_params"] = bench.n_trainable
    from dsft.flops import KERNEL_EFFICIENCY

    result["kernel_efficiency"] = KERNEL_EFFICIENCY
    result["data"] = bench.data_stats
    if c["prep_examples"] and "trl-default" in systems:
        from benchmarks.chat_data import generate_rows, write_jsonl
        from benchmarks.prep import run_prep

        path = write_jsonl(
            bench.work / "prep.jsonl", generate_rows(c["prep_examples"], 7, c["scale"])
        )
        from dsft.data.build import usable_cores

        workers = tuple(
            sorted({int(x) for x in (ns.prep_workers or f"1,{usable_cores()}").split(",")})
        )
        result["prep"] = run_prep(
            path, bench.tokenizer, c["max_len"], ns.prep_repeats or 1, lambda m: log(m), workers
        )
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    if ns.warmup:
        for s in systems:
            log(f"warm-up: {s}")
            bench.run_system(s, "warmup")
    for r in range(c["repeats"]):
        for s in systems:
            # round r: data order seed r for every system, so the spread of the final
            # validation losses over rounds shows the noise the systems are compared within
            res = bench.run_system(s, f"r{r}", seed=r)
            fig = bench.figures(res)
            runs[s].append({**fig, "startup_wall_s": res["wall_s"], "steps": res["steps"]})
            log(
                f"round {r + 1}/{c['repeats']} {s}: {fig['tokens_per_s']:,.0f} tokens/s, "
                f"step {fig['step_time']:.3f}s, start {fig['startup_s']:.1f}s, "
                f"val loss {_fmt(fig['val_loss'], '.4f')}"
            )
    result["runs"] = runs
    result["dsft_attention"] = ", ".join(f"{k} {v}" for k, v in bench.dsft_attention.items())
    med: dict[str, dict[str, Any]] = {}
    for s, rs in runs.items():
        med[s] = {}
        for k in (*FIGURES, "tokens_per_step", "mfu_4nt", "predicted_step_time"):
            vals = [x[k] for x in rs if x[k] is not None]
            med[s][k] = float(np.median(vals)) if vals else None
        losses = [x["val_loss"] for x in rs if x["val_loss"] is not None]
        med[s]["val_loss_range"] = [min(losses), max(losses)] if losses else None
    result["medians"] = med
    result["ratios"] = {}
    for a, b in RATIOS:
        if a in med and b in med:
            result["ratios"][f"{a} / {b}"] = {
                k: (
                    (med[a][k] - med[b][k] if k == "val_loss" else med[a][k] / med[b][k])
                    if med[a][k] is not None and med[b][k]
                    else None
                )
                for k in FIGURES
            }
    write_result(bench.work, result, table(result))
    return 0


def write_result(work: Path, result: dict[str, Any], text: str) -> None:
    """``<work>/bench.json`` (every figure, the table in it) and ``bench.md``; print the table."""
    result["table"] = text
    (work / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (work / "bench.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {work / 'bench.json'}, {work / 'bench.md'}")


def main(argv: list[str] | None = None) -> int:
    """``dsft bench ...`` / ``python -m benchmarks ...``; ``--mode vlm``: benchmarks/vlm.py."""
    args = sys.argv[1:] if argv is None else argv
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    if mode.parse_known_args(args)[0].mode == "vlm":  # its own options
        from benchmarks.vlm import main as vlm_main

        return vlm_main(args)
    p = argparse.ArgumentParser(
        prog="dsft bench", description="dsft vs TRL SFTTrainer on identical work (tokens/s, MFU...)"
    )
    add_arguments(p)
    return run(p.parse_args(args))


def add_arguments(b: Any) -> None:
    b.add_argument(
        "--mode",
        choices=("cpu", "gpu", "vlm"),
        default="cpu",
        help="vlm: image-text SFT against TRL's VLM path (benchmarks/vlm.py, its own options)",
    )
    b.add_argument(
        "--dry-run", action="store_true", help="gpu mode with tiny shapes (runs on a CPU)"
    )
    b.add_argument("--out", default="runs/bench", help="work directory (bench.json, bench.md)")
    b.add_argument("--steps", type=int, help="optimizer steps per run")
    b.add_argument("--skip-steps", type=int, default=3, help="first steps of a run not measured")
    b.add_argument("--repeats", type=int, help="alternating rounds (medians over them)")
    b.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip warm-up runs")
    b.add_argument("--prep-examples", type=int, help="data-prep benchmark size (0 = skip)")
    b.add_argument("--prep-repeats", type=int, default=1)
    b.add_argument(
        "--prep-workers", help="data.workers settings for the prep part (default: 1,<cores>)"
    )
    b.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU")
    b.add_argument("--nproc", type=int, help="ranks per system")
    b.add_argument("--micro-batch", type=int, help="sequences per micro-batch (padded modes)")
    b.add_argument("--packed-micro-batch", type=int, help="packed rows per micro-batch")
    b.add_argument("--grad-accum", type=int)
    b.add_argument("--max-len", type=int)
    b.add_argument("--train-examples", type=int, help="generated training examples")
    b.add_argument("--zero-stage", type=int, default=2)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument(
        "--attn",
        help="attention implementation of both systems (default: dsft auto, TRL flash-attn "
        "if installed, else sdpa)",
    )
    b.add_argument("--preset", choices=("tiny", "1b", "8b"), help="model shape (default: mode's)")
    b.add_argument(
        "--inputs-only", action="store_true", help="build data, tokenizer and model, then stop"
    )
    b.add_argument(
        "--reuse-model", action="store_true", help="keep a model already built under --out"
    )
    b.add_argument(
        "--lora-r", type=int, default=0, help="LoRA rank on all linear layers (0 = full FT)"
    )
    b.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    b.add_argument(
        "--no-val-loss",
        dest="val_loss",
        action="store_false",
        help="skip exporting each run's weights and measuring their validation loss",
    )
    b.add_argument(
        "--trl-no-deepspeed", action="store_true", help="run TRL without the DeepSpeed JSON"
    )
