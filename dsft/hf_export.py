"""Hugging Face export: from the live engine at the end of training, or from a checkpoint.

Both paths end in :func:`write_hf`: the weights (gathered from the engine's ZeRO
shards, or consolidated offline from a checkpoint by DeepSpeed's ``zero_to_fp32``)
are loaded strictly into a CPU copy of the model built from the base directory
(plus LoRA when the run used it), saved with ``save_pretrained`` (safetensors,
sharded past ``max_shard_size``), then loaded back and compared with the in-memory
model on a fixed batch. A missing tensor, an adapter that did not save, or logits
that differ is an error, never a silent bad export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from dsft import distributed as dist
from dsft.checkpoint import check_base, consolidate, find, saved_config
from dsft.config import Config, to_dict
from dsft.data.cache import _file_digest
from dsft.data.template import apply_template
from dsft.errors import ExportError
from dsft.flops import text_config
from dsft.hub import model_path
from dsft.model import (
    PROCESSOR_FILES,
    apply_lora,
    freeze,
    load_model,
    load_tokenizer,
    mutates_base,
)

log = logging.getLogger("dsft")


def gather_state_dict(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (other ranks get {}); parameters gathered one at a time.

    Under ZeRO-3 each parameter is only a shard per rank; gathering them one by
    one keeps the peak extra memory at a single full parameter per rank.
    """
    sd: dict[str, torch.Tensor] = {}
    main = dist.is_main()
    if zero3:
        deepspeed = dist.import_deepspeed()
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if main:
                    sd[name] = p.detach().to("cpu", copy=True).contiguous()
    elif main:
        sd = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in module.named_parameters()}
    return sd


def export_hf(
    engine: Any, cfg: Config, out: Path, run: dict[str, Any] | None = None
) -> Path | None:
    """Export the engine's current weights to ``out`` (all ranks call; rank 0 writes).
    ``run``: the run summary so far, for the model card."""
    sd = gather_state_dict(engine.module, cfg.deepspeed.zero_stage == 3)
    if dist.is_main():
        write_hf(cfg, sd, out, run=run)
    dist.wait_for_main()  # rank 0 writes and reloads alone: may take long for big models
    return out if dist.is_main() else None


def export_checkpoint(path: str | Path, out: Path, merged: bool = True) -> Path:
    """``dsft export``: a checkpoint (or run directory) to a Hugging Face directory."""
    dist.configure_accelerator()  # zero_to_fp32 imports deepspeed
    tag_dir = find(path)
    summary = tag_dir.parent.parent / "summary.json"  # the run's, when it finished
    run = json.loads(summary.read_text()) if summary.is_file() else {}
    run.setdefault("steps", json.loads((tag_dir / "dsft_state.json").read_text()).get("step"))
    cfg = saved_config(tag_dir)
    # a lean checkpoint takes its frozen weights from model.path: the same ones?
    check_base(tag_dir, cfg.model.path, cfg.model.revision)
    write_hf(cfg, consolidate(tag_dir), out, merged=merged, run=run)
    return out


def _build(cfg: Config) -> torch.nn.Module:
    """The run's model as training built it: base weights from model.path, LoRA, and the
    model.freeze parameters frozen (they keep model.path's values)."""
    model = load_model(cfg.model, torch.float32, training=False)
    model = apply_lora(model, cfg.model.lora) if cfg.model.lora.enabled else model
    freeze(model, cfg.model.freeze)
    return model


@torch.no_grad()
def _tokenizer(cfg: Config) -> Any:
    """The run's tokenizer (as training loaded it), with the chat template it was trained
    with (data.template)."""
    tok = load_tokenizer(cfg.model)
    apply_template(tok, cfg.data.template)
    return tok


def _logits(model: torch.nn.Module) -> torch.Tensor:
    # A fixed batch of ids from the bottom of every vocabulary.
    ids = torch.arange(1, 17).remainder(text_config(model.config).vocab_size).unsqueeze(0)
    return model(input_ids=ids).logits.float()


# Why a QLoRA run exports its adapter only (logged, and written in the model card).
QLORA_ADAPTER_ONLY = (
    "QLoRA trains the adapter against 4-bit NF4 base weights; merging it into the 16-bit base "
    "gives a model that differs from the one trained (and re-quantising the merge loses the "
    "adapter's small update), so the adapter is exported alone: load the base (in 4-bit NF4 "
    "as trained, or in bf16) and apply the adapter with peft"
)


