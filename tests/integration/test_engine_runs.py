"""Engine features on real multi-rank DeepSpeed runs (CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ..conftest import (
    base_config,
    read_summary,
    run_dsft,
    short_run_config,
    train_rows,
    weights,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("stage", [2, 3])
def test_layer_wise_lrs_exact_after_warmup(
    stage: int, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": stage},
            train={
                "max_steps": 4,
                "warmup_steps": 2,
                "schedule": "constant",
                "lr": 1e-3,
                "weight_decay": 0.1,
                "layer_decay": 0.5,
                "lr_scale": {"embed_tokens": 0.1},
            },
            eval={"generate": False},
            checkpoint={"save_final": False, "export": False},
            logging={"every": 1},
        ),
    )
    proc = run_dsft(["train", str(cfg)], nproc=2)
    assert proc.returncode == 0
    assert "layer00/decay" in proc.stdout  # the start-of-run group table
    after_warmup = train_rows(out)[2]  # step 3: warmup over, constant schedule
    lrs = {k[3:]: v for k, v in after_warmup.items() if k.startswith("lr/")}
    expected = {
        "head": 1e-3,
        "layer01": 5e-4,
        "layer00": 2.5e-4,
        "embed[embed_tokens]": 1e-3 * 0.125 * 0.1,
    }
    for name, lr in lrs.items():
        assert lr == expected[name.split("/")[0]], name  # exact: the schedule multiplies by 1
    assert {n.split("/")[0] for n in lrs} == set(expected)
    warm = train_rows(out)[0]  # step 1 of a 2-step warmup: every group at half its LR
    assert warm["lr/layer00/decay"] == pytest.approx(2.5e-4 * 1.0)  # LR for the *next* step


def test_frozen_weights_stay_bit_identical(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": 3},
            # activation checkpointing on too: recomputation must not touch frozen weights
            model={
                "freeze": {"embeddings": True, "bottom_layers": 1},
                "gradient_checkpointing": True,
            },
            train={"max_steps": 6, "weight_decay": 0.1},
            eval={"generate": False},
        ),
    )
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    before, after = weights(tiny_model), weights(out / "final")
    s = read_summary(out)
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"]
    frozen = [n for n in before if n.startswith(("model.embed_tokens", "model.layers.0."))]
    moving = [n for n in before if n.startswith("model.layers.1.")]
    assert frozen and moving
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
    for n in moving:
        if n.endswith("proj.weight"):
            assert not torch.equal(before[n], after[n]), n
    assert s["trainable_params"] == sum(before[n].numel() for n in before if n not in frozen)


def test_lora_zero2_with_modules_to_save(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": 2},
            model={
                "lora": {
                    "enabled": True,
                    "r": 4,
                    "alpha": 8,
                    "dropout": 0.0,
                    "target_modules": ["q_proj", "v_proj"],
                    "modules_to_save": ["norm"],
                }
            },
            train={"lr": 3e-2, "max_steps": 12},
            eval={"generate": False},
        ),
    )
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    s = read_summary(out)
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"] - 0.1
    # adapters on q and v (r * (32 + 32) each) in 2 layers, plus every norm weight (32 each):
    # 2 per layer and the final one
    assert s["trainable_params"] == 2 * 2 * 4 * 64 + 5 * 32
    before, after = weights(tiny_model), weights(out / "final")
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )  # not adapted
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        after["model.layers.0.self_attn.q_proj.weight"],
    )  # merged
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("stage", "nproc", "precision"),
    [(0, 1, "fp32"), (2, 2, "fp32"), (3, 2, "fp32"), (0, 2, "bf16")],
)
def test_nonfinite_step_is_skipped(
    stage: int, nproc: int, precision: str, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """A NaN loss on one rank at step 1: the step is skipped everywhere, weights untouched."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": stage},
            train={"max_steps": 1, "max_bad_steps": 0, "precision": precision, "warmup_steps": 0},
            eval={"generate": False, "before_training": False},
            logging={"every": 1},
        ),
    )
    proc = run_dsft(["train", str(cfg)], nproc=nproc, env={"DSFT_FAULT_NAN_STEPS": "1"})
    assert proc.returncode == 0
    assert "step 1 skipped" in proc.stdout
    (row,) = train_rows(out)
    assert row["bad_steps"] == 1 and row["skipped_steps"] == 1
    before, after = weights(tiny_model), weights(out / "final")
    for n in before:
        assert torch.equal(before[n].to(after[n].dtype), after[n]), n


@pytest.mark.parametrize("nproc", [1, 2])
def test_consecutive_bad_steps_stop_the_run(
    nproc: int, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """K bad steps in a row end the run on every rank with exit code 3 and a message."""
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": "auto"},  # the default: the CPU rule picks 0 or 2
            train={"max_steps": 8, "max_bad_steps": 3},
            eval={"generate": False},
        ),
    )
    proc = run_dsft(["train", str(cfg)], nproc=nproc, env={"DSFT_FAULT_NAN_STEPS": "2,4,5,6"})
    assert "stopped at step 6: 3 steps in a row" in proc.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["zero_stage"], plan["decided_by"]) == (2 if nproc > 1 else 0, "cpu")
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["deepspeed"]["zero_stage"]
        == (
            plan["zero_stage"]  # the saved config is the resolved one
        )
    )
    if nproc == 1:
        assert proc.returncode == 3
        assert "Traceback" not in proc.stderr
    else:  # both ranks decide the same at the same step; torchrun itself exits 1
        assert proc.returncode != 0
        assert proc.stderr.count("stopped at step 6: 3 steps in a row") == 2
        assert "exitcode  : 3" in proc.stderr


def test_loss_normalisation_four_ranks(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference_run: dict
) -> None:
    """World 4 x accumulation 1 gives the same steps as world 1 x accumulation 4."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", short_run_config(tiny_model, tiny_data, out, 2, 1))
    assert run_dsft(["train", str(cfg)], nproc=4).returncode == 0
    rows = train_rows(out)
    assert [r["loss"] for r in rows] == pytest.approx(reference_run["loss"], rel=1e-4)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference_run["grad_norm"], rel=1e-4)


def test_torch_compile_switch(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, reference_run: dict
) -> None:
    """model.compile=true trains through the compiled module (the same steps as eager) and
    still exports (the compiled wrapper's names do not leak into the weights)."""
    out = tmp_path / "run"
    tree = short_run_config(tiny_model, tiny_data, out, 0, 4)
    tree["model"]["compile"] = True
    tree["train"]["max_steps"] = 3
    tree["checkpoint"]["export"] = True
    assert run_dsft(["train", str(write_config(tmp_path / "c.yaml", tree))]).returncode == 0
    rows = train_rows(out)
    assert [r["loss"] for r in rows] == pytest.approx(reference_run["loss"][:3], rel=1e-4)
    assert [r["grad_norm"] for r in rows] == pytest.approx(reference_run["grad_norm"][:3], rel=1e-3)
    assert set(weights(out / "final")) == set(weights(tiny_model))
