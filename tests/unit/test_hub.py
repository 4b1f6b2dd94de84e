"""Hub names for models and datasets, resolved offline from a Hub cache laid out as the Hub
lays it out (blobs/, snapshots/<commit>/ symlinks, refs/main). Nothing is mocked."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dsft.errors import ConfigError, HubError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache: Path, repo: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Write ``files`` as the Hub's cache stores a download of ``repo`` at COMMIT."""
    root = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def build_hub_cache(cache: Path, model_dir: Path, rows: list[dict]) -> None:
    """dsft-test/tiny-llama (a model) and dsft-test/tasks (a dataset: train and test files)."""
    hub_repo(cache, "dsft-test/tiny-llama", {p.name: p.read_bytes() for p in model_dir.iterdir()})
    lines = [json.dumps(r) + "\n" for r in rows]
    half = len(lines) // 2
    hub_repo(
        cache,
        "dsft-test/tasks",
        {
            "data/train.jsonl": "".join(lines[:half]).encode(),
            "data/test.jsonl": "".join(lines[half:]).encode(),
        },
        "dataset",
    )


@pytest.fixture
def offline_cache(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(8)
    ]
    build_hub_cache(cache, tiny_model, rows)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return cache


def test_hub_model_and_dataset_resolve_offline(offline_cache: Path) -> None:
    from dsft.config import ModelConfig, is_hub_id
    from dsft.data.formats import load_examples
    from dsft.model import load_tokenizer

    assert is_hub_id("dsft-test/tiny-llama") and not is_hub_id("data/train.jsonl")
    tok = load_tokenizer(ModelConfig(path="dsft-test/tiny-llama"))
    assert COMMIT in tok.name_or_path and tok.chat_template
    exs = load_examples(["dsft-test/tasks?split=test"]).examples
    assert [e.messages[1]["content"] for e in exs] == ["a4", "a5", "a6", "a7"]
    assert exs[0].source == "dsft-test/tasks?split=test:row 1"
    assert len(load_examples(["dsft-test/tasks"]).examples) == 4  # split defaults to train


def test_missing_hub_names_are_one_line_errors(offline_cache: Path) -> None:
    from dsft.config import ModelConfig
    from dsft.data.formats import load_examples
    from dsft.model import load_tokenizer

    with pytest.raises(HubError) as e:
        load_tokenizer(ModelConfig(path="dsft-test/absent"))
    msg = str(e.value)
    assert msg.startswith("model 'dsft-test/absent' is not in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE=1 is set" in msg and "\n" not in msg
    with pytest.raises(HubError, match="dataset 'dsft-test/nope' is not in the Hugging Face"):
        load_examples(["dsft-test/nope"])
    with pytest.raises(ConfigError, match=r"unknown option\(s\) spilt"):
        load_examples(["dsft-test/tasks?spilt=test"])


def test_revisions_and_specs_never_become_paths(offline_cache: Path) -> None:
    from dsft.config import ModelConfig
    from dsft.data.formats import load_examples
    from dsft.hub import snapshot
    from dsft.model import load_tokenizer

    # refs/pr/1 is a real Hub revision: not cached here, so a one-line HubError
    with pytest.raises(HubError, match="refs/pr/1"):
        load_tokenizer(ModelConfig(path="dsft-test/tiny-llama", revision="refs/pr/1"))
    locks = offline_cache / ".dsft-locks"
    assert all(p.parent == locks for p in locks.rglob("*"))  # one flat folder of names
    # an encoded "/" in a dataset spec cannot climb out of the cache
    spec = "dsft-test/tasks?revision=x%2F..%2F..%2Fescaped"
    with pytest.raises(ConfigError, match="not a Hub revision"):
        load_examples([spec])
    with pytest.raises(ConfigError, match="not a Hub revision"):
        snapshot("dsft-test/tasks", "dataset", "../../escaped")
    assert not list(offline_cache.parent.rglob("*escaped*"))