def write_hf(
    cfg: Config, sd: dict[str, torch.Tensor], out: Path, merged: bool = True,
    max_shard_size: str = "5GB", run: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Save ``sd`` (the run's trained weights) as a verified Hugging Face directory.

    Full fine-tuning writes the model; LoRA writes the adapter to ``out/adapter``
    (loadable with peft on the base model) and, when ``merged``, the merged model to
    ``out``; QLoRA writes the adapter only (:data:`QLORA_ADAPTER_ONLY`). A model card
    (README.md) goes with either. Costs one CPU copy of the model on the calling rank.
    """
    if cfg.model.quantization != "none" and merged:
        log.info("adapter only: %s", QLORA_ADAPTER_ONLY)
        merged = False
    model = _build(cfg).eval()
    lora = cfg.model.lora.enabled
    initial = None
    if lora and mutates_base(cfg.model.lora):
        # PiSSA/LoftQ: the built model holds the residual base and the initial adapter; keep
        # that adapter, so the saved one is converted to apply to the base on disk.
        initial = Path(tempfile.mkdtemp(prefix="dsft-init-adapter-"))
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial / "init")
        model.peft_config["default"].init_lora_weights = cfg.model.lora.init
    # Only trained parameters must come from the run (LoRA adapters + modules_to_save, or
    # everything model.freeze left trainable); frozen ones are the base on disk, and a
    # lean checkpoint does not hold them.
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(sd))
    if missing:
        raise ExportError(f"{len(missing)} trained tensors are missing, e.g. {missing[:3]}")
    model.load_state_dict({n: sd[n] for n in expected}, strict=False)
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    reference = _logits(model)
    if lora:
        convert = (
            {"path_initial_model_for_weight_conversion": str(initial / "init")} if initial else {}
        )
        model.save_pretrained(out / "adapter", **convert)
        _verify_adapter(cfg, out / "adapter", reference)
        if not merged:
            _tokenizer(cfg).save_pretrained(out / "adapter")
            carry_processor_files(cfg, out / "adapter")
            write_model_card(cfg, out / "adapter", run, adapter=True)
            write_model_card(cfg, out, run, adapter=True)
            log.info("exported LoRA adapter: %s", out / "adapter")
            return
        model = model.merge_and_unload()
    model = model.to(dtype)
    reference = _logits(model)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    _tokenizer(cfg).save_pretrained(out)
    carry_processor_files(cfg, out)
    again = load_model(cfg.model, dtype, path=out, training=False).eval()
    _compare(reference, _logits(again), f"{out} reloaded", dtype)
    write_model_card(cfg, out, run)
    if lora:
        write_model_card(cfg, out / "adapter", run, adapter=True)
    log.info("exported Hugging Face model: %s (verified by reloading)", out)


def carry_processor_files(cfg: Config, out: Path) -> list[str]:
    """Copy the base checkpoint's processor files (image processor, processor, chat
    template; :data:`dsft.model.PROCESSOR_FILES`) that the export lacks, so that it loads
    with ``AutoProcessor`` as the base did. The tokenizer's files (saved with the template
    the run trained with) are not overwritten. Returns the copied names."""
    base = Path(model_path(cfg.model.path, cfg.model.revision))
    copied = []
    for name in PROCESSOR_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    return copied


def _verify_adapter(cfg: Config, adapter: Path, reference: torch.Tensor) -> None:
    from peft import PeftModel

    if not any(adapter.glob("adapter_model.*")):
        raise ExportError(f"{adapter}: peft wrote no adapter weights")
    base = load_model(cfg.model, torch.float32, training=False)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    _compare(reference, _logits(peft_model), str(adapter), torch.float32)


def _compare(expected: torch.Tensor, got: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    # Round-off of the saved dtype is allowed (a 16-bit reload recomputes e.g. rotary
    # tables in fp32); a missing or wrong tensor moves logits by far more.
    rel = max(1e-3, 4 * torch.finfo(dtype).eps)
    tol = rel * max(1.0, expected.abs().max().item())
    diff = (expected - got).abs().max().item()
    if diff > tol:
        raise ExportError(f"{what}: logits differ from the trained model by {diff:.3g} > {tol:.3g}")


# --------------------------------------------------------------------------- model card


def _method(cfg: Config) -> str:
    lora = cfg.model.lora
    if not lora.enabled:
        return "full fine-tuning"
    name = "QLoRA (4-bit NF4 base)" if cfg.model.quantization != "none" else "LoRA"
    extras = [x for x, on in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora)) if on]
    extras += [f"{lora.init} init"] * (lora.init != "default")
    return f"{name}, r={lora.r}, alpha={lora.alpha}" + "".join(f", {x}" for x in extras)


def _sha256(path: Path) -> str:
    """A file's sha256 (what `sha256sum` prints); a directory (save_to_disk): the sha256 over
    its files' relative names and contents, in order."""
    if path.is_dir():
        return _file_digest(path)
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _data_files(cfg: Config) -> list[tuple[str, str, str]]:
    """(role, file name, sha256) of every data file; the hash of a missing file is unknown."""
    rows = []
    for role, paths in (("train", cfg.data.path), ("val", cfg.data.val_path),
                        ("test", cfg.data.test_path)):  # fmt: skip
        for f in paths:
            p = Path(f)
            rows.append((role, p.name, _sha256(p) if p.exists() else "(file not found)"))
    return rows


