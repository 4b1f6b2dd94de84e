"""The batch equation: global batch = micro-batch x accumulation x data-parallel ranks,
solved once (:func:`batch_shape`)."""

from __future__ import annotations

from dataclasses import dataclass

from dsft.config.schema import TrainConfig
from dsft.errors import ConfigError


@dataclass(frozen=True)
class BatchShape:
    """Batch geometry of one optimizer step; derived once, used everywhere."""

    micro_batch: int
    grad_accum: int
    world_size: int  # all ranks
    sequence_parallel: int = 1  # ranks sharing each sequence (train.sequence_parallel)

    @property
    def data_parallel(self) -> int:
        """Ranks that see different sequences: the ranks of one sequence-parallel group see
        the same micro-batch, each its slice of the sequence."""
        return self.world_size // self.sequence_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel


def batch_shape(train: TrainConfig, world_size: int) -> BatchShape:
    """Derive gradient accumulation from ``train.global_batch`` (if set) and the world size.

    global batch = micro-batch x grad-accum x data-parallel size, where data-parallel size =
    ranks / train.sequence_parallel; this is the only place that equation is solved. A
    micro-batch or sequence-parallel degree of "auto" must be resolved by the planner
    (:func:`dsft.planner.resolve`) first.
    """
    for name in ("micro_batch", "sequence_parallel"):
        if getattr(train, name) == "auto":
            raise ConfigError([f"train.{name}=auto: resolve it with dsft.planner.resolve first"])
    sp = int(train.sequence_parallel)
    if world_size % sp:
        raise ConfigError(
            [
                f"train.sequence_parallel: {sp} does not divide the {world_size} ranks; run a "
                f"multiple of {sp} ranks or choose a divisor of {world_size}"
            ]
        )
    dp = world_size // sp
    if train.global_batch <= 0:
        return BatchShape(int(train.micro_batch), train.grad_accum, world_size, sp)
    per_step = train.micro_batch * dp
    if train.global_batch % per_step:
        raise ConfigError(
            [
                f"train.global_batch: {train.global_batch} is not a multiple of train.micro_batch "
                f"({train.micro_batch}) x data-parallel ranks ({dp}) = {per_step}; choose a "
                f"multiple of {per_step} or change the micro-batch"
            ]
        )
    return BatchShape(train.micro_batch, train.global_batch // per_step, world_size, sp)
