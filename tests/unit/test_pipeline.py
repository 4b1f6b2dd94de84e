"""prepare() (dsft/data/pipeline.py): files, counts, weights, truncation and what it drops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsft.config import DataConfig
from dsft.data import prepare
from dsft.synthetic import build_tokenizer

from .test_build import _data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_truncation_and_all_masked_examples_dropped(tok, tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"instruction": "'
        + "x" * 40
        + '", "output": "yy"}\n'
        + '{"instruction": "a", "output": "b"}\n' * 9
    )
    s = prepare(DataConfig(path=[str(f)], max_len=20, val_fraction=0, test_fraction=0), tok)
    # the long prompt leaves no response token within 20 tokens: dropped, not fed all-masked
    assert s.stats["dropped_no_target"] == 1 and s.stats["truncated"] == 0
    assert len(s.train) == 9
    s = prepare(DataConfig(path=[str(f)], max_len=46, val_fraction=0, test_fraction=0), tok)
    assert s.stats["truncated"] == 1 and len(s.train) == 10  # cut, but a response token is left
    s = prepare(
        DataConfig(path=[str(f)], max_len=46, val_fraction=0, test_fraction=0, truncation="drop"),
        tok,
    )
    assert s.stats["dropped_too_long"] == 1 and len(s.train) == 9
    assert all(t.num_target_tokens > 0 for t in s.train)


def test_prepare_files_counts_weights(tmp_path: Path, tok) -> None:
    a, b = _write(tmp_path / "a.jsonl", 30), _write(tmp_path / "b.jsonl", 10, 100)
    v, t = _write(tmp_path / "v.jsonl", 5, 200), _write(tmp_path / "t.jsonl", 4, 300)
    s = prepare(
        DataConfig(path=[str(a), str(b)], val_path=[str(v)], test_path=[str(t)], max_len=64), tok
    )
    assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 4)
    assert {s.val.example(k).dataset for k in range(5)} == {"v"}
    s = prepare(
        DataConfig(path=[str(a), str(b)], val_size=4, test_size=6, weights=[1.0, 3.0], max_len=64),
        tok,
    )
    assert (len(s.val), len(s.test)) == (4, 6)
    per = {"a": 0, "b": 0}
    for k in range(len(s.train)):
        per[s.train[k].dataset] += 1
    n_b = sum(1 for k in range(len(s.val)) if s.val[k].dataset == "b") + sum(
        1 for k in range(len(s.test)) if s.test[k].dataset == "b"
    )
    assert per["b"] == 3 * (10 - n_b)  # every training example of b three times per epoch


def _write(path: Path, n: int, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n"
            for i in range(start, start + n)
        )
    )
    return path


@pytest.mark.parametrize("mix", [[], [0.5, 0.5]])
def test_packing_with_and_without_mix(tmp_path: Path, tok, mix: list[float]) -> None:
    """Packed rows never mix files under data.mix; each row knows its file."""
    from dsft.config import DataConfig
    from dsft.data import prepare

    a, b = _data(tmp_path / "a.jsonl", 120, bad=False), _data(tmp_path / "b.jsonl", 80, bad=False)
    cfg = DataConfig(path=[str(a), str(b)], packing=True, max_len=96, mix=mix,
                     cache_dir=str(tmp_path / "c"), val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    s = prepare(cfg, tok)
    assert sorted(i for row in s.packs for i in row) == list(range(len(s.train)))
    if mix:
        files = np.searchsorted(s.train.corpus.starts, s.train.indices, side="right") - 1
        assert all(len({files[i] for i in row}) == 1 for row in s.packs)
        assert s.unit_source.tolist() == [files[row[0]] for row in s.packs]
        assert s.stats["train_per_source"] == {"a": int((s.unit_source == 0).sum()),
                                               "b": int((s.unit_source == 1).sum())}  # fmt: skip
