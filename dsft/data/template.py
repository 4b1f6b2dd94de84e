"""Chat templates: the built-in ones and ``data.template``, and the trained spans of a chat row.

Chat examples are rendered ONCE, whole, with the chat template (the tokenizer's own, a
built-in one, or the user's Jinja), and the trained character spans are found inside that
one rendering:

* A template that marks the assistant's output with ``{% generation %}`` gives the spans
  itself (what transformers' ``return_assistant_tokens_mask`` uses).
* Otherwise every text field of every assistant message (content, reasoning, tool-call names)
  is wrapped in private-use marker characters before rendering. The markers show where each
  assistant turn lands in the rendering, however the template rewrites history (Qwen3 drops
  earlier reasoning, GPT-OSS ends earlier turns differently, Mistral moves the system
  message...); they are removed before tokenising. A turn's trained span starts after the
  template's assistant cue (its generation prompt, e.g. ``<|im_start|>assistant\\n``, learnt
  by rendering a one-turn probe) and ends after the turn's ending token: the first of
  ``data.turn_end`` after the turn's last marker (default: the special tokens the template
  itself writes after an assistant turn, plus EOS). So ``<|im_end|>``, ``<|eot_id|>``,
  ``<end_of_turn>``, GPT-OSS's ``<|end|>``/``<|return|>``/``<|call|>``, and GLM-4's next
  role tag are trained; a template that writes nothing after the last turn gets the first
  ending token appended, so the model learns to stop.

Tokenising those renderings and turning the spans into labels: dsft/data/tokenize.py.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dsft.data.formats import Example, Message
from dsft.data.readers import MAX_IMAGE_PIXELS
from dsft.errors import DataError

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

# Marker characters: Unicode's supplementary private-use plane A, one code point per marked
# field of a conversation. No tokenizer sees them (they are removed before encoding).
_MARK0 = 0xF0000
_MARK_RE = re.compile("[\U000f0000-\U000ffffd]")
_THINK_RE = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_USER, _PROBE_USER2, _PROBE_ANSWER = (
    "probe question one",
    "probe question two",
    "probe answer",
)
_PROBE_RESULT = "probe tool result"
# Arguments as an object (the documented form) and as JSON text (DeepSeek concatenates them).
_PROBE_CALLS = [
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "probe0001",  # Mistral wants 9 characters
                "type": "function",
                "function": {"name": "dsft_probe_tool", "arguments": args},
            }
        ],
    }
    for args in ({"x": 1}, '{"x": 1}')
]


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


@dataclass(frozen=True)
class ChatOptions:
    """How chat examples are rendered and masked (the data.* settings that change tokens)."""

    loss_on: str = "assistant"  # assistant | last_assistant | all
    # Strings that end an assistant turn (trained); empty = learnt from the template + EOS.
    turn_end: tuple[str, ...] = ()
    fold_system: bool = False  # system message -> front of the first user turn
    reasoning: str = "train"  # train | drop (remove reasoning before rendering)
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # extra template variables
    template_date: str = ""  # YYYY-MM-DD: what strftime_now returns ("" = today)
    on_bad_row: str = "error"  # a row the template refuses: error | skip
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are bad rows

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> ChatOptions:
        """From the data settings dict that keys the tokenisation cache."""
        return cls(
            loss_on=s.get("loss_on", "assistant"),
            turn_end=tuple(s.get("turn_end") or ()),
            fold_system=bool(s.get("fold_system", False)),
            reasoning=s.get("reasoning", "train"),
            template_kwargs=tuple(sorted((s.get("template_kwargs") or {}).items())),
            template_date=s.get("template_date", ""),
            on_bad_row=s.get("on_bad_row", "error"),
            max_image_pixels=int(s.get("max_image_pixels") or MAX_IMAGE_PIXELS),
        )


class _RowError(Exception):
    """The template cannot render one conversation (the caller adds the location)."""


def _no_template() -> DataError:
    return DataError(
        "the tokenizer has no chat template; set data.template to one of "
        f"{', '.join(TEMPLATES)}, a .jinja file, or Jinja text"
    )


def _template_line(e: BaseException) -> int | None:
    """The chat-template line an exception was raised at (jinja rewrites tracebacks so)."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _refusal(e: BaseException) -> str:
    line = _template_line(e)
    at = f" (template line {line})" if line else ""
    return f"the chat template refused this conversation{at}: {e}"


