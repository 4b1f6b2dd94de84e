"""``dsft report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page per set of runs.

Curves come from each run's ``metrics.jsonl`` (training loss, validation loss,
learning rate per parameter group, gradient norm, tokens/s, MFU), drawn with
matplotlib and embedded as base64 PNGs (also written next to the page), so the
page opens anywhere without a network. Several runs are overlaid on the same axes
for comparison. Below the plots: final metrics (``summary.json``), the resolved
config and plan, and a sample of generations.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

# (title, split, metric key or prefix, y label); a prefix ending in "/" plots every key under it.
PLOTS = [
    ("Training loss", "train", "loss", "loss"),
    ("Validation loss", "val", "loss", "loss"),
    ("Learning rate per group", "train", "lr/", "lr"),
    ("Gradient norm", "train", "grad_norm", "L2 norm"),
    ("Throughput", "train", "tokens_per_s", "real tokens / s"),
    ("Model FLOPs utilisation", "train", "mfu", "MFU"),
]


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _series(rows: list[dict[str, Any]], split: str, key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r.get("split") != split:
            continue
        keys = [k for k in r if k.startswith(key)] if key.endswith("/") else [key]
        for k in keys:
            if k in r:
                xs, ys = out.setdefault(k, ([], []))
                xs.append(r["step"])
                ys.append(r[k])
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def plot_runs(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, bytes]]:
    """One PNG per plot that has data in at least one run."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in headless CI
    import matplotlib.pyplot as plt

    out = []
    for title, split, key, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        drawn = 0
        for name, rows in runs.items():
            for k, (xs, ys) in _series(rows, split, key).items():
                label = name if not key.endswith("/") else f"{name}: {k[len(key) :]}"
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
                drawn += 1
        if drawn:
            ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
            if key in ("lr/", "loss") and all(
                y > 0 for rows in runs.values() for _, ys in _series(rows, split, key).values()
                for y in ys
            ):  # fmt: skip
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            out.append((title, _png(fig)))
        plt.close(fig)
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _final_table(summaries: dict[str, Any]) -> str:
    keys = ["loss", "ppl", "token_acc", "exact_match", "f1"]
    head = "".join(f"<th>{k}</th>" for k in ["run", "split", "when", *keys])
    rows = []
    for name, s in summaries.items():
        if not s:
            continue
        for when in ("before", "after"):
            for split in ("val", "test"):
                m = (s.get(when) or {}).get(split) or {}
                if not any(k in m for k in keys):
                    continue
                cells = "".join(
                    f"<td>{m[k]:.4f}</td>" if isinstance(m.get(k), float) else "<td></td>"
                    for k in keys
                )
                rows.append(
                    f"<tr><td>{html.escape(name)}</td><td>{split}</td><td>{when}</td>{cells}</tr>"
                )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>" if rows else "<p>no summary yet</p>"


def _benchmarks(summary: dict[str, Any]) -> str:
    """eval.benchmarks: base vs fine-tuned lm-eval scores, forgetting flagged."""
    bench = summary.get("benchmarks") or {}
    if not bench.get("rows"):
        return ""
    forgot = {tuple(f.split(" ", 2)[:2]) for f in bench.get("forgetting", [])}
    cells = []
    for r in bench["rows"]:
        flag = (r["task"], r["metric"] + ":") in forgot
        vals = [r["task"], r["metric"]] + [
            "" if r[k] is None else f"{r[k]:+.4f}" if k == "delta" else f"{r[k]:.4f}"
            for k in ("base", "tuned", "delta")
        ]
        style = " style='background:#fdd'" if flag else ""
        cells.append(f"<tr{style}>" + "".join(f"<td>{html.escape(v)}</td>" for v in vals) + "</tr>")
    note = (
        f"<p>forgetting (a drop of more than {bench['max_drop']}): "
        f"{html.escape('; '.join(bench['forgetting']))}</p>"
        if bench.get("forgetting")
        else ""
    )
    head = "".join(f"<th>{h}</th>" for h in ("task", "metric", "base", "fine-tuned", "delta"))
    return f"<h3>Benchmarks</h3><table><tr>{head}</tr>{''.join(cells)}</table>{note}"


