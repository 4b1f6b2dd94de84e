"""Runtime checks before a run (dsft/runtime.py): what this machine cannot run (fp16,
flash-attn, GPU kernels on a CPU; Liger not installed) is refused with a message."""

from __future__ import annotations

import pytest
import torch

from dsft.config import Config
from dsft.errors import ConfigError
from dsft.runtime import check_runtime


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_refused_on_cpu() -> None:
    cfg = Config()
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        check_runtime(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flash_attention_refused_without_cuda() -> None:
    cfg = Config()
    cfg.model.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash-attn package"):
        check_runtime(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_gpu_kernel_options_refused_without_cuda() -> None:
    """model.kernels=liger and flex_attention say why they cannot run here, all at once."""
    cfg = Config()
    cfg.model.kernels = "liger"
    cfg.model.attn_implementation = "flex_attention"
    with pytest.raises(ConfigError) as e:
        check_runtime(cfg)
    text = str(e.value)
    assert "model.kernels=liger needs a CUDA GPU" in text and "use model.kernels=none" in text
    assert "flex_attention needs a CUDA GPU" in text


def test_liger_refused_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from dsft import runtime

    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        runtime.importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real(n)
    )
    cfg = Config()
    cfg.model.kernels = "liger"
    with pytest.raises(ConfigError, match=r"pip install 'dsft\[gpu\]'"):
        check_runtime(cfg)
