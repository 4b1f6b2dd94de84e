"""The optimizer's parameter groups (weight decay, layer-wise LR decay, LR scales, LoRA
adapters) and the LR schedule (dsft/optim.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft.config import TrainConfig, load_config
from dsft.errors import ConfigError
from dsft.optim import lr_lambda, param_groups


@pytest.fixture
def model(tiny_model: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model)


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_layer_decay_and_pattern_scales(model: torch.nn.Module) -> None:
    train = TrainConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5, lr_scale={"embed_tokens": 0.1})
    groups = param_groups(model, train)
    by_name = {g["name"]: g for g in groups}
    lr = {name.split("/")[0]: g["lr"] for name, g in by_name.items()}
    # 2 blocks: block 1 is one below the head, block 0 two below, embeddings three.
    assert lr == pytest.approx(
        {
            "head": 1e-3,
            "layer01": 1e-3 * 0.5,
            "layer00": 1e-3 * 0.25,
            "embed[embed_tokens]": 1e-3 * 0.125 * 0.1,
        }
    )
    # norms get no weight decay; matrices do
    assert all(n.endswith("norm.weight") for n in _names(model, by_name["layer00/no_decay"]))
    assert by_name["layer00/no_decay"]["weight_decay"] == 0.0
    assert by_name["layer00/decay"]["weight_decay"] == 0.1
    # every trainable parameter is in exactly one group
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_without_llrd_two_groups(model: torch.nn.Module) -> None:
    groups = param_groups(model, TrainConfig(lr=2e-5, weight_decay=0.01))
    assert sorted(g["name"] for g in groups) == ["all/decay", "all/no_decay"]
    assert {g["lr"] for g in groups} == {2e-5}


def test_schedule_warmup_then_decay() -> None:
    f = lr_lambda(total_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    lin = lr_lambda(total_steps=10, warmup_steps=0, schedule="linear", min_ratio=0.0)
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda(10, 2, "constant", 0.0)(7) == 1.0


def test_lr_scale_override_and_bad_regex(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "train.lr_scale={'(bad': 0.1}",
                "train.layer_decay=1.5",
                "model.attn_implementation=magic",
            ],
        )
    msg = str(e.value)
    assert "not a valid regular expression" in msg
    assert "train.layer_decay" in msg and "model.attn_implementation" in msg


def test_layer_decay_applies_to_lora_adapters(model: torch.nn.Module) -> None:
    from dsft.config import LoraConfig
    from dsft.model import apply_lora

    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=["q_proj"]))
    groups = param_groups(peft_model, TrainConfig(lr=1.0, layer_decay=0.5))
    lr_of = {n: g["lr"] for g in groups for n in _names(peft_model, g)}
    assert set(lr_of) == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in lr_of)  # the frozen base has no group
    assert lr_of["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == 0.25
    assert lr_of["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"] == 0.5
