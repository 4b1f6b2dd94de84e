"""Tiled MLP (``model.tiled_mlp``): each block's MLP runs over tiles of the sequence through
DeepSpeed's ``sequence_tiled_compute`` and is recomputed tile by tile in backward, so its
wide (intermediate-size) activations exist for one tile at a time. Long rows need it with or
without sequence parallelism (dsft/sequence_parallel.py), which divides the tile count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch


def tile_mlp(model: torch.nn.Module, tiles: int) -> int:
    """Run every block's MLP (modules named ``mlp``) over ``tiles`` sequence tiles in training.

    The tile count is fixed for the run (from ``data.max_len``), not derived from each batch,
    so under ZeRO-3 every rank gathers the MLP's weights the same number of times. Returns
    the number of MLPs tiled.
    """
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "mlp" and not hasattr(module, "_dsft_untiled"):
            module._dsft_untiled = module.forward
            module.forward = functools.partial(_tiled_forward, module, module.forward, tiles)
            count += 1
    return count


def tiles_for(max_len: int, sequence_parallel: int, hidden: int) -> int:
    """Tiles per sequence slice: about ``hidden`` tokens each (DeepSpeed's choice: one tile's
    intermediate activations then weigh about as much as the MLP's weights)."""
    return max(1, math.ceil(max_len // max(sequence_parallel, 1) / hidden))


def _tiled_forward(module: torch.nn.Module, forward: Callable, tiles: int, x: torch.Tensor) -> Any:
    params = [p for p in module.parameters() if p.requires_grad]
    # Tiling saves memory only for backward; and its autograd function passes gradients to
    # the weights only through x, so an input that needs none (everything below frozen)
    # takes the plain path.
    if not (module.training and torch.is_grad_enabled() and x.requires_grad) or x.dim() != 3:
        return forward(x)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    return sequence_tiled_compute(
        lambda x: forward(x),
        x.shape[1],
        tiles,
        kwargs_to_shard={"x": x},
        kwargs_to_pass={},
        grad_requiring_tensor_key="x",
        compute_params=params,
        output_unshard_dimension=1,
        output_reduction=None,
    )
