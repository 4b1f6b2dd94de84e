"""Preference data: chosen/rejected pairs (DPO and its family) and labelled completions (KTO).

Row shapes, detected per row in this order:

  * ms-swift: ``{"messages": [...], "rejected_response": str}``: the messages end with the
    chosen assistant turn; the rejected side replaces that turn's content.
  * TRL preference, explicit prompt: ``{"prompt": ..., "chosen": ..., "rejected": ...}``;
    standard (all strings: ``prompt + response + eos``, no template) or conversational
    (``chosen`` / ``rejected`` lists of messages, ``prompt`` a list of messages or a string
    taken as one user turn).
  * TRL preference, implicit prompt: ``{"chosen": ..., "rejected": ...}`` without ``prompt``:
    the shared prefix is the prompt, as TRL's ``extract_prompt`` finds it (the longest common
    run of messages, or of characters for strings, less a trailing space).
  * KTO (unpaired): ``{"prompt": ..., "completion": ..., "label": bool}``, strings or lists.

Both sides are rendered and masked by the SFT path (dsft.data.tokenize.encode): one whole
rendering per side with the chat template, template-exact masks. Only the response (every
assistant turn after the prompt) is scored. The two sides of a pair must render the same
prompt tokens; a row where they do not is a located error (file:line).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dsft.config import DataConfig
from dsft.data.formats import CHAT_ROLES, Example, Message, _BadRow, normaliser
from dsft.data.packing import efficiency, pack
from dsft.data.readers import read_rows
from dsft.data.split import carve_arrays, split_count
from dsft.data.template import ChatOptions, apply_template, set_chat_options
from dsft.data.tokenize import IGNORE_INDEX, Tokenized, encode
from dsft.errors import DataError

log = logging.getLogger("dsft")

SHAPES = (
    "prompt + chosen + rejected (TRL, strings or message lists), chosen + rejected (implicit "
    "prompt), messages + rejected_response (ms-swift), prompt + completion + label (KTO)"
)


@dataclass(frozen=True)
class PairExample:
    """One preference row: the chosen conversation and the rejected one (None for KTO)."""

    chosen: Example
    rejected: Example | None
    source: str
    label: bool | None = None  # KTO: the completion is desirable
    prompt_messages: int = 0  # messages of `chosen` that are the prompt


@dataclass
class Pair:
    """A tokenised preference row (labels are -100 outside the scored response)."""

    chosen: Tokenized
    rejected: Tokenized | None
    label: bool | None = None
    source: str = ""

    @property
    def sides(self) -> list[Tokenized]:
        return [self.chosen] if self.rejected is None else [self.chosen, self.rejected]

    @property
    def length(self) -> int:
        return sum(len(t.input_ids) for t in self.sides)


# --------------------------------------------------------------------------- normalising


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _PairNormaliser:
    def __init__(self, columns: dict[str, str]) -> None:
        self.norm = normaliser("auto", columns, "error")
        self.keys = {"chosen", "rejected", "rejected_response", "label", *self.norm.record_keys}

    def messages(self, record: dict[str, Any], name: str) -> list[Message]:
        return self.norm.message_list(record, name, "role", "content", CHAT_ROLES)

    def __call__(self, record: Any, where: str) -> PairExample:
        self.norm.images = []  # the record's image references (none allowed here)
        out = self.pair(record, where)
        if self.norm.images:
            raise _BadRow("image content in a preference row: preference tuning is text-only")
        return out

    def pair(self, record: Any, where: str) -> PairExample:
        if not isinstance(record, dict):
            raise _BadRow(f"expected an object, got {type(record).__name__}")
        if "rejected_response" in record:
            return self.swift(record, where)
        if "chosen" in record or "rejected" in record:
            return self.trl(record, where)
        if "label" in record and "completion" in record:
            return self.kto(record, where)
        fields = ", ".join(map(str, record)) or "none"
        raise _BadRow(f"not a preference row (fields: {fields}); accepted: {SHAPES}")

    def swift(self, record: dict[str, Any], where: str) -> PairExample:
        msgs = self.norm.chat(record)
        if msgs[-1]["role"] != "assistant":
            raise _BadRow("field 'messages' must end with the chosen assistant turn")
        rej = self.norm.response(record, "rejected_response")
        rejected = [*msgs[:-1], {"role": "assistant", "content": rej}]
        tools = self.norm.tools(record)
        n = len(msgs) - 1
        return PairExample(
            Example(msgs, where, "chat", tools),
            Example(rejected, where, "chat", tools),
            where,
            None,
            n,
        )

    def trl(self, record: dict[str, Any], where: str) -> PairExample:
        for name in ("chosen", "rejected"):
            if name not in record:
                raise _BadRow(f"missing field {name!r} (a preference row needs both sides)")
        c, r = record["chosen"], record["rejected"]
        if isinstance(c, list) and isinstance(r, list):
            chosen, rejected = self.messages(record, "chosen"), self.messages(record, "rejected")
            if "prompt" in record:
                prompt = self.prompt_messages(record)
            else:  # implicit: the shared run of messages
                n = _common_prefix(chosen, rejected)
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            for name, side in (("chosen", chosen), ("rejected", rejected)):
                if not any(m["role"] == "assistant" for m in side):
                    raise _BadRow(f"field {name!r}: no assistant message after the prompt")
                if any(m["role"] == "system" for m in side):
                    raise _BadRow(f"field {name!r}: holds a system message")
            tools = self.norm.tools(record)
            return PairExample(
                Example(prompt + chosen, where, "chat", tools),
                Example(prompt + rejected, where, "chat", tools),
                where,
                None,
                len(prompt),
            )
        if isinstance(c, list) or isinstance(r, list):
            raise _BadRow("fields 'chosen' and 'rejected' must both be strings or both be lists")
        chosen = self.norm.response(record, "chosen")
        rejected = self.norm.response(record, "rejected")
        if "prompt" in record:
            prompt = self.norm.string(record, "prompt")
        else:  # implicit: the shared characters, less a trailing space (TRL's extract_prompt)
            n = _common_prefix(chosen, rejected)
            if n and chosen[n - 1] == " ":
                n -= 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not chosen.strip() or not rejected.strip():
                raise _BadRow("'chosen' and 'rejected' leave an empty response after the prompt")
        return PairExample(
            _completion(prompt, chosen, where), _completion(prompt, rejected, where), where
        )

    def prompt_messages(self, record: dict[str, Any]) -> list[Message]:
        p = record["prompt"]
        if isinstance(p, str):
            return [{"role": "user", "content": p}]
        prompt = self.messages(record, "prompt")
        if any(m["role"] == "system" for m in prompt[1:]):
            raise _BadRow("field 'prompt': a system message may only come first")
        return prompt

    def kto(self, record: dict[str, Any], where: str) -> PairExample:
        label = record["label"]
        if not isinstance(label, bool):
            raise _BadRow(f"field 'label' must be true or false, got {label!r}")
        c = record.get("completion")
        if isinstance(c, list):
            prompt = self.prompt_messages(record) if "prompt" in record else []
            completion = self.messages(record, "completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise _BadRow("field 'completion': no assistant message")
            ex = Example(prompt + completion, where, "chat", self.norm.tools(record))
            return PairExample(ex, None, where, label, len(prompt))
        prompt = self.norm.string(record, "prompt")
        return PairExample(
            _completion(prompt, self.norm.response(record, "completion"), where), None, where, label
        )


def _completion(prompt: str, response: str, where: str) -> Example:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Example(msgs, where, "completion")


def read_pairs(paths: Sequence[str], columns: dict[str, str] | None = None) -> list[PairExample]:
    """Every preference row of every file, in order; a bad row raises a located DataError."""
    norm = _PairNormaliser(dict(columns or {}))
    out: list[PairExample] = []
    for path in map(str, paths):
        n = len(out)
        for row in read_rows(path, norm.keys):
            try:
                if row.error is not None:
                    raise _BadRow(row.error)
                out.append(norm(row.record, row.where))
            except _BadRow as e:
                raise DataError(f"{row.where}: {e}") from None
        if len(out) == n:
            raise DataError(f"{path}: no rows (the file is empty)")
    kinds = {p.rejected is None for p in out}
    if len(kinds) > 1:
        raise DataError(
            f"{', '.join(map(str, paths))}: paired (chosen/rejected) and unpaired (KTO "
            "label) rows are mixed; use one kind per run"
        )
    return out


# --------------------------------------------------------------------------- tokenising


def _response_mask(ids: np.ndarray, trained: np.ndarray, skip_runs: int) -> np.ndarray:
    """The trained mask without its first ``skip_runs`` runs (assistant turns of the prompt)."""
    if not skip_runs:
        return trained
    mask = trained.copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8)])) == 1)
    if len(edges) <= skip_runs:
        return np.zeros_like(mask)
    mask[: edges[skip_runs]] = False
    return mask


def tokenize_pairs(
    tokenizer: Any, rows: Sequence[PairExample], opts: ChatOptions, max_len: int
) -> tuple[list[Pair], dict[str, int]]:
    """Render, tokenise and mask both sides of each row with the SFT machinery; check that the
    sides share their prompt tokens. Sides longer than ``max_len`` keep their start; a row
    whose response is cut away entirely is dropped (counted)."""
    opts = replace(opts, loss_on="assistant", on_bad_row="error")
    sides: list[Example] = []
    for r in rows:
        sides.append(r.chosen)
        if r.rejected is not None:
            sides.append(r.rejected)
    enc = encode(tokenizer, sides, options=opts)
    k = 0
    out: list[Pair] = []
    stats = {"truncated": 0, "dropped_no_target": 0}
    for r in rows:
        toks: list[Tokenized] = []
        prompts = []
        for ex in (r.chosen, r.rejected):
            if ex is None:
                continue
            a, b = int(enc.offsets[k]), int(enc.offsets[k + 1])
            k += 1
            ids = enc.ids[a:b]
            skip = sum(m["role"] == "assistant" for m in ex.messages[: r.prompt_messages])
            mask = _response_mask(ids, enc.trained[a:b], skip if ex.kind == "chat" else 0)
            first = int(np.argmax(mask)) if mask.any() else len(ids)
            prompts.append(ids[:first])
            labels = np.where(mask, ids, IGNORE_INDEX)
            toks.append(
                Tokenized(ids[:max_len].tolist(), labels[:max_len].tolist(), len(ids) > max_len)
            )
        if len(prompts) == 2 and not np.array_equal(prompts[0], prompts[1]):
            at = _common_prefix(prompts[0].tolist(), prompts[1].tolist())
            raise DataError(
                f"{r.source}: chosen and rejected render different prompts (they differ at "
                f"prompt token {at}: {tokenizer.decode(prompts[0][at : at + 8].tolist())!r} vs "
                f"{tokenizer.decode(prompts[1][at : at + 8].tolist())!r}); the response must "
                "be the only difference"
            )
        stats["truncated"] += any(t.truncated for t in toks)
        if any(t.num_target_tokens == 0 for t in toks):
            stats["dropped_no_target"] += 1
            continue
        out.append(Pair(toks[0], toks[1] if len(toks) > 1 else None, r.label, r.source))
    return out, stats


# --------------------------------------------------------------------------- splits


class _Chosen(Sequence[Tokenized]):
    """The chosen sides of pairs as SFT examples (validation loss on the chosen responses)."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> Tokenized:  # type: ignore[override]
        return self.pairs[k].chosen


