"""`dsft init`: the rules, and configs for SmolLM- and Llama-8B-shaped models (config-only
directories: nothing but config.json and a tokenizer) that load and validate as `dsft train`
reads them, with the planner's choice as a comment; a Hub name read from a Hub-shaped cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dsft import planner
from dsft.cli import main
from dsft.config import load_config
from dsft.recipes.init import choose
from dsft.synthetic import build_tokenizer

# SmolLM-135M's config.json (HuggingFaceTB/SmolLM-135M)
SMOLLM = dict(
    hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    max_position_embeddings=2048,
)  # fmt: skip


def _config_only(path: Path, shape: dict) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**shape).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    assert not list(path.glob("*.safetensors"))
    return path


def test_rules() -> None:
    short = np.full(100, 200)
    r8b = choose(8_000_000_000, "lora", 5000, short, short // 4, 8192, 8)
    assert (r8b.lr, r8b.lora_r, r8b.epochs, r8b.global_batch) == (2e-4, 16, 3, 32)
    assert r8b.max_len == 256 and not r8b.packing
    full = choose(8_000_000_000, "full", 500_000, short, short // 4, 8192, 8)
    assert (full.lr, full.epochs, full.global_batch) == (1e-5, 1, 64)
    small = choose(135_000_000, "full", 50, np.array([20, 30, 100, 400] * 25), short, 2048, 1)
    assert small.lr == pytest.approx(7.7e-5) and small.global_batch == 8
    assert small.packing and small.max_len == 448  # p99 = 400, lengths spread 20..400
    assert choose(70e9, "lora", 10, short, short, 100, 1).max_len == 100  # the context caps it


@pytest.mark.parametrize("shape", ["smollm", "llama-8b"])
def test_config_for_shape_loads_and_validates(
    shape: str, tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    fields = (
        SMOLLM
        if shape == "smollm"
        else {**planner.SHAPES["llama-8b"], "max_position_embeddings": 8192}
    )
    model = _config_only(tmp_path / shape, fields)
    out = tmp_path / "cfg.yaml"
    args = ["init", str(model), str(tiny_data), "--gpus", "8", "--gpu-mem", "80GB", "-o", str(out)]
    assert main(args) == 0
    text = out.read_text()
    cfg = load_config(out)  # dsft train's loading and validation
    assert cfg.model.lora.enabled and cfg.train.micro_batch == "auto"
    assert cfg.deepspeed.zero_stage == "auto" and cfg.train.precision == "bf16"
    assert "# memory plan" in text and "8 GPUs × 80.0 GB" in text and "* chosen: ZeRO-" in text
    assert "found: instruction 200" in text
    assert cfg.train.global_batch % 8 == 0
    tree = yaml.safe_load(text)
    if shape == "llama-8b":
        assert "8,030.3M parameters" in text and "41.94M trainable (LoRA)" in text
        assert tree["train"]["lr"] == 2e-4 and tree["model"]["lora"]["r"] == 16
    else:
        assert tree["model"]["lora"]["r"] == 8
    assert main(args) == 2  # an existing file is not overwritten without --force
    assert "exists" in capsys.readouterr().err


def test_hub_name_from_the_cache(tmp_path: Path, tiny_model: Path, tiny_data: Path) -> None:
    # a Hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>/
    repo = tmp_path / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dsft", "init", "someorg/tiny", str(tiny_data), "-o"]
    ok = subprocess.run([*cmd, str(tmp_path / "a.yaml")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["model"]["path"] == "someorg/tiny"
    missing = [*cmd[:4], "someorg/absent", str(tiny_data), "-o", str(tmp_path / "b.yaml")]
    bad = subprocess.run(missing, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "could not read the Hub repo" in bad.stderr, bad.stderr
