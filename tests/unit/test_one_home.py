"""One home per fact (README "Layout"): the copies that had drifted apart are gone, and the
bugs they caused stay fixed — export loads models and tokenizers as training does, and
logging and planning count FLOPs with one formula."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dsft import planner
from dsft.config import Config
from dsft.flops import PEAK_TFLOPS, FlopCounter, train_flops
from dsft.hf_export import write_hf
from dsft.synthetic import build_model_dir

from ..conftest import weights

ROOT = Path(__file__).resolve().parents[2]

# A model repository with its own code, laid out as such repos are on the Hub: config.json
# names the classes in auto_map, next to the Python files that define them.
CONFIGURATION = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def _custom_code_model(out: Path) -> Path:
    build_model_dir(out, hidden=32, layers=2)
    (out / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (out / "modeling_tiny_custom.py").write_text(MODELING)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "tiny_custom"
    cfg["architectures"] = ["TinyCustomForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def test_export_of_a_custom_code_model_keeps_trust_remote_code(tmp_path: Path) -> None:
    model = _custom_code_model(tmp_path / "custom")
    cfg = Config()
    cfg.model.path = str(model)
    cfg.model.trust_remote_code = True
    # before: export loaded and reloaded without trust_remote_code and failed here
    write_hf(cfg, weights(model), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "tiny_custom"


def test_export_tokenizer_gets_the_pad_token_training_used(tmp_path: Path) -> None:
    model = build_model_dir(tmp_path / "m", hidden=32, layers=2)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)  # a base model that ships no pad token (Llama 3 does not)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    for name in ("special_tokens_map.json",):
        if (model / name).is_file():
            m = json.loads((model / name).read_text())
            m.pop("pad_token", None)
            (model / name).write_text(json.dumps(m))
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    cfg = Config()
    cfg.model.path = str(model)
    write_hf(cfg, weights(model), tmp_path / "out")
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    # before: export saved the tokenizer without the pad token training borrowed from EOS
    assert exported.pad_token == exported.eos_token is not None


def test_one_flop_formula_for_logging_and_planning() -> None:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    trainable = n // 10  # LoRA-like: the base gets no weight gradients
    seq = 64
    facts = planner.model_facts(config)
    facts = planner.ModelFacts(**{**facts.__dict__, "trainable_params": trainable})
    logged = FlopCounter(facts.total_params, trainable, config, 0.0).flops(seq, seq * seq)
    planned = planner.flops_per_token(facts, seq) * seq
    assert logged == pytest.approx(planned, rel=1e-12)
    # full fine-tuning is the usual 6·N·T; LoRA counts no weight-gradient FLOPs for the base
    assert train_flops(n, n, 0, 0, 10, 0) == 6 * n * 10
    assert train_flops(n, 0, 0, 0, 10, 0) == 4 * n * 10


def test_facts_live_once() -> None:
    """989 (the H100/H200 bf16 peak), the torchrun argv, the Llama-1B shape and the model-dir
    builder each have one home; the benchmark and tests take them from there."""
    sources = {
        p: p.read_text()
        for folder in ("dsft", "benchmarks", "tests")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "test_one_home.py"
    }
    where = lambda pattern: sorted(  # noqa: E731
        str(p.relative_to(ROOT)) for p, s in sources.items() if re.search(pattern, s)
    )
    assert [p for p in where(r"989\.0") if not p.startswith("tests/")] == ["dsft/flops.py"]
    # (tests/cluster builds its own two-node rendezvous line, a different argv)
    single_node = [p for p in where(r'"torch\.distributed\.run"') if "cluster/" not in p]
    assert single_node == ["dsft/distributed.py"]
    assert where(r"2048, 16, 8192, 32, 8, 128256") == ["dsft/planner/shapes.py"]  # Llama 3.2 1B
    assert where(r"def build_model_dir") == ["dsft/synthetic.py"]
    assert where(r"get_text_config") == ["dsft/flops.py"]
    assert PEAK_TFLOPS["H100"] == PEAK_TFLOPS["H200"] == 989.0
