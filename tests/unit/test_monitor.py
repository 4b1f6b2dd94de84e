"""Experiment trackers (logging.report_to): one that is missing or failing is a warning and
reporting goes on; W&B and MLflow, offline, receive the scalars, the config and the final
metrics (read back with their own file formats)."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from dsft.config import LoggingConfig
from dsft.monitor import Monitor, Tracker


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """History rows, config and summary of an offline W&B run, from its ``.wandb`` file.

    The file is W&B's record log (LevelDB log format: a 7-byte header, 32 KiB blocks of
    records each with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST); each
    record is a protobuf ``wandb.proto.wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[4:6] == b"\xe1\xbe" or data[:4] == b":W&B", data[:7]
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(part)
            part = b""
    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "run": None}
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            out["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update})
        elif kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    return out


def _log(monitor: Monitor) -> None:
    monitor.scalars(1, "train", {"loss": 2.5, "lr/all": 0.1})
    monitor.scalars(2, "train", {"loss": 2.0, "lr/all": 0.05})
    monitor.scalars(2, "val", {"loss": 2.2})
    monitor.hparams({"train": {"lr": 0.1}, "model": {"path": "m"}}, {"val": {"loss": 2.2}})
    monitor.close()


def test_missing_tracker_warns_and_reporting_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = LoggingConfig(report_to=["wandb", "tensorboard"], progress=False)
    with caplog.at_level(logging.WARNING, logger="dsft"):
        monitor = Monitor(tmp_path, cfg, 10)
    assert [t.name for t in monitor.trackers] == ["tensorboard"]
    assert "wandb is not installed" in caplog.text
    _log(monitor)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert any((tmp_path / "tensorboard").iterdir())


def test_failing_tracker_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Tracker):
        name = "broken"

        def scalars(self, step: int, values: dict[str, float]) -> None:
            raise ConnectionError("server went away")

    monitor = Monitor(tmp_path, LoggingConfig(report_to=[], progress=False), 10)
    monitor.trackers.append(Broken())
    with caplog.at_level(logging.WARNING, logger="dsft"):
        _log(monitor)
    assert "broken failed (ConnectionError: server went away)" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_and_mlflow_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for k in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    cfg = LoggingConfig(report_to=["wandb", "mlflow"], progress=False, group="sweep-a")
    monitor = Monitor(tmp_path, cfg, 10, config={"train": {"lr": 0.1}, "model": {"path": "m"}})
    assert [t.name for t in monitor.trackers] == ["wandb", "mlflow"]
    _log(monitor)

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_wandb_run(run_dir)
    losses = [(h["_step"], h["train/loss"]) for h in run["history"] if "train/loss" in h]
    assert losses == [(1, 2.5), (2, 2.0)]
    assert run["run"].run_group == "sweep-a"
    assert run["config"]["train"] == {"lr": 0.1}
    assert run["summary"]["final/val/loss"] == 2.2

    from mlflow import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "sweep-a"]
    (mrun,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(1, 2.5), (2, 2.0)]
    assert mrun.data.params["train.lr"] == "0.1"
    assert mrun.data.metrics["final/val/loss"] == 2.2
    assert mrun.info.status == "FINISHED"
    ids = json.loads((tmp_path / "trackers.json").read_text())
    assert ids == {"wandb": run["run"].run_id, "mlflow": mrun.info.run_id}


def test_sweep_trials_share_a_group(tmp_path: Path) -> None:
    from dsft.config import load_config
    from dsft.recipes.sweep import Sweep, trial_overrides

    out = tmp_path / "my-sweep" / "trials" / "003"
    overrides = trial_overrides(Sweep(parameters={"train.lr": [1e-4]}), {"train.lr": 1e-4}, out)
    assert "logging.group=my-sweep" in overrides
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    cfg = load_config(None, [f"model.path={model}", f"data.path={data}", *overrides])
    assert cfg.logging.group == "my-sweep"
