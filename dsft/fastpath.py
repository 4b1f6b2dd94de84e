"""The fast path's defaults: which optional kernels a run turns on when left to ``auto``.

``model.kernels`` (Liger's RMSNorm/RoPE/SwiGLU) and ``model.compile`` (torch.compile of each
decoder layer, "regional") default to ``auto``, resolved once per job by
:func:`resolve_config`: on a CPU both stay off; on CUDA each is on only where the GPU check
measured that it helps (:data:`MEASURED_HELPS`, one home for that verdict) and the
equality tests pass (tests/integration/test_gpu_kernels.py). ``train.fused_loss`` is on by
default everywhere (equal to the full-logits loss; it never materialises the logits).
The attention half of the fast path is dsft/attention.py (``model.attn_implementation``).

The GPU check flips the verdicts without a code change through ``DSFT_FAST_DEFAULTS``:
a comma-separated list of ``liger``, ``compile`` (on) or ``none`` (all off) that overrides
:data:`MEASURED_HELPS` for ``auto`` settings, so that it can profile and bench the same
shape with and without them. docs/gpu-path.md says what was measured and why each default is
what it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from typing import Any

import torch

log = logging.getLogger("dsft")

# On CUDA, does "auto" turn it on? Set from a GPU check's measurement (docs/gpu-path.md): not
# measured in the session that wrote this, so both stay off until a run shows they help.
MEASURED_HELPS: dict[str, bool] = {"liger": False, "compile": False}
ENV = "DSFT_FAST_DEFAULTS"


def verdicts(env: dict[str, str] | None = None) -> dict[str, bool]:
    """:data:`MEASURED_HELPS`, overridden by ``DSFT_FAST_DEFAULTS`` when set."""
    value = (os.environ if env is None else env).get(ENV)
    if value is None:
        return dict(MEASURED_HELPS)
    asked = {v.strip() for v in value.split(",") if v.strip()}
    unknown = asked - {*MEASURED_HELPS, "none"}
    if unknown:
        from dsft.errors import ConfigError

        raise ConfigError(
            [f"{ENV}={value!r}: unknown {', '.join(sorted(unknown))}; use liger, compile, none"]
        )
    return {k: k in asked for k in MEASURED_HELPS}


def resolve(
    kernels: str, compile_: Any, *, cuda: bool, liger: bool, helps: dict[str, bool]
) -> tuple[str, Any]:
    """(model.kernels, model.compile) with ``auto`` resolved: on only on CUDA where measured
    to help (and, for Liger, where the package is installed)."""
    if kernels == "auto":
        kernels = "liger" if cuda and liger and helps.get("liger") else "none"
    if compile_ == "auto":
        compile_ = "regional" if cuda and helps.get("compile") else False
    return kernels, compile_


def resolve_config(cfg: Any, cuda: bool) -> Any:
    """``cfg`` with ``model.kernels`` / ``model.compile`` resolved for this job (logged)."""
    m = cfg.model
    if "auto" not in (m.kernels, m.compile):
        return cfg
    liger = importlib.util.find_spec("liger_kernel") is not None and _liger_knows(m)
    kernels, compile_ = resolve(m.kernels, m.compile, cuda=cuda, liger=liger, helps=verdicts())
    log.info(
        "fast path (%s): model.kernels=%s, model.compile=%s",
        "CUDA" if cuda else "CPU",
        kernels,
        compile_,
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, kernels=kernels, compile=compile_))


def _liger_knows(m: Any) -> bool:
    """Whether Liger has kernels for the model's type (else auto leaves them off quietly)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        from transformers import AutoConfig

        from dsft.hub import model_path

        path = model_path(m.path, m.revision)
        kind = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code).model_type
    except Exception:  # no package, a shape name, remote code: auto stays off
        return False
    return kind in MODEL_TYPE_TO_APPLY_LIGER_FN


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the ModuleList with the most entries of one class)."""
    best: list[torch.nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            kinds = {type(x) for x in mod}
            if len(kinds) == 1:
                best = list(mod)
    return best


def compile_model(engine: Any, model: torch.nn.Module, mode: Any, **kwargs: Any) -> int:
    """``model.compile``: ``regional`` compiles each decoder layer (one graph reused by every
    layer: a short compile, no graph breaks at the model's Python); ``True`` / ``full`` the
    whole model through DeepSpeed. Returns the number of compiled regions."""
    if mode in (False, None, "none"):
        return 0
    # ZeRO-3 gathers each layer's weights in module hooks: DeepSpeed's own compile keeps them
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    layers = decoder_layers(model) if mode == "regional" and not zero3 else []
    if not layers:
        engine.compile(**kwargs)  # DeepSpeed wraps torch.compile so its hooks stay in place
        return 1
    for layer in layers:
        layer.compile(**kwargs)
    return len(layers)
