"""Validation metrics and generation accuracy, aggregated exactly across ranks.

Every metric is a ratio of sums. Each rank accumulates its sums over a disjoint
shard (no padding, no duplicates), the sums are all-reduced once, and the ratio
is taken afterwards, so the result does not depend on the number of ranks or on
how examples fall into batches (unlike a mean of per-batch means).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dsft import distributed as dist
from dsft.data.collate import collate, collate_prompts
from dsft.data.formats import Example
from dsft.data.sampler import eval_shard
from dsft.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_prompt


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed next-token NLL (a tensor, for backward), correct predictions, target count."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    correct = ((logits.argmax(-1) == target) & mask).sum().item()
    return nll, int(correct), int(mask.sum().item())


def _lockstep_batches(n_local: int, micro_batch: int) -> int:
    # Under ZeRO-3 a forward pass gathers parameters collectively, so every rank
    # must run the same number of forwards; ranks with a shorter shard run dummy ones.
    return dist.all_reduce_max(math.ceil(n_local / micro_batch))


@torch.no_grad()
def validate(
    model: Callable, examples: list[Tokenized], micro_batch: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted loss, perplexity and token accuracy on response tokens."""
    if not examples:
        return {}
    mine = eval_shard(len(examples), dist.get_world_size(), dist.get_rank())
    dev = dist.device()
    nll_sum = correct = count = 0.0
    for b in range(_lockstep_batches(len(mine), micro_batch)):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        batch = collate([examples[i] for i in idx] or [examples[0]], pad_id)
        batch = {k: v.to(dev) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if idx:  # a dummy batch contributes nothing
            nll, c, n = token_stats(logits, batch["labels"])
            nll_sum += nll.item()
            correct += c
            count += n
    tot = dist.all_reduce_sum([nll_sum, correct, count, len(mine)])
    loss = (tot[0] / tot[2]).item()
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "token_acc": (tot[1] / tot[2]).item(),
        "tokens": int(tot[2].item()),
        "examples": int(tot[3].item()),
    }


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation/articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@torch.no_grad()
def generate_metrics(
    module: Any,
    tokenizer: Any,
    examples: list[Example],
    micro_batch: int,
    max_new_tokens: int,
    synced: bool,
    samples: int = 10,
) -> dict[str, Any]:
    """Greedy-generate the last assistant turn of each example; exact-match accuracy.

    ``synced`` (ZeRO-3 with several ranks) keeps every rank generating until all
    are done, because each decoding step gathers parameters collectively.
    """
    if not examples:
        return {}
    mine = eval_shard(len(examples), dist.get_world_size(), dist.get_rank())
    dev = dist.device()
    exact = total = 0
    preds: list[dict[str, str]] = []
    for b in range(_lockstep_batches(len(mine), micro_batch)):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        prompts, refs = zip(
            *(tokenize_prompt(tokenizer, examples[i].messages) for i in (idx or [0])), strict=True
        )
        batch = {
            k: v.to(dev) for k, v in collate_prompts(list(prompts), tokenizer.pad_token_id).items()
        }
        out = module.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        if not idx:
            continue
        texts = tokenizer.batch_decode(
            out[:, batch["input_ids"].size(1) :], skip_special_tokens=True
        )
        for i, text, ref in zip(idx, texts, refs, strict=True):
            hit = normalize_answer(text) == normalize_answer(ref)
            exact += hit
            total += 1
            if len(preds) < samples:
                preds.append(
                    {
                        "source": examples[i].source,
                        "prediction": text.strip(),
                        "reference": ref,
                        "exact": hit,
                    }
                )
    tot = dist.all_reduce_sum([exact, total])
    gathered = [p for rank_preds in dist.all_gather_objects(preds) for p in rank_preds]
    return {
        "exact_match": (tot[0] / tot[1]).item(),
        "examples": int(tot[1].item()),
        "samples": gathered[:samples],
    }
