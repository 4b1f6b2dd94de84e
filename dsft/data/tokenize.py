"""Chat-template rendering and loss masking.

Each conversation is rendered once with the tokenizer's chat template and
tokenised with character offsets. The character span of every assistant turn is
found by rendering the prefixes of the conversation, and exactly the tokens that
start inside those spans are trained on; all other labels are -100. This works
for any template that renders a conversation as a prefix-extension of its
earlier turns (true of the common templates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsft.data.formats import Example, Message
from dsft.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    """Token ids and labels of one example (labels are -100 outside responses)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dataset: str = ""  # which file it came from (metrics are also reported per dataset)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
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
                "conversation, so response tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_example(tokenizer: Any, ex: Example, max_len: int) -> Tokenized:
    """Render, tokenise and mask one example; truncates to ``max_len`` tokens."""
    text, spans = assistant_spans(tokenizer, ex.messages, ex.source)
    # The template already contains any BOS text; do not let the tokenizer add another.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[j] = ids[j]
    truncated = len(ids) > max_len
    return Tokenized(ids[:max_len], labels[:max_len], truncated, ex.dataset)


def tokenize_prompt(tokenizer: Any, messages: list[Message]) -> tuple[list[int], str]:
    """Prompt ids for generation (every turn before the last assistant one) and its reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render(tokenizer, messages[:last], add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, messages[last]["content"]
