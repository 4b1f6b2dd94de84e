"""The token cache (dsft/data/cache.py): an entry is reused and invalidated by content and
settings, its per-example target counts are read in blocks, and where the cache lives.
Building entries: test_build.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dsft.config import DataConfig
from dsft.data import prepare
from dsft.data.build import cached_store
from dsft.data.cache import cache_root
from dsft.synthetic import build_tokenizer

from .test_build import _data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_targets_by_blocks_equal_the_whole_array(tmp_path: Path, tok) -> None:
    src = _data(tmp_path / "d.jsonl", bad=False)
    store = cached_store(str(src), tok, SETTINGS, tmp_path / "c", True)
    assert isinstance(store.trained, np.memmap)
    cs = np.concatenate([[0], np.cumsum(np.asarray(store.trained), dtype=np.int64)])
    start = store.offsets[:-1]
    for max_len in (8, 48, 10**6):
        end = np.minimum(store.offsets[1:], start + max_len)
        expected = np.maximum(cs[end] - cs[np.minimum(start + 1, end)], 0)
        assert np.array_equal(store.targets(max_len, block=7), expected)


def test_cache_reused_and_invalidated(tmp_path: Path, tok, monkeypatch) -> None:
    f = _write(tmp_path / "d.jsonl", 20)
    cfg = DataConfig(path=[str(f)], max_len=64, cache_dir=str(tmp_path / "c"))
    first = prepare(cfg, tok)
    assert len(list((tmp_path / "c").iterdir())) == 1

    import dsft.data.build as build

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(build, "encode", no_tokenising)
    again = prepare(cfg, tok)  # from the cache, memory-mapped
    assert [again.train[k].input_ids for k in range(5)] == [
        first.train[k].input_ids for k in range(5)
    ]
    assert isinstance(again.train.corpus.stores[0].ids, np.memmap)
    monkeypatch.undo()
    _write(f, 21)  # new contents -> new entry
    assert len(prepare(cfg, tok).train) != len(first.train)
    prepare(DataConfig(**{**cfg.__dict__, "loss_on": "all"}), tok)  # new settings -> new entry
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_cache_root_default(monkeypatch) -> None:
    monkeypatch.setenv("DSFT_CACHE", "/x/y")
    assert cache_root("") == Path("/x/y")
    assert cache_root("/z") == Path("/z")


def _write(path: Path, n: int, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n"
            for i in range(start, start + n)
        )
    )
    return path


SETTINGS = {"format": "auto", "columns": {}, "loss_on": "assistant", "on_bad_row": "skip"}
