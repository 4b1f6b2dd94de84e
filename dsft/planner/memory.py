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
  reference     preference.reference=live for a full fine-tune keeps a frozen second copy of the
                weights (w·P), placed like the model's: divided by N under ZeRO-3, in host
                RAM with parameter offload. Precomputed and reference-free methods, and LoRA
                (the adapter switched off), hold none.
  allowance     1 GiB for the CUDA context, cuBLAS workspace and NCCL (invisible to PyTorch's
                allocator) plus DeepSpeed's communication buckets.

A plan fits when states + max(micro-batch × per-sequence + loss, step-only bytes) + allowance stays
within ``headroom`` (90 %) of the free GPU memory, and the host part within the host RAM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsft.ds_config import bucket_sizes
from dsft.errors import ConfigError
from dsft.loss import chunk_rows
from dsft.planner.facts import GiB, Hardware, ModelFacts

CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL: not in PyTorch's allocator
# Pinned staging buffers for offload: DeepSpeed's additional_buffer_factor.
HOST_BUFFER_FACTOR = 1.5
DEFAULT_HEADROOM = 0.9


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
    reference_copy: bool = False  # a frozen copy of the weights (dsft.config.live_reference_copy)

    @property
    def local_seq(self) -> int:
        """Tokens of each sequence on one rank."""
        return -(-self.seq // self.sequence_parallel)


def _width(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_states(
    f: ModelFacts, o: Option, hw: Hardware, precision: str, reference_copy: bool = False
) -> tuple[int, int, int]:
    """Model-state bytes: (held on each GPU, extra on each GPU during the optimizer step only,
    host RAM per node). ``reference_copy``: a frozen second copy of the weights, placed as
    the model's are."""
    n, w = hw.world_size, _width(precision)
    P, T = f.total_params, f.trainable_params
    # DeepSpeed keeps an fp32 master copy and builds fp32 gradients for the step in mixed
    # precision, and in its ZeRO optimizers even for fp32 models; plain fp32 ZeRO-0 steps
    # torch's AdamW on the model's own weights and gradients.
    zero_opt = w == 2 or o.stage >= 1
    optim = (4 + 8 if zero_opt else 8) * T  # master copy + Adam moments
    step = 4 * T if zero_opt else 0  # fp32 gradients, built for the step
    weights = w * P * (2 if reference_copy else 1)
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
    states, step_extra, host = model_states(f, o, hw, w.precision, w.reference_copy)
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
