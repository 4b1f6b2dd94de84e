"""Tokenisation and loss masking: rendered examples (dsft/data/template.py finds the trained
character spans of chat rows) -> token ids and labels.

Tokens that overlap a trained span get a label (transformers' rule); all others are -100.
Completion examples are ``prompt + completion + eos`` (loss on the completion) and raw text
examples ``text + eos`` (loss on everything), both without a template.

Tokenising is batched through the Rust tokenizer (``encode_batch`` with offsets) and masks
are built with numpy, so the Python cost per example is the template rendering.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dsft.data.formats import IMAGE_PLACEHOLDER, Example, Message
from dsft.data.readers import open_image
from dsft.data.template import (
    ChatOptions,
    _refusal,
    _RowError,
    _text,
    chat_template,
    prepare_messages,
)
from dsft.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    """Token ids and labels of one example (labels are -100 outside trained spans)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dataset: str = ""  # which file it came from (metrics are also reported per dataset)

    @property
    def num_target_tokens(self) -> int:
        # Position 0 is never predicted (the loss shifts by one), so it never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def _special(tokenizer: Any, name: str) -> str:
    return getattr(tokenizer, name, None) or ""


def render_example(
    tokenizer: Any, ex: Example, loss_on: str = "assistant", opts: ChatOptions | None = None
) -> tuple[str, list]:
    """The text of ``ex`` and the character spans that carry loss."""
    if ex.kind == "text":
        bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
        text = bos + ex.messages[-1]["content"] + eos
        return text, [(0, len(text))]
    if ex.kind == "completion":
        bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
        prompt = bos + ex.messages[0]["content"]
        text = prompt + ex.messages[-1]["content"] + eos
        return text, [(0 if loss_on == "all" else len(prompt), len(text))]
    try:
        return chat_template(tokenizer, opts).locate(ex, loss_on)
    except _RowError as e:
        raise DataError(f"{ex.source}: {e}") from None


@dataclass
class Encoded:
    """A batch of tokenised examples as flat arrays (what the cache stores)."""

    ids: np.ndarray  # int32, all examples back to back
    trained: np.ndarray  # bool, same length: the token carries loss
    offsets: np.ndarray  # int64, n + 1: example i is ids[offsets[i]:offsets[i+1]]
    # With on_bad_row=skip: the input examples kept (indices), and why others were left out.
    kept: list[int] | None = None
    skipped: list[str] = field(default_factory=list)


def _batch_encode(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, character offsets) of each text, straight from the Rust tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            "dsft needs a fast (tokenizers-backed) tokenizer for character offsets; "
            "this model ships only a slow one"
        )
    # The templates already contain any BOS text; the tokenizer must not add another.
    out = []
    for e in backend.encode_batch(texts, add_special_tokens=False):
        offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        out.append((np.asarray(e.ids, dtype=np.int32), offs))
    return out


def encode(
    tokenizer: Any,
    examples: Iterable[Example],
    loss_on: str | None = None,
    batch: int = 1000,
    *,
    options: ChatOptions | None = None,
) -> Encoded:
    """Render, tokenise and mask examples (untruncated; truncation is applied on read).

    A row the chat template refuses raises a located DataError, or with
    ``options.on_bad_row == "skip"`` is left out and listed in ``Encoded.skipped``.
    """
    opts = options or ChatOptions()
    if loss_on is not None and loss_on != opts.loss_on:  # the argument wins
        opts = replace(opts, loss_on=loss_on)
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    lengths: list[int] = []
    kept: list[int] = []
    skipped: list[str] = []
    n = 0
    for chunk in _chunks(examples, batch):
        rendered = []
        expansions: list[list[np.ndarray] | None] = []
        for ex in chunk:
            try:
                ex = cap_example(ex, opts.char_cap)
                expanded = image_expansions(tokenizer, ex, opts)
                text, spans = render_example(
                    tokenizer, _with_image_token(tokenizer, ex), opts.loss_on, opts
                )
                _check_image_count(tokenizer, ex, text)
                rendered.append((text, spans))
                expansions.append(expanded)
                kept.append(n)
            except DataError as e:
                if opts.on_bad_row != "skip" or not str(e).startswith(ex.source):
                    raise
                skipped.append(str(e))
            n += 1
        for (_, spans), (ids, offs), expanded in zip(
            rendered, _batch_encode(tokenizer, [t for t, _ in rendered]), expansions, strict=True
        ):
            mask = np.zeros(len(ids), dtype=bool)
            # A token overlapping a span is trained (transformers' assistant-mask rule).
            for a, b in spans:
                mask |= (offs[:, 1] > a) & (offs[:, 0] < b)
            if expanded:
                ids, mask = _expand_images(tokenizer, ids, mask, expanded)
            ids_parts.append(ids)
            mask_parts.append(mask)
            lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    kept_or_none = kept if skipped else None
    if not ids_parts:
        return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), offsets, kept_or_none, skipped)
    return Encoded(
        np.concatenate(ids_parts), np.concatenate(mask_parts), offsets, kept_or_none, skipped
    )


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary
    entry: a byte-level entry's length bounds its decoded characters)."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) or 1