def _metrics_table(run: dict[str, Any]) -> list[str]:
    after = run.get("after") or {}
    rows = [
        f"| {split}/{k} | {v:.4f} |"
        for split in ("val", "test")
        for k, v in (after.get(split) or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    lines = ["| metric | final |", "|---|---|", *rows] if rows else ["No final metrics recorded."]
    best = run.get("best")
    if best:
        lines += ["", f"Best {best['metric']}: {best['value']:.4f} at step {best['step']}."]
    return lines


def _benchmarks_section(run: dict[str, Any]) -> list[str]:
    """eval.benchmarks: lm-eval scores of the base and the fine-tuned model (the table as
    dsft.eval.harness wrote it)."""
    bench = run.get("benchmarks")
    if not bench or not bench.get("table"):
        return []
    lines = ["", "## Benchmarks (lm-evaluation-harness)", "", bench["table"]]
    if bench.get("forgetting"):
        lines += ["", f"Forgetting (a drop of more than {bench['max_drop']}):", ""]
        lines += [f"- {f}" for f in bench["forgetting"]]
    return lines


def model_card(cfg: Config, run: dict[str, Any] | None = None, adapter: bool = False) -> str:
    """The README.md of an export: what it is, from which base and data, how it was trained,
    how well it did, and the resolved config that reproduces it."""
    run = run or {}
    base = cfg.model.path
    local = Path(base).is_dir()
    front = {"library_name": "peft" if adapter else "transformers", "tags": ["dsft", "sft"]}
    if not local:  # a Hub name: the Hub links the base model
        front["base_model"] = base
    if cfg.model.lora.enabled:
        front["tags"].append("lora")
    seconds = run.get("train_seconds")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(cfg.output_dir).name}",
        "",
        f"Fine-tuned from `{Path(base).name if local else base}` with "
        f"[dsft](https://github.com) ({_method(cfg)}).",
    ]
    if adapter:
        lines += [
            "",
            "This directory holds the LoRA adapter only; load the base model and apply it with "
            "`peft.PeftModel.from_pretrained(base, path)`.",
        ]
        if cfg.model.quantization != "none":
            lines += ["", f"Why the adapter only: {QLORA_ADAPTER_ONLY}."]
    lines += ["", "## Data", "", "| split | file | sha256 |", "|---|---|---|"]
    lines += [f"| {r} | `{n}` | `{h}` |" for r, n, h in _data_files(cfg)]
    stats = run.get("data") or {}
    if stats:
        lines += [
            "",
            f"{stats.get('train', '?')} training, {stats.get('val', '?')} validation and "
            f"{stats.get('test', '?')} test examples; {stats.get('train_tokens', '?')} training "
            "tokens.",
        ]
    lines += ["", "## Results", "", *_metrics_table(run)]
    lines += _benchmarks_section(run)
    lines += ["", "## Training", ""]
    lines.append(f"- hardware: {run.get('hardware', 'not recorded')}")
    if run.get("world_size"):
        lines.append(f"- ranks: {run['world_size']}, global batch {run.get('global_batch')}")
    if run.get("steps") is not None:
        lines.append(f"- optimizer steps: {run['steps']}")
    if seconds is not None:
        lines.append(f"- training time: {seconds / 60:.1f} min ({seconds:.0f} s)")
    lines.append(f"- precision: {cfg.train.precision}, ZeRO stage {cfg.deepspeed.zero_stage}")
    lines += [
        "",
        "## Resolved config",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    cfg: Config, out: Path, run: dict[str, Any] | None = None, adapter: bool = False
) -> Path:
    path = out / "README.md"
    path.write_text(model_card(cfg, run, adapter), encoding="utf-8")
    return path


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export (with its model card) to the Hub repo ``repo_id``; returns its URL.

    The token and endpoint are huggingface_hub's own (HF_TOKEN / `hf auth login`,
    HF_ENDPOINT)."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload model fine-tuned with dsft",
    )
    return str(url)
