"""Mixture-of-experts models: the router's load-balancing loss, LoRA targets for fused experts,
ZeRO-3 leaf modules and active parameters.

transformers 5 stores a MoE block's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``,
``down_proj``: one module for all experts) and its router as a small module holding a
``weight`` (``mlp.gate`` / ``mlp.router``), not an ``nn.Linear``.

Router loss. A MoE causal LM of transformers adds ``router_aux_loss_coef × aux`` to its loss
when asked for ``output_router_logits``, with ``aux`` from its family's own
``load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`` (the Switch
Transformer loss; padding tokens excluded through the mask). dsft asks for the router logits
in its own forward (fused loss or plain) and calls that same function, with the mask of real
tokens: the attention mask of padded rows, the real-token mask of packed rows (which carry no
attention mask). Its ``loss`` stays the exact token mean of the NLL; the step's objective is

    loss + coef × mean over the step's micro-batches (all ranks) of each micro-batch's aux

which for one micro-batch is transformers' ``model(..., labels=..., output_router_logits=True)``
loss exactly (tests/unit/test_moe.py). Families whose transformers class adds no such loss
(DeepSeek-V3: its router balances by a bias, without an auxiliary loss) get none.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("dsft")


def base_model(model: Any) -> Any:
    """The transformers model inside a DeepSpeed engine and / or a peft wrapper."""
    model = getattr(model, "module", model)
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


@dataclass
class RouterLoss:
    """The family's load-balancing loss (transformers' own function) and its coefficient."""

    fn: Callable[..., Any]  # the family module's load_balancing_loss_func
    num_experts: int
    top_k: int
    coef: float
    family: str = ""

    def __call__(
        self, router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The aux loss of one forward: ``router_logits`` one [rows × seq, experts] tensor per
        MoE layer, ``mask`` [rows, seq] of the real (non-padding) tokens or None (all real)."""
        if mask is not None:
            mask = mask.to(router_logits[0].device)
        return self.fn(tuple(router_logits), self.num_experts, self.top_k, mask)

    def of_slices(
        self, router_logits: Sequence[torch.Tensor], mask: torch.Tensor, group: Any, size: int
    ) -> torch.Tensor:
        """Sequence parallelism: this rank's share of the aux loss of the whole rows, when
        each of the ``size`` ranks of ``group`` ran the model on its slice of every row.

        The loss is not a sum over tokens (a product of two token means), so the slices'
        router logits are gathered (differentiably: gradients flow back to every slice) and
        the rows' loss computed whole, on every rank alike; each returns 1/size of it, so the
        group's shares add up to the loss and its gradient (``mask``: the unsplit rows')."""
        from torch.distributed.nn.functional import all_gather

        rows = mask.size(0)
        whole = []
        for layer in router_logits:
            parts = all_gather(layer.contiguous(), group=group)  # [rows x slice, experts] each
            joined = torch.stack([p.view(rows, -1, p.size(-1)) for p in parts], dim=1)
            whole.append(joined.reshape(-1, joined.size(-1)))  # rows x (size x slice)
        width = whole[0].size(0) // rows if whole else mask.size(1)
        mask = torch.nn.functional.pad(mask, (0, width - mask.size(1)))  # the slices' padding
        return self(whole, mask) / size


def router_loss(model: Any, override: float | None = None) -> RouterLoss | None:
    """The router loss ``model`` trains with: its family's, with ``router_aux_loss_coef`` or
    ``override`` (``train.router_aux_loss_coef``); None for dense models, families without an
    auxiliary loss, and a coefficient of 0."""
    base = base_model(model)
    fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    own = getattr(base, "router_aux_loss_coef", None)
    if fn is None or own is None:
        return None
    coef = float(own if override is None else override)
    experts = getattr(base, "num_experts", None)
    top_k = getattr(base, "num_experts_per_tok", None)
    params = list(inspect.signature(fn).parameters)
    if experts is None or top_k is None or params[:4] != _SIGNATURE:
        log.warning(
            "%s: its router loss is not the (logits, experts, top-k, mask) form dsft calls; "
            "trained without it",
            type(base).__name__,
        )
        return None
    if coef == 0:
        log.info("router aux loss off (train.router_aux_loss_coef=0)")
        return None
    family = getattr(getattr(base, "config", None), "model_type", "")
    log.info(
        "router aux loss: %s's load_balancing_loss_func × %g (%d experts, top-%d)%s",
        family,
        coef,
        experts,
        top_k,
        " (train.router_aux_loss_coef)" if override is not None else "",
    )
    return RouterLoss(fn, int(experts), int(top_k), coef, family)


_SIGNATURE = ["gate_logits", "num_experts", "top_k", "attention_mask"]


def aux_weight(coef: float, divisor: int, micro_batches: int) -> float:
    """What each micro-batch's aux loss is multiplied by before backward: DeepSpeed sums
    the ranks' gradients and divides by ``divisor``, so ``coef × divisor / micro_batches``
    (``micro_batches`` = grad_accum × data-parallel ranks) makes the step's gradient that
    of ``coef ×`` the mean aux loss over the step's micro-batches."""
    return coef * divisor / micro_batches


# ---------------------------------------------------------------------------- LoRA


def fused_expert_parameters(model: Any) -> list[str]:
    """Suffixes (``experts.gate_up_proj``) of the fused expert weights: the 3-D parameters a
    module holds itself (one module for all of a block's experts)."""
    found: set[str] = set()
    for name, module in base_model(model).named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 or getattr(p, "ds_shape", torch.Size()).__len__() == 3:
                found.add(f"{name.rpartition('.')[2]}.{pname}")
    return sorted(found)


