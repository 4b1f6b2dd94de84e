"""Packing several examples into one row, with attention that cannot cross them.

Rows are filled best-fit decreasing: examples sorted longest first, each put in
the open row whose free space it fills most tightly (a new row if none fits).
On typical SFT length spreads this wastes a few percent of the slots, against
30-60 % padding for length-unaware batches.

A packed row carries ``position_ids`` that restart at 0 for every example and no
``attention_mask`` (``token_mask`` marks the real tokens for the MoE router loss only).
transformers turns restarting position ids into per-example attention: flash-attention
varlen uses them as sequence boundaries, and SDPA / eager / flex get a block-diagonal
causal mask (``find_packed_sequence_indices``).
The first label of every example is -100: unpacked, position 0 is never
predicted, so a packed row must not predict it from the previous example either.
Then the loss and gradients of a packed batch equal those of the same examples
unpacked (tests/unit/test_packing.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from dsft.attention import SEGMENTS_KEY, cu_seqlens_from_lengths
from dsft.data.tokenize import IGNORE_INDEX, Tokenized


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices, each summing to at most ``capacity``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # open bins as (free space, bin id), sorted, so the tightest fit is one bisect away
    free: list[tuple[int, int]] = []
    for i in order:
        n = min(int(lengths[i]), capacity)
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Real tokens / slots of the packed rows."""
    return sum(min(int(x), capacity) for x in lengths) / max(len(bins) * capacity, 1)


def collate_packed(
    rows: list[list[Tokenized]], pad_id: int, token_mask: bool = False, cu_seqlens: bool = False
) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; pad rows to the longest with a pad segment.

    ``token_mask``: also the mask of the real tokens (not a model input: the MoE router
    loss's, dsft/moe.py). ``cu_seqlens``: also the segments' cumulative lengths over the
    flattened rows, counted here on the host (``dsft_cu_seqlens``, int32), for the varlen
    attention (dsft.attention).
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    lengths: list[int] = []
    per_row: list[list[int]] = []
    for r, row in enumerate(rows):
        per_row.append([len(e.input_ids) for e in row])
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:])
            pos[r, at : at + n] = torch.arange(n)
            lengths.append(n)
            at += n
        # padding forms its own segment (positions restart), so no example attends to it
        pos[r, at:] = torch.arange(width - at)
        real[r, :at] = 1
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "labels": labels,
        "lengths": torch.tensor(lengths),
    }
    if token_mask:
        batch["token_mask"] = real
    if cu_seqlens:
        batch[SEGMENTS_KEY] = cu_seqlens_from_lengths(per_row, width)
    return batch
