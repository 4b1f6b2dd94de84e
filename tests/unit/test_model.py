"""The model (dsft/model.py): freezing, and PEFT variants by name (model.lora.use_dora /
use_rslora / init, model.quantization): dsft's model equals peft's own model built the same
way (trainable parameters, the first step's loss and the loss after one update), and what
cannot run here is refused with a message."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsft.config import Config, FreezeConfig, LoraConfig, ModelConfig, TrainConfig, validate
from dsft.errors import ConfigError
from dsft.model import apply_lora, freeze, load_model
from dsft.optim import param_groups
from dsft.runtime import check_runtime

# dsft's config -> the peft LoraConfig arguments a peft user writes for the same thing
VARIANTS = {
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "gaussian": ({"init": "gaussian"}, {"init_lora_weights": "gaussian"}),
    "pissa": ({"init": "pissa"}, {"init_lora_weights": "pissa"}),
}


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, vocab, (4, 24), generator=g)
    return {"input_ids": ids, "labels": ids}


def _first_steps(model: torch.nn.Module, batch: dict) -> tuple[int, float, float]:
    """(trainable parameters, loss before any update, loss after one AdamW step)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    return trainable, loss.item(), after


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_peft(tiny_model: Path, name: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ours, theirs = VARIANTS[name]
    cfg = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, **ours)
    mcfg = ModelConfig(path=str(tiny_model))
    batch = _batch(load_model(mcfg, torch.float32).config.vocab_size)

    torch.manual_seed(3)
    dsft_model = apply_lora(load_model(mcfg, torch.float32), cfg)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        load_model(mcfg, torch.float32),
        PeftLoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
            task_type="CAUSAL_LM", **theirs,
        ),
    )  # fmt: skip
    got, want = _first_steps(dsft_model, batch), _first_steps(peft_model, batch)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    assert got[2] == pytest.approx(want[2], rel=1e-6)
    plain_model = apply_lora(
        load_model(mcfg, torch.float32), LoraConfig(enabled=True, r=4, alpha=8)
    )
    plain = _first_steps(plain_model, batch)
    if name == "dora":  # one magnitude per output feature of every adapted linear
        assert got[0] > plain[0]
    else:
        assert got[0] == plain[0]
    # the variant changes the update (scaling) or the start (init): not plain LoRA in disguise
    assert got[2] != pytest.approx(plain[2], rel=1e-6)


def test_variants_need_lora_and_qlora_needs_cuda(tiny_model: Path) -> None:
    cfg = Config()
    cfg.model.path = str(tiny_model)
    cfg.data.path = [str(tiny_model / "config.json")]
    cfg.model.lora.use_dora = True
    cfg.model.quantization = "nf4"
    problems = validate(cfg)
    assert any("need model.lora.enabled=true" in p and "use_dora" in p for p in problems)
    cfg.model.lora.enabled = True
    cfg.deepspeed.zero_stage = 3
    assert any("ZeRO-3" in p for p in validate(cfg))
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    for model in (
        dataclasses.replace(cfg.model, quantization="nf4"),
        dataclasses.replace(
            cfg.model, quantization="none", lora=dataclasses.replace(cfg.model.lora, init="loftq")
        ),
    ):
        with pytest.raises(ConfigError, match="needs a CUDA GPU and the bitsandbytes"):
            check_runtime(dataclasses.replace(cfg, model=model))


@pytest.fixture
def model(tiny_model: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_freeze_embeddings_bottom_layers_and_patterns(model: torch.nn.Module, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dsft"):
        frozen = freeze(
            model,
            FreezeConfig(
                embeddings=True, bottom_layers=1, patterns=[r"layers\.1\.mlp\.down", "nomatch"]
            ),
        )
    assert "nomatch" in caplog.text  # an option that does nothing says so
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert all(
        n.startswith("model.layers.0.")
        for n in frozen
        if n.startswith("model.layers.") and "down_proj" not in n
    )
    assert "model.layers.1.mlp.down_proj.weight" in frozen
    assert "model.layers.1.self_attn.q_proj.weight" in trainable
    # frozen parameters get no optimizer group, hence no optimizer state
    grouped = {id(p) for g in param_groups(model, TrainConfig()) for p in g["params"]}
    assert not grouped & {id(p) for n, p in model.named_parameters() if n in frozen}