def router_parameters(model: Any) -> list[str]:
    """Suffixes (``gate.weight``, ``router.weight``) of the routers' weights: transformers 5
    routers are their own modules (``*TopKRouter``) holding a 2-D weight, not ``nn.Linear``."""
    found: set[str] = set()
    for name, module in base_model(model).named_modules():
        if "router" not in type(module).__name__.lower() or isinstance(module, torch.nn.Linear):
            continue
        weight = module._parameters.get("weight")
        if weight is not None:
            found.add(f"{name.rpartition('.')[2]}.weight")
    return sorted(found)


def lora_parameters(model: Any, all_linear: bool, experts: bool) -> list[str]:
    """peft ``target_parameters`` for a mixture of experts: its routers (with ``all-linear``:
    they are linear maps, only not ``nn.Linear``) and, with ``model.lora.experts``, its fused
    expert weights. Empty for a dense model."""
    if not fused_expert_parameters(model):
        return []
    return (router_parameters(model) if all_linear else []) + (
        fused_expert_parameters(model) if experts else []
    )


@contextlib.contextmanager
def peft_as_configured() -> Iterator[None]:
    """Within: peft applies LoRA targets as given. peft 0.21 rewrites the targets of
    transformers-5 MoE families as if they were transformers-4 names (``gate_proj`` ->
    the fused ``gate_up_proj``, ``gate`` -> the router), which takes the adapters off real
    ``nn.Linear`` layers of those names (shared experts, dense MLP layers) and doubles the
    rank of the fused ones. dsft names the targets of transformers 5 itself."""
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:  # an older peft without the conversion
        yield
        return
    saved = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *a, **k: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = saved


def module_dropout(model: Any, p: float) -> int:
    """LoRA dropout ``p`` on the adapters of modules (``nn.Linear``); peft has none for
    adapters on parameters (fused experts, routers), which keep none. Returns the count."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ != "ParamWrapper":
            for key in list(module.lora_dropout.keys()):
                module.lora_dropout[key] = torch.nn.Dropout(p)
                n += 1
    return n


# ------------------------------------------------------------------ active parameters


def top_k(config: Any) -> int:
    """Experts each token is routed to (0 for a dense model's config)."""
    from dsft.flops import text_config

    text = text_config(config)
    for key in ("num_experts_per_tok", "experts_per_token", "moe_topk"):
        k = getattr(text, key, None)
        if isinstance(k, int) and k > 0:
            return k
    return 0


def idle_params(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters of the experts a token does *not* use: of each fused
    experts module (one holding 3-D parameters, experts first), the share (E - k) / E of its
    parameters. FLOPs, the time estimate and MFU count the rest (the active parameters);
    memory counts them all. (0, 0) for a dense model."""
    base = base_model(model)
    k = top_k(getattr(base, "config", None))
    idle = idle_trainable = 0
    if not k:
        return 0, 0
    for module in base.modules():
        own = list(module._parameters.values())
        shapes = [tuple(getattr(p, "ds_shape", None) or p.shape) for p in own if p is not None]
        experts = next((s[0] for s in shapes if len(s) == 3), 0)
        if experts <= k:
            continue
        for p in own:
            if p is None:
                continue
            n = (getattr(p, "ds_numel", None) or p.numel()) * (experts - k) // experts
            idle += n
            idle_trainable += n if p.requires_grad else 0
    return idle, idle_trainable


def expert_width(config: Any) -> int:
    """The MLP width a token passes through in a MoE layer (k experts' intermediate sizes);
    0 for a dense model's config."""
    from dsft.flops import text_config

    k = top_k(config)
    text = text_config(config)
    width = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0)
    return k * int(width or 0)


# ------------------------------------------------------------------ MXFP4 experts


def dequantize_kwargs(path: Any, trust_remote_code: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments that load MXFP4 expert weights (GPT-OSS's published
    checkpoints) dequantised: MXFP4 does not train, so the experts load as bf16 (the
    dtype asked for) and the quantisation config is dropped, so exports are plain weights.
    Empty for any other checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    if str(getattr(method, "value", method)) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    log.info("%s: MXFP4 expert weights, loaded dequantised for training", path)
    return {"quantization_config": Mxfp4Config(dequantize=True)}


# ------------------------------------------------------------------ ZeRO-3


def z3_leaf_classes(model: Any) -> list[type]:
    """Classes of the MoE blocks whose experts are separate modules (an ``nn.ModuleList``
    ``experts``, as in remote-code DeepSeek / older families). Under ZeRO-3 each module's
    parameters are gathered collectively when it runs; when ranks route their tokens to
    different experts they would run different experts and wait on each other for ever.
    Declared a leaf (DeepSpeed's ``set_z3_leaf_modules``), the whole block is gathered on
    entry, on every rank alike. Fused experts (transformers 5: one module holding 3-D
    parameters) run as one module on every rank and need nothing."""
    classes: list[type] = []
    for module in base_model(model).modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.ModuleList) and type(module) not in classes:
            classes.append(type(module))
    return classes


def declare_z3_leaves(model: Any) -> list[type]:
    """Mark :func:`z3_leaf_classes` as ZeRO-3 leaf modules (before the engine is built)."""
    classes = z3_leaf_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
        log.info(
            "ZeRO-3 leaf modules (experts gathered together): %s", [c.__name__ for c in classes]
        )
    return classes
