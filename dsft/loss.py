"""The token loss without full logits: the LM head applied, in chunks, to target positions only.

The plain path (``train.fused_loss=false``) asks the model for ``[batch, seq, vocab]``
logits, makes a float32 copy and then a gradient of the same size: about 5 GB per
4,096-token sequence for a vocabulary of 128,256. Here the model's forward stops at the
final hidden states (``logits_to_keep=1``: one position per row goes through the head,
a rounding error), the hidden states of the positions whose next token carries loss are
picked out with an index computed on the host, and the head runs on them a chunk at a
time. In training each chunk's gradients (with respect to the hidden states and the head
weight) are computed right there, in forward, from its softmax, and the logits dropped:
backward only scales them by the incoming gradient. So at most one chunk's logits exist
at any time and nothing is recomputed (the FLOPs of a plain forward + backward).

The head's weight is the model's own (``get_output_embeddings()``; peft's trained copy
under ``modules_to_save``), trained, frozen or tied alike. Under ZeRO-3 it is partitioned:
the chunked computation runs as the forward of the head's own module, so ZeRO-3's hooks
gather the weight for it (once per micro-batch) and again for its backward, where the full
gradient is accumulated while the weight is whole and ZeRO-3's own hook reduce-scatters it.
A head that is not a plain linear layer (LoRA on the head itself) is called as a module,
each chunk gradient-checkpointed; not under ZeRO-3. Evaluation calls the head module per
chunk without gradients; under ZeRO-3 every call gathers collectively, so ranks agree on
the number of chunks (``lockstep_chunks``).

``chunked_nll`` is the piece other paths reuse (sequence parallelism calls it on its
local shard of hidden states and shifted labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dsft import distributed
from dsft.data.tokenize import IGNORE_INDEX
from dsft.flops import text_config

# Rows per chunk are chosen so that one chunk's float32 logits take about this much.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Target rows per chunk for a vocabulary: ~256 MiB of float32 logits (>= 64 rows)."""
    return max(64, chunk_bytes // (4 * vocab))


def num_chunks(n_targets: int, vocab: int) -> int:
    """Chunks for ``n_targets`` rows (at least 1)."""
    return max(1, math.ceil(n_targets / chunk_rows(vocab)))


def lockstep_chunks(counts: list[int], vocab: int, lockstep: bool) -> list[int]:
    """Chunks per micro-batch; with ``lockstep`` (ZeRO-3, several ranks) the largest over
    the ranks, so every rank calls the head (a collective gather) equally often."""
    if lockstep:
        counts = distributed.all_reduce_max_list(counts)
    return [num_chunks(n, vocab) for n in counts]


def logits_nll(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Summed next-token NLL of full ``[batch, seq, vocab]`` logits (the plain path).
    ``shifted``: ``labels`` are already aligned with ``logits`` (the next tokens' ids)."""
    logits = logits.float() if shifted else logits[:, :-1].float()
    target = labels if shifted else labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_index(labels: torch.Tensor, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions into ``hidden.view(-1, H)``, their next-token ids) of every target.

    Position t of a row predicts token t+1, so the targets are ``labels[:, 1:]`` and the
    predicting positions are t; ``shifted`` labels are already those targets, aligned with
    the positions (dsft.sequence_parallel.shift_labels, a rank's slice of them). Call it on
    the collated CPU batch: the selection size is then known without asking the device (a
    boolean mask on the device would sync).
    """
    target = labels if shifted else labels[:, 1:]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.size(1) + cols, target[rows, cols]


@dataclass
class Head:
    """The module mapping final hidden states to logits, its vocabulary, the logit soft-cap."""

    module: Callable[[torch.Tensor], torch.Tensor]
    vocab: int
    softcap: float | None = None


def output_head(model: Any) -> Head:
    """The LM head of ``model``: a transformers causal LM, or a peft model around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (LM head)")
    cfg = text_config(base.config)  # a multimodal model's language part has the head
    # out_features survives ZeRO-3 partitioning (the weight itself is then empty)
    vocab = getattr(head, "out_features", None) or cfg.vocab_size
    return Head(head, int(vocab), getattr(cfg, "final_logit_softcapping", None))


def _logits(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    logits = head(h).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunk_sum(head, softcap, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = _logits(head, h, softcap)
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def head_linear(module: Any) -> torch.nn.Linear | None:
    """The plain (bias-free) linear layer that holds the head's weight, seen through peft's
    ``modules_to_save`` wrapper; None for anything else (e.g. LoRA on the head itself)."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = [] if module.disable_adapters else module.active_adapters
        if active and active[0] in module.modules_to_save:
            module = module.modules_to_save[active[0]]
        else:
            module = module.original_module
    if type(module) is torch.nn.Linear and module.bias is None:
        return module
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of ``targets`` from ``hidden @ weight.T``, chunk by chunk; the gradients
    are made in forward (the logits never outlive their chunk) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunks, softcap):  # type: ignore[override]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        start = 0
        for h, y in zip(
            torch.tensor_split(hidden, chunks), torch.tensor_split(targets, chunks), strict=True
        ):
            rows = h.size(0)
            raw = (h @ weight.t()).float()  # as the plain path: the head in the model's dtype
            z = softcap * torch.tanh(raw / softcap) if softcap else raw
            keep = y != IGNORE_INDEX
            safe = torch.where(keep, y, 0)
            lse = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * keep).sum()
            if want_h or want_w:
                dz = torch.exp(z - lse[:, None])  # softmax, then minus the one-hot target
                dz[torch.arange(rows, device=dz.device), safe] -= 1.0
                dz *= keep[:, None]
                if softcap:
                    dz *= 1.0 - (z / softcap) ** 2
                dz = dz.to(hidden.dtype)
                if want_h:
                    grad_h[start : start + rows] = dz @ weight
                if want_w:  # summed over chunks in fp32 (in place: no [vocab, H] temporary)
                    if h.dtype == torch.float32:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w.add_(dz.t() @ h)
            start += rows
        # Kept on ctx (not saved tensors): backward scales them in place and lets go, so
        # no second copy of the head's gradient ever exists.
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_out.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    """Per-target log-probs of ``targets`` (all scored) from ``hidden @ weight.T``, chunk by
    chunk: forward keeps no logits; backward, given each target's gradient (a preference
    loss weighs every sequence differently), recomputes one chunk's logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunks, softcap):  # type: ignore[override]
        out = []
        for h, y in zip(
            torch.tensor_split(hidden, chunks), torch.tensor_split(targets, chunks), strict=True
        ):
            z = _logits(lambda x: x @ weight.t(), h, softcap)
            out.append(z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, dim=-1))
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunks, ctx.softcap = chunks, softcap
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        softcap = ctx.softcap
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )
        start = 0
        for h, y, g in zip(
            torch.tensor_split(hidden, ctx.chunks),
            torch.tensor_split(targets, ctx.chunks),
            torch.tensor_split(grad_out.float(), ctx.chunks),
            strict=True,
        ):
            rows = h.size(0)
            z = _logits(lambda x: x @ weight.t(), h, softcap)
            dz = torch.softmax(z, dim=-1).mul_(-g[:, None])  # d log p(y) / dz = onehot - p
            dz[torch.arange(rows, device=dz.device), y] += g
            if softcap:
                dz *= 1.0 - (z / softcap) ** 2
            dz = dz.to(hidden.dtype)
            if want_h:
                grad_h[start : start + rows] = dz @ weight
            if want_w:
                grad_w.add_(dz.t().float() @ h.float())
            start += rows
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None


def chunked_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, softcap: float | None
) -> torch.Tensor:
    """Log-prob of each of ``targets`` [N] (all scored) from ``hidden`` [N, H] through the
    plain linear LM head ``head`` (:func:`head_linear`), never more than one chunk of logits
    at a time (train.fused_loss for the preference objective). Through the head's module, so
    ZeRO-3 gathers its weight once for forward and once for backward, whatever the chunk
    count (ranks need not agree on it)."""
    chunks = num_chunks(targets.numel(), head.out_features)
    return _through_module(head, hidden, targets, chunks, softcap, _LinearLogProbs)


def _through_module(
    lin: torch.nn.Linear, hidden, targets, chunks, softcap, fn: Any = _LinearCrossEntropy
) -> torch.Tensor:
    """``fn`` (``_LinearCrossEntropy``) run as the forward of the head's own module, so that
    ZeRO-3's hooks gather its partitioned weight for forward and again for backward, where the
    weight's full gradient is accumulated while it is whole (DeepSpeed's own order)."""

    def forward(h: torch.Tensor) -> torch.Tensor:
        return fn.apply(h, lin.weight, targets, chunks, softcap)

    lin.forward = forward  # an instance attribute: nn.Module.__call__ runs it, hooks and all
    try:
        return lin(hidden)
    finally:
        del lin.forward


def chunked_nll(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    chunks: int = 0,
    *,
    softcap: float | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL of ``targets`` [N] predicted from ``hidden`` [N, H] through ``head``, in chunks.

    ``head`` is the LM head module (or its weight: then ``F.linear``). ``chunks`` = 0 picks
    the count from the size; pass an explicit count where ranks must agree (ZeRO-3).
    Returns the summed NLL (a tensor in the graph) and ``None``; with ``per_token`` (no
    gradient: evaluation) the NLL per target [N] and whether the argmax was right [N].
    Targets equal to -100 are ignored (zero loss, never right).
    """
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    grad = torch.is_grad_enabled() and not per_token
    if isinstance(head, torch.Tensor):
        if hasattr(head, "ds_id"):
            raise ValueError("chunked_nll: under ZeRO-3 pass the head module, not its weight")
        weight = head
        chunks = chunks or num_chunks(targets.numel(), weight.size(0))
        if grad:
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunks, softcap), None
        head = lambda h: F.linear(h, weight)  # noqa: E731
    elif grad and (lin := head_linear(head)) is not None:
        chunks = chunks or num_chunks(targets.numel(), lin.out_features)
        return _through_module(lin, hidden, targets, chunks, softcap), None
    elif grad and any(hasattr(p, "ds_id") for p in head.parameters()):
        raise ValueError(
            "train.fused_loss under ZeRO-3 needs a plain linear LM head (this one is "
            f"{type(head).__name__}); set train.fused_loss=false"
        )
    if not chunks:
        vocab = getattr(head, "out_features", None) or getattr(head, "num_embeddings", 1 << 17)
        chunks = num_chunks(targets.numel(), vocab)
    parts = zip(
        torch.tensor_split(hidden, chunks), torch.tensor_split(targets, chunks), strict=True
    )
    if per_token:
        nll, right = [], []
        with torch.no_grad():
            for h, y in parts:
                logits = _logits(head, h, softcap)
                nll.append(F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="none"))
                right.append((logits.argmax(-1) == y) & (y != IGNORE_INDEX))
        return torch.cat(nll), torch.cat(right)
    total: torch.Tensor | None = None
    grad = torch.is_grad_enabled()
    for h, y in parts:
        if grad:
            # Recompute this chunk's logits in backward instead of keeping them.
            s = checkpoint(_chunk_sum, head, softcap, h, y, use_reentrant=False)
        else:
            s = _chunk_sum(head, softcap, h, y)
        total = s if total is None else total + s
    assert total is not None
    return total, None


def final_hidden(
    model: Callable, inputs: dict[str, torch.Tensor], router_logits: list | None = None
) -> torch.Tensor:
    """The final (normed) hidden states [batch, seq, H] from the model's forward.

    Through the model's (the engine's) own forward, so DeepSpeed's hooks, compilation and
    peft all apply; ``logits_to_keep=1`` sends a single position per row through the head.
    The last of ``hidden_states`` is the input of the LM head in transformers' decoders.
    ``router_logits`` (a list): a mixture of experts' router logits of this forward, one
    tensor per MoE layer, are appended to it (dsft/moe.py).
    """
    extra = {"output_router_logits": True} if router_logits is not None else {}
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1, **extra)
    if router_logits is not None:
        router_logits.extend(out.router_logits or ())
    return out.hidden_states[-1]


def fused_nll(
    model: Callable,
    head: Head,
    inputs: dict[str, torch.Tensor],
    index: torch.Tensor,
    targets: torch.Tensor,
    chunks: int = 0,
    per_token: bool = False,
    router_logits: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunked_nll`` of one micro-batch: forward to hidden states, pick targets, head.
    ``chunks`` = 0: by size (training gathers the head once whatever the count).
    ``router_logits``: as :func:`final_hidden`."""
    hidden = final_hidden(model, inputs, router_logits)
    picked = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
    return chunked_nll(
        picked, targets, head.module, chunks, softcap=head.softcap, per_token=per_token
    )


def micro_nll(
    model: Callable,
    head: Head | None,
    inputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    router_logits: list | None = None,
) -> torch.Tensor:
    """Summed NLL of one training micro-batch: ``inputs`` on the device, ``targets`` the
    shifted labels (on the host). With ``head`` (``train.fused_loss``) no full logits are
    made; without, the model's logits. ``router_logits``: as :func:`final_hidden`."""
    dev = inputs["input_ids"].device
    if head is not None:
        index, ids = target_index(targets, shifted=True)
        nll, _ = fused_nll(
            model, head, inputs, index.to(dev), ids.to(dev), router_logits=router_logits
        )
        return nll
    extra = {"output_router_logits": True} if router_logits is not None else {}
    out = model(**inputs, use_cache=False, **extra)
    if router_logits is not None:
        router_logits.extend(out.router_logits or ())
    return logits_nll(out.logits, targets.to(dev), shifted=True)
