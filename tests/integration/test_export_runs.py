"""`dsft export`: any checkpoint to a verified Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dsft.config import Config
from dsft.errors import ExportError
from dsft.hf_export import write_hf

from ..conftest import base_config, run_dsft, weights, write_config


def test_missing_tensor_is_an_error(tiny_model: Path, tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.path = str(tiny_model)
    sd = weights(tiny_model)
    sd.pop("model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ExportError, match="missing"):
        write_hf(cfg, sd, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_export_of_zero3_checkpoint_matches_training(
    lora: bool, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        base_config(
            tiny_model,
            tiny_data,
            out,
            deepspeed={"zero_stage": 3},
            model={"lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0}},
            train={"max_steps": 6, "lr": 3e-2 if lora else 3e-3},
            eval={"generate": False, "before_training": False},
        ),
    )
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    exported = tmp_path / "exported"
    proc = run_dsft(["export", str(out), str(exported)])
    assert proc.returncode == 0
    # the offline consolidation equals what training exported from the live engine
    live, offline = weights(out / "final"), weights(exported)
    assert set(live) == set(offline)
    for k in live:
        torch.testing.assert_close(offline[k], live[k], rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.num_hidden_layers == 2
    if lora:  # the adapter alone loads with peft and reproduces the merged model
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        peft = PeftModel.from_pretrained(base, exported / "adapter").eval()
        ids = torch.arange(1, 12).unsqueeze(0)
        with torch.no_grad():
            torch.testing.assert_close(
                peft(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4
            )
        assert not torch.equal(
            weights(tiny_model)["model.layers.0.self_attn.q_proj.weight"],
            offline["model.layers.0.self_attn.q_proj.weight"],
        )
