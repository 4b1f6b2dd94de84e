"""Padding a list of tokenised examples into a batch of tensors."""

from __future__ import annotations

from typing import Any

import torch

from dsft.data.tokenize import IGNORE_INDEX, Tokenized


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "lengths": mask.sum(1)}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts so that generation continues every row at the same position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class ImageInputs:
    """The pixel side of image rows, made per batch by the model's processor (decoded here,
    in the process that builds the batch; the cache holds only token layouts and image
    references): ``pixel_values`` and the family's other image inputs (``image_sizes``,
    ``pixel_attention_mask``...), and the per-token inputs its processor makes
    (``token_type_ids`` for Gemma 3), learnt from the processor's own output on a probe."""

    def __init__(self, processor: Any, max_pixels: int, dtype: torch.dtype = torch.float32):
        from PIL import Image

        self.processor, self.max_pixels, self.dtype = processor, max_pixels, dtype
        probe = processor(
            text=[processor.image_token],
            images=[[Image.new("RGB", (64, 64))]],
            add_special_tokens=False,
            return_tensors="pt",
        )
        self.per_token: dict[str, list[int]] = {}  # key -> token ids where it is 1
        ids = probe["input_ids"][0]
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in probe and key not in ("input_ids", "attention_mask"):
                self.per_token[key] = sorted(set(ids[probe[key][0] == 1].tolist()))
        self.image_keys = [
            k for k in probe if k not in ("input_ids", "attention_mask", *self.per_token)
        ]
        self._dummy = self.pixels([[Image.new("RGB", (64, 64))]])

    @classmethod
    def of(cls, tokenizer: Any, max_pixels: int, precision: str) -> ImageInputs | None:
        """The image inputs of ``tokenizer``'s processor (dsft.model.load_tokenizer), or
        None for a text-only model."""
        proc = getattr(tokenizer, "dsft_processor", None)
        if proc is None:
            return None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        return cls(proc, max_pixels, dtype)

    def pixels(self, images: list[list[Any]]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=images, return_tensors="pt")
        keep = {k: v for k, v in out.items() if k in self.image_keys and torch.is_tensor(v)}
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in keep.items()}

    def dummy(self) -> dict[str, torch.Tensor]:
        """Image inputs of one black image (ZeRO-3: a rank with no image still runs the
        tower, so that every rank gathers its parameters alike)."""
        return dict(self._dummy)

    def add(self, batch: dict[str, torch.Tensor], split: Any, index: list[int]) -> None:
        """Add the image inputs of examples ``index`` of ``split`` (the batch's examples,
        in order: packed rows' examples one after the other) to ``batch``. The families
        place image features by their image tokens in flattened order, so packed rows take
        the same pixels in the same order as the examples unpacked. Image rows are never
        truncated (the processor's expansion must stay whole)."""
        from dsft.errors import DataError

        rows = []
        for i in index:
            ex = split.example(i)
            if ex.images and split[i].truncated:
                raise DataError(
                    f"{ex.source}: an image row longer than data.max_len (truncating it "
                    "would cut its image tokens); raise data.max_len or set "
                    "data.truncation=drop"
                )
            rows.append(ex.images)
        self(batch, rows)

    def __call__(self, batch: dict[str, torch.Tensor], rows: list[list[str] | None]) -> None:
        """Add the image inputs of ``rows`` (each row's image references) to ``batch``."""
        from dsft.data.readers import open_image

        for key, tokens in self.per_token.items():
            batch[key] = torch.isin(batch["input_ids"], torch.tensor(tokens)).long()
        images = [[open_image(r, self.max_pixels) for r in row] for row in rows if row]
        if images:
            batch.update(self.pixels(images))
