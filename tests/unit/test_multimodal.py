"""Multimodal checkpoints: the class that loads them, the tower / projector / language split,
freezing defaults, LoRA targets, layer decay and the planner's counts, on meta models of
transformers' own classes (nothing is allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dsft import model as dsft_model
from dsft import optim, planner
from dsft.config import FreezeConfig, LoraConfig, TrainConfig
from dsft.flops import text_config
from dsft.synthetic import build_vlm_tokenizer, vlm_class, vlm_config


def _meta(family: str) -> torch.nn.Module:
    config = vlm_config(family, build_vlm_tokenizer(family))
    with torch.device("meta"):
        return dsft_model.from_config(config)


@pytest.mark.parametrize("family", ["gemma3", "llama4", "qwen3_5_moe", "idefics3"])
def test_loads_with_its_own_class_and_splits_parts(family: str) -> None:
    model = _meta(family)
    assert type(model) is vlm_class(family)
    model.config.architectures = [vlm_class(family).__name__]  # as saved
    assert dsft_model.model_class(model.config) is vlm_class(family)
    assert dsft_model.model_class(LlamaConfig()) is AutoModelForCausalLM
    parts = {dsft_model.part(n) for n, _ in model.named_parameters()}
    assert parts == {"vision", "projector", "language"}
    assert dsft_model.num_layers(model) == text_config(model.config).num_hidden_layers == 2
    # blocks are the language model's: a tower's "layers.0" is not block 0
    tower = [n for n, _ in model.named_parameters() if dsft_model.part(n) == "vision"]
    assert all(dsft_model.layer_index(n) is None for n in tower)


def test_tower_and_projector_frozen_by_default_and_trainable_when_asked() -> None:
    model = _meta("gemma3")
    frozen = set(dsft_model.freeze(model, FreezeConfig()))
    expected = {n for n, _ in model.named_parameters() if dsft_model.part(n) != "language"}
    assert frozen == expected and frozen
    model = _meta("gemma3")
    frozen = set(dsft_model.freeze(model, FreezeConfig(vision=False, bottom_layers=1)))
    assert all(dsft_model.part(n) == "projector" or ".layers.0." in n for n in frozen)
    assert any("vision_tower" in n and p.requires_grad for n, p in model.named_parameters())
    assert any("language_model.layers.0." in n for n in frozen)


def test_lora_all_linear_adapts_the_language_model_only() -> None:
    model = dsft_model.apply_lora(_meta("llava"), LoraConfig(enabled=True))
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(dsft_model.part(n) == "language" for n in adapted)
    assert not any(n.endswith("lm_head") for n in adapted)


def test_layer_decay_puts_a_trained_tower_below_the_blocks() -> None:
    model = _meta("gemma3")
    dsft_model.freeze(model, FreezeConfig(vision=False, projector=False))
    groups = optim.param_groups(model, TrainConfig(layer_decay=0.5))
    by_name = {id(p): g["name"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if dsft_model.part(name) != "language":
            assert by_name[id(p)].startswith("embed/"), name


def test_planner_counts_the_tower(tmp_path: Path) -> None:
    config = vlm_config("gemma3", build_vlm_tokenizer("gemma3"))
    facts = planner.model_facts(config, freeze=FreezeConfig())
    model = _meta("gemma3")
    everything = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for n, p in model.named_parameters() if dsft_model.part(n) != "language")
    assert facts.total_params == everything
    assert facts.trainable_params == everything - tower  # frozen by default
    assert (facts.layers, facts.hidden) == (2, 32)
