"""One optimizer step of an objective, and what it hands the loop.

An objective is what the training loop is generic over: how its data is prepared
(``prepare``, called by dsft.job.open_job), how a micro-batch is built from the training split
(``batch``), how one optimizer step runs on a window of them (``step``) and the objective's own
scalars (``StepResult.metrics``, averaged over the good steps by the StepMeter). Supervised
fine-tuning (``sft``) is the one today; a preference objective adds its own ``prepare``,
``batch`` and ``step`` and an entry in :func:`dsft.objectives.objective_for`, and runs in the same loop, with
the same checkpoints, resume, logging and planner. A step that needs state built from the
engine (reference log-probs) can be a bound method of an object made after build_engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dsft import attention, distributed, flops, loss, moe
from dsft.data import Splits, prepare
from dsft.data.collate import collate
from dsft.data.packing import collate_packed
from dsft.data.tokenize import IGNORE_INDEX
from dsft.job import Prepare
from dsft.optim import guard_zero0_fp32_step

if TYPE_CHECKING:
    from dsft.engine import Engine


@dataclass
class Window:
    """The micro-batches of one optimizer step on this rank (``train.grad_accum`` of them)."""

    micro_batches: list[dict[str, torch.Tensor]]
    nan_fault: bool = False  # test hook (DSFT_FAULT_NAN_STEPS): make this step's loss NaN


class WindowLoader:
    """The micro-batches of each window, built one window ahead in a background thread when
    the rows have images (``ahead``): decoding the pictures and the processor's resizing and
    normalising, the costly part of an image batch, overlap the step, as a DataLoader
    worker's would, without copying the splits into worker processes. Text batches (a
    collate of token lists) are built in line. Either way a window holds exactly what
    building it in line gives, in the same order; an error (a bad image) is raised when its
    window is asked for."""

    def __init__(self, build: Callable[[list[int]], dict[str, torch.Tensor]], ahead: bool):
        self._build = build
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dsft-loader") if ahead else None
        self._next: tuple[list[list[int]], Future] | None = None

    def _make(self, batches: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        return [self._build(b) for b in batches]

    def window(
        self, batches: list[list[int]], following: list[list[int]]
    ) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of ``batches``; starts building ``following`` (the next window
        of the epoch, empty at its end) when loading ahead."""
        ahead, self._next = self._next, None
        micro = ahead[1].result() if ahead and ahead[0] == batches else self._make(batches)
        if self._pool is not None and following:
            self._next = (following, self._pool.submit(self._make, following))
        return micro

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class StepResult:
    """What one optimizer step hands the loop (every number already global, but tokens)."""

    loss: float  # the step's loss: global sum of token losses / global target count
    targets: float  # the global number of target tokens (the loss's denominator)
    tokens: int  # this rank's real (non-pad) tokens, once per sequence-parallel group
    sq_tokens: int  # ... and the sum of their squares per example (attention FLOPs)
    skipped: bool  # DeepSpeed skipped the update (non-finite gradients or fp16 overflow)
    stop: bool  # some rank was asked to stop (SIGTERM / SIGUSR1)
    grad_norm: float | None = None  # our pre-clip norm where DeepSpeed keeps none (ZeRO-0 fp32)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own scalars
    patches: int = 0  # this rank's image patches (the tower's FLOPs, dsft.flops.Tower) ...
    sq_patches: int = 0  # ... and the sum of their squares per image


Batch = Callable[[Splits, list[list[int]], list[int], int], dict[str, torch.Tensor]]
Step = Callable[["Engine", Window], StepResult]


@dataclass(frozen=True)
class Objective:
    """What the training loop is generic over (see the module docstring)."""

    name: str
    prepare: Prepare  # (data config, tokenizer, builder) -> Splits (see dsft.data.prepare)
    batch: Batch  # (splits, units, unit indices of one micro-batch, pad id) -> tensors
    step: Step  # (engine, window) -> StepResult; forward, backward and engine.step()
    # Objectives with state built from the engine (preference: reference log-probs): the
    # objective the loop runs once the engine exists (None: this one as it is).
    start: Callable[[Any, Engine], Objective] | None = None
    # The objective's own validation metrics, merged into the Evaluator's (None: none).
    validation: Callable[[Any], dict[str, float]] | None = None


