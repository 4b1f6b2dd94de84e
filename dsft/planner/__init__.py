"""The memory planner: ZeRO stage, offload and micro-batch from the model's size and the
hardware (the memory model itself is described in dsft/planner/memory.py).

    shapes   Llama-shaped presets to plan for without a model directory
    facts    model facts (meta device, no weights read) and hardware facts
    memory   bytes per GPU and per host for each ZeRO / offload option
    choose   the first option that fits, the smallest sequence-parallel degree, suggestions
    render   the `dsft plan` tables and the time per epoch
    resolve  "auto" resolved for `dsft train`: the typed Decision (plan.json)
"""

from dsft.flops import DEFAULT_PEAK_TFLOPS
from dsft.planner.choose import (
    Plan,
    choose,
    refusal_message,
    smallest_sp,
    sp_degrees,
    suggestions,
)
from dsft.planner.facts import (
    GiB,
    Hardware,
    ModelFacts,
    free_gpu_memory,
    hardware_facts,
    hidden_size,
    host_memory,
    job_hardware,
    model_facts,
    parse_count,
    parse_size,
)
from dsft.planner.memory import (
    CONTEXT_BYTES,
    DEFAULT_HEADROOM,
    ESCALATION,
    HOST_BUFFER_FACTOR,
    Estimate,
    Option,
    Workload,
    activation_bytes,
    comm_buffers,
    estimate,
    loss_bytes,
    micro_batch_candidates,
    model_states,
)
from dsft.planner.render import (
    DEFAULT_MFU,
    epoch_seconds,
    flops_per_token,
    render_family,
    render_plan,
    render_sequence_parallel,
)
from dsft.planner.resolve import (
    Decision,
    resolve,
)
from dsft.planner.shapes import (
    SHAPES,
    shape_config,
)

__all__ = [
    "CONTEXT_BYTES",
    "DEFAULT_HEADROOM",
    "DEFAULT_MFU",
    "DEFAULT_PEAK_TFLOPS",
    "ESCALATION",
    "HOST_BUFFER_FACTOR",
    "SHAPES",
    "Decision",
    "Estimate",
    "GiB",
    "Hardware",
    "ModelFacts",
    "Option",
    "Plan",
    "Workload",
    "activation_bytes",
    "choose",
    "comm_buffers",
    "epoch_seconds",
    "estimate",
    "flops_per_token",
    "free_gpu_memory",
    "hardware_facts",
    "hidden_size",
    "host_memory",
    "job_hardware",
    "loss_bytes",
    "micro_batch_candidates",
    "model_facts",
    "model_states",
    "parse_count",
    "parse_size",
    "refusal_message",
    "render_family",
    "render_plan",
    "render_sequence_parallel",
    "resolve",
    "shape_config",
    "smallest_sp",
    "sp_degrees",
    "suggestions",
]
