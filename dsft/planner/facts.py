"""What the memory planner knows before it plans: the model's facts (built on the meta
device, no weights read) and the hardware's (CUDA, the launcher's environment, flags)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft import moe
from dsft.config import FreezeConfig, LoraConfig
from dsft.errors import ConfigError
from dsft.flops import text_config, text_dims
from dsft.planner.shapes import SHAPES, shape_config

log = logging.getLogger("dsft")

GiB = 2**30


@dataclass(frozen=True)
class ModelFacts:
    """What the memory model needs to know about a model, read without loading weights."""

    name: str
    total_params: int
    trainable_params: int
    largest_layer_params: int  # most parameters held directly by one module (DeepSpeed's measure)
    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim
    ffn: int  # MLP inner width
    activation_layers: int  # blocks that keep activations for backward (frozen bottom ones don't)
    lora_inputs: int = 0  # LoRA: summed input widths of one block's adapted linears
    lora_max_input: int = 0  # LoRA: the widest of them
    lora_rank_width: int = 0  # LoRA: summed ranks of one block's adapters
    lora_dropout: bool = False
    kv_heads: int = 0  # key/value heads (0 = as many as attention heads)
    # Mixture of experts: parameters a token uses (idle experts left out): FLOPs and time use
    # these, memory the totals. 0 = a dense model (all active).
    active_params: int = 0
    active_trainable: int = 0
    # A multimodal model's vision tower and projector (in the totals above: memory holds
    # them, frozen ones without gradients or optimizer state; FLOPs count them per image,
    # not per token): parameters, trainable ones.
    tower_params: int = 0
    tower_trainable: int = 0
    config: Any = field(default=None, compare=False, repr=False)  # the HF config, for re-planning

    @property
    def lora(self) -> bool:
        return self.lora_rank_width > 0

    @property
    def active(self) -> tuple[int, int]:
        """(total, trainable) parameters a token uses: all of them but a MoE's idle experts
        and a multimodal model's tower and projector (which run per image)."""
        total, trainable = self.total_params, self.trainable_params
        if self.active_params:
            total, trainable = self.active_params, self.active_trainable
        return total - self.tower_params, trainable - self.tower_trainable

    def describe(self) -> str:
        kind = "LoRA" if self.lora else "full" if self.trainable_params == self.total_params else ""
        notes = f" ({_count(self.active_params)} active)" if self.active_params else ""
        if self.tower_params:
            trains = (
                f"{_count(self.tower_trainable)} trainable" if self.tower_trainable else "frozen"
            )
            notes += f" (vision tower + projector {_count(self.tower_params)}, {trains})"
        return (
            f"{self.name}: {_count(self.total_params)} params{notes}, "
            f"{_count(self.trainable_params)} "
            f"trainable{f' ({kind})' if kind else ''}; hidden {self.hidden}, {self.layers} layers, "
            f"vocab {self.vocab}, largest layer {_count(self.largest_layer_params)}"
        )