@dataclass
class PreferenceSplits:
    """Pairs per split. ``val``/``val_raw``/``test_raw`` give the SFT evaluator the chosen
    sides (loss on the chosen responses, generation exact match against them)."""

    train_pairs: list[Pair]
    val_pairs: list[Pair]
    test_pairs: list[Pair]
    val_raw: list[Example]
    test_raw: list[Example]
    stats: dict[str, Any]
    packs: list[list[int]] | None = None  # data.packing: pairs per row
    sources: list[str] = field(default_factory=list)
    unit_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def val(self) -> _Chosen:
        return _Chosen(self.val_pairs)

    @property
    def test(self) -> _Chosen:
        return _Chosen(self.test_pairs)

    @property
    def train(self) -> list[Pair]:
        return self.train_pairs


def prepare_pairs(cfg: DataConfig, tokenizer: Any) -> PreferenceSplits:
    """Read, tokenise, split (as SFT data: data.split_seed, fractions, files) and pack pairs."""
    apply_template(tokenizer, cfg.template)
    opts = ChatOptions(
        turn_end=tuple(cfg.turn_end),
        fold_system=cfg.fold_system,
        reasoning=cfg.reasoning,
        template_kwargs=tuple(sorted(cfg.template_kwargs.items())),
        template_date=cfg.template_date,
    )
    set_chat_options(tokenizer, opts)
    rows = read_pairs(cfg.path, cfg.columns)
    n = len(rows)
    n_test = 0 if cfg.test_path else split_count(n, cfg.test_fraction, cfg.test_size)
    n_val = 0 if (cfg.val_path or cfg.kfold) else split_count(n, cfg.val_fraction, cfg.val_size)
    tr, va, te = carve_arrays(n, n_val, n_test, cfg.split_seed, cfg.kfold, max(cfg.fold, 0))
    stats: dict[str, Any] = {"examples": n, "kind": "kto" if rows[0].rejected is None else "pairs"}
    parts: dict[str, list[Pair]] = {}
    raw: dict[str, list[Example]] = {}
    for name, extra, idx in (
        ("train", [], tr),
        ("val", cfg.val_path, va),
        ("test", cfg.test_path, te),
    ):
        chosen = read_pairs(extra, cfg.columns) if extra else [rows[int(i)] for i in idx]
        pairs, s = tokenize_pairs(tokenizer, chosen, opts, cfg.max_len)
        if cfg.truncation == "drop":
            before = len(pairs)
            pairs = [p for p in pairs if not any(t.truncated for t in p.sides)]
            s["dropped_too_long"] = before - len(pairs)
        parts[name] = pairs
        raw[name] = [p.chosen for p in chosen if p.label is not False]
        stats[name] = len(pairs)
        for key, v in s.items():
            stats[f"{name}_{key}"] = v
    if not parts["train"]:
        raise DataError(f"{', '.join(cfg.path)}: no training pairs left after the split")
    lengths = [p.length for p in parts["train"]]
    stats["train_tokens"] = int(sum(lengths))
    packs = None
    if cfg.packing:
        packs = pack(lengths, 2 * cfg.max_len)
        stats["packed_rows"] = len(packs)
        stats["packing_efficiency"] = round(efficiency(lengths, packs, 2 * cfg.max_len), 4)
    return PreferenceSplits(
        parts["train"], parts["val"], parts["test"], raw["val"], raw["test"], stats, packs
    )


def iter_sides(pairs: Sequence[Pair]) -> Iterator[Tokenized]:
    for p in pairs:
        yield from p.sides
