"""``dsft data inspect``: what the model will see, and statistics of the prepared data."""

from __future__ import annotations

from typing import Any

import numpy as np

from dsft.config import Config, load_config
from dsft.data import Split, prepare
from dsft.data.tokenize import IGNORE_INDEX, Tokenized

GREEN, RESET = "\033[32m", "\033[0m"


def mark_trained(tokenizer: Any, t: Tokenized, color: bool = False) -> str:
    """The example's text with the tokens that carry loss inside ``[[ ]]`` (or green)."""
    out: list[str] = []
    run: list[int] = []
    trained = False
    # Labels are shifted in the loss: label j is predicted at j-1, but it is token j that
    # is learnt, so marking input token j where labels[j] is set is what users expect.
    for tok_id, lab in [*zip(t.input_ids, t.labels, strict=True), (None, None)]:
        now = lab is not None and lab != IGNORE_INDEX
        if (now != trained or tok_id is None) and run:
            text = tokenizer.decode(run)
            out.append((GREEN + text + RESET if color else f"[[{text}]]") if trained else text)
            run = []
        trained = now
        if tok_id is not None:
            run.append(tok_id)
    return "".join(out)


def _lengths_line(split: Split) -> str:
    if not len(split):
        return "-"
    n = split.lengths()
    p = np.percentile(n, [50, 90, 99])
    return f"p50 {p[0]:.0f}  p90 {p[1]:.0f}  p99 {p[2]:.0f}  max {n.max()}"


def report(cfg: Config, tokenizer: Any, examples: int = 2, split: str = "train",
           color: bool = False) -> str:  # fmt: skip
    """Rendered examples with trained tokens marked, then the data statistics."""
    if cfg.train.objective == "dpo":
        return pair_report(cfg, tokenizer, examples, split, color)
    s = prepare(cfg.data, tokenizer)
    chosen: Split = getattr(s, split)
    lines: list[str] = []
    for k in range(min(examples, len(chosen))):
        t = chosen[k]
        lines += [
            f"--- {split} example {k} ({chosen.example(k).source}): {len(t.input_ids)} tokens, "
            f"{t.num_target_tokens} trained {'(marked green)' if color else '(inside [[ ]])'}",
            mark_trained(tokenizer, t, color),
            "",
        ]
    st = s.stats
    lines += [
        "--- statistics",
        f"rows read            {st['examples'] + st['skipped_rows']}"
        + (
            f" ({st['skipped_rows']} skipped: {st.get('skipped_first')})"
            if st["skipped_rows"]
            else ""
        ),
        f"examples             train {st['train']}  val {st['val']}  test {st['test']}",
        f"train tokens         {st['train_tokens']} ({st['train_target_tokens']} trained, "
        f"{100 * st['trained_fraction']:.1f}%)",
        f"train length         {_lengths_line(s.train)}  (data.max_len {cfg.data.max_len})",
        f"val / test length    {_lengths_line(s.val)} / {_lengths_line(s.test)}",
        f"truncated (kept)     {st['truncated']}",
        f"dropped too long     {st['dropped_too_long']}  (data.truncation={cfg.data.truncation})",
        f"dropped, no target   {st['dropped_no_target']}",
    ]
    datasets: dict[str, int] = {}
    for store in s.train.corpus.stores:
        datasets[store.name] = len(store)
    if len(datasets) > 1:
        lines.append("datasets             " + "  ".join(f"{k} {v}" for k, v in datasets.items()))
    if s.packs is not None:
        lines.append(
            f"packing              {st['train']} examples -> {st['packed_rows']} rows of "
            f"{cfg.data.max_len}, efficiency {100 * st['packing_efficiency']:.1f}% (real tokens/slots)"
        )
    else:
        from dsft.data.packing import efficiency, pack

        lengths = s.train.lengths().tolist()
        eff = efficiency(lengths, pack(lengths, cfg.data.max_len), cfg.data.max_len)
        lines.append(
            f"packing              off (data.packing=true would fill {100 * eff:.1f}% of slots)"
        )
    return "\n".join(lines)


def pair_report(cfg: Config, tokenizer: Any, examples: int, split: str, color: bool) -> str:
    """train.objective=dpo: both sides of each pair (scored tokens marked), then statistics."""
    from dsft.data.pairs import prepare_pairs

    s = prepare_pairs(cfg.data, tokenizer)
    pairs = getattr(s, f"{split}_pairs")
    mark = "(marked green)" if color else "(inside [[ ]])"
    lines: list[str] = []
    for k, p in enumerate(pairs[:examples]):
        names = ["chosen", "rejected"] if p.rejected is not None else [f"label={p.label}"]
        for name, t in zip(names, p.sides, strict=True):
            lines += [
                f"--- {split} pair {k} ({p.source}) {name}: {len(t.input_ids)} tokens, "
                f"{t.num_target_tokens} scored {mark}",
                mark_trained(tokenizer, t, color),
            ]
        lines.append("")
    st = s.stats
    lines += [
        "--- statistics",
        f"rows read            {st['examples']} ({st['kind']})",
        f"pairs                train {st['train']}  val {st['val']}  test {st['test']}",
        f"train tokens         {st['train_tokens']} (both sides)",
        f"truncated (kept)     {sum(st.get(f'{x}_truncated', 0) for x in ('train', 'val', 'test'))}",
        f"dropped, no target   "
        f"{sum(st.get(f'{x}_dropped_no_target', 0) for x in ('train', 'val', 'test'))}",
    ]
    if s.packs is not None:
        lines.append(
            f"packing              {st['train']} pairs -> {st['packed_rows']} rows of "
            f"{2 * cfg.data.max_len}, efficiency {100 * st['packing_efficiency']:.1f}%"
        )
    return "\n".join(lines)


def main(ns: Any) -> int:
    """``dsft data inspect CONFIG``."""
    import sys

    from dsft.model import load_tokenizer

    cfg = load_config(ns.config, ns.overrides)
    tokenizer = load_tokenizer(cfg.model)
    color = sys.stdout.isatty() and not ns.no_color
    print(report(cfg, tokenizer, ns.examples, ns.split, color))
    return 0
