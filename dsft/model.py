"""Loading the model and tokenizer, LoRA, freezing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from dsft import moe
from dsft.attention import hf_name, mask_packed_images
from dsft.config import FreezeConfig, LoraConfig, ModelConfig, is_hub_id
from dsft.errors import ConfigError
from dsft.flops import text_config
from dsft.hub import model_path

log = logging.getLogger("dsft")


# ------------------------------------------------------------------ multimodal checkpoints
# Natively multimodal checkpoints: which class loads them, which parameters are the vision
# (or audio) tower, the projector and the language model.
#
# A checkpoint whose config has a vision or audio part (Gemma 3 / 4, Qwen3.5, Llama 4,
# Mistral 3, LLaVA, Idefics3 ...) loads with its own multimodal class, the one named in
# ``architectures`` (else ``AutoModelForImageTextToText``), never narrowed to a text-only
# class: the export then has the input's architecture, config and vision weights. Shapes
# (layers, hidden size, heads, vocabulary) are read from the text config through
# :func:`dsft.flops.text_config`.
#
# Parameter names are split in three parts by the module that holds them: the tower
# (``vision_tower``, ``vision_model``, ``visual``, ``audio_tower`` ...), the projector that
# maps its features into the language model (``multi_modal_projector``, ``connector``,
# ``embed_vision``, Qwen's ``visual.merger`` ...) and the language model (everything else:
# its blocks, embeddings, head). ``model.freeze.vision`` / ``model.freeze.projector`` freeze
# the first two (both by default, as LLaMA-Factory and ms-swift do).

# Checked first: a projector may sit inside the tower's module (Qwen's visual.merger).
PROJECTOR_RE = re.compile(
    r"(?:^|\.)(?:multi_modal_projector|mm_projector|connector|embed_vision|embed_audio"
    r"|audio_projector|visual\.merger)\."
)
TOWER_RE = re.compile(
    r"(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder|image_encoder|audio_tower"
    r"|audio_model|audio_encoder)\."
)
# Config fields that name a non-text part.
MODALITY_CONFIGS = ("vision_config", "audio_config", "visual", "vision_tower_config")


def part(name: str) -> str:
    """``"projector"``, ``"vision"`` (any non-text tower) or ``"language"`` for a parameter or
    module name."""
    name = name if name.endswith(".") else name + "."
    if PROJECTOR_RE.search(name):
        return "projector"
    if TOWER_RE.search(name):
        return "vision"
    return "language"


def is_language(name: str) -> bool:
    return part(name) == "language"


def is_multimodal(config: Any) -> bool:
    """Whether a Hugging Face config has a vision or audio part next to its text model."""
    return any(getattr(config, k, None) is not None for k in MODALITY_CONFIGS)


def model_class(config: Any, trust_remote_code: bool = False) -> Any:
    """The class that loads a checkpoint as what it is.

    A text model: ``AutoModelForCausalLM``. A multimodal one: transformers' class named in
    ``architectures``, else ``AutoModelForImageTextToText`` (remote code included)."""
    import transformers

    if not is_multimodal(config):
        return transformers.AutoModelForCausalLM
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForImageTextToText


def multimodal_rope(config: Any) -> bool:
    """Whether the model places its tokens by multimodal RoPE (Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL, Qwen3.5, GLM-4V...: 3-D positions from each image's grid, made by the
    family's ``get_rope_index``), which packed rows' restarting position ids cannot carry."""
    import sys

    import transformers

    cls = model_class(config)
    if cls is transformers.AutoModelForImageTextToText:
        cls = cls._model_mapping.get(type(config), cls)
    module = vars(sys.modules[cls.__module__])
    return any(isinstance(o, type) and hasattr(o, "get_rope_index") for o in module.values())


def from_config(config: Any, trust_remote_code: bool = False) -> Any:
    """A randomly initialised model of ``config`` with the class that loads it
    (:func:`model_class`); build it on the meta device to read shapes for free."""
    cls = model_class(config)
    if hasattr(cls, "from_config"):  # an Auto class
        return cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls._from_config(config)


def lora_targets(model: Any) -> str:
    """peft ``target_modules`` (a full-match regex) for ``all-linear`` on a multimodal model:
    the language model's linear layers, the LM head excluded (peft's own rule)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted(
        {
            re.escape(name)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and is_language(name)
        }
    )
    if not names:
        raise ValueError("model.lora all-linear: the model has no linear layer to adapt")
    return "^(?:" + "|".join(names) + ")$"


