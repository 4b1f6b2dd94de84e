"""The kernel table of a profiled run: where the time of a training step goes.

Reads the Chrome trace that ``torch.profiler`` exports (``logging.profile_steps`` writes it
to ``<output_dir>/profile/trace.json.gz``) and sums, over the profiled steps (its
``ProfilerStep#N`` spans):

- on a GPU, the device's kernels, copies and sets; on a CPU, every operator's self time
  (its time less that of the operators it called);
- by category — attention, GEMM, loss, optimizer, communication, memory (copies), other —
  from the kernel's name, else from the operator that launched it and that operator's
  callers (``aten::mm`` inside ``aten::linear``; an elementwise kernel inside
  ``Optimizer.step``);
- idle / host gaps: the step time in which the device ran nothing (on a CPU: no operator
  ran), i.e. the Python, the launches, the waits.

Pure code on the trace's JSON, so the table is tested on the CPU with a CPU trace
(tests/unit/test_profiling.py) and is the same code that reads the GPU's.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The category of a kernel or operator name, the first that matches (lower-cased name).
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(
        r"nccl|c10d|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all|"
        r"\bsend\b|\brecv\b")),
    ("optimizer", re.compile(
        r"adam|optimizer|multi_tensor|_foreach|\bsgd\b|lamb|lion|clip_grad|zero_grad")),
    ("loss", re.compile(
        r"cross_?entropy|nll_?loss|log_?softmax|logsumexp|fused_linear|chunked_nll|liger.*ce")),
    ("attention", re.compile(
        r"flash|fmha|attention|attn|sdpa|scaled_dot_product|varlen|softmax")),
    ("GEMM", re.compile(
        r"gemm|\bmm\b|aten::mm|addmm|bmm|matmul|linear|cublas|cutlass|nvjet|xmma|wgmma|"
        r"sm\d+_.*_tn|_nt_|mmbackward|addmmbackward")),
    ("memory", re.compile(r"memcpy|memset|copy_|_to_copy|\bcat\b|contiguous")),
)  # fmt: skip
ORDER = ("attention", "GEMM", "loss", "optimizer", "communication", "memory", "other")
IDLE = "idle / host gaps"
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
STEP = re.compile(r"^ProfilerStep#\d+$")


def category(name: str) -> str:
    """The category of one kernel / operator name ("other" when none matches)."""
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if pattern.search(low):
            return cat
    return "other"


@dataclass
class KernelRow:
    name: str
    category: str
    calls: int
    ms_per_step: float
    share: float  # of the step time


@dataclass
class KernelTable:
    device: str  # "cuda" (device kernels) or "cpu" (operators' self time)
    steps: int
    step_ms: float  # mean wall time of a profiled step
    categories: dict[str, float] = field(default_factory=dict)  # share of the step
    top: list[KernelRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self, title: str = "") -> str:
        what = "device kernels" if self.device == "cuda" else "CPU operators (self time)"
        lines = [
            f"# Top kernels{': ' + title if title else ''}",
            "",
            f"{self.steps} profiled steps, {self.step_ms:.1f} ms a step; {what}. Shares of "
            "the step time (a category's kernels can overlap on several streams).",
            "",
            "| category | ms / step | share of step |",
            "|---|---:|---:|",
        ]
        for cat, share in self.categories.items():
            lines.append(f"| {cat} | {share * self.step_ms:.2f} | {share:.1%} |")
        lines += ["", "| kernel | category | calls / step | ms / step | share |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for r in self.top:
            name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
            name = name.replace("|", "\\|")
            lines.append(
                f"| `{name}` | {r.category} | {r.calls / max(self.steps, 1):.1f} | "
                f"{r.ms_per_step:.3f} | {r.share:.1%} |"
            )
        return "\n".join(lines) + "\n"


def load_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome trace (``.json`` or ``.json.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def kernel_table(trace: dict[str, Any] | list[dict[str, Any]], top: int = 15) -> KernelTable:
    """The :class:`KernelTable` of a Chrome trace (the dict, or its ``traceEvents``)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in spans
        if STEP.match(str(e.get("name", ""))) and e.get("cat") != "gpu_user_annotation"
    )
    if not steps:
        raise ValueError("no ProfilerStep spans in the trace: was prof.step() called?")
    total = sum(b - a for a, b in steps)

    def in_steps(e: dict[str, Any]) -> bool:
        t = float(e["ts"])
        return any(a <= t <= b for a, b in steps)

    device = [e for e in spans if e.get("cat") in DEVICE_CATS]
    host = [
        e
        for e in spans
        if e.get("cat") not in DEVICE_CATS
        and e.get("cat") != "gpu_user_annotation"
        and not STEP.match(str(e.get("name", "")))
    ]
    parents, self_us = _nesting(host)
    by_ext = {
        e["args"]["External id"]: i
        for i, e in enumerate(host)
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }

    def classify(name: str, i: int | None) -> str:
        cat = category(name)
        while cat == "other" and i is not None:
            cat = category(str(host[i].get("name", "")))
            i = parents[i]
        return cat

    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    if device:
        mode = "cuda"
        items = []
        for e in device:
            if not in_steps(e):
                continue
            ext = e.get("args", {}).get("External id")
            cat = "memory" if e.get("cat") != "kernel" else classify(e["name"], by_ext.get(ext))
            items.append((e["name"], cat, float(e["dur"])))
        busy = _union([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device], steps)
    else:
        mode = "cpu"
        items = [
            (str(e["name"]), classify(str(e["name"]), i), self_us[i])
            for i, e in enumerate(host)
            if e.get("cat") == "cpu_op" and in_steps(e)
        ]
        busy = min(sum(t for _, _, t in items), total)
    for name, cat, t in items:
        row = rows[(name, cat)]
        row[0] += 1
        row[1] += t
    per_cat: dict[str, float] = defaultdict(float)
    for (_, cat), (_, t) in rows.items():
        per_cat[cat] += t
    n = len(steps)
    cats = {c: per_cat.get(c, 0.0) / total for c in ORDER}
    cats[IDLE] = max(total - busy, 0.0) / total
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]
    return KernelTable(
        device=mode,
        steps=n,
        step_ms=total / n / 1000,
        categories=cats,
        top=[
            KernelRow(name, cat, int(calls), t / n / 1000, t / total)
            for (name, cat), (calls, t) in ranked
        ],
    )


