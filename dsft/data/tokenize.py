"""Templates, tokenisation and loss masking.

Chat examples are rendered with a chat template (the tokenizer's own, a built-in
one, or the user's Jinja) and tokenised once with character offsets. The
character span of every assistant turn is found by rendering the prefixes of the
conversation, and exactly the tokens that start inside the trained spans get a
label; all others are -100. This works for any template that renders a
conversation as a prefix-extension of its earlier turns (true of the common
templates). Completion examples are ``prompt + completion + eos`` (loss on the
completion) and raw text examples ``text + eos`` (loss on everything), both
without a template.

Tokenising is batched: the fast tokenizer encodes a list of texts in Rust, and
labels are built with numpy from the offsets, so the Python cost per example is
the template rendering.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsft.data.formats import Example, Message
from dsft.errors import DataError

IGNORE_INDEX = -100

# Built-in templates for tokenizers without one (or to override theirs). Each renders
# the assistant turn's end marker inside the turn, so the model learns to stop.
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def resolve_template(spec: str) -> str | None:
    """The Jinja text ``data.template`` names (None = keep the tokenizer's own)."""
    if not spec:
        return None
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(
        f"data.template: {spec!r} is not a built-in template ({', '.join(TEMPLATES)}), "
        "a readable .jinja file, or Jinja text"
    )


def apply_template(tokenizer: Any, spec: str) -> None:
    """Install ``data.template`` on the tokenizer (it is saved with the exported model)."""
    text = resolve_template(spec)
    if text is not None:
        tokenizer.chat_template = text


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


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; set data.template to one of "
            f"{', '.join(TEMPLATES)}, a .jinja file, or Jinja text"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[Message], where: str) -> tuple[str, list]:
    """The rendered text and the (start, end) character spans of assistant turns."""
    text = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render turns as a prefix of the whole "
                "conversation, so response tokens cannot be located; use data.template=chatml "
                "or a template that does"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _special(tokenizer: Any, name: str) -> str:
    return getattr(tokenizer, name, None) or ""


def render_example(tokenizer: Any, ex: Example, loss_on: str = "assistant") -> tuple[str, list]:
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
    text, spans = assistant_spans(tokenizer, ex.messages, ex.source)
    if loss_on == "all":
        return text, [(0, len(text))]
    if loss_on == "last_assistant":
        return text, spans[-1:]
    return text, spans


@dataclass
class Encoded:
    """A batch of tokenised examples as flat arrays (what the cache stores)."""

    ids: np.ndarray  # int32, all examples back to back
    trained: np.ndarray  # bool, same length: the token carries loss
    offsets: np.ndarray  # int64, n + 1: example i is ids[offsets[i]:offsets[i+1]]


def encode(
    tokenizer: Any, examples: Iterable[Example], loss_on: str = "assistant", batch: int = 1000
) -> Encoded:
    """Render, tokenise and mask examples (untruncated; truncation is applied on read)."""
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    lengths: list[int] = []
    for chunk in _chunks(examples, batch):
        rendered = [render_example(tokenizer, ex, loss_on) for ex in chunk]
        # The templates already contain any BOS text; the tokenizer must not add another.
        enc = tokenizer(
            [t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
        )
        for (_, spans), ids, offs in zip(
            rendered, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            starts = np.fromiter((o[0] for o in offs), dtype=np.int64, count=len(offs))
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                mask |= (starts >= a) & (starts < b)
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            mask_parts.append(mask)
            lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if not ids_parts:
        return Encoded(np.zeros(0, np.int32), np.zeros(0, bool), offsets)
    return Encoded(np.concatenate(ids_parts), np.concatenate(mask_parts), offsets)


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
    tokenizer: Any, ex: Example, max_len: int, loss_on: str = "assistant"
) -> Tokenized:
    """Render, tokenise and mask one example; truncates to ``max_len`` tokens."""
    e = encode(tokenizer, [ex], loss_on)
    ids = e.ids.tolist()
    labels = np.where(e.trained, e.ids, IGNORE_INDEX).tolist()
    return Tokenized(ids[:max_len], labels[:max_len], len(ids) > max_len, ex.dataset)


def tokenize_prompt(tokenizer: Any, ex: Example) -> tuple[list[int], str]:
    """Prompt ids for generation and the reference answer.

    Chat: every turn before the last assistant one, with the generation prompt.
    Completion: the raw prompt. (Raw text examples have no reference.)
    """
    messages = ex.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if ex.kind == "completion":
        text = _special(tokenizer, "bos_token") + messages[0]["content"]
    else:
        text = render(tokenizer, messages[:last], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, messages[last]["content"]
