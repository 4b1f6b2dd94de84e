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

A multimodal model's vision tower and projector (:class:`Tower`) run once per image patch,
never per text token, so N and N_t above are the language model's alone and the tower adds,
for P_j patches of image j (P = Σ P_j; L_v blocks of width d_v):

    forward   2·(N_v + N_p)·P + 4·L_v·d_v·Σ P_j²
    backward  only as far down as something trains: through the projector (2·N_p·P) when it
              or the tower trains, through the tower (2·N_v·P + 8·L_v·d_v·Σ P_j²) when it
              trains, plus the weight gradients 2·(N_v,t + N_p,t)·P

A frozen tower and projector (the default) cost the forward only. The projector is counted
per patch, an upper bound for the families that pool patches before projecting (Gemma 3,
Idefics3).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Tower:
    """A multimodal model's vision tower and projector: their parameters (total, trainable)
    and the tower's shape, for FLOPs per image patch (see the module docstring)."""

    vision: int
    vision_trainable: int
    projector: int
    projector_trainable: int
    layers: int  # the tower's blocks
    hidden: int  # ... and their width
    patch: int  # pixels per patch side
    values_per_patch: int  # pixel_values entries per patch: channels × patch² × frames

    @property
    def params(self) -> tuple[int, int]:
        """(total, trainable) parameters of tower and projector together."""
        return self.vision + self.projector, self.vision_trainable + self.projector_trainable

    def flops(self, patches: float, sq_patches: float) -> float:
        """Training FLOPs of images of ``patches`` patches in all, whose per-image squares sum
        to ``sq_patches``."""
        total, trainable = self.params
        out = 2 * total * patches + 4 * self.layers * self.hidden * sq_patches  # forward
        if trainable:  # gradients flow back through the projector ...
            out += 2 * self.projector * patches + 2 * trainable * patches
        if self.vision_trainable:  # ... and through the tower when it trains
            out += 2 * self.vision * patches + 8 * self.layers * self.hidden * sq_patches
        return float(out)


def tower(model_config: Any, parts: dict[str, tuple[int, int]]) -> Tower | None:
    """The :class:`Tower` of a Hugging Face config with a ``vision_config``, given the
    (total, trainable) parameters of each part (``dsft.model.part_params``); None for a
    text model or a tower without image patches (audio)."""
    vision = getattr(model_config, "vision_config", None)
    if vision is None or isinstance(vision, dict) or not parts.get("vision", (0, 0))[0]:
        return None
    patch = int(getattr(vision, "patch_size", 0) or 0)
    if not patch:
        return None
    layers = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", 0)
    channels = int(getattr(vision, "num_channels", None) or getattr(vision, "in_channels", 3))
    frames = int(getattr(vision, "temporal_patch_size", None) or 1)
    (nv, tv), (np_, tp) = parts.get("vision", (0, 0)), parts.get("projector", (0, 0))
    return Tower(
        vision=nv,
        vision_trainable=tv,
        projector=np_,
        projector_trainable=tp,
        layers=int(layers),
        hidden=int(vision.hidden_size),
        patch=patch,
        values_per_patch=channels * patch * patch * frames,
    )


def image_patches(micro: dict[str, Any], tower: Tower | None) -> tuple[int, int]:
    """(patches, Σ per-image patches²) of a micro-batch's images, from the shapes of its
    processor outputs: ``image_grid_thw`` (Qwen-VL: t·h·w patches per image), else
    ``pixel_values`` of images [..., channels, H, W] (H·W / patch² each; Idefics3's padding
    images, all-zero in ``pixel_attention_mask``, left out). (0, 0) without images."""
    pixels = micro.get("pixel_values")
    if tower is None or pixels is None:
        return 0, 0
    grid = micro.get("image_grid_thw")
    if grid is not None:
        per = [int(t * h * w) for t, h, w in grid.tolist()]
    elif pixels.dim() >= 4:
        h, w = pixels.shape[-2:]
        mask = micro.get("pixel_attention_mask")
        images = (
            int(mask.flatten(0, -3).flatten(1).any(1).sum())
            if mask is not None
            else pixels.numel() // (pixels.shape[-3] * h * w)
        )
        per = [(h // tower.patch) * (w // tower.patch)] * images
    else:  # flattened patches without a grid: count them, as one image
        per = [pixels.numel() // tower.values_per_patch]
    return sum(per), sum(p * p for p in per)


class FlopCounter:
    """Model FLOPs of training steps and MFU, by :func:`train_flops` for the language model
    and :meth:`Tower.flops` for a multimodal model's tower (``total``, ``trainable``: all
    parameters; the tower's are counted per image patch, the rest per token)."""

    def __init__(
        self,
        total: int,
        trainable: int,
        model_config: Any,
        total_peak: float,
        tower: Tower | None = None,
    ):
        tower_total, tower_trainable = tower.params if tower else (0, 0)
        self.total, self.trainable = total - tower_total, trainable - tower_trainable
        self.tower = tower
        self.layers, self.hidden = text_dims(model_config) if model_config else (0, 0)
        self.total_peak = total_peak  # peak FLOP/s of all devices together

    def flops(
        self, tokens: float, sq_tokens: float, patches: float = 0, sq_patches: float = 0
    ) -> float:
        text = train_flops(self.total, self.trainable, self.layers, self.hidden, tokens, sq_tokens)
        return text + (self.tower.flops(patches, sq_patches) if self.tower else 0.0)

    def scalars(
        self,
        tokens: float,
        sq_tokens: float,
        seconds: float,
        patches: float = 0,
        sq_patches: float = 0,
    ) -> dict[str, float]:
        achieved = self.flops(tokens, sq_tokens, patches, sq_patches) / max(seconds, 1e-9)
        out = {"tflops": achieved / 1e12}
        if self.total_peak:
            out["mfu"] = achieved / self.total_peak
        return out