def char_cap(tokenizer: Any, max_len: int) -> int:
    """Characters of a message that can matter for ``max_len`` tokens, with a margin.

    N tokens cover at most N x (longest token) characters, so a text cut at this many
    characters still tokenises to more than ``max_len`` tokens (the truncation is seen as
    truncation, exactly), and the first ``max_len`` are those of the whole text: the cut is
    64 tokens past them. A power of two, so nearby ``max_len`` values share cache entries."""
    need = (max_len + 64) * longest_token_chars(tokenizer)
    return 1 << max(need - 1, 1).bit_length()


def _cap_text(value: Any, cap: int) -> Any:
    if isinstance(value, str):
        return value[:cap]
    if isinstance(value, list):  # content parts: cut their text
        return [
            {**p, "text": p["text"][:cap]}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in value
        ]
    return value


def cap_example(ex: Example, cap: int) -> Example:
    """``ex`` with every message text cut to ``cap`` characters (0: unchanged)."""
    if not cap or not any(
        len(v) > cap for m in ex.messages for v in m.values() if isinstance(v, str | list)
    ):
        return ex
    messages = [{k: _cap_text(v, cap) for k, v in m.items()} for m in ex.messages]
    return replace(ex, messages=messages)


# ------------------------------------------------------------------------------- images
# An image row is rendered with the model's own processor: each image's placeholder (the
# processor's image token) is replaced by the ids the processor expands it to for that very
# image (no per-family token counts written here), and those ids never carry loss. The cache
# keeps this token layout and the image references; pixels are decoded per batch
# (dsft.data.collate.ImageInputs).


def processor_of(tokenizer: Any) -> Any:
    """The model's multimodal processor riding on its tokenizer (dsft.model.load_tokenizer),
    or None for a text-only model."""
    return getattr(tokenizer, "dsft_processor", None)


def image_expansions(tokenizer: Any, ex: Example, opts: ChatOptions) -> list[np.ndarray] | None:
    """The token ids the processor puts in place of each of ``ex``'s images (None: none)."""
    if not ex.images:
        return None
    proc = processor_of(tokenizer)
    if proc is None:
        why = getattr(tokenizer, "dsft_processor_error", "")
        raise DataError(
            f"{ex.source}: the row has an image, but "
            + (
                f"the model's processor does not load here ({why})"
                if why
                else "the model is text-only (model.path has no image processor: no "
                "processor_config.json / preprocessor_config.json)"
            )
        )
    out = []
    for i, ref in enumerate(ex.images):
        img = open_image(ref, opts.max_image_pixels, f"{ex.source}: image {i + 1}")
        enc = proc(text=[proc.image_token], images=[[img]], add_special_tokens=False)
        out.append(np.asarray(enc["input_ids"][0], dtype=np.int32))
    return out


