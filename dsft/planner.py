"""The memory planner: ZeRO stage, offload and micro-batch from the model's size and the hardware.

    model facts (meta device, no weights read) ─┐
    hardware facts (CUDA, launcher env, flags) ─┼─> bytes per GPU and per host for each option
    workload (sequence length, global batch)   ─┘      -> the choice and its micro-batch

Memory model, per GPU. P parameters, T of them trainable, N GPUs, w bytes per weight and per
gradient (2 for bf16/fp16, 4 for fp32):

  model states  weights w·P, gradients w·T, optimizer 12·T (fp32 master copy 4 + Adam
                moments 8) and the fp32 gradients DeepSpeed builds for the step 4·T — the same
                bytes DeepSpeed's estimators count ("18 = 2 grads16 + 4 grads32 + 4 params32 + 8
                states"). ZeRO-1 divides the optimizer by N, ZeRO-2 the gradients too, ZeRO-3 the
                weights too and adds one gathered layer (4 × largest layer, as DeepSpeed does).
                Optimizer offload moves the optimizer (and, from ZeRO-2, the gradients) to host
                RAM, parameter offload the weights. fp32 at ZeRO-0 has no master copy (8 bytes).
  activations   per token and layer (measured on Hugging Face Llama blocks, see the tests):
                8h + b·(6h + 2·kv + 4·ffn) bytes with b bytes per activation: two RMSNorms keep
                their fp32 input and two b-sized outputs, attention keeps q, k, v and its output
                (fused SDPA/flash: no seq² term; eager attention adds (4 + b)·heads·seq), the
                MLP its gate, up, activation and product. Activation checkpointing keeps b·h per
                layer plus one layer being recomputed. LoRA changes the pattern (frozen weights
                keep no inputs, each adapted linear keeps its dropped-out input).
  logits        per token (b + 12)·vocab: the logits, and three fp32 tensors alive at once around
                the loss (upcast or log-softmax output, and the gradient in and out of it).
  long rows     sequence parallelism over S ranks (train.sequence_parallel) leaves each rank
                seq/S tokens of every row: activations and logits divide by S (eager's
                seq² scores too: heads/S of them over the whole row); the model states
                stay partitioned over all N ranks. The tiled MLP keeps none of the MLP's
                4·ffn-wide activations, only one tile's while it runs (hidden tokens, and
                its gradient).
  fused loss    train.fused_loss (dsft/loss.py) keeps no logits per token: once per micro-batch
                one chunk of them, (b + 12)·vocab per row over dsft.loss.chunk_rows rows, and
                the head's gradient summed in fp32 (4·vocab·hidden; none with LoRA).
  allowance     1 GiB for the CUDA context, cuBLAS workspace and NCCL (invisible to PyTorch's
                allocator) plus DeepSpeed's communication buckets.

A plan fits when states + max(micro-batch × per-sequence + loss, step-only bytes) + allowance stays
within ``headroom`` (90 %) of the free GPU memory, and the host part within the host RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.config import Config, FreezeConfig, LoraConfig, batch_shape
from dsft.ds_config import bucket_sizes
from dsft.errors import ConfigError
from dsft.flops import DEFAULT_PEAK_TFLOPS, KERNEL_EFFICIENCY, text_config, text_dims, train_flops
from dsft.loss import chunk_rows

log = logging.getLogger("dsft")

GiB = 2**30
CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL: not in PyTorch's allocator
# Pinned staging buffers for offload: DeepSpeed's additional_buffer_factor.
HOST_BUFFER_FACTOR = 1.5
DEFAULT_HEADROOM = 0.9
DEFAULT_MFU = KERNEL_EFFICIENCY  # measured efficiency of dsft's step (dsft/flops.py)

# Llama-shaped models to plan for without a directory (there is no hub access to read their
# config.json): hidden, layers, MLP width, heads, key/value heads, vocabulary, tied embeddings.
_LLAMA_SHAPES = {
    "llama-1b": (2048, 16, 8192, 32, 8, 128256, True),  # Llama 3.2 1B
    "llama-3b": (3072, 28, 8192, 24, 8, 128256, True),  # Llama 3.2 3B
    "llama-7b": (4096, 32, 11008, 32, 32, 32000, False),  # Llama 2 7B
    "llama-8b": (4096, 32, 14336, 32, 8, 128256, False),  # Llama 3.1 8B
    "llama-13b": (5120, 40, 13824, 40, 40, 32000, False),  # Llama 2 13B
    "llama-34b": (8192, 48, 22016, 64, 8, 32000, False),  # Code Llama 34B
    "llama-70b": (8192, 80, 28672, 64, 8, 32000, False),  # Llama 2 70B
}
SHAPES: dict[str, dict[str, Any]] = {
    name: dict(
        hidden_size=h,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    for name, (h, layers, ffn, heads, kv, vocab, tied) in _LLAMA_SHAPES.items()
}


# --------------------------------------------------------------------------- model facts


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
    config: Any = field(default=None, compare=False, repr=False)  # the HF config, for re-planning

    @property
    def lora(self) -> bool:
        return self.lora_rank_width > 0

    def describe(self) -> str:
        kind = "LoRA" if self.lora else "full" if self.trainable_params == self.total_params else ""
        return (
            f"{self.name}: {_count(self.total_params)} params, {_count(self.trainable_params)} "
            f"trainable{f' ({kind})' if kind else ''}; hidden {self.hidden}, {self.layers} layers, "
            f"vocab {self.vocab}, largest layer {_count(self.largest_layer_params)}"
        )


def shape_config(name: str) -> Any:
    """A Hugging Face ``LlamaConfig`` for one of the built-in :data:`SHAPES`."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ConfigError([f"unknown model shape {name!r}; built-in shapes: {', '.join(SHAPES)}"])
    return LlamaConfig(**SHAPES[name])


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
    from transformers import AutoConfig, AutoModelForCausalLM

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
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        if lora is not None and lora.enabled:
            model = dsft_model.apply_lora(model, lora)
        if freeze is not None:
            dsft_model.freeze(model, freeze)
    total, trainable = dsft_model.count_params(model)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    text = text_config(config)
    hidden = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    ffn = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 0)

    # Blocks below the first trainable parameter keep no activations (nothing to backprop
    # into); trainable embeddings (index -1) make every block keep them.
    first = layers
    for name_, p in model.named_parameters():
        m = dsft_model.LAYER_RE.search(name_)
        if p.requires_grad and (m or dsft_model.EMBED_RE.search(name_)):
            first = min(first, int(m.group(1)) if m else -1)
    lora_inputs = [  # input widths of block 0's LoRA-adapted linears
        int(module.in_features)
        for name_, module in model.named_modules()
        if (m := dsft_model.LAYER_RE.search(name_ + ".")) and m.group(1) == "0"
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


# --------------------------------------------------------------------------- hardware facts


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


# --------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class Option:
    """One way of placing the model states: a ZeRO stage and what it offloads to host RAM."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    def __str__(self) -> str:
        off = ["optimizer"] * self.offload_optimizer + ["params"] * self.offload_params
        return f"ZeRO-{self.stage}" + (f" + {' & '.join(off)} offload" if off else "")


# Escalation order: each step holds less per GPU and costs more time. Offload is last
# because host transfers and the CPU optimizer make steps several times slower.
ESCALATION = (
    Option(0),
    Option(1),
    Option(2),
    Option(3),
    Option(3, offload_optimizer=True),
    Option(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes, and how."""

    seq: int  # tokens per sequence (data.max_len: the padded worst case)
    global_batch: int  # sequences per optimizer step over all ranks
    micro_batch: int | None = None  # sequences per rank per forward; None = the planner picks
    precision: str = "bf16"
    checkpointing: bool = False  # activation (gradient) checkpointing
    attention: str = "sdpa"
    headroom: float = DEFAULT_HEADROOM  # fraction of free GPU memory a plan may use
    sequence_parallel: int = 1  # ranks sharing each sequence (train.sequence_parallel)
    tiled_mlp: bool = False  # model.tiled_mlp
    chunked_loss: bool = False  # train.fused_loss: one chunk of logits, never a row's

    @property
    def local_seq(self) -> int:
        """Tokens of each sequence on one rank."""
        return -(-self.seq // self.sequence_parallel)


def _width(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_states(f: ModelFacts, o: Option, hw: Hardware, precision: str) -> tuple[int, int, int]:
    """Model-state bytes: (held on each GPU, extra on each GPU during the optimizer step only,
    host RAM per node)."""
    n, w = hw.world_size, _width(precision)
    P, T = f.total_params, f.trainable_params
    # DeepSpeed keeps an fp32 master copy and builds fp32 gradients for the step in mixed
    # precision, and in its ZeRO optimizers even for fp32 models; plain fp32 ZeRO-0 steps
    # torch's AdamW on the model's own weights and gradients.
    zero_opt = w == 2 or o.stage >= 1
    optim = (4 + 8 if zero_opt else 8) * T  # master copy + Adam moments
    step = 4 * T if zero_opt else 0  # fp32 gradients, built for the step
    weights = w * P
    grads = w * T
    if o.stage >= 1:
        optim, step = optim / n, step / n
    if o.stage >= 2:
        grads /= n
    if o.stage == 3:
        weights /= n
    gathered = 4 * f.largest_layer_params if o.stage == 3 else 0  # one layer gathered at a time
    host = 0.0
    if o.offload_optimizer:
        host += optim + step
        optim = step = 0
        if o.stage >= 2:
            grads = 0  # reduced gradient partitions go straight to host RAM
    if o.offload_params:
        host += weights
        weights = 0
    host_per_node = host * hw.gpus_per_node * HOST_BUFFER_FACTOR
    # Loading: below ZeRO-3 every local rank materialises the whole model in host RAM before
    # moving it to its GPU; ZeRO-3 partitions it while loading (zero.Init).
    load = hw.gpus_per_node * w * (P if o.stage < 3 else P / n)
    return int(weights + grads + optim + gathered), int(step), int(max(host_per_node, load))


def comm_buffers(f: ModelFacts, o: Option, precision: str) -> int:
    """DeepSpeed's gradient-reduction buckets (two in flight) and ZeRO-3's prefetch bucket."""
    if o.stage == 0:
        return 0
    b = bucket_sizes(f.hidden)
    elements = 2 * b["reduce_bucket_size"] + (
        b["stage3_prefetch_bucket_size"] if o.stage == 3 else 0
    )
    return elements * _width(precision)


def activation_bytes(f: ModelFacts, w: Workload) -> tuple[int, int]:
    """(activations, logits) bytes of one sequence of ``w.seq`` tokens kept for backward, on
    each rank (its ``seq / sequence_parallel`` tokens)."""
    b, h, kv, ffn = _width(w.precision), f.hidden, f.kv_dim, f.ffn
    mlp = (3 if f.lora else 4) * ffn * b  # the MLP's wide activations per token
    if f.lora:
        # Frozen weights need no inputs: norms keep only their fp32 input, the MLP its gate,
        # up and activation outputs. Each adapted linear keeps its dropped-out input (b) and
        # the dropout mask (1 byte); without dropout the adapters share the base inputs, of
        # which only the widest (the MLP product, when down_proj is adapted) is new.
        block = 8 * h + b * (2 * h + 2 * kv + 3 * ffn) + b * f.lora_rank_width
        block += (b + 1) * f.lora_inputs if f.lora_dropout else b * f.lora_max_input
    else:
        block = 8 * h + b * (6 * h + 2 * kv + 4 * ffn)
    block += 4 * f.heads  # attention log-sum-exp (fp32)
    if w.attention == "eager":
        block += (4 + b) * f.heads * w.seq  # the seq x seq scores: fp32 softmax + its copy
    if w.tiled_mlp:
        block -= mlp
    layers = f.activation_layers
    # checkpointing: every block's input, and one block's activations while it is recomputed
    per_token = layers * b * h + block if w.checkpointing and layers else layers * block
    per_token += 4 * h + 2 * b * h  # final norm
    tokens = w.local_seq
    act = tokens * per_token
    if w.tiled_mlp and layers:  # one tile of about `hidden` tokens and its gradient
        act += 2 * min(tokens, h) * mlp
    logits = 0 if w.chunked_loss else (b + 12) * f.vocab * tokens
    return int(act), int(logits)


def loss_bytes(f: ModelFacts, w: Workload) -> int:
    """train.fused_loss's bytes, once per micro-batch (0 without it): one chunk of logits
    and the LM head's gradient, summed in fp32 over the chunks (dsft/loss.py)."""
    if not w.chunked_loss:
        return 0
    chunk = (_width(w.precision) + 12) * f.vocab * min(chunk_rows(f.vocab), w.local_seq)
    return chunk + (0 if f.lora else 4 * f.vocab * f.hidden)


@dataclass(frozen=True)
class Estimate:
    """Memory of one option, and the largest micro-batch it fits."""

    option: Option
    micro_batch: int  # largest candidate micro-batch that fits; 0 = none
    states: int  # model-state bytes held on each GPU
    step_extra: int  # bytes on each GPU during the optimizer step only
    per_sequence: int  # activation + logits bytes of one sequence
    fixed: int  # CUDA context and communication buffers
    host: int  # host RAM bytes per node
    budget: int  # usable bytes per GPU (headroom x free)
    host_budget: int | None  # usable host bytes per node, None = unknown
    loss: int = 0  # train.fused_loss: its chunk and the head's gradient, per micro-batch

    def gpu(self, micro_batch: int) -> int:
        """Peak bytes per GPU at ``micro_batch``: the largest of the forward/backward peak and
        the optimizer step (activations are gone by then)."""
        forward_backward = micro_batch * self.per_sequence + self.loss
        return self.states + max(forward_backward, self.step_extra) + self.fixed

    @property
    def host_fits(self) -> bool:
        return self.host_budget is None or self.host <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0 and self.host_fits

    @property
    def peak(self) -> int:
        """Bytes per GPU at the chosen micro-batch (at 1 when none fits)."""
        return self.gpu(max(self.micro_batch, 1))


def micro_batch_candidates(w: Workload, world_size: int) -> list[int]:
    """Micro-batches worth trying, largest first: powers of two that divide the per-rank share
    of the global batch, and that share itself (no accumulation at all)."""
    if w.micro_batch is not None:
        return [w.micro_batch]
    dp = world_size // w.sequence_parallel  # a sequence-parallel group shares its rows
    if w.global_batch % dp:
        raise ConfigError(
            [
                f"train.global_batch: {w.global_batch} is not a multiple of the {dp} "
                "data-parallel ranks; choose a multiple"
            ]
        )
    per_rank = w.global_batch // dp
    powers = [2**i for i in range(per_rank.bit_length()) if per_rank % 2**i == 0]
    return sorted({*powers, per_rank}, reverse=True)


def estimate(f: ModelFacts, hw: Hardware, w: Workload, o: Option) -> Estimate:
    """Memory of option ``o`` and the largest candidate micro-batch that fits."""
    states, step_extra, host = model_states(f, o, hw, w.precision)
    act, logits = activation_bytes(f, w)
    fixed = comm_buffers(f, o, w.precision) + (CONTEXT_BYTES if hw.device == "cuda" else 0)
    est = Estimate(
        option=o,
        micro_batch=0,
        states=states,
        step_extra=step_extra,
        per_sequence=act + logits,
        fixed=fixed,
        host=host,
        budget=int(w.headroom * hw.gpu_mem),
        host_budget=int(w.headroom * hw.host_mem) if hw.host_mem else None,
        loss=loss_bytes(f, w),
    )
    fitting = [m for m in micro_batch_candidates(w, hw.world_size) if est.gpu(m) <= est.budget]
    return dataclasses.replace(est, micro_batch=max(fitting, default=0))


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Plan:
    """Every option's estimate and the one chosen (None: nothing fits)."""

    facts: ModelFacts
    hardware: Hardware
    workload: Workload
    estimates: list[Estimate]
    choice: Estimate | None

    @property
    def micro_batch(self) -> int:
        return self.choice.micro_batch if self.choice else 0

    @property
    def grad_accum(self) -> int:
        per_step = self.micro_batch * self.hardware.world_size // self.workload.sequence_parallel
        return self.workload.global_batch // per_step if per_step else 0

    def refusal(self) -> str:
        """Why nothing fits, and what would."""
        return refusal_message(self)


def choose(
    f: ModelFacts, hw: Hardware, w: Workload, options: Sequence[Option] = ESCALATION
) -> Plan:
    """Estimate every option and pick one.

    Without offload: the option that fits the largest micro-batch, the earliest in the
    escalation order among equals (ZeRO-0/1/2 communicate as much as plain data parallelism,
    ZeRO-3 half as much again, which a larger micro-batch amortises). Offload only when
    nothing else fits, and then the least of it (host transfers bound the step time).
    """
    estimates = [estimate(f, hw, w, o) for o in options]
    on_gpu = [
        e
        for e in estimates
        if e.fits and not (e.option.offload_optimizer or e.option.offload_params)
    ]
    offloaded = [e for e in estimates if e.fits and e not in on_gpu]
    if on_gpu:
        choice = max(on_gpu, key=lambda e: e.micro_batch)  # max keeps the first of equals
    else:
        choice = offloaded[0] if offloaded else None
    return Plan(f, hw, w, estimates, choice)


def sp_degrees(f: ModelFacts, hw: Hardware, seq: int) -> list[int]:
    """Possible sequence-parallel degrees: divisors of the ranks that also divide the
    attention heads, the key/value heads and the sequence length (each rank owns whole heads
    and an equal slice)."""
    kv = f.kv_heads or f.heads
    return [
        n
        for n in range(1, hw.world_size + 1)
        if hw.world_size % n == 0 and f.heads % n == 0 and kv % n == 0 and seq % n == 0
    ]


def smallest_sp(
    f: ModelFacts,
    hw: Hardware,
    w: Workload,
    options: Sequence[Option] = ESCALATION,
    global_batch: Any = None,
) -> Plan | None:
    """The plan at the smallest sequence-parallel degree that fits: the first whose choice
    stays on the GPUs, else the first that fits with offload; None when none does.

    ``global_batch(n)`` gives the global batch at degree ``n`` (default: the workload's).
    """
    fallback = None
    for n in sp_degrees(f, hw, w.seq):
        wn = dataclasses.replace(w, sequence_parallel=n)
        if global_batch is not None:
            wn = dataclasses.replace(wn, global_batch=global_batch(n))
        plan = choose(f, hw, wn, options)
        c = plan.choice
        if c is not None and not (c.option.offload_optimizer or c.option.offload_params):
            return plan
        if c is not None and fallback is None:
            fallback = plan
    return fallback


def refusal_message(plan: Plan) -> str:
    """What does not fit, by how much, and the changes that would make something fit."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    smallest = min(plan.estimates, key=lambda e: e.peak)
    mb = w.micro_batch or 1
    lines = [
        f"no DeepSpeed setup fits {f.name} ({_count(f.total_params)} params, "
        f"{_count(f.trainable_params)} trainable) on {hw.describe()} at micro-batch {mb}, "
        f"sequence length {w.seq}: the smallest, {smallest.option}, needs "
        f"{_gb(smallest.gpu(mb))} per GPU (usable: {_gb(smallest.budget)})"
        + ("" if smallest.host_fits else f" and {_gb(smallest.host)} host RAM per node")
    ]
    fixes = suggestions(plan)
    if fixes:
        lines.append("what would fit: " + "; ".join(fixes))
    return "\n".join(lines)


def suggestions(plan: Plan) -> list[str]:
    """Changes that would make the plan fit: a smaller micro-batch, activation checkpointing,
    shorter sequences, LoRA, more GPUs."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    out: list[str] = []

    def first_fit(f2: ModelFacts, hw2: Hardware, w2: Workload) -> Estimate | None:
        options = [e.option for e in plan.estimates]
        w2 = dataclasses.replace(w2, micro_batch=w2.micro_batch or 1)
        return choose(f2, hw2, w2, options).choice

    if w.micro_batch and w.micro_batch > 1:
        e = first_fit(f, hw, dataclasses.replace(w, micro_batch=1))
        if e:
            out.append(f"train.micro_batch=auto or 1 ({e.option})")
    if not w.checkpointing:
        e = first_fit(f, hw, dataclasses.replace(w, checkpointing=True))
        if e:
            out.append(f"model.gradient_checkpointing=true ({e.option})")
    for tiled in (False, True):
        w2 = dataclasses.replace(w, micro_batch=w.micro_batch or 1)
        if tiled:
            w2 = dataclasses.replace(w2, tiled_mlp=True, chunked_loss=True)
        sp = smallest_sp(f, hw, w2, [e.option for e in plan.estimates])
        n = sp.workload.sequence_parallel if sp else 0
        if sp and n > w.sequence_parallel:
            extra = ", model.tiled_mlp=true and a chunked loss" if tiled else ""
            out.append(f"train.sequence_parallel={n}{extra} ({sp.choice.option})")  # type: ignore[union-attr]
            break
    seq = w.seq // 2
    while seq >= 256:
        e = first_fit(f, hw, dataclasses.replace(w, seq=seq))
        if e:
            out.append(f"data.max_len={seq} ({e.option})")
            break
        seq //= 2
    if not f.lora and f.config is not None:
        lf = model_facts(f.config, lora=LoraConfig(enabled=True))
        e = first_fit(dataclasses.replace(lf, name=f.name), hw, w)
        if e:
            out.append(f"LoRA, model.lora.enabled=true ({e.option})")
    for more in _bigger(hw):
        e = first_fit(f, more, dataclasses.replace(w, global_batch=more.world_size))
        if e:
            out.append(f"{more.world_size} GPUs ({more.nodes} × {more.gpus_per_node}, {e.option})")
            break
    return out


def _bigger(hw: Hardware) -> Iterator[Hardware]:
    """Larger machines of the same GPU: a fuller node (up to 8 GPUs), then more nodes."""
    for gpus in (2, 4, 8):
        if hw.nodes == 1 and gpus > hw.gpus_per_node:
            yield dataclasses.replace(hw, gpus_per_node=gpus)
    per_node = max(hw.gpus_per_node, 8) if hw.nodes == 1 else hw.gpus_per_node
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes > hw.nodes:
            yield dataclasses.replace(hw, gpus_per_node=per_node, nodes=nodes)


# --------------------------------------------------------------------------- time estimate


def flops_per_token(f: ModelFacts, seq: int, checkpointing: bool = False) -> float:
    """Training FLOPs per token of full ``seq``-token sequences, by :func:`dsft.flops.train_flops`
    (the formula MFU uses), with the recomputation of activation checkpointing."""
    per_seq = train_flops(
        f.total_params, f.trainable_params, f.layers, f.hidden, seq, seq * seq, checkpointing
    )
    return per_seq / seq


def epoch_seconds(
    f: ModelFacts, hw: Hardware, w: Workload, tokens: int, peak_tflops: float, mfu: float
) -> float:
    """Compute-bound time to train on ``tokens`` tokens at ``mfu`` of every GPU's peak."""
    flops = tokens * flops_per_token(f, w.seq, w.checkpointing)
    return flops / (hw.world_size * peak_tflops * 1e12 * mfu)


# --------------------------------------------------------------------------- dsft train


def resolve(cfg: Config, hw: Hardware, facts: ModelFacts | None = None) -> tuple[Config, dict]:
    """``cfg`` with ``deepspeed.zero_stage`` and ``train.micro_batch`` "auto" replaced by the
    plan for ``hw``, and a record of the decision (written to ``<output_dir>/plan.json``).

    On CUDA the planner chooses; explicit values always win, with a warning when the plan
    predicts they will not fit. Without CUDA (CPU ranks, gloo) auto means ZeRO-0 on one rank
    and ZeRO-2 on several (ranks of a node share its RAM; ZeRO-2 divides gradients and
    optimizer states between them at the communication cost of plain data parallelism).
    ``train.sequence_parallel: auto`` takes the smallest degree at which a plan fits on CUDA
    (with the stage, when that is auto too), 1 without CUDA.
    """
    ds, t = cfg.deepspeed, cfg.train
    auto_stage, auto_micro = ds.zero_stage == "auto", t.micro_batch == "auto"
    auto_sp = t.sequence_parallel == "auto"
    record: dict[str, Any] = {"hardware": dataclasses.asdict(hw), "warnings": []}
    planned = hw.device == "cuda" or auto_micro
    if planned and facts is None:
        facts = model_facts(
            cfg.model.path, cfg.model.lora, cfg.model.freeze, cfg.model.trust_remote_code
        )
    if auto_stage and hw.device == "cpu":
        stage = 3 if ds.offload_params else 2 if hw.world_size > 1 or ds.offload_optimizer else 0
        options = [Option(stage, ds.offload_optimizer, ds.offload_params)]
    elif auto_stage:  # offloads asked for are requirements; the planner may add them too
        options = [
            o
            for o in ESCALATION
            if o.offload_optimizer >= ds.offload_optimizer and o.offload_params >= ds.offload_params
        ]
    else:
        options = [Option(int(ds.zero_stage), ds.offload_optimizer, ds.offload_params)]
    world = hw.world_size

    def global_batch(sp: int) -> int:
        return t.global_batch or (t.micro_batch if not auto_micro else 0) * t.grad_accum * (
            world // sp
        )

    sp = 1 if auto_sp else int(t.sequence_parallel)
    option, micro = options[0], None if auto_micro else int(t.micro_batch)
    if planned:
        assert facts is not None
        work = Workload(
            seq=cfg.data.max_len,
            global_batch=global_batch(sp),
            micro_batch=micro,
            precision=t.precision,
            checkpointing=cfg.model.gradient_checkpointing,
            attention=cfg.model.attn_implementation,
            sequence_parallel=sp,
            tiled_mlp=cfg.model.tiled_mlp,
            chunked_loss=t.fused_loss,
        )
        plan = choose(facts, hw, work, options)
        if auto_sp and hw.device == "cuda":
            plan = smallest_sp(facts, hw, work, options, global_batch) or plan
            sp = plan.workload.sequence_parallel
            work = plan.workload
        chosen = plan.choice
        if chosen is None and (auto_stage or hw.device == "cpu"):
            if hw.device == "cuda":
                raise ConfigError([plan.refusal()])
            chosen = plan.estimates[0]  # CPU: host RAM is a soft limit (it swaps); say so
            record["warnings"].append(plan.refusal())
        if chosen is None:  # an explicit stage: it wins, with a warning
            chosen = plan.estimates[0]
            record["warnings"].append(
                f"deepspeed.zero_stage={ds.zero_stage} may not fit: " + plan.refusal()
            )
        option = chosen.option
        micro = micro or chosen.micro_batch or 1
        record.update(
            model=_facts_record(facts),
            workload=dataclasses.asdict(work),
            predicted_gpu_bytes=chosen.gpu(micro),
            predicted_host_bytes=chosen.host,
            options=[_estimate_record(e) for e in plan.estimates],
            table=render_plan(plan),
        )
    resolved = dataclasses.replace(
        cfg,
        deepspeed=dataclasses.replace(
            ds,
            zero_stage=option.stage,
            offload_optimizer=option.offload_optimizer,
            offload_params=option.offload_params,
        ),
        train=dataclasses.replace(t, micro_batch=micro, sequence_parallel=sp),
    )
    bp = batch_shape(resolved.train, world)
    record.update(
        decided_by="config" if not auto_stage else "planner" if hw.device == "cuda" else "cpu",
        zero_stage=option.stage,
        offload_optimizer=option.offload_optimizer,
        offload_params=option.offload_params,
        micro_batch=bp.micro_batch,
        grad_accum=bp.grad_accum,
        world_size=world,
        sequence_parallel=bp.sequence_parallel,
        global_batch=bp.global_batch,
    )
    for warning in record["warnings"]:
        log.warning("plan: %s", warning)
    return resolved, record


def _facts_record(f: ModelFacts) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(f).items() if k != "config"}


def _estimate_record(e: Estimate) -> dict[str, Any]:
    return {
        "option": str(e.option),
        "micro_batch": e.micro_batch,
        "gpu_bytes": e.peak,
        "states_bytes": e.states,
        "per_sequence_bytes": e.per_sequence,
        "host_bytes": e.host,
        "fits": e.fits,
    }


# --------------------------------------------------------------------------- rendering


def _gb(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def render_plan(
    plan: Plan,
    tokens: int | None = None,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
) -> str:
    """The option table: memory per GPU and host, largest micro-batch, fit, time per epoch."""
    f, hw, w = plan.facts, plan.hardware, plan.workload
    act, logits = activation_bytes(f, w)
    lines = [
        f"model     {f.describe()}",
        f"hardware  {hw.describe()}",
        f"workload  seq {w.seq}, global batch {w.global_batch}, {w.precision}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}{_long_rows(w)}, "
        f"usable {w.headroom:.0%} of GPU memory",
        f"per sequence{' and rank' if w.sequence_parallel > 1 else ''}: activations {_gb(act)}, "
        f"logits {_gb(logits)}"
        + (f" (fused loss: {_gb(loss_bytes(f, w))} per micro-batch)" if w.chunked_loss else ""),
        "",
    ]
    head = f"  {'option':<34}{'states/GPU':>11}{'peak/GPU':>10}{'host/node':>11}{'micro':>7}  fits"
    if tokens:
        head += f"{'time/epoch':>12}"
    lines.append(head)
    seconds = epoch_seconds(f, hw, w, tokens, peak_tflops, mfu) if tokens else 0.0
    for e in plan.estimates:
        mark = "*" if e is plan.choice else " "
        fits = "yes" if e.fits else ("host" if e.micro_batch and not e.host_fits else "no")
        row = (
            f"{mark} {e.option!s:<34}{e.states / GiB:>11.1f}{e.peak / GiB:>10.1f}"
            f"{e.host / GiB:>11.1f}{e.micro_batch or '-':>7}  {fits:<4}"
        )
        if tokens:
            slow = "+" if e.option.offload_optimizer else ""
            row += f"{_duration(seconds) + slow:>12}"
        lines.append(row)
    lines.append("")
    if plan.choice:
        c = plan.choice
        dp = hw.world_size // w.sequence_parallel
        lines.append(
            f"* chosen: {c.option}, micro-batch {plan.micro_batch} × accumulation "
            f"{plan.grad_accum} × {dp} {'data-parallel ranks' if dp != hw.world_size else 'GPUs'}"
            f" = global batch {w.global_batch}; predicted peak {_gb(c.peak)} per GPU of "
            f"{_gb(hw.gpu_mem)}"
        )
    else:
        lines.append(plan.refusal())
    if tokens:
        lines.append(
            f"time/epoch: {_count(tokens)} tokens at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s "
            "per GPU (+: offload steps are host-bound, usually several times slower)"
        )
    return "\n".join(lines)


def _long_rows(w: Workload) -> str:
    parts = [f"sequence parallel {w.sequence_parallel}"] * (w.sequence_parallel > 1)
    parts += ["tiled MLP"] * w.tiled_mlp + ["chunked loss"] * w.chunked_loss
    return "".join(f", {p}" for p in parts)


def render_sequence_parallel(facts: list[ModelFacts], hw: Hardware, w: Workload) -> str:
    """The smallest sequence-parallel degree that fits each model, plain and with tiling
    (tiled MLP and a chunked loss), at micro-batch 1 (or the workload's)."""
    w = dataclasses.replace(w, micro_batch=w.micro_batch or 1)
    plain = dataclasses.replace(w, tiled_mlp=False, chunked_loss=False)
    tiled = dataclasses.replace(w, tiled_mlp=True, chunked_loss=True)
    lines = [
        f"sequence parallelism at seq {w.seq}, micro-batch {w.micro_batch}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}: the smallest degree that fits "
        f"(train.sequence_parallel) on {hw.describe()}",
        f"  {'model':<12}{'plain':<52}tiled (model.tiled_mlp + chunked loss)",
    ]

    def cell(p: Plan | None) -> str:
        if p is None or p.choice is None:
            return "does not fit"
        c = p.choice
        return f"SP {p.workload.sequence_parallel:<3}{c.option!s:<36}{c.peak / GiB:>5.1f} GB"

    for f in facts:
        row = cell(smallest_sp(f, hw, plain)), cell(smallest_sp(f, hw, tiled))
        lines.append(f"  {f.name:<12}{row[0]:<52}{row[1]}")
    return "\n".join(lines)


def render_family(
    plans: list[Plan],
    tokens: int | None = None,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    mfu: float = DEFAULT_MFU,
    epochs: int = 1,
    budget_hours: float | None = None,
) -> str:
    """One line per model size: whether and how it fits, and its training time."""
    hw, w = plans[0].hardware, plans[0].workload
    lines = [
        f"hardware  {hw.describe()}",
        f"workload  seq {w.seq}, global batch {w.global_batch}, {w.precision}, activation "
        f"checkpointing {'on' if w.checkpointing else 'off'}",
        "",
    ]
    head = (
        f"  {'model':<12}{'params':>9}{'trainable':>11}  {'choice':<34}{'micro':>6}{'peak/GPU':>10}"
    )
    if tokens:
        head += f"{'train time':>12}"
    lines.append(head)
    for p in plans:
        c = p.choice
        row = (
            f"  {p.facts.name:<12}{_count(p.facts.total_params):>9}"
            f"{_count(p.facts.trainable_params):>11}  "
        )
        if c is None:
            row += f"{'does not fit':<34}{'-':>6}{'-':>10}"
        else:
            row += f"{c.option!s:<34}{c.micro_batch:>6}{c.peak / GiB:>7.1f} GB"
        if tokens and c is not None:
            hours = epochs * epoch_seconds(p.facts, hw, w, tokens, peak_tflops, mfu) / 3600
            over = budget_hours is not None and hours > budget_hours
            slow = "+" if c.option.offload_optimizer or c.option.offload_params else ""
            row += f"{_duration(hours * 3600) + slow:>12}" + (" over budget" if over else "")
        lines.append(row)
    if tokens:
        lines.append("")
        lines.append(
            f"train time: {epochs} epoch(s) of {_count(tokens)} tokens at {mfu:.0%} MFU of "
            f"{peak_tflops:g} TFLOP/s per GPU"
            + (f"; budget {budget_hours:g} h" if budget_hours is not None else "")
            + " (+: offload, host-bound, usually several times slower)"
        )
    return "\n".join(lines)