def _special_tokens(tokenizer: Any) -> list[str]:
    """Added tokens flagged special (control tokens), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in added.values() if getattr(t, "special", False)}
    names |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((n for n in names if n), key=len, reverse=True)


def _alternation(strings: Iterable[str]) -> re.Pattern | None:
    s = sorted(set(strings), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, s))) if s else None


class ChatTemplate:
    """One tokenizer's chat template, compiled once, and what probing it taught us.

    ``cue``: what precedes an assistant turn's output (the generation prompt, or the tail
    of a user turn for templates without one, e.g. Mistral's ``[/INST]``). ``ends``: the
    strings that end an assistant turn. ``parts``: the template reads content as a list of
    ``{"type": "text"}`` parts (LLaVA) rather than a string.
    """

    def __init__(self, tokenizer: Any, opts: ChatOptions) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        text = getattr(tokenizer, "chat_template", None)
        if not text:
            raise _no_template()
        if not isinstance(text, str):
            raise DataError("the tokenizer has several named chat templates; set data.template")
        self.text = text
        try:
            self.compiled = _compile_jinja_template(text)
            import jinja2.meta

            self.variables = jinja2.meta.find_undeclared_variables(
                self.compiled.environment.parse(text)
            )
        except Exception as e:  # a syntax error in the user's or the model's template
            raise DataError(f"the chat template does not compile: {e}") from None
        self.tagged = bool(_GENERATION_RE.search(text))
        self.tokenizer = tokenizer
        self.opts = opts
        date = datetime.strptime(opts.template_date, "%Y-%m-%d") if opts.template_date else None
        self.kwargs = {
            **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
            **dict(opts.template_kwargs),
            # Llama 3 and GPT-OSS stamp today's date; data.template_date pins it.
            "strftime_now": lambda fmt: (date or datetime.now()).strftime(fmt),
        }
        self.special = _special_tokens(tokenizer)
        self.special_re = _alternation(self.special)
        self.parts = self._probe_parts()
        self.cues = self._probe_cues()
        self.ends = list(opts.turn_end) if opts.turn_end else self._probe_ends()
        self.ends_re = _alternation(self.ends)

    # ------------------------------------------------------------------ rendering

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the ``{% generation %}`` spans (empty if untagged)."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        if self.parts:
            messages = [_as_parts(m) for m in messages]
        text, spans = _render_with_assistant_indices(
            self.compiled,
            messages,
            tools,
            None,
            add_generation_prompt,
            **self.kwargs,
        )
        return text, [tuple(s) for s in spans]

    def _try_render(self, messages: list[dict[str, Any]], gen: bool = False) -> str | None:
        # Some templates iterate `tools` unconditionally (Command R's tool_use): retry with [].
        for tools in (None, []):
            try:
                return self.render(messages, tools, add_generation_prompt=gen)[0]
            except Exception:  # a probe the template does not accept teaches nothing
                continue
        return None

    # ------------------------------------------------------------------ probing

    def _probe_parts(self) -> bool:
        conv = [{"role": "user", "content": _PROBE_USER}]
        self.parts = False
        plain = self._try_render(conv, True)
        if plain is not None and _PROBE_USER in plain:
            return False
        self.parts = True
        parts = self._try_render(conv, True)
        if parts is not None and _PROBE_USER in parts:
            return True
        self.parts = False
        try:
            self.render(conv, add_generation_prompt=True)
        except Exception as e:
            raise DataError(
                f"the chat template fails on a one-turn conversation: {_refusal(e)}"
            ) from None
        raise DataError("the chat template does not render the user's message content")

    def _tail(self, messages: list[dict[str, Any]], after: str, gen: bool) -> str | None:
        text = self._try_render(messages, gen)
        if text is None or after not in text:
            return None
        return text[text.rfind(after) + len(after) :]

    def _from_last_special(self, tail: str) -> str:
        found = list(self.special_re.finditer(tail)) if self.special_re else []
        return tail[found[-1].start() :] if found else tail

    def _probe_cues(self) -> list[list[str]]:
        """What precedes an assistant's output, most specific first, as token prefixes.

        1. the generation prompt (``<|im_start|>assistant\\n``; a prefix of it where history
           turns render less, e.g. DeepSeek-R1's ``<｜Assistant｜>`` without ``<think>``);
        2. the end of a user turn, for templates without a generation prompt (Mistral's
           ``[/INST]``), and 3. of a tool turn (DeepSeek's ``<｜tool▁outputs▁end｜>``), from
           their last control token on.
        """
        u = [{"role": "user", "content": _PROBE_USER}]
        tail_gen = self._tail(u, _PROBE_USER, True) or ""
        tail = self._tail(u, _PROBE_USER, False) or ""
        gen = tail_gen[len(tail) :] if tail_gen.startswith(tail) else tail_gen
        cues = [gen, self._from_last_special(tail_gen)]
        tool = {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "probe0001"}
        tool["name"] = "dsft_probe_tool"
        for call in _PROBE_CALLS:
            tool_tail = self._tail([*u, call, tool], _PROBE_RESULT, True)
            if tool_tail:
                cues.append(self._from_last_special(tool_tail))
                break
        return [self._prefixes(c) for c in dict.fromkeys(c for c in cues if c.strip())]

    def _prefixes(self, cue: str) -> list[str]:
        """Prefixes of the cue that end at a token boundary, longest first."""
        if not cue:
            return []
        enc = self.tokenizer.backend_tokenizer.encode(cue, add_special_tokens=False)
        ends = sorted({e for _, e in enc.offsets if e > 0} | {len(cue)}, reverse=True)
        return [cue[:e] for e in ends]

    def _specials_in(self, s: str) -> list[str]:
        return [m.group() for m in self.special_re.finditer(s)] if self.special_re else []

    def _probe_ends(self) -> list[str]:
        u = {"role": "user", "content": _PROBE_USER}
        a = {"role": "assistant", "content": _PROBE_ANSWER}
        ends: list[str] = []
        last = self._try_render([u, a])
        if last is not None and _PROBE_ANSWER in last:
            tail = last[last.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
            found = self._specials_in(tail)[:1]
            # LLaVA ends turns with literal text ("<\s>"), not a token
            ends += found or ([tail.strip()] if tail.strip() else [])
        mid = self._try_render([u, a, {"role": "user", "content": _PROBE_USER2}])
        if mid is not None and _PROBE_ANSWER in mid and _PROBE_USER2 in mid:
            between = mid[mid.find(_PROBE_ANSWER) + len(_PROBE_ANSWER) : mid.rfind(_PROBE_USER2)]
            ends += self._specials_in(between)[:1]  # GLM-4: the next role tag
        for call in _PROBE_CALLS:
            tc = self._try_render([u, call])
            if tc is not None and "dsft_probe_tool" in tc:
                ends += self._specials_in(tc[tc.find("dsft_probe_tool") :])[-1:]  # GPT-OSS <|call|>
                break
        eos = getattr(self.tokenizer, "eos_token", None)
        if isinstance(eos, str) and eos:
            ends.append(eos)
        return list(dict.fromkeys(e for e in ends if e))

    # ------------------------------------------------------------------ locating turns

    def conversation(self, ex: Example) -> tuple[list[dict[str, Any]], list[list[int]], list[int]]:
        """Messages to render (options applied, assistant fields marked), the marker codes
        of each assistant message, and the tool-call name markers of each."""
        msgs = prepare_messages(ex.messages, self.opts)
        marks: list[list[int]] = []
        calls: list[list[int]] = []
        code = _MARK0
        out: list[dict[str, Any]] = []
        for m in msgs:
            if m["role"] != "assistant":
                out.append(m)
                continue
            m = dict(m)
            mine: list[int] = []
            call_marks: list[int] = []

            def wrap(s: str, mine: list[int] = mine) -> str:
                nonlocal code
                core = s.strip()
                if not core:
                    return s  # an empty field stays empty: templates test for it
                lead = s[: len(s) - len(s.lstrip())]
                trail = s[len(s.rstrip()) :]
                a, b = chr(code), chr(code + 1)
                mine += [code, code + 1]
                code += 2
                return lead + a + core + b + trail

            if isinstance(m.get("content"), str):
                m["content"] = wrap(m["content"])
            if isinstance(m.get("reasoning_content"), str):
                m["reasoning_content"] = wrap(m["reasoning_content"])
                m["thinking"] = m["reasoning_content"]  # GPT-OSS reads `thinking`
            if m.get("tool_calls"):
                tcs = []
                for tc in m["tool_calls"]:
                    tc = dict(tc)
                    fn = dict(tc.get("function") or {})
                    if isinstance(fn.get("name"), str):
                        before = len(mine)
                        fn["name"] = wrap(fn["name"])
                        call_marks += mine[before:]
                    tc["function"] = fn
                    tcs.append(tc)
                m["tool_calls"] = tcs
            marks.append(mine)
            calls.append(call_marks)
            out.append(m)
        return out, marks, calls

    def locate(self, ex: Example, loss_on: str) -> tuple[str, list[tuple[int, int]]]:
        """The text of a chat example and its trained character spans."""
        msgs, marks, calls = self.conversation(ex)
        if ex.tools and "tools" not in self.variables:
            raise _RowError(
                "the row has `tools`, but the chat template does not read a `tools` variable "
                "(no tool support); use a template with tool calling (data.template)"
            )
        try:
            marked, gen_spans = self.render(msgs, ex.tools)
        except Exception as e:
            raise _RowError(_refusal(e)) from None
        # Where each marker first lands, in the coordinates of the text without markers.
        found = list(_MARK_RE.finditer(marked))
        raw = [f.start() for f in found]
        first: dict[int, int] = {}
        for k, f in enumerate(found):
            first.setdefault(ord(f.group()), f.start() - k)
        text = _MARK_RE.sub("", marked)

        def clean(pos: int) -> int:
            return pos - bisect_left(raw, pos)

        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        where: list[tuple[int, int]] = []  # (first, last) marker position per assistant msg
        for n, i in enumerate(assistants):
            pos = [first[c] for c in marks[n] if c in first]
            if calls[n] and not any(c in first for c in calls[n]):
                raise _RowError(
                    f"messages[{i}] has tool_calls, but the chat template does not render "
                    "them (no tool support); use a template with tool calling (data.template)"
                )
            if not pos:
                raise _RowError(f"the chat template does not render messages[{i}] (assistant)")
            where.append((min(pos), max(pos)))
        for i, m in enumerate(msgs):
            if m["role"] == "tool" and (c := _text(m).strip()) and _find(text, c) < 0:
                raise _RowError(
                    f"messages[{i}] is a tool result, but the chat template does not render "
                    "tool messages (no tool support); use a template with tool calling"
                )
        if self.tagged:
            spans = [(clean(a), clean(b)) for a, b in gen_spans if b > a]
            if loss_on == "last_assistant" and where:
                spans = [s for s in spans if s[1] > where[-1][0]]
        else:
            spans = []
            prev = 0
            for n, i in enumerate(assistants):
                p, z = where[n]
                before = _text(msgs[i - 1]).strip() if i else ""
                start = self._start(text, prev, p, before)
                nxt = where[n + 1][0] if n + 1 < len(where) else None
                end, text = self._end(text, msgs, i, z, nxt)
                spans.append((start, end))
                prev = end
            if loss_on == "last_assistant":
                spans = spans[-1:]
        if loss_on == "all":
            return text, [(0, len(text))]
        return text, spans

    def _start(self, text: str, lo: int, p: int, prev: str) -> int:
        """Where the assistant's output starts: after the last cue before its first marker;
        without one, right after the previous message (and its control tokens)."""
        for prefixes in self.cues:
            for g in prefixes:
                at = text.rfind(g, lo, p)
                if at >= 0:
                    return at + len(g)
        at = _find(text, prev, lo, p, last=True) if prev else -1
        if at < 0:
            return p
        while self.special_re is not None and (m := self.special_re.match(text, at, p)):
            at = m.end()
        return at

    def _end(
        self, text: str, msgs: list[dict[str, Any]], i: int, z: int, next_assistant: int | None
    ) -> tuple[int, str]:
        """The end of assistant turn ``i`` (after its ending tokens), and the text (with the
        first ending appended when the template ends the conversation without one)."""
        bound = next_assistant if next_assistant is not None else len(text)
        if i + 1 < len(msgs) and msgs[i + 1]["role"] != "assistant":
            core = _text(msgs[i + 1]).strip()
            at = _find(text, core, z, bound) if core else -1
            if at >= 0:
                bound = at
        if self.ends_re is not None:
            m = self.ends_re.search(text, z, bound)
            if m is not None:
                end = m.end()
                while True:  # EOS right after the end-of-turn token (Phi-3)
                    rest = text[end:bound]
                    nxt = self.ends_re.match(text, end + len(rest) - len(rest.lstrip()), bound)
                    if nxt is None or nxt.end() <= end:
                        break
                    end = nxt.end()
                return end, text
        if not text[z:].strip() and self.ends:
            return len(text) + len(self.ends[0]), text + self.ends[0]
        if self.special_re is not None:
            m = self.special_re.search(text, z, bound)
            if m is not None:
                return m.start(), text
        return bound, text


def _find(text: str, s: str, lo: int = 0, hi: int | None = None, last: bool = False) -> int:
    """Where ``s`` is in ``text[lo:hi]`` as written or JSON-escaped (templates ``tojson`` tool
    results); with ``last``, the END of its last occurrence. -1 if absent."""
    hi = len(text) if hi is None else hi
    for form in (s, json.dumps(s, ensure_ascii=False)[1:-1]):
        at = text.rfind(form, lo, hi) if last else text.find(form, lo, hi)
        if at >= 0:
            return at + len(form) if last else at
    return -1


def _text(m: Mapping[str, Any]) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else ""


def _as_parts(m: dict[str, Any]) -> dict[str, Any]:
    c = m.get("content")
    if isinstance(c, str):
        return {**m, "content": [{"type": "text", "text": c}]}
    return m


def prepare_messages(messages: list[Message], opts: ChatOptions) -> list[dict[str, Any]]:
    """Messages as the template gets them: system folded, reasoning dropped, if asked."""
    msgs = [dict(m) for m in messages]
    if opts.fold_system and msgs and msgs[0]["role"] == "system":
        system = _text(msgs[0])
        rest = msgs[1:]
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{_text(m)}" if system.strip() else _text(m)
                break
        else:
            rest = msgs  # nothing to fold into
        msgs = rest
    if opts.reasoning == "drop":
        for m in msgs:
            if m["role"] == "assistant":
                m.pop("reasoning_content", None)
                m.pop("thinking", None)
                if "</think>" in _text(m):
                    m["content"] = _THINK_RE.sub("", _text(m))
    return msgs


# One ChatTemplate per (tokenizer, template, options): probing costs a few renders.
_TEMPLATES: dict[tuple[int, str, str, str], ChatTemplate] = {}


def set_chat_options(tokenizer: Any, opts: ChatOptions) -> None:
    """Make ``opts`` (the run's data settings) the tokenizer's default for chat rendering, so
    that generation prompts at evaluation render as the training data did."""
    tokenizer.dsft_chat_options = opts


def chat_template(tokenizer: Any, opts: ChatOptions | None = None) -> ChatTemplate:
    """The (cached) ChatTemplate of the tokenizer's current template."""
    opts = opts or getattr(tokenizer, "dsft_chat_options", None) or ChatOptions()
    text = getattr(tokenizer, "chat_template", None)
    if not text:
        raise _no_template()
    # repr: template_kwargs may hold lists (unhashable)
    key = (id(tokenizer), text, repr(opts), repr(sorted(tokenizer.special_tokens_map.items())))
    tpl = _TEMPLATES.get(key)
    if tpl is None or tpl.tokenizer is not tokenizer:
        if len(_TEMPLATES) > 32:
            _TEMPLATES.clear()
        tpl = _TEMPLATES[key] = ChatTemplate(tokenizer, opts)
    return tpl


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The plain rendering of ``messages`` (as the model sees them at inference)."""
    tpl = chat_template(tokenizer)
    try:
        return tpl.render(prepare_messages(messages, tpl.opts), None, add_generation_prompt)[0]
    except Exception as e:
        raise DataError(_refusal(e)) from None