def model_facts(
    source: str | Path | Any,
    lora: LoraConfig | None = None,
    freeze: FreezeConfig | None = None,
    trust_remote_code: bool = False,
) -> ModelFacts:
    """Facts about a model directory (its config.json), a shape name or an HF config.

    The model is built on the meta device from its config: nothing is read but config.json
    and no memory is allocated, so a 70B model takes about a second. LoRA and freezing are
    applied exactly as training applies them, so the trainable count is the real one.
    """
    import torch
    from transformers import AutoConfig

    from dsft import model as dsft_model

    if isinstance(source, str | Path) and str(source) in SHAPES:
        name, config = str(source), shape_config(str(source))
    elif isinstance(source, str | Path):
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(
                [
                    f"{source}: no config.json; give a from_pretrained directory or one of "
                    f"the built-in shapes: {', '.join(SHAPES)}"
                ]
            )
        name = Path(source).name
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    else:
        name, config = getattr(source, "name_or_path", "") or source.model_type, source
    with torch.device("meta"), _quiet():
        model = dsft_model.from_config(config, trust_remote_code=trust_remote_code)
        if lora is not None and lora.enabled:
            model = dsft_model.apply_lora(model, lora)
        if freeze is not None:
            dsft_model.freeze(model, freeze)
    total, trainable = dsft_model.count_params(model)
    parts = dsft_model.part_params(model)
    tower = [parts[k] for k in ("vision", "projector") if k in parts]
    idle, idle_trainable = moe.idle_params(model)  # experts a token does not use
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    text = text_config(config)
    hidden = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    ffn = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 0)
    ffn = moe.expert_width(config) if idle else ffn  # MoE: the k experts a token passes

    # Blocks below the first trainable parameter keep no activations (nothing to backprop
    # into); trainable embeddings (index -1) make every block keep them.
    first = layers
    for name_, p in model.named_parameters():
        layer = dsft_model.layer_index(name_)
        language = dsft_model.is_language(name_)
        trains_below = layer is not None or not language or dsft_model.EMBED_RE.search(name_)
        if p.requires_grad and trains_below:
            first = min(first, layer if layer is not None else -1)
    lora_inputs = [  # input widths of block 0's LoRA-adapted linears
        int(module.in_features)
        for name_, module in model.named_modules()
        if dsft_model.layer_index(name_ + ".") == 0
        if hasattr(module, "lora_A") and "default" in module.lora_A
    ]
    return ModelFacts(
        name=name,
        total_params=total,
        trainable_params=trainable,
        largest_layer_params=largest,
        hidden=hidden,
        layers=layers,
        vocab=int(text.vocab_size),
        heads=heads,
        kv_dim=kv_heads * head_dim,
        kv_heads=kv_heads,
        ffn=ffn or 4 * hidden,
        activation_layers=layers - max(first, 0) if trainable else 0,
        lora_inputs=sum(lora_inputs),
        lora_max_input=max(lora_inputs, default=0),
        lora_rank_width=lora.r * len(lora_inputs) if lora is not None else 0,
        lora_dropout=bool(lora is not None and lora.enabled and lora.dropout > 0),
        active_params=total - idle if idle else 0,
        active_trainable=trainable - idle_trainable if idle else 0,
        tower_params=sum(t for t, _ in tower),
        tower_trainable=sum(t for _, t in tower),
        config=config,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence dsft's and transformers' warnings while building a throw-away meta model
    (training builds the real one and warns then)."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    disabled, log.disabled = log.disabled, True
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.disabled = disabled
        hf_logging.set_verbosity(level)


@dataclass(frozen=True)
class Hardware:
    """The machines a plan is for."""

    gpus_per_node: int
    nodes: int
    gpu_mem: int  # bytes free per GPU (the smallest GPU counts)
    host_mem: int | None = None  # bytes of host RAM per node; None = unknown (not checked)
    device: str = "cuda"  # "cuda", or "cpu" (ranks share host RAM as their device memory)
    source: str = "flags"  # where the numbers came from

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        what = "GPU" if self.device == "cuda" else "CPU rank"
        host = f", host RAM {_gb(self.host_mem)} per node" if self.host_mem else ""
        return (
            f"{self.nodes} node{'s' * (self.nodes > 1)} × {self.gpus_per_node} {what}"
            f"{'s' * (self.gpus_per_node > 1)} × {_gb(self.gpu_mem)} free{host} ({self.source})"
        )


def parse_size(text: str | int | float) -> int:
    """Bytes from ``80GB``, ``80G``, ``512MiB``, ``1.5TB`` or a plain number of GB.

    Units are binary (1 GB = 2**30 bytes), as nvidia-smi and DeepSpeed print them.
    """
    if isinstance(text, int | float):
        return int(text * GiB)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ConfigError([f"{text!r} is not a size; write e.g. 80GB, 512MB or 1.5TB"])
    power = {"": 3, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2)]
    return int(float(m.group(1)) * 1024**power)