def _samples(run: Path, n: int = 8) -> str:
    folder = run / "predictions"
    files = (
        sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    )
    if not files:
        return "<p>no generations</p>"
    preds = [json.loads(x) for x in files[-1].read_text().splitlines()[:n]]
    rows = "".join(
        f"<tr><td>{html.escape(str(p.get('source', '')))}</td>"
        f"<td>{html.escape(str(p.get('prediction', '')))}</td>"
        f"<td>{html.escape(str(p.get('reference', '')))}</td></tr>"
        for p in preds
    )
    return (
        f"<p>{html.escape(files[-1].name)}</p><table><tr><th>example</th><th>prediction</th>"
        f"<th>reference</th></tr>{rows}</table>"
    )


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
img{max-width:100%;border:1px solid #ddd;margin:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:8px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
pre{background:#f6f6f6;padding:8px;max-height:400px;overflow:auto;font-size:12px}"""


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out`` (an .html file, or a directory to put ``report.html`` in) and the PNGs."""
    if out.suffix != ".html":
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = _names(run_dirs)
    runs = {n: read_metrics(d) for n, d in zip(names, run_dirs, strict=True)}
    plots = plot_runs(runs)
    imgs = []
    for i, (title, png) in enumerate(plots):
        (out.parent / f"{out.stem}_plot{i}.png").write_bytes(png)
        b64 = base64.b64encode(png).decode()
        imgs.append(
            f'<figure><img class="plot" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{b64}"></figure>'
        )
    summaries = {n: _read_json(d / "summary.json") for n, d in zip(names, run_dirs, strict=True)}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>dsft report</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>dsft report: {html.escape(', '.join(names))}</h1>",
        f"<h2>Curves</h2><div class='plots'>{''.join(imgs) or '<p>no metrics yet</p>'}</div>",
        f"<h2>Final metrics</h2>{_final_table(summaries)}",
    ]
    for n, d in zip(names, run_dirs, strict=True):
        parts.append(f"<h2>{html.escape(n)}</h2><p>{html.escape(str(d))}</p>")
        s = summaries[n] or {}
        facts = {k: s[k] for k in ("world_size", "global_batch", "steps", "train_seconds",
                                   "params", "trainable_params", "best") if k in s}  # fmt: skip
        parts.append(f"<h3>Run</h3><pre>{html.escape(json.dumps(facts, indent=2))}</pre>")
        parts.append(_benchmarks(s))
        for f, title in (("plan.json", "Plan"), ("config.yaml", "Resolved config")):
            if (d / f).is_file():
                parts.append(f"<h3>{title}</h3><pre>{html.escape((d / f).read_text())}</pre>")
        parts.append(f"<h3>Sample generations</h3>{_samples(d)}")
    # Counts the plots the browser actually decoded (the headless-browser test reads it).
    parts.append(
        "<script>window.addEventListener('load', () => { document.body.dataset.plotsLoaded ="
        " [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });"
        "</script></body></html>"
    )
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _names(run_dirs: list[Path]) -> list[str]:
    """Short unique labels: the directory names, made unique with their parents if needed."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    for i, d in enumerate(run_dirs):  # a sweep trial is best named by its settings
        trial = _read_json(d / "trial.json")
        if trial:
            names[i] = f"trial {trial['index']}: " + ", ".join(
                f"{k}={v}" for k, v in trial["settings"].items()
            )
    return names


def main(ns: Any) -> int:
    """``dsft report RUN [RUN ...] [--out PATH]``."""
    import sys

    runs = [Path(r) for r in ns.runs]
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"dsft: error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(ns.out) if ns.out else runs[0] / "report"
    print(f"report: {write_report(runs, out)}")
    return 0
