"""Attention: which implementation a run uses, and the varlen path for packed rows.

``model.attn_implementation: auto`` (the default) is resolved once, before the model loads,
by :func:`resolve` from the model family's support (read from its class, not by loading it),
the hardware and the batch shape:

- CUDA, packed rows (``data.packing``), bf16/fp16, a family whose attention is plain causal
  softmax attention: ``varlen`` — a flash kernel on the rows' segment boundaries, no 4-D mask;
- CUDA otherwise: ``sdpa``; a family without sdpa (GPT-OSS: attention sinks): FlexAttention
  where the family has it, else ``eager``;
- CPU: ``sdpa``, or ``eager`` for a family without sdpa;
- sequence parallelism: ``sdpa`` (``eager`` without it): the Ulysses exchange wraps those.

An explicit choice the family cannot run is a :class:`ConfigError` naming what it can, never
transformers' traceback from inside ``from_pretrained``.

``varlen`` (registered with transformers' ``AttentionInterface`` as :data:`VARLEN`) attends
within each packed example of a row. The examples' boundaries come from the host: the
training step's batches carry ``dsft_cu_seqlens`` (dsft.step.with_segments, from the CPU
position ids; ``collate_packed(..., cu_seqlens=True)`` counts the same from the lengths), the
cumulative lengths of every segment of the flattened batch (the pad tail of a row is a
segment of its own), which the model's forward passes down to every attention call; without
it they are found on the device from ``position_ids`` (where a position does not continue the
previous one). Its registered mask
function tells transformers to build no mask for such rows. Kernels, first available:
``torch.nn.attention.varlen.varlen_attn`` (torch's flash varlen), flash-attn's
``flash_attn_varlen_func``, and on a CPU the reference: one ``sdpa`` call per segment, the
same numbers as ``sdpa`` with the block-diagonal mask (tests/unit/test_attention.py).
Padded rows (a 2-D ``attention_mask``) and decoding with a KV cache take the ``sdpa`` path
under the same name.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dsft.config import ATTENTION as CHOICES
from dsft.errors import ConfigError

log = logging.getLogger("dsft")

VARLEN = "dsft_varlen"  # the name transformers knows the varlen function by
AUTO = "auto"
SEGMENTS_KEY = "dsft_cu_seqlens"  # the batch key collate_packed(cu_seqlens=True) adds


# ---------------------------------------------------------------------- family support


@dataclass(frozen=True)
class Support:
    """What a model family's attention can run, read from its transformers class."""

    family: str  # the class name (for messages)
    sdpa: bool = True
    flex: bool = False
    flash: bool = False
    # None: varlen can run; else why not ("attention sinks", "sliding-window layers", ...)
    no_varlen: str | None = None


