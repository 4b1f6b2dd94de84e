"""The TRL peer of a benchmark run: ``python -m benchmarks.trl_run SPEC.json``.

Runs as its own process (or torchrun ranks), like ``dsft train`` does, so start-up is
measured the same way. Trains ``trl.SFTTrainer`` on the pre-tokenised dataset the
driver wrote (``input_ids`` + ``assistant_masks``: dsft's own tokens and loss mask, so
both systems learn from identical tokens), with the DeepSpeed JSON dsft generated
(``SFTConfig(deepspeed=path)``) unless the spec says otherwise.

Modes: ``default`` (padded micro-batches, TRL's defaults) and ``best``
(``packing=True`` with the default ``packing_strategy="bfd"``, which in TRL 1.16
switches ``padding_free`` on: packed rows are flattened into one sequence per
micro-batch with restarting position ids, no padding at all).

VLM mode (``"vlm": true``, ``dsft bench --mode vlm``, benchmarks/vlm.py): TRL's own
vision-language path: the model loaded with ``AutoModelForImageTextToText``, its
``AutoProcessor`` as the processing class, a prompt-completion dataset with an ``images``
column (image files, decoded by ``datasets``), which SFTTrainer renders and processes per
batch (``DataCollatorForVisionLanguageModeling``; loss on the completion only). The vision
tower and projector are frozen as dsft freezes them by default (``dsft.model.part``) unless
the spec says ``"train_tower": true``.

Writes ``<out>/metrics.jsonl``: one row per optimizer step with the real (non-pad)
tokens of the step per device, the sum of squared segment lengths (attention FLOPs)
and the wall time at the step's end; ``<out>/summary.json``; ``<out>/final`` (weights).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def segment_lengths(inputs: dict[str, Any]) -> torch.Tensor:
    """Real lengths of the sequences of a micro-batch (padded rows or flattened segments)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum(1)
    pos = inputs["position_ids"].reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
    return ends - starts


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    # DeepSpeed's JIT-built ops (CPU: the shm comm op) come from the cache dsft uses.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if "RANK" not in os.environ:
        # One plain process: say so in torchrun's variables, or DeepSpeed's init_distributed
        # goes looking for MPI (mpi4py without a libmpi fails there).
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    out = Path(spec["out"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    tokenizer, model, train = (_vlm_inputs if spec.get("vlm") else _text_inputs)(spec, dtype)
    best = spec["mode"] == "best"
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_length=spec["max_len"],
        packing=best,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_steps"],
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=spec["max_grad_norm"],
        bf16=spec["precision"] == "bf16",
        fp16=False,
        # SFTConfig turns gradient checkpointing on by default; dsft's default is off, and
        # the comparison is of the same work (no recomputation on either side).
        gradient_checkpointing=False,
        deepspeed=spec.get("deepspeed") or None,
        use_cpu=not cuda,
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=10**9,  # our callback records every step; keep Trainer's logging off
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        shuffle_dataset=False,
        # trl-best on a GPU: Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear CE)
        use_liger_kernel=bool(spec.get("liger")),
    )
    peft_config = None
    if spec.get("lora"):  # the same adapters as dsft's model.lora
        from peft import LoraConfig

        lo = spec["lora"]
        targets = lo["target_modules"]
        peft_config = LoraConfig(
            r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )  # fmt: skip

    rows: list[dict[str, Any]] = []
    count = {"tokens": 0, "sq": 0}

    class Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):  # type: ignore[override]
            if model.training:
                lengths = segment_lengths(inputs).to("cpu", torch.int64)
                count["tokens"] += int(lengths.sum())
                count["sq"] += int((lengths**2).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # type: ignore[override]
            if cuda:
                torch.cuda.synchronize()
            tokens, sq = float(count["tokens"]), float(count["sq"])
            if world > 1:  # per-device figures: the mean over ranks
                t = torch.tensor([tokens, sq], dtype=torch.float64)
                torch.distributed.all_reduce(t)
                tokens, sq = (t / world).tolist()
            count["tokens"] = count["sq"] = 0
            row = {"step": state.global_step, "wall": time.time(), "tokens": tokens, "sq": sq}
            if cuda:
                row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            if rank == 0:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[Timer()],
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(str(out / "final"))
    if rank == 0:
        tokenizer.save_pretrained(out / "final")  # (a processor: its files and the tokenizer's)
        summary = {
            "steps_done": len(rows),
            "world_size": world,
            "deepspeed": bool(args.deepspeed),
            "padding_free": bool(trainer.padding_free),
            "packing": best,
            "train_rows": len(trainer.train_dataset),
            "liger": bool(args.use_liger_kernel),
            "lora": bool(peft_config),
        }
        if cuda:
            summary["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def _text_inputs(spec: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Tokenizer, causal LM and the pre-tokenised dataset (input_ids + assistant_masks)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation=spec["attn_implementation"]
    )
    return tokenizer, model, load_from_disk(spec["train"])


def _vlm_inputs(spec: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Processor, image-text model (tower frozen unless asked) and the prompt-completion
    dataset with its images column, from the JSON-lines file the driver wrote."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dsft.model import part

    processor = AutoProcessor.from_pretrained(spec["model"])
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation=spec["attn_implementation"]
    )
    if not spec.get("train_tower"):
        for name, p in model.named_parameters():
            if part(name) != "language":
                p.requires_grad_(False)
    rows = [json.loads(x) for x in Path(spec["train"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    return processor, model, train


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
