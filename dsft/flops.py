"""Model FLOPs, device peaks and MFU: the one formula that logging, the planner and the
benchmark all use.

Training FLOPs of one step, for N parameters of which N_t are trainable, T real (non-pad)
tokens, L layers, hidden size d and tᵢ the real length of each sequence (of each packed
segment, not of the padded row):

    (4·N + 2·N_t)·T + 12·L·d·Σ tᵢ²

Forward matmuls cost 2·N per token and the backward's activation gradients another 2·N
(they flow through frozen weights too, down to the lowest trainable one); weight gradients
cost 2·N_t, which frozen and LoRA-base weights never get. The attention term counts the
score and value products, which grow with each sequence's own length. With full
fine-tuning N_t = N and this is the usual 6·N·T. Activation recomputation (checkpointing)
is not counted: MFU counts the model's FLOPs, not the hardware's; the planner adds the
recomputation to its *time* estimate only (``recompute=True``).
"""

from __future__ import annotations

from typing import Any

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name; extend with logging.peak_tflops.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "A6000": 155.0,
}
DEFAULT_PEAK_TFLOPS = PEAK_TFLOPS["H100"]  # planning for hardware we cannot see
# The model FLOP utilisation a dsft training step reaches on a GPU: the planner's time
# estimates (`dsft plan`, the "auto" plan) divide by it, and `dsft bench` prints its predicted
# step time against the measured one. One home: set it from the GPU check's bench
# (benchmarks/gpu_check.sh, docs/gpu-path.md). 0.40 is issue 24's target for the fast path
# (varlen attention), not yet measured; the last measurement, 0.146 (1B Llama full FT, seq
# 4096, packed, H200), was of sdpa with the 4-D mask.
KERNEL_EFFICIENCY = 0.40


def peak_flops(configured_tflops: float) -> float:
    """Peak FLOP/s of one device: the configured value, else looked up; 0 when unknown."""
    if configured_tflops:
        return configured_tflops * 1e12
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 0.0


def train_flops(
    total: int,
    trainable: int,
    layers: int,
    hidden: int,
    tokens: float,
    sq_tokens: float,
    recompute: bool = False,
) -> float:
    """FLOPs of training on ``tokens`` real tokens whose per-sequence squares sum to
    ``sq_tokens`` (see the module docstring). ``recompute``: activation checkpointing runs
    the forward a second time (time estimates only, never MFU)."""
    dense = (4 * total + 2 * trainable) * tokens
    attention = 12 * layers * hidden * sq_tokens
    if recompute:
        dense += 2 * total * tokens
        attention += 4 * layers * hidden * sq_tokens
    return float(dense + attention)


def text_config(model_config: Any) -> Any:
    """The language model's part of a Hugging Face config (multimodal configs nest it; a
    plain causal LM's config is its own), or of a config.json read as a dict (its
    "text_config"). The one home of this fallback: the planner, sequence parallelism, the FLOP
    counter and the config's head-count check read shapes through it."""
    if isinstance(model_config, dict):
        return model_config.get("text_config") or model_config
    get = getattr(model_config, "get_text_config", None)
    return (get() if get else None) or model_config


def text_dims(model_config: Any) -> tuple[int, int]:
    """(layers, hidden size) of a Hugging Face config. (0, 0) when it has neither."""
    text = text_config(model_config)
    layers = getattr(text, "num_hidden_layers", 0) or 0
    return int(layers), int(getattr(text, "hidden_size", 0) or 0)


class FlopCounter:
    """Model FLOPs of training steps and MFU, by :func:`train_flops`."""

    def __init__(self, total: int, trainable: int, model_config: Any, total_peak: float):
        self.total, self.trainable = total, trainable
        self.layers, self.hidden = text_dims(model_config) if model_config else (0, 0)
        self.total_peak = total_peak  # peak FLOP/s of all devices together

    def flops(self, tokens: float, sq_tokens: float) -> float:
        return train_flops(self.total, self.trainable, self.layers, self.hidden, tokens, sq_tokens)

    def scalars(self, tokens: float, sq_tokens: float, seconds: float) -> dict[str, float]:
        achieved = self.flops(tokens, sq_tokens) / max(seconds, 1e-9)
        out = {"tflops": achieved / 1e12}
        if self.total_peak:
            out["mfu"] = achieved / self.total_peak
        return out
