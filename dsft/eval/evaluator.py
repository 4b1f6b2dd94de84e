"""Validation and generation metrics, exact whatever the number of ranks.

Token metrics are ratios of sums: each rank sums over a disjoint shard (no padding,
no duplicates), the sums are all-reduced once and divided afterwards, so the result
does not depend on the number of ranks or on how examples fall into batches (unlike
a mean of per-batch means). Generation metrics are computed from every rank's
(prediction, reference) pairs gathered in example order. Under ZeRO-3 every rank runs
the same number of forward passes (dummy batches on short shards), because each
forward gathers parameters collectively.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft import distributed as dist
from dsft import loss
from dsft.config import EvalConfig
from dsft.data.collate import collate, collate_prompts
from dsft.data.formats import Example
from dsft.data.sampler import eval_shard
from dsft.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_prompt
from dsft.loss import logits_nll

log = logging.getLogger("dsft")


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False
) -> tuple[torch.Tensor, int, int]:
    """Summed next-token NLL (a tensor, for backward), correct predictions, target count.

    ``shifted``: ``labels`` are already the next tokens' (aligned with ``logits``, as a
    sequence-parallel slice's targets are: dsft.sequence_parallel.shift_labels).
    """
    nll = logits_nll(logits, labels, shifted)
    logits = logits if shifted else logits[:, :-1]
    target = labels if shifted else labels[:, 1:]
    mask = target != IGNORE_INDEX
    correct = ((logits.argmax(-1) == target) & mask).sum().item()
    return nll, int(correct), int(mask.sum().item())


def _lockstep_batches(n_local: int, micro_batch: int) -> int:
    # Under ZeRO-3 a forward pass gathers parameters collectively, so every rank
    # must run the same number of forwards; ranks with a shorter shard run dummy ones.
    return dist.all_reduce_max(math.ceil(n_local / micro_batch))


@torch.no_grad()
def validate(
    model: Callable,
    examples: list[Tokenized],
    micro_batch: int,
    pad_id: int,
    head: loss.Head | None = None,
    images: Any = None,
    toucher: Any = None,
    router: Any = None,
) -> dict[str, float]:
    """Token-weighted loss, perplexity and token accuracy on response tokens.

    ``images`` (dsft.data.collate.ImageInputs): image rows get their pixels (``examples``
    is then a split, which has the rows' images); ``toucher`` (dsft.model.TowerTouch,
    ZeRO-3): a batch without images runs the tower on a dummy one, as in training.

    With several datasets mixed, the same metrics per dataset appear as
    ``<name>/loss``, ``<name>/ppl`` and ``<name>/token_acc``. With ``head`` (the model's
    LM head, ``train.fused_loss``) no full logits are made: dsft/loss.py. With ``router`` (a
    mixture of experts' :class:`dsft.moe.RouterLoss`) also ``aux_loss``, the mean router
    load-balancing loss of the batches (before its coefficient).
    """
    if not examples:
        return {}
    names = sorted({e.dataset for e in examples})
    col = {n: i for i, n in enumerate(names)}
    # Per dataset: summed NLL, correct argmax predictions, target tokens, examples.
    sums = torch.zeros(len(names), 4, dtype=torch.float64)
    mine = eval_shard(len(examples), dist.get_world_size(), dist.get_rank())
    aux = torch.zeros(2, dtype=torch.float64)  # summed router loss, batches
    dev = dist.device()
    for b in range(_lockstep_batches(len(mine), micro_batch)):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        batch = collate([examples[i] for i in idx] or [examples[0]], pad_id)
        if images is not None:
            images.add(batch, examples, idx or [0])
        if toucher is not None:
            toucher.arm("pixel_values" not in batch)
        router_logits: list | None = [] if router is not None else None
        if head is not None:
            cols = [col[examples[i].dataset] for i in idx]
            _fused_stats(model, head, batch, cols, sums, router_logits)
        else:
            batch = {k: v.to(dev) for k, v in batch.items()}
            extra = {k: v for k, v in batch.items() if k not in ("labels", "lengths")}
            if router is not None:
                extra["output_router_logits"] = True
            res = model(**extra)
            if router_logits is not None:
                router_logits.extend(res.router_logits)
            for row, i in enumerate(idx):  # a dummy batch (no idx) contributes nothing
                nll, c, n = token_stats(res.logits[row : row + 1], batch["labels"][row : row + 1])
                sums[col[examples[i].dataset]] += torch.tensor(
                    [nll.item(), c, n, 1], dtype=torch.float64
                )
        if router_logits and idx:
            value = router(router_logits, batch["attention_mask"])
            aux += torch.tensor([float(value), 1.0], dtype=torch.float64)
    sums = dist.all_reduce_sum(sums.flatten()).view(len(names), 4)
    out = _ratios(sums.sum(0))
    if router is not None:
        aux_sum, batches = dist.all_reduce_sum(aux).tolist()
        out["aux_loss"] = aux_sum / batches if batches else float("nan")
    if len(names) > 1:
        for n in names:
            out.update({f"{n}/{k}": v for k, v in _ratios(sums[col[n]]).items()})
    return out


def _fused_stats(
    model: Callable,
    head: loss.Head,
    batch: dict[str, torch.Tensor],
    cols: list[int],
    sums: torch.Tensor,
    router_logits: list | None = None,
) -> None:
    """Add one batch's per-dataset sums (NLL, correct, targets, examples) from the chunked
    head; ``cols`` = the dataset column of each real row (none for a dummy batch)."""
    dev = dist.device()
    index, targets = loss.target_index(batch["labels"])
    # ranks agree on the chunk count: under ZeRO-3 every head call gathers collectively
    (chunks,) = loss.lockstep_chunks([len(targets)], head.vocab, dist.get_world_size() > 1)
    inputs = {k: v.to(dev) for k, v in batch.items() if k not in ("labels", "lengths")}
    nll, right = loss.fused_nll(
        model, head, inputs, index.to(dev), targets.to(dev), chunks, True, router_logits
    )
    assert right is not None
    rows = index // batch["labels"].size(1)
    n = batch["labels"].size(0)
    row_nll = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, nll.double().cpu())
    row_right = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, right.double().cpu())
    row_count = torch.bincount(rows, minlength=n).double()
    for row, c in enumerate(cols):
        sums[c] += torch.stack([row_nll[row], row_right[row], row_count[row], torch.tensor(1.0)])


def _ratios(s: torch.Tensor) -> dict[str, float]:
    nll, correct, count, n = s.tolist()
    loss = nll / count if count else float("nan")
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "token_acc": correct / count if count else float("nan"),
        "tokens": int(count),
        "examples": int(n),
    }


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation/articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-level F1 between normalised answers (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(
    pairs: list[tuple[str, str]], label_metrics: str = "auto", max_labels: int = 20
) -> dict[str, float]:
    """Exact match and token F1 over (prediction, reference) pairs; label metrics if asked.

    Label metrics (accuracy and macro-F1 over the set of reference labels) are
    computed when ``label_metrics`` is "on", or "auto" and the references take at
    most ``max_labels`` distinct values each seen at least twice (a classification
    task rather than free text). A prediction outside the label set counts as wrong
    for its reference label and as a prediction of no label.
    """
    if not pairs:
        return {}
    out = {
        "exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs)
        / len(pairs),
        "f1": sum(token_f1(p, r) for p, r in pairs) / len(pairs),
        "examples": len(pairs),
    }
    refs = Counter(normalize_answer(r) for _, r in pairs)
    label_like = len(refs) <= max_labels and min(refs.values()) >= 2
    if label_metrics == "on" or (label_metrics == "auto" and label_like):
        labels = sorted(refs)
        f1s = []
        for label in labels:
            tp = sum(normalize_answer(p) == label == normalize_answer(r) for p, r in pairs)
            predicted = sum(normalize_answer(p) == label for p, _ in pairs)
            actual = refs[label]
            prec = tp / predicted if predicted else 0.0
            rec = tp / actual
            f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        out["label_accuracy"] = out["exact_match"]
        out["macro_f1"] = sum(f1s) / len(f1s)
        out["labels"] = len(labels)
    return out


@torch.no_grad()
def generate_predictions(
    module: Any,
    tokenizer: Any,
    examples: list[Example],
    micro_batch: int,
    max_new_tokens: int,
    synced: bool,
    sample: dict[str, float] | None = None,
    images: Any = None,
    toucher: Any = None,
) -> tuple[list[dict[str, Any]], int]:
    """Generate the last assistant turn of every example, sharded over ranks.

    Returns every rank's predictions (gathered, in example order) and the number of
    tokens generated. ``synced`` (ZeRO-3 with several ranks) keeps every rank
    decoding until all are done, because each decoding step gathers parameters
    collectively. ``sample`` (temperature, top_p) switches from greedy to sampling.
    ``images`` (dsft.data.collate.ImageInputs): image rows' prompts get their pixels;
    ``toucher`` (ZeRO-3): a prompt batch without images runs the tower on a dummy one in
    its first forward, as the ranks with images do.
    """
    mine = eval_shard(len(examples), dist.get_world_size(), dist.get_rank())
    dev = dist.device()
    preds: list[dict[str, Any]] = []
    new_tokens = 0
    kwargs: dict[str, Any] = {"do_sample": False}
    if sample:
        kwargs = {"do_sample": True, **sample}
    for b in range(_lockstep_batches(len(mine), micro_batch)):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        prompts, refs = zip(
            *(tokenize_prompt(tokenizer, examples[i]) for i in (idx or [0])), strict=True
        )
        batch = collate_prompts(list(prompts), tokenizer.pad_token_id)
        if images is not None:
            images(batch, [examples[i].images for i in (idx or [0])])
        if toucher is not None:
            toucher.before_generate("pixel_values" in batch)
        batch = {k: v.to(dev) for k, v in batch.items()}
        out = module.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
            **kwargs,
        )
        if not idx:
            continue
        gen = out[:, batch["input_ids"].size(1) :]
        new_tokens += int(((gen != tokenizer.pad_token_id) & (gen != tokenizer.eos_token_id)).sum())
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        for i, text, ref in zip(idx, texts, refs, strict=True):
            preds.append(
                {
                    "index": i,
                    "source": examples[i].source,
                    "prediction": text.strip(),
                    "reference": ref,
                }
            )
    gathered = [p for rank_preds in dist.all_gather_objects(preds) for p in rank_preds]
    total_tokens = int(dist.all_reduce_sum([new_tokens])[0].item())
    return sorted(gathered, key=lambda p: p["index"]), total_tokens


@dataclass
class BestTracker:
    """Best value of the watched validation metric, and evaluations since it improved."""

    metric: str  # "val/loss", "val/exact_match", ...
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    @property
    def maximize(self) -> bool:
        return not self.metric.endswith(("loss", "ppl"))

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        value = metrics.get(self.metric.split("/", 1)[1])
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            better = True
        elif self.maximize:
            better = value > self.best + self.min_delta
        else:
            better = value < self.best - self.min_delta
        if better:
            self.best, self.best_step, self.since_best = float(value), step, 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience


class Evaluator:
    """Runs validation and generation for the training loop and ``dsft eval``.

    It switches the model to eval mode and back, logs through the monitor (rank 0)
    and writes every prediction to ``<out>/predictions/<split>_step<N>.jsonl``.
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        splits: Any,
        cfg: EvalConfig,
        monitor: Any,
        out_dir: Path,
        synced: bool,
        fused_loss: bool = False,
        extra: Callable[[Any], dict[str, float]] | None = None,
        images: Any = None,
        router: Any = None,
    ):
        self.engine, self.tokenizer, self.splits, self.cfg = engine, tokenizer, splits, cfg
        # The objective's own validation metrics (preference: rewards, its loss as "loss";
        # the token loss on the chosen responses stays as "nll_chosen")
        self.extra = extra
        self.monitor, self.out_dir, self.synced = monitor, out_dir, synced
        # train.fused_loss: validation losses from the chunked head too (dsft/loss.py)
        self.head = loss.output_head(self._module()) if fused_loss else None
        # image rows: their pixels (dsft.data.collate.ImageInputs), and under ZeRO-3 the
        # dummy tower run of batches without images (Job.tower_toucher, set by train and eval)
        self.images: Any = images
        self.toucher: Any = None
        self.router = router  # MoE: validation reports the router loss too (dsft/moe.py)
        self.sample = (
            {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else None
        )

    def _module(self) -> Any:
        return getattr(self.engine, "module", self.engine)

    def validation(
        self, step: int, train_loss: float | None = None, split: str = "val"
    ) -> dict[str, Any]:
        """Loss / perplexity / token accuracy on a split (generation metrics too when the
        watched metric needs them); ``gap`` = validation loss - recent train loss."""
        self.engine.eval()
        try:
            metrics = validate(
                self.engine,
                getattr(self.splits, split),
                self.cfg.micro_batch,
                self.tokenizer.pad_token_id,
                self.head,
                getattr(self, "images", None),
                getattr(self, "toucher", None),
                self.router,
            )
            if metrics and split == "val" and self.extra is not None:
                metrics["nll_chosen"] = metrics["loss"]
                metrics.update(self.extra(self.engine))
            if metrics and split == "val" and self.cfg.metric in ("val/exact_match", "val/f1"):
                metrics.update(self._generate(step, "val", self.splits.val_raw))
        finally:
            self.engine.train()
        if not metrics:
            return metrics
        if train_loss is not None and math.isfinite(train_loss):
            metrics["gap"] = metrics["loss"] - train_loss
        self.monitor.scalars(step, split, metrics)
        log.info(
            "step %d | %s loss %.4f | ppl %.3f | token acc %.4f%s",
            step,
            split,
            metrics["loss"],
            metrics["ppl"],
            metrics["token_acc"],
            f" | gap to train {metrics['gap']:+.4f}" if "gap" in metrics else "",
        )
        return metrics

    def test(self, step: int) -> dict[str, Any]:
        """Generation metrics on the test split (up to eval.max_generate examples)."""
        if not self.cfg.generate:
            return {}
        self.engine.eval()
        try:
            return self._generate(step, "test", self.splits.test_raw)
        finally:
            self.engine.train()

    def _generate(self, step: int, split: str, examples: Sequence[Example]) -> dict[str, Any]:
        n = min(len(examples), self.cfg.max_generate or len(examples))
        examples = [examples[i] for i in range(n)]
        if not examples:
            return {}
        t0 = time.time()
        preds, new_tokens = generate_predictions(
            self._module(),
            self.tokenizer,
            examples,
            self.cfg.micro_batch,
            self.cfg.max_new_tokens,
            self.synced,
            self.sample,
            getattr(self, "images", None),
            getattr(self, "toucher", None),
        )
        seconds = time.time() - t0
        for p in preds:
            p["exact"] = normalize_answer(p["prediction"]) == normalize_answer(p["reference"])
        metrics: dict[str, Any] = generation_scores(
            [(p["prediction"], p["reference"]) for p in preds], self.cfg.label_metrics
        )
        metrics.update(seconds=round(seconds, 3), tokens_per_s=new_tokens / max(seconds, 1e-9))
        if dist.is_main():
            folder = self.out_dir / "predictions"
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"{split}_step{step}.jsonl").open("w", encoding="utf-8") as f:
                for p in preds:
                    f.write(json.dumps(p) + "\n")
        metrics["samples"] = preds[:10]
        self.monitor.scalars(step, split, metrics)
        self.monitor.text(
            step,
            f"{split}/samples",
            "\n\n".join(
                f"**ref** `{p['reference']}`  \n**pred** `{p['prediction']}`" for p in preds[:10]
            ),
        )
        log.info(
            "step %d | %s exact match %.4f | f1 %.4f%s on %d examples (%.1fs, %.0f tok/s)",
            step,
            split,
            metrics["exact_match"],
            metrics["f1"],
            f" | macro-F1 {metrics['macro_f1']:.4f}" if "macro_f1" in metrics else "",
            metrics["examples"],
            metrics["seconds"],
            metrics["tokens_per_s"],
        )
        return metrics
