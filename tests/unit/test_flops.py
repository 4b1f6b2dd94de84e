"""The FLOP formula and MFU (dsft/flops.py) by hand, and the text-config fallback for
multimodal configs. (That logging and planning share the formula: test_one_home.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dsft.flops import FlopCounter, peak_flops, text_config, text_dims, train_flops


def test_train_flops_by_hand() -> None:
    # 100 parameters, 40 trainable, 2 layers of width 8; 10 tokens in sequences of 6 and 4
    dense = (4 * 100 + 2 * 40) * 10
    attention = 12 * 2 * 8 * (6**2 + 4**2)
    assert train_flops(100, 40, 2, 8, 10, 52) == dense + attention
    again = 2 * 100 * 10 + 4 * 2 * 8 * 52  # activation checkpointing: a second forward
    assert train_flops(100, 40, 2, 8, 10, 52, recompute=True) == dense + attention + again


def test_text_config_of_nested_and_plain_configs() -> None:
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4)
    nested = LlavaConfig(text_config=text.to_dict())  # a multimodal config nests its LM's
    assert text_config(nested) is nested.text_config and text_dims(nested) == (4, 64)
    assert text_config(text) is text and text_dims(text) == (4, 64)
    assert text_dims(SimpleNamespace()) == (0, 0)


def test_counter_reports_mfu_only_with_a_peak() -> None:
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
    flops = train_flops(100, 40, 2, 8, 10, 52)
    with_peak = FlopCounter(100, 40, cfg, total_peak=flops * 4).scalars(10, 52, seconds=2.0)
    assert with_peak["tflops"] == pytest.approx(flops / 2 / 1e12)
    assert with_peak["mfu"] == pytest.approx(0.125)
    assert "mfu" not in FlopCounter(100, 40, cfg, total_peak=0).scalars(10, 52, 1.0)
    assert peak_flops(989) == 989e12  # a configured peak wins over the lookup