def _nesting(events: list[dict[str, Any]]) -> tuple[list[int | None], list[float]]:
    """Each host event's enclosing event (same thread) and its self time (µs)."""
    parents: list[int | None] = [None] * len(events)
    self_us = [float(e["dur"]) for e in events]
    by_thread: dict[Any, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    for idx in by_thread.values():
        idx.sort(key=lambda i: (float(events[i]["ts"]), -float(events[i]["dur"])))
        stack: list[int] = []
        for i in idx:
            start = float(events[i]["ts"])
            while stack and start >= float(events[stack[-1]]["ts"]) + float(
                events[stack[-1]]["dur"]
            ):
                stack.pop()
            if stack:
                parents[i] = stack[-1]
                self_us[stack[-1]] -= float(events[i]["dur"])
            stack.append(i)
    return parents, [max(t, 0.0) for t in self_us]


def _union(intervals: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Total length of the union of ``intervals`` clipped to ``windows``."""
    clipped = []
    for a, b in intervals:
        for wa, wb in windows:
            lo, hi = max(a, wa), min(b, wb)
            if hi > lo:
                clipped.append((lo, hi))
    clipped.sort()
    total, end = 0.0, float("-inf")
    for a, b in clipped:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def write(trace_path: str | Path, out_dir: str | Path, title: str = "") -> KernelTable:
    """``kernels.md`` and ``kernels.json`` from a trace, in ``out_dir``."""
    table = kernel_table(load_trace(trace_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(table.markdown(title))
    (out / "kernels.json").write_text(json.dumps(table.to_json(), indent=2))
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m dsft.profiling TRACE [OUT_DIR]``: print (and write) the kernel table."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m dsft.profiling TRACE.json[.gz] [OUT_DIR]", file=sys.stderr)
        return 2
    table = write(args[0], args[1]) if len(args) > 1 else kernel_table(load_trace(args[0]))
    print(table.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
