"""The DeepSpeed JSON (dsft/ds_config.py): derived from the typed config, and the shipped
ds_configs/ presets equal the generator's output and pass DeepSpeed's parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.cli import main
from dsft.ds_config import PRESETS, presets

from ..conftest import ROOT, base_config, write_config


def test_ds_config_is_generated_from_typed_config(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model, tiny_data, tmp_path / "o"))
    assert (
        main(
            [
                "ds-config",
                str(cfg),
                "deepspeed.zero_stage=3",
                "train.max_grad_norm=0",
                "train.global_batch=32",
                "--world-size",
                "2",
            ]
        )
        == 0
    )
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default would be 1.0
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (4, 4, 32)


def test_shipped_presets_match_the_generator() -> None:
    """ds_configs/*.json are regenerated from dsft's defaults; they never drift."""
    for name, expected in presets().items():
        assert json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()) == expected, name


def test_presets_are_generated_and_valid_for_deepspeed() -> None:
    """ds_configs/*.json equal the generator's output and DeepSpeed's parser accepts them."""
    from dsft.distributed import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    shipped = {p.stem: p for p in (ROOT / "ds_configs").glob("*.json")}
    assert set(shipped) == set(PRESETS)
    readme = (ROOT / "ds_configs" / "README.md").read_text()
    for name, expected in presets().items():
        assert json.loads(shipped[name].read_text()) == expected, name
        parsed = DeepSpeedConfig(str(shipped[name]))
        stage, opt, params = PRESETS[name]
        assert parsed.zero_optimization_stage == stage
        assert (parsed.zero_config.offload_optimizer is not None) == opt
        assert (parsed.zero_config.offload_param is not None) == params
        assert parsed.zero_config.reduce_bucket_size == 4096 * 4096 or stage == 0
        assert f"{name}.json" in readme
    bad = presets()["zero2"]
    bad["zero_optimization"]["reduce_bucket_sise"] = 1  # the parser is strict: a typo fails
    with pytest.raises(Exception, match="reduce_bucket_sise"):
        DeepSpeedConfig(bad)
