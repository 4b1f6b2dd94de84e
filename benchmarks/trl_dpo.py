"""TRL's preference trainers run the way dsft's preference runs are compared with them.

``run_trl(...)`` trains ``trl.DPOTrainer`` (or the experimental ``CPOTrainer`` for SimPO)
on a preference file in file order (no shuffling), with a constant learning rate,
torch AdamW, no weight decay and fp32 on the CPU, and returns the per-step log rows
(loss, grad_norm, rewards/..., logps/...). The TRL-equality tests and
``benchmarks/dpo_bench.py`` use it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def _dataset(path: Path) -> Any:
    from datasets import Dataset

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return Dataset.from_list(rows)


def run_trl(
    model_dir: Path,
    data: Path,
    out: Path,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    steps: int = 3,
    batch: int = 4,
    lr: float = 1e-3,
    max_grad_norm: float = 1e6,
    simpo_gamma: float = 0.5,
    precompute: bool = True,
    seed: int = 42,
    label_smoothing: float = 0.0,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Train TRL on ``data`` and return ``{"rows": per-step logs, "seconds", "tokens"}``."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("WANDB_DISABLED", "true")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=max_grad_norm,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        optim="adamw_torch",
        dataloader_num_workers=0,
        beta=beta,
        disable_tqdm=True,
    )
    if loss_type == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            **common,
            loss_type="simpo",
            simpo_gamma=simpo_gamma,
            cpo_alpha=0.0,
            label_smoothing=label_smoothing,
            max_length=None,
        )
        base = CPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **common,
            loss_type=[loss_type],
            precompute_ref_log_probs=precompute,
            label_smoothing=label_smoothing,
            max_length=None,
        )
        base = DPOTrainer

    class InOrder(base):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=_dataset(data),
        processing_class=tok,
        callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return {"rows": rows, "seconds": seconds, "model": trainer.model}


def main(spec_path: str) -> int:
    """``python -m benchmarks.trl_dpo SPEC.json``: one timed TRL run for dpo_bench.py; writes
    ``<out>/metrics.jsonl`` (per step: wall time, cumulative non-pad tokens)."""
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec.pop("out"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "num_tokens" in logs:
                rows.append({"step": state.global_step, "wall": time.time(), **logs})
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")

    run_trl(
        Path(spec.pop("model")), Path(spec.pop("data")), out / "trl", callbacks=[Clock()], **spec
    )
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1]))