def family_support(path: str, trust_remote_code: bool = False, revision: str = "") -> Support:
    """The attention support of the causal LM class for the model at ``path`` (its
    config.json only: nothing is loaded). Unknown classes (remote code) are assumed to
    support sdpa, and auto does not pick varlen for them."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from dsft.hub import model_path

        config = AutoConfig.from_pretrained(
            model_path(path, revision), trust_remote_code=trust_remote_code
        )
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception as e:  # remote code, a shape name, a missing file
        log.debug("attention: no class for %s (%s); assuming sdpa support", path, e)
        return Support(family=str(path), no_varlen="an unknown model class")
    return support_of(cls, config)


def support_of(cls: type, config: Any) -> Support:
    """:class:`Support` of a transformers model class and its config."""
    from dsft.flops import text_config

    text = text_config(config)
    why = None
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        source = ""
    if "s_aux" in source:
        why = "attention sinks"
    elif getattr(text, "attn_logit_softcapping", None):
        why = "attention logit soft-capping"
    elif _sliding(text):
        why = "sliding-window layers"
    elif not getattr(cls, "_supports_attention_backend", False):
        why = "no pluggable attention functions"
    return Support(
        family=cls.__name__,
        sdpa=bool(getattr(cls, "_supports_sdpa", False)),
        flex=bool(getattr(cls, "_supports_flex_attn", False)),
        flash=bool(getattr(cls, "_supports_flash_attn", False)),
        no_varlen=why,
    )


def _sliding(text: Any) -> bool:
    types = getattr(text, "layer_types", None) or []
    if any("sliding" in str(t) for t in types):
        return True
    if getattr(text, "sliding_window", None) is None:
        return False
    return bool(getattr(text, "use_sliding_window", True))


# ---------------------------------------------------------------------- the resolver


def resolve(
    requested: str,
    support: Support,
    *,
    cuda: bool,
    packed: bool,
    sequence_parallel: int = 1,
    half: bool = True,
) -> str:
    """The attention implementation a run uses (``auto`` resolved; an explicit choice
    checked against the family). Raises :class:`ConfigError` for one the family lacks.
    ``half``: bf16/fp16 training (the flash kernels' dtypes; fp32 would run the reference)."""
    if requested == AUTO:
        plain = "sdpa" if support.sdpa else "eager"
        if sequence_parallel > 1:
            return plain
        if cuda and packed and half and support.no_varlen is None:
            return "varlen"
        if cuda and not support.sdpa and support.flex:
            return "flex_attention"
        return plain
    lacks = {
        "sdpa": not support.sdpa,
        "flex_attention": not support.flex,
        "flash_attention_2": not support.flash,
        "varlen": support.no_varlen is not None,
    }
    if lacks.get(requested, False):
        why = f" ({support.no_varlen})" if requested == "varlen" else ""
        can = [c for c in CHOICES[2:] if not lacks.get(c, False)]
        raise ConfigError(
            [
                f"model.attn_implementation={requested}: {support.family} does not support it"
                f"{why}; use auto or one of {', '.join(can)}"
            ]
        )
    return requested


def hf_name(implementation: str, path: str = "", trust_remote_code: bool = False) -> str:
    """The ``attn_implementation`` handed to transformers (registering ours first). ``auto``
    not resolved by a training job (an export's check, chat, evaluation): the family's plain
    one, ``sdpa`` or ``eager``."""
    if implementation == AUTO:
        implementation = resolve(
            AUTO, family_support(path, trust_remote_code), cuda=False, packed=False
        )
    if implementation == "varlen":
        register()
        return VARLEN
    return implementation


def wants_segments(implementation: str) -> bool:
    """Whether packed batches should carry :data:`SEGMENTS_KEY` for this implementation."""
    return implementation == "varlen"


# ---------------------------------------------------------------------- segments


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths (int32, ``[0, ..., rows*width]``) of the flattened rows: a
    segment starts at every row start and wherever a position does not continue the last."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    rows, width = pos.shape
    start = torch.ones_like(pos, dtype=torch.bool)
    if width > 1:
        start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(start.reshape(-1)).reshape(-1)
    end = torch.tensor([rows * width], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def cu_seqlens_from_lengths(row_lengths: list[list[int]], width: int) -> torch.Tensor:
    """:func:`cu_seqlens_from_positions` from each row's example lengths (rows padded to
    ``width``; a row's pad tail is a segment of its own), on the host."""
    cu = [0]
    for r, lengths in enumerate(row_lengths):
        at = 0
        for n in lengths:
            cu.append(r * width + at + n)
            at += n
        if at < width:
            cu.append((r + 1) * width)
    return torch.tensor(cu, dtype=torch.int32)


# ---------------------------------------------------------------------- the attention function


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]``
    -> (``[B, L, H, D]``, None). Causal attention within each segment of the rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len != k_len:  # padded rows, decoding: sdpa's job
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for feature in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise ConfigError(
                [
                    f"model.attn_implementation=varlen: this model's attention uses {feature}, "
                    "which the varlen path does not implement; use auto or sdpa/eager"
                ]
            )
    if dropout and module.training:
        raise ConfigError(
            ["model.attn_implementation=varlen: attention dropout is not supported; use sdpa"]
        )
    batch, heads, _, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    cu = kwargs.get(SEGMENTS_KEY)
    if cu is None:
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(q_len, device=query.device).expand(batch, q_len)
        cu = cu_seqlens_from_positions(pos.expand(batch, q_len))
    cu = cu.to(device=query.device, dtype=torch.int32)
    # [B, H, L, D] -> [B*L, H, D]: the flattened token stream the segments index
    q = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    k = key.transpose(1, 2).reshape(batch * k_len, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * k_len, value.shape[1], dim)
    kernel = _kernel(query)
    out = kernel(q, k, v, cu, q_len, scale)
    return out.reshape(batch, q_len, heads, dim), None


def _kernel(query: torch.Tensor) -> Callable[..., torch.Tensor]:
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen() is not None:
            return torch_varlen
        if importlib.util.find_spec("flash_attn") is not None:
            return flash_attn_varlen
    return reference_varlen


def reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """One causal ``sdpa`` per segment: [T, H, D] tokens, ``cu`` their segment boundaries."""
    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    outs = []
    for a, b in itertools.pairwise(bounds):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
    return torch.cat(outs, dim=1).transpose(0, 1)


@functools.cache
def _torch_varlen() -> tuple[Callable[..., Any], frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """torch's own flash varlen (``torch.nn.attention.varlen.varlen_attn``), across its
    signatures: 2.10 takes ``is_causal``, 2.11+ ``window_size``; GQA and ``scale`` where
    the signature has them, else done here. ``max_len``: the row width, an upper bound of
    every segment (no device sync to find the longest)."""
    found = _torch_varlen()
    assert found is not None
    fn, params = found
    extra: dict[str, Any] = {}
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params:
        extra["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **extra)


def flash_attn_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (GQA native)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=True
    )


def varlen_mask(**kwargs: Any) -> Any:
    """The mask function under :data:`VARLEN`: none for rows without a padding mask and
    without a cache offset (the segments come from the positions); sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    q_len = kwargs.get("q_length")
    if q_len is None and kwargs.get("cache_position") is not None:
        q_len = kwargs["cache_position"].shape[0]
    offsets = [kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)]
    if (
        kwargs.get("attention_mask") is None
        and q_len is not None
        and q_len == kwargs.get("kv_length")
        and all(isinstance(o, int) and o == 0 for o in offsets)
    ):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Make :data:`VARLEN` known to transformers (its attention and its mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)


def kernel_name(device: str | torch.device = "cuda") -> str:
    """Which varlen kernel runs on ``device`` (for logs and the GPU check)."""
    if torch.device(device).type == "cuda":
        if _torch_varlen() is not None:
            return "torch.nn.attention.varlen.varlen_attn"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attn.flash_attn_varlen_func"
    return "reference (sdpa per segment)"


def resolve_config(cfg: Any, cuda: bool) -> Any:
    """``cfg`` (a :class:`dsft.config.Config`) with ``model.attn_implementation`` resolved for
    this job (:func:`resolve`), logged when ``auto`` chose."""
    import dataclasses

    m = cfg.model
    support = family_support(m.path, m.trust_remote_code, m.revision)
    sp = cfg.train.sequence_parallel
    chosen = resolve(
        m.attn_implementation,
        support,
        cuda=cuda,
        packed=bool(cfg.data.packing),
        sequence_parallel=sp if isinstance(sp, int) else 1,
        half=cfg.train.precision != "fp32",
    )
    if chosen == m.attn_implementation:
        return cfg
    log.info(
        "model.attn_implementation=auto -> %s (%s, %s, %s rows)%s",
        chosen,
        support.family,
        "CUDA" if cuda else "CPU",
        "packed" if cfg.data.packing else "padded",
        f"; kernel: {kernel_name()}" if chosen == "varlen" and cuda else "",
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, attn_implementation=chosen))


# ------------------------------------------------------------ packed image rows (Gemma 3)
# Gemma 3 (and Gemma 4) let an image's tokens attend to each other both ways: its forward
# makes "block" ids from token_type_ids and ORs them into the causal mask. On packed rows
# (restarting position_ids, no attention mask) transformers 5.25 looks those block ids up by
# position, not by index, in its sliding-window layers, so an image in a row's second example
# borrows the first example's blocks. For such rows the masks are built here, by index, from
# transformers' own pieces (its block ids, causal / blockwise / sliding / same-segment
# functions): within an example, causal or the same image; sliding layers also within the
# window. Packed == unpacked is held by tests/unit/test_packing.py.


def mask_packed_images(model: torch.nn.Module) -> None:
    """Have ``model`` (a family that builds image blocks from ``token_type_ids``) take, on
    packed rows, the per-layer-type masks of :func:`packed_image_masks`; other models and
    unpacked or generation forwards are left as they are."""
    block_ids = getattr(
        sys.modules[type(model).__module__], "get_block_sequence_ids_for_mask", None
    )
    if block_ids is None:
        return
    from transformers.masking_utils import find_packed_sequence_indices

    from dsft.flops import text_config

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        types, pos = kwargs.get("token_type_ids"), kwargs.get("position_ids")
        if types is None or pos is None or kwargs.get("attention_mask") is not None:
            return None
        segments = find_packed_sequence_indices(pos)
        if segments is None:  # one example per row: transformers' own masks are right
            return None
        impl = module.config._attn_implementation
        masks = packed_image_masks(text_config(module.config), block_ids(types), segments)
        if impl == "eager":  # eager adds the mask to the scores
            for k, m in masks.items():
                masks[k] = torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo().min)
        elif impl != "sdpa":
            raise ConfigError(
                [f"packed image rows of {type(module).__name__} need model.attn_implementation "
                 f"sdpa or eager (its image tokens attend both ways), not {impl}"]
            )  # fmt: skip
        return args, {**kwargs, "attention_mask": masks}

    model.register_forward_pre_hook(hook, with_kwargs=True)


def packed_image_masks(
    text_config: Any, blocks: torch.Tensor, segments: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Boolean ``(rows, 1, L, L)`` masks per layer type (True: attends) for packed rows whose
    image tokens form ``blocks`` (-1: text) and examples ``segments`` (ids per token)."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        packed_sequence_mask_function,
        sliding_window_overlay,
    )

    full = and_masks(
        or_masks(causal_mask_function, blockwise_overlay(blocks)),
        packed_sequence_mask_function(segments),
    )
    fns = {"full_attention": full}
    if getattr(text_config, "sliding_window", None):
        fns["sliding_attention"] = and_masks(
            full, sliding_window_overlay(text_config.sliding_window)
        )
    rows, n = blocks.shape
    at = torch.arange(n, device=blocks.device)
    b = torch.arange(rows, device=blocks.device)[:, None, None, None]
    q, kv = at[None, None, :, None], at[None, None, None, :]
    return {k: fn(b, 0, q, kv).expand(rows, 1, n, n) for k, fn in fns.items()}
