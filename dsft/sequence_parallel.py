"""Long sequences: Ulysses sequence parallelism (the tiled MLP is dsft/tiled_mlp.py).

Sequence parallelism (``train.sequence_parallel: N``). The N ranks of a group
(:func:`dsft.distributed.sequence_parallel_groups`) get the same micro-batch and each keeps
1/N of every row (:meth:`SequenceParallel.shard`). Everything but attention is per token, so
each rank runs the model on its slice; attention swaps the split (Ulysses): an all-to-all
turns [seq/N tokens, all heads] into [all tokens, heads/N], each rank attends over the whole
sequence with its heads, and a second all-to-all turns the result back. Activations per rank
shrink about N-fold; the exchange is 4 all-to-alls of the attention width per layer.

What is DeepSpeed's and what is ours:
- the exchange is DeepSpeed's ``UlyssesSPAttentionHF`` (its all-to-all is a registered,
  differentiable operator), and DeepSpeed gets its sequence-parallel ``mpu``, so ZeRO
  partitions over all ranks and averages gradients over the data-parallel ones;
- its ``register_with_transformers`` we do not use: it replaces "sdpa" in transformers'
  global table for the whole process and drops the attention mask, so packed rows (position
  ids restarting per example) would attend across examples. Instead the exchange runs under
  its own attention name only inside :meth:`SequenceParallel.sharded` (one micro-batch's
  forward and backward, gradient-checkpointing recomputation included); validation,
  generation and export see the unchanged model. The mask of the whole row is rebuilt once
  per micro-batch from its position ids, which every rank of the group holds: causal, and
  within each packed example, exactly what transformers builds for the unsplit row.

Labels are shifted *before* the split (each position carries the label of the next token),
so the token after a slice boundary is predicted by the rank holding the position before it,
once; the loss of a micro-batch is the sum of the ranks' slice losses.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from dsft.data.tokenize import IGNORE_INDEX
from dsft.distributed import SequenceParallelGroups
from dsft.errors import ConfigError
from dsft.flops import text_config

ATTENTION = "dsft_ulysses"  # the attention name the model runs under while sharded

_active: SequenceParallel | None = None  # the group whose micro-batch is being computed


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: ``out[:, t]`` is the label of token ``t + 1`` (the last
    position has none). Shifted before any split, so a slice's targets are its own."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class SequenceParallel:
    """One rank's part in sequence parallelism: splits micro-batches, runs the exchange."""

    def __init__(self, groups: SequenceParallelGroups, model: torch.nn.Module) -> None:
        self.size, self.rank, self.group = groups.size, groups.rank, groups.group
        config = _hf_config(model)
        self.config = config
        self.core = config._attn_implementation
        text = text_config(config)
        self.heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // self.heads)
        self.layers = int(text.num_hidden_layers)
        if self.size > 1 and (self.heads % self.size or self.kv_heads % self.size):
            raise ConfigError(
                [
                    f"train.sequence_parallel={self.size}: the model's {self.heads} attention / "
                    f"{self.kv_heads} key-value heads are not divisible by it"
                ]
            )
        self._exchange: dict[int, Any] = {}  # UlyssesSPAttentionHF per micro-batch size
        self._positions: torch.Tensor | None = None  # the whole rows' position ids
        self._mask: dict[Any, torch.Tensor | None] = {}
        if self.size > 1:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTENTION, _attention)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def shard(
        self, micro: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's slice of a micro-batch and its targets (:func:`shift_labels`).

        Rows are padded to a multiple of N (padding after the last token, with continuing
        positions and no targets, changes no real token's output: attention is causal).
        Without sequence parallelism the micro-batch is returned whole.
        """
        targets = shift_labels(labels)
        if not self.enabled:
            return micro, targets
        ids = micro["input_ids"]
        rows, width = ids.shape
        pos = micro.get("position_ids")
        if pos is None:  # unpacked rows are right-padded: positions are 0..width-1
            pos = torch.arange(width, device=ids.device).expand(rows, width)
        pad = -width % self.size
        if pad:
            more = pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)
            pos = torch.cat([pos, more], dim=1)
            ids = F.pad(ids, (0, pad), value=0)
            targets = F.pad(targets, (0, pad), value=IGNORE_INDEX)
        chunk = (width + pad) // self.size
        part = slice(self.rank * chunk, (self.rank + 1) * chunk)
        self._positions, self._mask = pos, {}
        # no attention_mask: the exchange builds the whole row's mask from the positions
        return {"input_ids": ids[:, part], "position_ids": pos[:, part]}, targets[:, part]

    @contextlib.contextmanager
    def sharded(self) -> Iterator[None]:
        """Run the model on slices: wrap one micro-batch's forward *and* backward (which may
        recompute attention under gradient checkpointing)."""
        global _active
        if not self.enabled:
            yield
            return
        self.config._attn_implementation = ATTENTION
        _active = self
        try:
            yield
        finally:
            self.config._attn_implementation = self.core
            _active = None

    # ------------------------------------------------------------------ attention

    def exchange(self, rows: int) -> Any:
        """DeepSpeed's Ulysses all-to-all for micro-batches of ``rows`` rows."""
        if rows not in self._exchange:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            self._exchange[rows] = UlyssesSPAttentionHF(
                attn=self.attend,
                batch_size=rows,
                attn_head_count=self.heads,
                attn_head_size=self.head_dim,
                kv_head_count=self.kv_heads,
                num_hidden_layers=self.layers,
                process_group=self.group,
                seq_length_is_variable=True,
            )
        return self._exchange[rows]

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """The model's own attention over whole rows (this rank's heads), with the mask the
        unsplit row would get."""
        if self.core == "flash_attention_2":  # finds packed examples in position_ids itself
            from transformers import AttentionInterface

            fn = AttentionInterface._global_mapping[self.core]
            return fn(module, query, key, value, None, *args, **kwargs)
        if self.core == "eager":
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise ConfigError(
                    [
                        f"train.sequence_parallel: {type(module).__name__} has no "
                        "eager_attention_forward; use model.attn_implementation=sdpa"
                    ]
                )
        else:
            from transformers import AttentionInterface

            fn = AttentionInterface._global_mapping[self.core]
        return fn(module, query, key, value, self.row_mask(query.dtype), *args, **kwargs)

    def row_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Causal mask of the whole rows, within packed examples; built once per micro-batch.

        sdpa on unpacked rows needs none (its causal kernel); eager always adds one.
        """
        eager = self.core == "eager"
        key = dtype if eager else "bool"
        if key in self._mask:
            return self._mask[key]
        pos = self._positions
        assert pos is not None, "shard() a micro-batch before running the model on it"
        # An example starts wherever the position does not continue the previous one
        # (transformers' find_packed_sequence_indices).
        step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        example = (step != 1).cumsum(-1)
        packed = bool((example[:, -1] != 0).any())
        mask: torch.Tensor | None = None
        if packed or eager:
            n = pos.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=pos.device).tril()
            allowed = causal[None] & (example[:, :, None] == example[:, None, :])
            allowed = allowed[:, None]  # [rows, 1, n, n], shared by the heads
            if eager:
                mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
                mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            else:
                mask = allowed
        self._mask[key] = mask
        return mask


def gradient_divisor(data_parallel: int, sequence_parallel: int, zero_stage: int) -> int:
    """What DeepSpeed 0.19.8 divides the summed gradients of all ranks by: the data-parallel
    ranks, except at ZeRO-3, whose reduce-scatter (dsft always asks for it) divides by every
    rank of the partition group, sequence-parallel ones included. The loop multiplies each
    micro-batch's loss by this, so the step's gradient is exact either way (a test pins it)."""
    return data_parallel * (sequence_parallel if zero_stage == 3 else 1)


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The attention function registered as :data:`ATTENTION` (active only while sharded)."""
    sp = _active
    if sp is None:
        raise RuntimeError(f"attention {ATTENTION!r} runs only inside SequenceParallel.sharded()")
    return sp.exchange(query.shape[0])(module, query, key, value, None, *args, **kwargs)


def _hf_config(model: torch.nn.Module) -> Any:
    """The Hugging Face config the attention layers read (through peft and engine wrappers)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner.config
