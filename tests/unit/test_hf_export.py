"""The Hugging Face export (dsft/hf_export.py), its model card: the base, the method, each data
file's sha256, the final metrics and the resolved config. Exporting a trained run:
tests/integration/test_export_runs.py; export loads as training does: test_one_home.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from dsft.config import Config
from dsft.hf_export import model_card, write_model_card


def test_card_of_a_lora_run_from_a_hub_base(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = Config()
    cfg.model.path = "org/base-model"
    cfg.model.lora.enabled = True
    cfg.model.lora.use_dora = True
    cfg.data.path = [str(data)]
    cfg.data.val_path = [str(tmp_path / "gone.jsonl")]
    cfg.output_dir = str(tmp_path / "my-run")
    run = {"after": {"val": {"loss": 0.5, "examples": 3}}, "steps": 12, "train_seconds": 90}
    card = model_card(cfg, run, adapter=True)
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"library_name": "peft", "tags": ["dsft", "sft", "lora"],
                     "base_model": "org/base-model"}  # fmt: skip
    assert "# my-run" in card and f"LoRA, r={cfg.model.lora.r}, alpha=" in card and "DoRA" in card
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert f"| train | `train.jsonl` | `{digest}` |" in card
    assert "| val | `gone.jsonl` | `(file not found)` |" in card
    assert "| val/loss | 0.5000 |" in card and "| val/examples | 3.0000 |" in card
    assert "- optimizer steps: 12" in card and "- training time: 1.5 min (90 s)" in card
    resolved = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert resolved["model"]["path"] == "org/base-model"


def test_card_of_a_full_run_from_a_local_base(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.path = str(tmp_path)  # a local directory: no Hub link
    path = write_model_card(cfg, tmp_path)
    card = path.read_text()
    assert path.name == "README.md"
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and front["library_name"] == "transformers"
    assert "(full fine-tuning)" in card and "No final metrics recorded." in card
