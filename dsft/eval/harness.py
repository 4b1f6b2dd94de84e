"""Benchmark evaluation through lm-evaluation-harness: standard tasks (MMLU, GSM8K, IFEval,
HellaSwag, ARC...) or the user's own YAML tasks, on a trained model and on its base.

dsft reimplements no task or metric: it hands lm-eval a model it loaded itself (an export,
a run's best/final export, a Hub name, or a LoRA adapter on its base) and reports lm-eval's
own JSON. What dsft adds:

- **Sharding.** On several ranks lm-eval's requests are dealt out by data-parallel rank
  (its ``rank``/``world_size`` hooks) and every document's metric values are gathered once on
  rank 0, which aggregates them: the scores are those of a one-rank run.
- **The chat template training used.** A chat model (its tokenizer has a template: dsft's
  exports save the one it trained with) is prompted through it by default.
- **Offline tasks.** Relative ``data_files`` in a task folder's YAML resolve against the YAML's
  own folder (lm-eval would resolve them against the working directory), so a task folder can
  be moved and shipped; Hub tasks load from the Hugging Face cache with ``HF_HUB_OFFLINE=1``.
  A task that is neither known, cached nor reachable is a one-line error naming it.
- **Base vs fine-tuned.** :func:`compare` lines up the two score sets (task, metric, base,
  tuned, delta) and flags a drop beyond ``max_drop`` as forgetting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft import distributed
from dsft.errors import ConfigError, DataError, HubError

log = logging.getLogger("dsft")

EXTRA_HINT = "pip install 'dsft[eval]'"
# Metrics that are bookkeeping in lm-eval's results, not scores.
_NOT_SCORES = ("alias", "samples", "name", "sample_len", "sample_count")


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a config error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(
            [f"eval.benchmarks / dsft eval --tasks need lm-evaluation-harness: {EXTRA_HINT} ({e})"]
        ) from e
    return lm_eval


@dataclass
class HarnessOptions:
    """What to run and how (the ``dsft eval --tasks`` options; ``eval.benchmarks`` in a run)."""

    tasks: list[str]
    limit: float | None = None  # documents per task (a fraction when < 1), None = all
    num_fewshot: int | None = None  # None = each task's own default
    batch_size: int = 8
    apply_chat_template: bool | None = None  # None = on when the tokenizer has a template
    include_path: str | None = None  # a folder of the user's own YAML tasks
    backend: str = "auto"  # auto | hf | vllm
    max_new_tokens: int | None = None  # generate_until tasks: cap on generated tokens
    seed: int = 1234

    def key(self) -> dict[str, Any]:
        """What changes the scores (the base model's cache key uses it)."""
        return {
            "tasks": sorted(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "apply_chat_template": self.apply_chat_template,
            "include_path": _folder_digest(self.include_path) if self.include_path else None,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


def options(b: Any) -> HarnessOptions:
    """HarnessOptions from the run's ``eval.benchmarks`` (config.BenchmarksConfig)."""
    return HarnessOptions(
        tasks=list(b.tasks),
        limit=b.limit or None,
        num_fewshot=None if b.num_fewshot < 0 else b.num_fewshot,
        batch_size=b.batch_size,
        apply_chat_template={"auto": None, "on": True, "off": False}[b.apply_chat_template],
        include_path=b.include_path or None,
        backend=b.backend,
        max_new_tokens=b.max_new_tokens or None,
    )


def _folder_digest(folder: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def choose_backend(backend: str) -> str:
    """``auto``: vLLM when it is installed and a GPU is present, else batched HF generation."""
    if backend not in ("auto", "hf", "vllm"):
        raise ConfigError([f"--backend {backend}: choose auto, hf or vllm"])
    has_vllm = _importable("vllm")
    if backend == "vllm" and not has_vllm:
        raise ConfigError([f"--backend vllm needs vLLM: pip install 'dsft[vllm]' ({EXTRA_HINT})"])
    if backend == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
    return backend


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------ task folders


class _Tagged:
    """A YAML node with a custom tag (lm-eval's ``!function``), kept as written."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


def _yaml_codecs() -> tuple[Any, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Loader.add_multi_constructor(
        "!", lambda loader, suffix, node: _Tagged(f"!{suffix}", loader.construct_scalar(node))
    )
    Dumper.add_representer(_Tagged, lambda d, t: d.represent_scalar(t.tag, t.value))
    return Loader, Dumper


def _absolute(files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list, or a split -> path(s) mapping) made absolute."""
    if isinstance(files, dict):
        return {k: _absolute(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, folder) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        return str((folder / files).resolve())
    return files


def _resolved_tasks_folder(include_path: str, into: Path) -> str:
    """A copy of the user's task folder whose YAML files name their local ``data_files``
    by absolute path, resolved against each YAML's own folder."""
    import yaml

    src = Path(include_path)
    if not src.is_dir():
        raise ConfigError([f"--include-path {include_path}: not a folder of lm-eval YAML tasks"])
    shutil.copytree(src, into, dirs_exist_ok=True)
    loader, dumper = _yaml_codecs()
    for y in into.rglob("*.yaml"):
        try:
            doc = yaml.load(y.read_text(encoding="utf-8"), Loader=loader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ConfigError([f"{src / y.relative_to(into)}: not valid YAML ({e})"]) from e
        kwargs = doc.get("dataset_kwargs") if isinstance(doc, dict) else None
        if isinstance(kwargs, dict) and "data_files" in kwargs:
            folder = (src / y.relative_to(into)).parent
            kwargs["data_files"] = _absolute(kwargs["data_files"], folder)
            y.write_text(yaml.dump(doc, Dumper=dumper, sort_keys=False), encoding="utf-8")
    return str(into)


def prepare_tasks(opts: HarnessOptions, workdir: Path) -> Any:
    """lm-eval's task index, with the user's folder (its data paths resolved) added; every
    named task checked before any model loads. When the folder holds every task asked for,
    lm-eval's own thousands of task files are not indexed (seconds saved per call)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if opts.include_path:
        path = _resolved_tasks_folder(opts.include_path, workdir / "tasks")
        own = TaskManager(include_path=path, include_defaults=False)
        if all(t in set(own.all_tasks) for t in opts.tasks):
            return own
        manager = TaskManager(include_path=path)
    else:
        manager = TaskManager()
    check_tasks(opts.tasks, manager)
    return manager


def check_tasks(tasks: list[str], manager: Any) -> None:
    """Every named task (or group) must be known to lm-eval or the task folder."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(
            [
                f"task {t!r}: not an lm-eval task or group, nor in --include-path "
                "(list them with `lm_eval ls tasks`)"
                for t in unknown
            ]
        )


@contextlib.contextmanager
def _datasets_through_hub_cache() -> Iterator[None]:
    """While lm-eval loads its tasks, a Hub dataset name is read from the dataset's snapshot
    in the Hugging Face cache (downloaded first when the Hub is reachable), through
    ``dsft.hub`` like every other Hub name; so a cached task works with HF_HUB_OFFLINE=1 and
    a missing one is a one-line error naming the dataset."""
    import datasets

    from dsft.config import is_hub_id
    from dsft.hub import snapshot

    original = datasets.load_dataset

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and is_hub_id(path) and not Path(path).exists():
            path = snapshot(path, "dataset", kwargs.pop("revision", None))
        return original(path, *args, **kwargs)

    datasets.load_dataset = load
    try:
        yield
    finally:
        datasets.load_dataset = original


# ------------------------------------------------------------------ the sharded model


def _sharded_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int, **kw: Any) -> Any:
    """lm-eval's HF model around an already loaded model, dealing requests by rank."""
    from lm_eval.models.huggingface import HFLM

    class Sharded(HFLM):
        """HFLM whose rank hooks use dsft's process group (gloo or NCCL): lm-eval shards the
        documents by rank, pads the request lists to equal length, and gathers per-document
        metric values on rank 0."""

        def __init__(self) -> None:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
            self._rank = distributed.get_rank()
            self._world_size = distributed.get_world_size()

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self) -> None:
            distributed.barrier()

    return Sharded()


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    opts: HarnessOptions,
    manager: Any,
    model_path: str | None = None,
) -> dict[str, Any] | None:
    """lm-eval's results for ``opts.tasks`` (on rank 0; None on other ranks); ``manager``
    from :func:`prepare_tasks`."""
    lm_eval = require_lm_eval()
    chat = opts.apply_chat_template
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    backend = choose_backend(opts.backend)
    if backend == "vllm":  # a path, not a loaded model: vLLM loads its own copy
        from lm_eval.models.vllm_causallms import VLLM

        lm: Any = VLLM(pretrained=model_path, batch_size=opts.batch_size)
    else:
        lm = _sharded_lm(model, tokenizer, opts.batch_size)
    gen_kwargs = {"max_gen_toks": opts.max_new_tokens} if opts.max_new_tokens else None
    try:
        with _datasets_through_hub_cache():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(opts.tasks),
                num_fewshot=opts.num_fewshot,
                limit=opts.limit,
                apply_chat_template=chat,
                task_manager=manager,
                gen_kwargs=gen_kwargs,
                log_samples=False,
                random_seed=opts.seed,
                numpy_random_seed=opts.seed,
                torch_random_seed=opts.seed,
                fewshot_random_seed=opts.seed,
                bootstrap_iters=0,
            )
    except HubError as e:
        raise HubError(f"tasks {','.join(opts.tasks)}: {e}") from None
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise DataError(
            f"tasks {','.join(opts.tasks)}: a task's dataset is neither in the Hugging Face "
            f"cache nor reachable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    except Exception as e:  # lm-eval wraps dataset errors in its own types
        if "offline" in str(e).lower() or "couldn't find" in str(e).lower():
            raise DataError(
                f"tasks {','.join(opts.tasks)}: a task's dataset is neither cached nor "
                f"reachable ({str(e).splitlines()[0][:200]})"
            ) from e
        raise
    if results is not None:
        results["config"] = {
            k: v for k, v in results.get("config", {}).items() if k in ("batch_size", "limit")
        }
        results["dsft"] = {"apply_chat_template": chat, "backend": backend, "ranks": lm.world_size}
    return results


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (stderr and bookkeeping left out;
    lm-eval's ``acc,none`` becomes ``acc``, a filter other than none stays: ``exact_match,flexible``)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for k, v in metrics.items():
            name, _, filt = k.partition(",")
            if name in _NOT_SCORES or "_stderr" in name or not isinstance(v, int | float):
                continue
            row[name if filt in ("", "none") else f"{name},{filt}"] = float(v)
        if row:
            out[task] = row
    return out


def compare(
    base: dict[str, dict[str, float]],
    tuned: dict[str, dict[str, float]],
    max_drop: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of (task, metric, base, tuned, delta) and the metrics that dropped by more than
    ``max_drop`` (absolute; every lm-eval score here is higher-is-better except perplexity-like
    ones, which are left out of the forgetting check)."""
    rows: list[dict[str, Any]] = []
    forgot: list[str] = []
    for task in sorted(set(base) | set(tuned)):
        for metric in sorted(set(base.get(task, {})) | set(tuned.get(task, {}))):
            b, t = base.get(task, {}).get(metric), tuned.get(task, {}).get(metric)
            delta = None if b is None or t is None else t - b
            rows.append({"task": task, "metric": metric, "base": b, "tuned": t, "delta": delta})
            lower_better = "perplexity" in metric or metric in ("bits_per_byte", "ppl")
            if delta is not None and not lower_better and -delta > max_drop:
                forgot.append(f"{task} {metric}: {b:.4f} -> {t:.4f} ({delta:+.4f})")
    return rows, forgot


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The comparison (or a single model's scores: rows without base) as text."""
    two = any(r.get("base") is not None for r in rows)
    head = ["task", "metric", "base", "fine-tuned", "delta"] if two else ["task", "metric", "score"]
    body = [
        [r["task"], r["metric"], _fmt(r["base"]), _fmt(r["tuned"]),
         "-" if r["delta"] is None else f"{r['delta']:+.4f}"]
        if two else [r["task"], r["metric"], _fmt(r["tuned"])]
        for r in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join([*lines, *("| " + " | ".join(b) + " |" for b in body)])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*b) for b in body)])


def score_rows(s: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One model's scores as table rows."""
    return [
        {"task": t, "metric": m, "base": None, "tuned": v, "delta": None}
        for t in sorted(s)
        for m, v in sorted(s[t].items())
    ]


def evaluate_dir(
    model_dir: str | Path,
    opts: HarnessOptions,
    manager: Any,
    adapter: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any] | None:
    """Load a saved model (and adapter) for inference and run the tasks on it."""
    from dsft.model import load_for_inference

    model, tokenizer = load_for_inference(
        model_dir, adapter, tokenizer_dir, trust_remote_code=trust_remote_code
    )
    try:
        return run_tasks(model, tokenizer, opts, manager, model_path=str(model_dir))
    finally:
        del model


def cached_base_scores(
    cache_dir: Path,
    fingerprint: dict[str, Any],
    opts: HarnessOptions,
    compute: Any,
) -> dict[str, Any] | None:
    """The base model's results, computed once per (base weights, task settings) and reused
    by later runs and sweep trials; ``compute()`` runs on every rank (it is sharded)."""
    key = hashlib.sha256(
        json.dumps({"base": fingerprint, "opts": opts.key()}, sort_keys=True).encode()
    ).hexdigest()[:24]
    path = cache_dir / "benchmarks" / f"base-{key}.json"
    hit = torch.tensor([int(path.is_file())])
    if torch.distributed.is_initialized():  # every rank takes the same branch
        torch.distributed.broadcast(hit, 0)
    if hit.item():
        log.info("benchmarks: base scores from the cache (%s)", path)
        return json.loads(path.read_text()) if distributed.is_main() else None
    results = compute()
    if distributed.is_main() and results is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=path.parent, suffix=".tmp")[1])
        tmp.write_text(json.dumps(results, default=str))
        tmp.replace(path)
    return results