def image_text(tokenizer: Any) -> str:
    """What the chat template writes for an image part (Qwen's ``<|vision_start|><|image_pad|>
    <|vision_end|>``, Gemma 3's ``<start_of_image>``...), learnt by rendering a probe with and
    without one; the processor's image token when the template takes no content parts."""
    proc = processor_of(tokenizer)
    cached = getattr(proc, "_dsft_image_text", None)
    if cached is not None:
        return cached
    mark = "\x00MARK\x00"

    def probe(parts: list[dict[str, Any]]) -> str:
        msgs = [{"role": "user", "content": parts}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)

    found = proc.image_token
    try:
        plain = probe([{"type": "text", "text": mark}])
        with_image = probe([{"type": "image"}, {"type": "text", "text": mark}])
        head = plain[: plain.index(mark)]
        if with_image.startswith(head) and mark in with_image:
            between = with_image[len(head) : with_image.index(mark)].strip("\n ")
            if between.count(proc.image_token) == 1:
                found = between
    except Exception:  # a template without content parts: the bare image token
        pass
    proc._dsft_image_text = found
    return found


def _with_image_token(tokenizer: Any, ex: Example) -> Example:
    """``ex`` with its image placeholders written as the chat template writes an image."""
    proc = processor_of(tokenizer)
    if not ex.images or proc is None:
        return ex
    text = image_text(tokenizer)
    if text == IMAGE_PLACEHOLDER:
        return ex

    def swap(m: Message) -> Message:
        c = m.get("content")
        return {**m, "content": c.replace(IMAGE_PLACEHOLDER, text)} if isinstance(c, str) else m

    return replace(ex, messages=[swap(m) for m in ex.messages])


def _check_image_count(tokenizer: Any, ex: Example, text: str) -> None:
    proc = processor_of(tokenizer)
    if proc is None:
        return
    found = text.count(proc.image_token)
    given = len(ex.images or [])
    if found != given:
        raise DataError(
            f"{ex.source}: {found} image placeholder(s) ({IMAGE_PLACEHOLDER!r}) but {given} "
            "image(s); every image needs one placeholder, in order"
        )


def _expand_images(
    tokenizer: Any, ids: np.ndarray, mask: np.ndarray, expanded: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    token = tokenizer.convert_tokens_to_ids(processor_of(tokenizer).image_token)
    at = np.flatnonzero(ids == token)
    ids_out, mask_out, start = [], [], 0
    for pos, exp in zip(at, expanded, strict=True):
        ids_out += [ids[start:pos], exp]
        mask_out += [mask[start:pos], np.zeros(len(exp), dtype=bool)]  # never trained
        start = pos + 1
    ids_out.append(ids[start:])
    mask_out.append(mask[start:])
    return np.concatenate(ids_out).astype(np.int32), np.concatenate(mask_out)


def _chunks(items: Iterable[Example], n: int) -> Iterator[list[Example]]:
    chunk: list[Example] = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_example(
    tokenizer: Any,
    ex: Example,
    max_len: int,
    loss_on: str | None = None,
    options: ChatOptions | None = None,
) -> Tokenized:
    """Render, tokenise and mask one example; truncates to ``max_len`` tokens."""
    e = encode(tokenizer, [ex], loss_on, options=options)
    ids = e.ids.tolist()
    labels = np.where(e.trained, e.ids, IGNORE_INDEX).tolist()
    return Tokenized(ids[:max_len], labels[:max_len], len(ids) > max_len, ex.dataset)


def tokenize_prompt(
    tokenizer: Any, ex: Example, options: ChatOptions | None = None
) -> tuple[list[int], str]:
    """Prompt ids for generation and the reference answer.

    Chat: every turn before the last assistant one, with the generation prompt; an image
    row's images expanded as in training (its pixels: ``ImageInputs`` on ``ex.images``).
    Completion: the raw prompt. (Raw text examples have no reference.)
    """
    messages = ex.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if ex.kind == "completion":
        text = _special(tokenizer, "bos_token") + messages[0]["content"]
    else:
        tpl = chat_template(tokenizer, options)
        shown = _with_image_token(tokenizer, ex).messages[:last]
        try:
            text = tpl.render(
                prepare_messages(shown, tpl.opts), ex.tools, add_generation_prompt=True
            )[0]
        except Exception as e:
            raise DataError(f"{ex.source}: {_refusal(e)}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expanded = image_expansions(tokenizer, ex, tpl.opts) if ex.kind != "completion" else None
    if expanded:
        _check_image_count(tokenizer, ex, text)
        ids = _expand_images(tokenizer, np.asarray(ids), np.zeros(len(ids), bool), expanded)[0]
        ids = ids.tolist()
    return ids, _text(messages[last])