def sft_batch(
    splits: Splits, units: list[list[int]], batch: list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """The tensors of one micro-batch: padded examples, or packed rows (data.packing); with
    a multimodal processor (``splits.images``), the rows' image inputs too."""
    if splits.packs:  # token_mask: the real tokens of packed rows (the MoE router loss's mask)
        rows = [[splits.train[i] for i in units[u]] for u in batch]
        micro = collate_packed(rows, pad_id, token_mask=True)
    else:
        micro = collate([splits.train[units[u][0]] for u in batch], pad_id)
    images = getattr(splits, "images", None)
    if images is not None:
        images.add(micro, splits.train, [i for u in batch for i in units[u]])
    return micro


def sft_step(engine: Engine, window: Window) -> StepResult:
    """One optimizer step of supervised fine-tuning on ``window``.

    Loss normalisation: the loss of an optimizer step is the sum of the token losses of every
    response token in the global batch divided by the global number of such tokens. Each
    micro-batch therefore contributes ``sum_nll * D / global_tokens``, where D is what DeepSpeed
    divides the gradients summed over all ranks by (the data-parallel size:
    dsft.sequence_parallel.gradient_divisor), and we tell it not to divide by grad_accum again,
    so neither gradient accumulation nor the number of ranks changes the step. With sequence
    parallelism (dsft/sequence_parallel.py) each rank's ``sum_nll`` covers its slice of the
    rows and the target count is taken once per row, by the first rank of its group.

    Host syncs: target counts come from the collated CPU batch; the micro-batch losses add up
    on the device; the host waits for the device twice per optimizer step (the global target
    count before the first forward, the global loss and stop flag after the step), plus the
    logging steps' grad norm. With ``train.fused_loss`` (dsft/loss.py) no full-vocabulary
    logits exist: the loss comes from the target positions' hidden states through the LM head
    in chunks (on a sequence-parallel rank: its slice's).

    Mixture of experts (``engine.router``, dsft/moe.py): the objective adds the router's
    load-balancing loss, ``coef ×`` its mean over the step's micro-batches (all ranks); the
    step's ``loss`` stays the token mean of the NLL and ``metrics["aux_loss"]`` is that mean
    (before its coefficient), logged as ``train/aux_loss``.
    """
    ds, sp, dev = engine.ds, engine.sp, engine.device
    # Count the response tokens of the whole global batch before any backward, so every
    # micro-batch can be weighted by the same global denominator (counted on the host, from
    # the CPU tensors: no device sync). The ranks of a sequence-parallel group hold the same
    # rows: the first counts them.
    window_targets = sum(
        int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in window.micro_batches
    )
    window_targets *= sp.rank == 0
    global_targets = distributed.all_reduce_sum([window_targets])[0].item()
    own_norm = None
    step_nll = torch.zeros((), dtype=torch.float64, device=dev)  # summed on device
    step_aux = torch.zeros((), dtype=torch.float64, device=dev)  # MoE router loss, summed
    router = engine.router
    n = len(window.micro_batches) * engine.data_parallel  # the step's micro-batches, all ranks
    tokens = sq_tokens = patches = sq_patches = 0
    skipped_before = ds.skipped_steps
    for i, micro in enumerate(window.micro_batches):
        lengths = micro.pop("lengths")  # real tokens per example (for throughput)
        # real tokens of packed rows (no attention mask): the router loss's mask
        real = micro.pop("token_mask", micro.get("attention_mask"))
        # This rank's slice of the rows (all of them without sequence parallelism) and its
        # targets, shifted before the split (on the host: no device sync).
        micro, targets = sp.shard(micro, micro.pop("labels"))
        micro = {k: v.to(dev) for k, v in micro.items()}
        if engine.toucher is not None:  # ZeRO-3: no image here, the tower runs all the same
            engine.toucher.arm("pixel_values" not in micro)
        with sp.sharded():  # forward and backward (checkpointing recomputes in it)
            # No KV cache in training; transformers would also ignore packed-row
            # boundaries (restarting position_ids) when given one. train.fused_loss
            # (engine.head): no full logits.
            router_logits: list | None = [] if router is not None else None
            nll = loss.micro_nll(ds, engine.head, micro, targets, router_logits)
            if window.nan_fault:
                nll = nll * float("nan")  # test hook: a step whose loss blows up
            objective = nll * engine.grad_divisor / global_targets
            if router is not None:
                aux = router_aux(engine, router_logits, real)
                step_aux += aux.detach().double()
                objective = objective + aux * moe.aux_weight(router.coef, engine.grad_divisor, n)
            ds.backward(objective, scale_wrt_gas=False)
        if i == len(window.micro_batches) - 1 and engine.zero0_fp32:
            own_norm = guard_zero0_fp32_step(ds)
        ds.step()  # clips and steps only at the accumulation boundary
        step_nll += nll.detach().double()
        if sp.rank == 0:  # a group's rows are counted once
            tokens += int(lengths.sum())
            sq_tokens += int((lengths**2).sum())
            p, sq = flops.image_patches(micro, engine.tower)
            patches, sq_patches = patches + p, sq_patches + sq
    (nll_sum, aux_sum), stop = reduce_with_stop(torch.stack([step_nll, step_aux]), dev)
    return StepResult(
        loss=nll_sum / global_targets,
        targets=global_targets,
        tokens=tokens,
        sq_tokens=sq_tokens,
        skipped=ds.skipped_steps > skipped_before,
        stop=stop,
        grad_norm=own_norm,
        patches=patches,
        sq_patches=sq_patches,
        # MoE: the mean router aux loss of the step's micro-batches (before its coefficient)
        metrics={"aux_loss": aux_sum / n} if router is not None else {},
    )


def router_aux(engine: Engine, router_logits: Any, real: torch.Tensor | None) -> torch.Tensor:
    """A micro-batch's router load-balancing loss (dsft/moe.py); ``real``: the mask of its
    real tokens. Under sequence parallelism, this rank's share of the whole rows' loss."""
    assert engine.router is not None
    sp = engine.sp
    if sp.enabled:  # the whole rows' loss from the group's slices
        return engine.router.of_slices(router_logits, real, sp.group, sp.size)
    return engine.router(router_logits, real)


def reduce_with_stop(values: torch.Tensor, dev: Any) -> tuple[list[float], bool]:
    """The global sums of a step's device scalars (``values``: 1-D), and whether any rank was
    asked to stop: one all-reduce, the step's one wait for the device."""
    stop = torch.tensor([float(distributed.stop_requested() is not None)], dtype=values.dtype)
    *totals, stops = distributed.all_reduce_sum(torch.cat([values, stop.to(dev)])).tolist()
    return totals, bool(stops)


SFT = Objective("sft", prepare, sft_batch, sft_step)


def with_segments(objective: Objective, attn_implementation: str) -> Objective:
    """``objective`` whose packed micro-batches also carry their rows' segments (cu_seqlens,
    counted on the host from the position ids) when the attention wants them (varlen:
    dsft.attention); unchanged otherwise."""
    if not attention.wants_segments(attn_implementation):
        return objective

    def batch(*args: Any) -> dict[str, torch.Tensor]:
        b = objective.batch(*args)
        if "position_ids" in b and attention.SEGMENTS_KEY not in b:
            b[attention.SEGMENTS_KEY] = attention.cu_seqlens_from_positions(b["position_ids"])
        return b

    return dataclasses.replace(objective, batch=batch)