# Files of a checkpoint's processor that an export carries next to the tokenizer's.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


class TowerTouch:
    """ZeRO-3 with image rows: a micro-batch without images still runs the tower and the
    projector on a dummy image, at the very point of the forward where the model runs them
    for real images (right after the input embeddings), adding 0 x their output to the
    embeddings. So every rank gathers the same parameters in the same order, forward and
    backward (a rank skipping the tower while another runs it would hang ZeRO-3's
    collectives); no value or gradient changes. ``arm()`` before such a forward."""

    def __init__(self, model: torch.nn.Module, dummy: dict[str, torch.Tensor], device: Any):
        import inspect

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        fn = getattr(base, "get_image_features", None) or base.model.get_image_features
        params = inspect.signature(fn).parameters
        self.fn = fn
        self.inputs = {k: v.to(device) for k, v in dummy.items() if k in params}
        self.armed = False
        # transformers' generate() runs the tower on a prompt's images before the prefill
        # (mm_encoder_outputs), not inside the forward, where the model supports it
        self.generate_encodes_first = bool(
            getattr(base, "_supports_mm_encoder_outputs", lambda: False)()
        )
        base.get_input_embeddings().register_forward_hook(self._hook)

    def arm(self, on: bool = True) -> None:
        self.armed = on

    def before_generate(self, has_images: bool) -> None:
        """Before ``generate()`` of a prompt batch: one without images runs the tower where
        a batch with images does (first thing, or in the prefill's forward)."""
        if has_images:
            return
        if self.generate_encodes_first:
            with torch.no_grad():
                self.fn(**self.inputs)
        else:
            self.arm()

    def _hook(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self.armed:
            return None
        self.armed = False
        feats = _tensors(self.fn(**self.inputs))
        zero = sum((t.float().sum() for t in feats), torch.zeros((), device=output.device))
        return output + (zero * 0.0).to(output.dtype)


def _tensors(x: Any) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    if hasattr(x, "to_tuple"):
        return _tensors(x.to_tuple())
    return []


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model directory's tokenizer; a pad token is borrowed from EOS if missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_path(cfg.path, cfg.revision), trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    attach_processor(tok, model_path(cfg.path, cfg.revision), cfg.trust_remote_code)
    # A missing chat template is reported where one is needed (chat data without
    # data.template); raw-text and completion data do not need one.
    return tok


def attach_processor(tok: Any, path: str | Path, trust_remote_code: bool = False) -> None:
    """Load the model directory's multimodal processor (when it has one) onto ``tok`` as
    ``tok.dsft_processor``: image rows are rendered and their pixels made by it. A processor
    that cannot load here (Qwen-VL's needs torchvision) leaves the reason in
    ``tok.dsft_processor_error``; text rows do not need it."""
    tok.dsft_processor, tok.dsft_processor_error = None, ""
    if not any((Path(path) / f).is_file() for f in PROCESSOR_FILES[:2]):
        return
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # any failure: text rows still train
        tok.dsft_processor_error = f"{type(e).__name__}: {e}"
        log.info("model: no image processor (%s); text rows only", tok.dsft_processor_error)
        return
    if getattr(proc, "image_token", None) and getattr(proc, "image_processor", None):
        from transformers import AutoConfig

        proc.tokenizer = tok  # the same pad token and template as training's
        tok.dsft_processor = proc
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tok.dsft_mrope = multimodal_rope(config)  # its image rows are not packed


def load_model(
    cfg: ModelConfig, dtype: torch.dtype, path: str | Path | None = None, training: bool = True
) -> torch.nn.Module:
    """Load the pretrained model (``cfg.path``, or ``path``: an export of it) as what it
    is: a causal LM, or a multimodal model with its own class (:func:`model_class`).

    Under ZeRO-3 call this while a ``HfDeepSpeedConfig`` is alive, so that
    transformers partitions the weights as it loads them (zero.Init). ``training=False``
    (exports, their checks, chat): the family's CPU-safe attention (sdpa, eager for a family
    without it) and no checkpointing.
    """
    from transformers import AutoConfig

    source = path or model_path(cfg.path, cfg.revision)
    if cfg.kernels == "liger":
        apply_liger(source, cfg.trust_remote_code)
    # GPT-OSS's MXFP4 experts: dequantised (dsft/moe.py)
    extra: dict[str, Any] = moe.dequantize_kwargs(source, cfg.trust_remote_code)
    quantized = training and cfg.quantization == "nf4"
    if quantized:  # exports and chat load the base unquantized (the adapter applies to both)
        extra = {"quantization_config": nf4_config(dtype), "device_map": {"": _cuda_device()}}
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    model = model_class(config).from_pretrained(
        source,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=hf_name(
            cfg.attn_implementation if training else "auto",
            str(path or model_path(cfg.path, cfg.revision)),
            cfg.trust_remote_code,
        ),
        **extra,
    )
    if quantized:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and head input, input grads on for checkpointing (peft's QLoRA recipe)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if training and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    mask_packed_images(model)  # Gemma 3: packed image rows' bidirectional image attention
    return model


def apply_liger(path: str | Path, trust_remote_code: bool) -> None:
    """Patch transformers' classes for this model type with Liger's RMSNorm, RoPE and SwiGLU
    (before loading, so ZeRO-3's partitioned loading builds the patched modules).

    Liger's loss kernels stay off: the chunked loss (dsft/loss.py, train.fused_loss) does
    that job for any head and under ZeRO-3, and Liger's fused linear cross-entropy would
    replace the forward that returns the hidden states it needs.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers import AutoConfig

    from dsft.errors import ConfigError

    model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ConfigError(
            [
                f"model.kernels=liger: Liger has no kernels for model type {model_type!r} "
                f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); use "
                "model.kernels=none"
            ]
        )
    import inspect

    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=False)  # fmt: skip
    params = inspect.signature(apply).parameters
    apply(**{k: v for k, v in wanted.items() if k in params})
    log.info("model.kernels=liger: Liger RMSNorm/RoPE/SwiGLU patched in for %s", model_type)


def build_model(cfg: ModelConfig, dtype: torch.dtype, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Load the model (partitioned as it loads under ZeRO-3) and add LoRA if configured."""
    hf_zero3 = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this lives, from_pretrained loads under deepspeed.zero.Init, so the
        # weights are partitioned as they load and never whole on one rank.
        hf_zero3 = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference
    if hf_zero3 is not None and cfg.quantization != "none":
        raise ConfigError(
            [
                "model.quantization: a 4-bit base cannot be partitioned by ZeRO-3; set "
                "deepspeed.zero_stage to 0-2 (LoRA's optimizer states are small)"
            ]
        )
    if hf_zero3 is not None and mutates_base(cfg.lora):
        raise ConfigError(
            [
                f"model.lora.init={cfg.lora.init}: needs whole weights (an SVD / quantisation "
                "of each), which ZeRO-3 partitions; use deepspeed.zero_stage 0-2"
            ]
        )
    model = load_model(cfg, dtype)
    if hf_zero3 is not None:  # separate expert modules: gathered as one (dsft/moe.py)
        moe.declare_z3_leaves(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    # Released now: a later from_pretrained on rank 0 alone (the LoRA merge at export)
    # must not enter zero.Init, a collective the other ranks never join. Generation is
    # told about ZeRO-3 explicitly (synced_gpus).
    del hf_zero3
    return model


def context_length(model_config: Any) -> int | None:
    """The longest sequence a model's config says it was built for (None: not stated)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(model_config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def warn_beyond_context(model_config: Any, max_len: int) -> bool:
    """Warn when ``data.max_len`` exceeds the model's context; True if it does."""
    n = context_length(model_config)
    if n is None or max_len <= n:
        return False
    log.warning(
        "data.max_len=%d is above the model's context of %d tokens (max_position_embeddings): "
        "positions past it were never trained and may give poor results; lower data.max_len or "
        "use a model with a longer context (rope scaling)",
        max_len,
        n,
    )
    return True


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters (base weights frozen). On a multimodal model
    ``all-linear`` adapts the language model's linear layers only (name the tower's modules
    in ``target_modules`` to adapt them too)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    kwargs = peft_lora_kwargs(cfg)
    if kwargs["target_modules"] == "all-linear" and is_multimodal(model.config):
        kwargs["target_modules"] = lora_targets(model)
    # mixture of experts: routers and fused experts are parameters, not nn.Linear (dsft/moe.py)
    params = moe.lora_parameters(model, cfg.target_modules == ["all-linear"], cfg.experts)
    if not params:
        return get_peft_model(model, PeftLoraConfig(**kwargs))
    if cfg.use_dora:
        raise ConfigError(
            [
                "model.lora.use_dora: peft has no DoRA for a mixture of experts' router and "
                "fused expert weights; set model.lora.use_dora=false, or model.lora.experts=false "
                "with explicit model.lora.target_modules"
            ]
        )
    # peft has no dropout on parameter adapters: dropout goes on the nn.Linear ones only
    dropout, kwargs["lora_dropout"] = kwargs["lora_dropout"], 0.0
    with moe.peft_as_configured():
        model = get_peft_model(model, PeftLoraConfig(**kwargs, target_parameters=params))
    if dropout:
        moe.module_dropout(model, dropout)
    log.info(
        "LoRA on a mixture of experts: modules %s; parameters %s (no dropout on these)",
        "all linear layers" if kwargs["target_modules"] == "all-linear" else cfg.target_modules,
        ", ".join(params),
    )
    return model


# model.lora.init -> peft's init_lora_weights
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


def peft_lora_kwargs(cfg: LoraConfig) -> dict[str, Any]:
    """peft ``LoraConfig`` arguments of ``model.lora`` (the one mapping from dsft's names)."""
    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    kwargs: dict[str, Any] = dict(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=LORA_INIT[cfg.init],
    )
    if cfg.init == "loftq":
        from peft import LoftQConfig

        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
    return kwargs


def mutates_base(cfg: LoraConfig) -> bool:
    """PiSSA and LoftQ initialisation rewrite the base weights (the residual / the quantised
    weight), so the adapter alone applies to that base, not to the one on disk."""
    return cfg.init in ("pissa", "loftq")


def nf4_config(dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit NF4 with double quantisation (QLoRA's choice), computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
    )


def _cuda_device() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


# Transformer block index in parameter names: model.layers.3., transformer.h.3., blocks.3.
LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
EMBED_RE = re.compile(r"embed|wte|wpe")


def num_layers(model: torch.nn.Module) -> int:
    """Number of the language model's transformer blocks, from its (text) config."""
    return int(text_config(model.config).num_hidden_layers)


def layer_index(name: str) -> int | None:
    """The language model's block index in a parameter name (None: not in a block, or in
    a vision / audio tower's block)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m and is_language(name) else None


def freeze(model: torch.nn.Module, cfg: FreezeConfig) -> list[str]:
    """Stop gradients for the configured parameters; returns the frozen names. A
    multimodal model's vision (audio) tower and projector are frozen unless
    ``cfg.vision`` / ``cfg.projector`` are false.

    Frozen parameters are then left out of the optimizer (no state, no update).
    """
    patterns = [re.compile(p) for p in cfg.patterns]
    frozen: list[str] = []
    hits = dict.fromkeys(cfg.patterns, 0)
    for name, p in model.named_parameters():
        layer = layer_index(name)
        where = part(name)
        by_pattern = [r.pattern for r in patterns if r.search(name)]
        for pat in by_pattern:
            hits[pat] += 1
        if (
            (cfg.embeddings and where == "language" and layer is None and EMBED_RE.search(name))
            or (layer is not None and layer < cfg.bottom_layers)
            or (where == "vision" and cfg.vision)
            or (where == "projector" and cfg.projector)
            or by_pattern
        ) and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    for pat, n in hits.items():
        if n == 0:
            log.warning("model.freeze.patterns: %r matches no parameter; nothing frozen by it", pat)
    if cfg.bottom_layers > num_layers(model):
        log.warning(
            "model.freeze.bottom_layers=%d exceeds the model's %d layers",
            cfg.bottom_layers,
            num_layers(model),
        )
    return frozen


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; correct under ZeRO-3 partitioning too."""
    parts = part_params(model).values()
    return sum(t for t, _ in parts), sum(t for _, t in parts)


def part_params(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(total, trainable) parameter counts of each :func:`part` ("language", "vision",
    "projector"; the parts a model has), under ZeRO-3 partitioning too. FLOPs count the
    tower's per image patch (dsft.flops.Tower)."""
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        c = counts.setdefault(part(name), [0, 0])
        c[0] += n
        c[1] += n if p.requires_grad else 0
    return {k: (t, tr) for k, (t, tr) in counts.items()}


def torch_dtype(precision: str) -> torch.dtype:
    # Weights load in fp32 for fp32 runs; for bf16/fp16 DeepSpeed keeps fp32 masters
    # in the optimizer, so loading in 16 bit halves load-time memory at no cost.
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def locate_trained(path: str, base: str | None = None) -> tuple[Path, Path | None, Path]:
    """(model to load, adapter to apply or None, tokenizer directory) for RUN_OR_MODEL: an
    exported model, a LoRA adapter (its ``adapter_config.json`` names the base, or ``base``
    does), a run directory (its ``best`` export when there is one, else ``final``), or a Hub
    name (through the Hugging Face cache)."""
    p = Path(path)
    if not p.is_dir():
        if is_hub_id(path):
            hub = Path(model_path(path))
            return hub, None, hub
        raise ConfigError(
            [f"{path}: not a directory nor a Hub name (give an export, an adapter or a run dir)"]
        )
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        # a run directory: its best export, else its final one (merged, else the adapter)
        for name in ("best", "final", "final/adapter", "best/adapter"):
            q = p / name
            if (q / "config.json").is_file() or (q / "adapter_config.json").is_file():
                p = q
                break
        else:
            raise ConfigError(
                [
                    f"{path}: no model here: expected config.json (an export), "
                    "adapter_config.json (a LoRA adapter) or a run directory with best/ or final/"
                ]
            )
    if (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        return p, None, p
    adapter_cfg = json.loads((p / "adapter_config.json").read_text())
    base_path = base or adapter_cfg.get("base_model_name_or_path") or ""
    if not base_path:
        raise ConfigError([f"{p}/adapter_config.json names no base model; pass --base DIR"])
    # The adapter's own tokenizer (adapter-only exports save it), else the export's next to
    # it, else the base's: the first one found carries the template training used.
    tok = next(
        (d for d in (p, p.parent, Path(base_path)) if (d / "tokenizer_config.json").is_file()),
        Path(base_path),
    )
    return Path(base_path), p, tok


def load_for_inference(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """A saved model (with its LoRA adapter applied) in eval mode and its tokenizer: bf16 on
    a GPU, fp32 on the CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mcfg = ModelConfig(path=str(model_dir), trust_remote_code=trust_remote_code)
    model = load_model(mcfg, dtype, training=False)
    if adapter is not None:
        from peft import PeftModel

        with moe.peft_as_configured():  # a mixture of experts' targets as trained (dsft/moe.py)
            model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = load_tokenizer(
        ModelConfig(path=str(tokenizer_dir or model_dir), trust_remote_code=trust_remote_code)
    )
    return model.to(device).eval(), tokenizer
