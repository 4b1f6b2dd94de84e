"""Reading data files (dsft/data/readers.py): line ranges for parallel reading."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from dsft.data.readers import line_ranges, read_range


def test_line_ranges_cover_the_file_at_line_boundaries(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "x" * (i % 37)}) + "\n" for i in range(500)]
    f.write_text("".join(lines) + '{"text": "no newline at the end"}')
    for size in (1, 100, 1000, 10**6):
        ranges = line_ranges(str(f), size)
        assert ranges[0][0] == 0 and ranges[-1][1] == f.stat().st_size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        rows = [r for a, b, line in ranges for r in read_range(str(f), a, b, line)]
        assert [r.where for r in rows] == [f"{f}:{i}" for i in range(1, 502)]
        assert rows[-1].record == {"text": "no newline at the end"}
