"""The base-weights fingerprint a lean checkpoint records, and the refusal to mix bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.checkpoint import base_fingerprint, check_base
from dsft.errors import ConfigError


def _weights(d: Path, payload: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text("{}")  # not weights: not fingerprinted
    return d


def _checkpoint(tmp: Path, base: dict, lean: bool = True) -> Path:
    tag = tmp / "step_00000001"
    tag.mkdir()
    meta = {"frozen_excluded": lean, "base": {**base, "path": "orig"}}
    (tag / "dsft_state.json").write_text(json.dumps(meta))
    return tag


def test_fingerprint_sees_size_and_both_ends(tmp_path: Path) -> None:
    big = bytes(3 << 20)
    a = base_fingerprint(str(_weights(tmp_path / "a", big)))
    assert list(a["files"]) == ["model.safetensors"] and a["revision"] is None
    for name, payload in {
        "head": b"\x01" + big[1:],
        "tail": big[:-1] + b"\x01",
        "size": big + b"\x00",
    }.items():
        assert base_fingerprint(str(_weights(tmp_path / name, payload))) != a, name
    same = base_fingerprint(str(_weights(tmp_path / "same", big)))
    assert same == a
    snap = _weights(tmp_path / "hub" / "snapshots" / "0123abcd", big)
    assert base_fingerprint(str(snap))["revision"] == "0123abcd"


def test_check_base_refuses_other_weights(tmp_path: Path) -> None:
    orig = _weights(tmp_path / "orig", b"weights-v1" * 1000)
    other = _weights(tmp_path / "other", b"weights-v2" * 1000)
    tag = _checkpoint(tmp_path, base_fingerprint(str(orig.resolve())))
    check_base(tag, str(orig))  # the same weights: fine
    with pytest.raises(ConfigError, match=r"its weights differ(.|\n)*model\.safetensors"):
        check_base(tag, str(other))
    (tag / "dsft_state.json").write_text(json.dumps({"frozen_excluded": False}))
    check_base(tag, str(other))  # a checkpoint holding every weight needs no base
