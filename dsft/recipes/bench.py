"""``dsft bench``: the benchmark against TRL, which lives in the source tree's
``benchmarks/`` folder and not in the installed package. Imported only when this command
runs; equivalent to ``python -m benchmarks ...`` from a checkout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def main(ns: Any) -> int:
    root = Path(__file__).resolve().parents[2]  # the checkout dsft was installed from
    if not (root / "benchmarks" / "vs_trl.py").is_file():
        print(
            "dsft: error: `dsft bench` runs from a source checkout (its benchmarks/ folder); "
            "this dsft is installed without it",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.vs_trl import main as bench_main

    return bench_main(ns.args)