def parse_count(text: str | int) -> int:
    """A count such as ``250M``, ``1.2B`` or ``3e9`` (decimal suffixes K, M, B/G, T)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMBGT]?)\s*", str(text).upper())
    if not m:
        raise ConfigError([f"{text!r} is not a count; write e.g. 250M or 1.2B"])
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def free_gpu_memory() -> int | None:
    """Free bytes on this process's current CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def host_memory() -> int | None:
    """Available host RAM in bytes (Linux ``MemAvailable``, else total physical memory)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def job_hardware(world_size: int, local_world_size: int, free_gpu_mem: int | None) -> Hardware:
    """The hardware of a running job: its ranks' GPUs (the smallest free memory, measured by
    the caller over all ranks) or, without CUDA, CPU ranks sharing their node's RAM."""
    import torch

    local = local_world_size if local_world_size and world_size % local_world_size == 0 else 0
    local = local or world_size  # uneven ranks per node: count them as one node
    nodes = world_size // local
    host = host_memory()
    if free_gpu_mem is None:
        return Hardware(local, nodes, (host or 0) // local, None, "cpu", "CPU ranks sharing RAM")
    name = torch.cuda.get_device_name()
    return Hardware(local, nodes, free_gpu_mem, host, "cuda", f"this job: {name}")


def hidden_size(model_path: str, trust_remote_code: bool = False) -> int | None:
    """The hidden size in a model directory's config.json (None if it has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return text_dims(config)[1] or None


def _env_int(env: Mapping[str, str], *keys: str) -> int | None:
    for k in keys:
        v = env.get(k, "")
        m = re.match(r"\d+", v)  # SLURM_TASKS_PER_NODE looks like "8(x2)"
        if m:
            return int(m.group())
    return None


def hardware_facts(
    gpus: int | None = None,
    gpu_mem: int | str | None = None,
    nodes: int | None = None,
    host_mem: int | str | None = None,
    env: Mapping[str, str] | None = None,
) -> Hardware:
    """This machine's hardware, or the hardware described by flags (which always win).

    GPUs per node: flag, else the launcher's local world size (torchrun, Slurm, OpenMPI),
    else the visible CUDA devices. Nodes: flag, else world size / local world size or Slurm's
    node count. Free memory: flag, else the smallest free memory of the visible GPUs.
    Host RAM is only measured when the GPUs are this machine's.
    """
    import torch

    env = os.environ if env is None else env
    cuda = torch.cuda.is_available()
    local = _env_int(
        env,
        "LOCAL_WORLD_SIZE",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_GPUS_ON_NODE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    )
    world = _env_int(env, "WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    detected = gpu_mem is None
    if gpus is None:  # this job's ranks per node (and so its nodes), else this machine's GPUs
        gpus = local or (torch.cuda.device_count() if cuda else None)
        if nodes is None and world and local:
            nodes = world // local
    if nodes is None:
        nodes = _env_int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    if gpu_mem is None:
        if not cuda:
            raise ConfigError(
                [
                    "no CUDA GPU is visible here: describe the hardware to plan for, e.g. "
                    "--gpus 8 --gpu-mem 80GB (and --nodes, --host-mem)"
                ]
            )
        gpu_mem = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    if host_mem is None and detected:
        host_mem = host_memory()
    return Hardware(
        gpus_per_node=max(1, gpus or 1),
        nodes=max(1, nodes or 1),
        gpu_mem=parse_size(gpu_mem) if isinstance(gpu_mem, str) else int(gpu_mem),
        host_mem=parse_size(host_mem) if isinstance(host_mem, str) else host_mem,
        device="cuda",
        source=("detected: " + torch.cuda.get_device_name()) if detected else "flags",
    )


def _gb(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
