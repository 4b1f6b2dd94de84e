"""dsft.fastpath: what "auto" turns on (CUDA and measured to help only), the GPU check's
override, and regional compilation (each decoder layer) equal to the plain model."""

from __future__ import annotations

import pytest
import torch

from dsft import fastpath
from dsft.errors import ConfigError

ON = {"liger": True, "compile": True}
OFF = {"liger": False, "compile": False}


@pytest.mark.parametrize(
    ("cuda", "liger", "helps", "want"),
    [
        (False, True, ON, ("none", False)),  # a CPU: never
        (True, True, OFF, ("none", False)),  # not measured to help: off
        (True, True, ON, ("liger", "regional")),
        (True, False, ON, ("none", "regional")),  # Liger not installed / no kernels
    ],
)
def test_auto_is_on_only_on_cuda_where_measured(cuda, liger, helps, want) -> None:
    assert fastpath.resolve("auto", "auto", cuda=cuda, liger=liger, helps=helps) == want


def test_explicit_settings_are_kept() -> None:
    assert fastpath.resolve("none", True, cuda=True, liger=True, helps=ON) == ("none", True)
    assert fastpath.resolve("liger", False, cuda=False, liger=False, helps=OFF) == ("liger", False)


def test_the_gpu_check_flips_verdicts_by_environment() -> None:
    assert fastpath.verdicts({}) == fastpath.MEASURED_HELPS
    assert fastpath.verdicts({fastpath.ENV: "liger, compile"}) == ON
    assert fastpath.verdicts({fastpath.ENV: "none"}) == OFF
    with pytest.raises(ConfigError, match="unknown flash"):
        fastpath.verdicts({fastpath.ENV: "flash"})


def test_config_defaults_are_auto_and_resolve_off_on_cpu(tiny_model) -> None:
    from dsft.config import Config, ModelConfig

    cfg = Config(model=ModelConfig(path=str(tiny_model)))
    assert (cfg.model.kernels, cfg.model.compile, cfg.model.attn_implementation) == ("auto",) * 3
    resolved = fastpath.resolve_config(cfg, cuda=False)
    assert (resolved.model.kernels, resolved.model.compile) == ("none", False)


def test_regional_compile_compiles_each_layer_and_equals_plain(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(5, 40, (2, 12))
    plain = model(input_ids=ids).logits

    class Engine:
        def compile(self, **kw):  # the whole-model path must not be taken
            raise AssertionError("whole-model compile")

    n = fastpath.compile_model(Engine(), model, "regional", backend="eager")
    assert n == model.config.num_hidden_layers == len(fastpath.decoder_layers(model))
    assert all(layer._compiled_call_impl is not None for layer in fastpath.decoder_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, plain)
    assert fastpath.compile_model(Engine(), model, False) == 0