def benchmark_run(cfg: Any, out: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """After training: ``eval.benchmarks`` on the base model and on the run's best export
    (else its final one); the exports' model cards are rewritten with the table."""
    from dsft.data.cache import cache_root
    from dsft.hf_export import write_model_card
    from dsft.hub import model_path

    exports = [out / n for n in ("best", "final") if (out / n).is_dir()]
    result = run_benchmarks(
        cfg,
        out,
        exports[0] if exports else None,
        cache_root(cfg.data.cache_dir),
        model_path(cfg.model.path, cfg.model.revision),
    )
    if distributed.is_main() and result is not None:
        for d in exports:  # the card written at export time, now with the benchmark table
            if (d / "README.md").is_file():
                write_model_card(cfg, d, {**summary, "benchmarks": result},
                                 adapter=not (d / "config.json").is_file())  # fmt: skip
    distributed.barrier()
    return result


def run_benchmarks(
    cfg: Any, out: Path, tuned_dir: Path | None, cache_dir: Path, base_dir: str
) -> dict[str, Any] | None:
    """``eval.benchmarks`` of a training run: the base model's scores (cached by its weights'
    fingerprint and the task settings) and the trained export's, side by side. Runs on every
    rank (sharded); returns the summary's ``benchmarks`` entry on rank 0, None elsewhere.
    Writes ``<out>/benchmarks/{base,tuned}.json`` (lm-eval's JSON) and ``table.md``."""
    from dsft.checkpoint import base_fingerprint

    b = cfg.eval.benchmarks
    opts = options(b)
    work = Path(tempfile.mkdtemp(prefix="dsft-lmeval-"))
    try:
        manager = prepare_tasks(opts, work)
        base = cached_base_scores(
            cache_dir,
            base_fingerprint(base_dir),
            opts,
            lambda: evaluate_dir(
                base_dir, opts, manager, trust_remote_code=cfg.model.trust_remote_code
            ),
        )
        tuned = None
        if tuned_dir is not None:
            from dsft.model import locate_trained

            model_dir, adapter, tok_dir = locate_trained(str(tuned_dir))
            tuned = evaluate_dir(model_dir, opts, manager, adapter, tok_dir,
                                 trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not distributed.is_main() or base is None:
        return None
    folder = out / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.json").write_text(json.dumps(base, indent=2, default=str))
    base_s, tuned_s = scores(base), scores(tuned) if tuned is not None else {}
    if tuned is not None:
        (folder / "tuned.json").write_text(json.dumps(tuned, indent=2, default=str))
    rows, forgot = compare(base_s, tuned_s, b.max_drop)
    markdown = table(rows, markdown=True)
    (folder / "table.md").write_text(markdown + "\n")
    log.info("benchmarks (base vs fine-tuned %s):\n%s", tuned_dir, table(rows))
    for f in forgot:
        log.warning("benchmarks: forgetting: %s (more than eval.benchmarks.max_drop)", f)
    return {
        "tasks": list(b.tasks),
        "model": str(tuned_dir) if tuned_dir is not None else None,
        "base": base_s,
        "tuned": tuned_s,
        "rows": rows,
        "table": markdown,
        "forgetting": forgot,
        "max_drop": b.max_drop,
    }
