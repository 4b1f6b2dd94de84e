"""Lean checkpoints: LoRA / frozen runs save only what they train, and still resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsft.synthetic import build_model_dir

from ..conftest import base_config, run_dsft, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LORA = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}


def _config(model: Path, data: Path, out: Path, stage: int, **extra: dict) -> dict:
    return base_config(
        model,
        data,
        out,
        model=LORA,
        deepspeed={"zero_stage": stage},
        train={"max_steps": 6, "lr": 3e-2, "weight_decay": 0.1},
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 2, "keep_last": 1},
        logging={"every": 1},
        **extra,
    )


def _model_states(tag: Path) -> dict:
    files = sorted(tag.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)


@pytest.mark.parametrize(("stage", "nproc"), [(2, 2), (3, 1)], ids=["zero2-2ranks", "zero3"])
def test_lean_lora_checkpoint_resumes_bit_identically(
    stage: int, nproc: int, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    tree = _config(tiny_model, tiny_data, straight, stage)
    tree["checkpoint"]["export"] = False  # its final checkpoint is compared instead
    cfg = write_config(tmp_path / "a.yaml", tree)
    assert run_dsft(["train", str(cfg)], nproc=nproc).returncode == 0

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "b.yaml", _config(tiny_model, tiny_data, out, stage))
    killed = run_dsft(["train", str(cfg)], nproc=nproc, env={"DSFT_FAULT_KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    tag = out / "checkpoints" / "step_00000002"
    meta = json.loads((tag / "dsft_state.json").read_text())
    assert meta["frozen_excluded"] and meta["base"]["files"]["model.safetensors"]["size"] > 0
    # only the adapters' weights are stored, no base tensor (not even the tied head)
    states = _model_states(tag)
    assert all("lora_" in k for k in states["module"] if k.endswith(".weight")), stage
    assert not states.get("frozen_param_fragments")

    resumed = run_dsft(["train", str(cfg)], nproc=nproc)
    assert resumed.returncode == 0
    assert "resumed from" in resumed.stdout
    a = {r["step"]: r["loss"] for r in train_rows(straight)}
    b = {r["step"]: r["loss"] for r in train_rows(out)}
    assert sorted(b) == list(range(1, 7))
    for step in range(3, 7):
        assert b[step] == a[step], step  # fp32 on CPU: bit-identical
    # the trained state at the end: the fp32 master weights and Adam moments, bit for bit
    final = "checkpoints/step_00000006"
    for f in sorted((straight / final).glob("*optim_states.pt")):
        x = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        y = torch.load(out / final / f.name, map_location="cpu", weights_only=False)
        flat = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        assert all(torch.equal(a, b) for a, b in zip(x[flat], y["optimizer_state_dict"][flat],
                                                     strict=True))  # fmt: skip
    # the offline export of the lean checkpoint (zero_to_fp32 + base from model.path) is
    # the model training exported
    exported = tmp_path / "exported"
    assert run_dsft(["export", str(out), str(exported)]).returncode == 0
    live, offline = (
        load_file(str(out / "final" / "model.safetensors")),
        load_file(str(exported / "model.safetensors")),
    )
    assert live.keys() == offline.keys()
    for k in live:
        torch.testing.assert_close(offline[k], live[k], rtol=1e-5, atol=1e-6)


def test_resume_onto_other_base_weights_is_refused(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    tree = _config(tiny_model, tiny_data, out, 0)
    tree["train"]["max_steps"] = 2
    tree["checkpoint"].update(every=0, export=False)
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)]).returncode == 0
    # same shape and tokenizer, other values: a LoRA checkpoint on it would be garbage
    other = build_model_dir(tmp_path / "other", seed=1, hidden=32, layers=2)
    refused = run_dsft(["train", str(cfg), "train.max_steps=4", f"model.path={other}"])
    assert refused.returncode == 2
    assert "its weights differ from those" in refused.stderr
    assert "model.safetensors" in refused.stderr
