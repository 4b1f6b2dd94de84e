"""`--push-to-hub` sends the export's files only (never checkpoints, metrics or logs), to a
private repo unless --public, says what it sends first, and the model card holds no local
paths. Against an in-memory stand-in of the Hub API (tests/integration/test_practitioner)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dsft.config import Config, DataConfig, ModelConfig
from dsft.errors import ExportError
from dsft.hf_export import model_card, push_to_hub

from ..integration.test_practitioner import _Hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Any:
    from huggingface_hub import constants

    _Hub.repos, _Hub.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    yield _Hub
    server.shutdown()


def _export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    (folder / "README.md").write_text("card")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    # what must never travel: a pickle, logs, a stray file
    (folder / "optimizer.pt").write_bytes(b"x")
    (folder / "events.out.tfevents.1").write_bytes(b"x")
    (folder / "notes.sh").write_text("x")
    return folder


def test_push_sends_export_files_only_and_private(hub: Any, tmp_path: Path, capsys) -> None:
    folder = _export(tmp_path / "export")
    push_to_hub(folder, "me/model")
    repo = hub.repos["me/model"]
    assert repo["private"] is True
    assert set(repo["files"]) == {
        "config.json", "tokenizer.json", "generation_config.json", "model.safetensors",
        "README.md", "adapter/adapter_config.json",
    }  # fmt: skip
    said = capsys.readouterr().out
    assert "uploading 6 files" in said and "private" in said and "model.safetensors" in said
    push_to_hub(folder, "me/open", private=False)
    assert hub.repos["me/open"]["private"] is False


def test_push_refuses_a_run_folder(hub: Any, tmp_path: Path) -> None:
    run = _export(tmp_path / "run")
    (run / "checkpoints").mkdir()
    with pytest.raises(ExportError, match=r"not an export.*checkpoints"):
        push_to_hub(run, "me/model")
    with pytest.raises(ExportError, match="not an export"):
        push_to_hub(tmp_path, "me/model")
    assert not hub.repos


def test_model_card_has_no_local_paths(tmp_path: Path) -> None:
    data = tmp_path / "secret-home" / "tasks.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    cfg = Config(
        output_dir=str(tmp_path / "runs" / "mine"),
        model=ModelConfig(path=str(tmp_path / "models" / "base")),
        data=DataConfig(path=[str(data)]),
    )
    card = model_card(cfg, {})
    assert str(tmp_path) not in card and "secret-home" not in card
    assert "tasks.jsonl" in card and "https://github.com)" not in card
