"""Text-only SFT on natively multimodal checkpoints (tiny ones of each family, built from
transformers' own classes and saved as published): training runs, and the export is the
input's model: its architecture and config, every frozen vision / projector tensor
bit-identical, the processor files carried, loadable with AutoModelForImageTextToText."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsft.model import part
from dsft.synthetic import build_vlm_dir

from ..conftest import base_config, read_summary, run_dsft, weights, write_config

FAST = ["gemma3", "qwen3_5_moe"]
SLOW = ["gemma4", "qwen3_5", "llama4", "mistral3", "llava", "idefics3", "smolvlm"]


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vlm")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_vlm_dir(root / family, family)
        return built[family]

    return get


def _train(model: Path, data: Path, out: Path, ranks: int = 1, stage: int = 0) -> Path:
    tree = base_config(
        model, data, out,
        train={"max_steps": 2, "grad_accum": 1, "micro_batch": 2, "fused_loss": True},
        deepspeed={"zero_stage": stage},
        eval={"generate": False, "before_training": False},
    )  # fmt: skip
    cfg = write_config(out.parent / f"{out.name}.yaml", tree)
    proc = run_dsft(["train", str(cfg)], nproc=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out / "final"


def _check_export(base: Path, export: Path) -> None:
    from transformers import AutoModelForImageTextToText

    config = json.loads((export / "config.json").read_text())
    base_config_ = json.loads((base / "config.json").read_text())
    assert config["architectures"] == base_config_["architectures"]
    assert config["model_type"] == base_config_["model_type"]
    before, after = weights(base), weights(export)
    assert set(after) == set(before)
    tower = [k for k in before if part(k) != "language"]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if part(k) == "language")
    for name in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (export / name).exists() == (base / name).exists(), name
    model = AutoModelForImageTextToText.from_pretrained(export)
    assert type(model).__name__ == config["architectures"][0]
    if (base / "processor_config.json").exists():
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(export)


@pytest.mark.parametrize("family", FAST + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW])
def test_text_only_sft_keeps_the_whole_model(
    family: str, vlm_dirs, tiny_data: Path, tmp_path: Path
) -> None:
    base = vlm_dirs(family)
    _check_export(base, _train(base, tiny_data, tmp_path / "run"))
    # the lean checkpoint stores no frozen tower or projector
    (states,) = (tmp_path / "run" / "checkpoints").rglob("mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module and all(part(k) == "language" for k in module)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "qwen3_5_moe"])
def test_text_only_sft_two_ranks_zero3(
    family: str, vlm_dirs, tiny_data: Path, tmp_path: Path
) -> None:
    base = vlm_dirs(family)
    export = _train(base, tiny_data, tmp_path / "run", ranks=2, stage=3)
    _check_export(base, export)
    # the lean checkpoint stores no frozen tower
    (tag,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    meta = json.loads((tag / "dsft_state.json").read_text())
    assert meta.get("frozen_excluded") is True


# ------------------------------------------------------------------------ image-text SFT


def _image_train(model: Path, data: Path, out: Path, steps: int, packing: bool = False):
    tree = base_config(
        model, data, out,
        data={"max_len": 128 if packing else 64, "val_fraction": 0.1, "test_fraction": 0.0,
              "packing": packing},
        train={"max_steps": steps, "grad_accum": 1, "micro_batch": 4, "lr": 5e-3,
               "fused_loss": True},
        eval={"generate": False, "before_training": False},
        logging={"every": 10},
    )  # fmt: skip
    cfg = write_config(out.parent / f"{out.name}.yaml", tree)
    proc = run_dsft(["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out / "final"


def test_image_sft_learns_a_visual_task_and_chats_about_a_picture(vlm_dirs, tmp_path: Path) -> None:
    """Gemma 3, tower and projector frozen, image rows packed (each image's two-way
    attention kept inside its example): which colour is the picture? (chance 0.25)"""
    from PIL import Image

    from dsft.synthetic import colour_accuracy, write_colour_task

    base = vlm_dirs("gemma3")
    export = _image_train(base, write_colour_task(tmp_path / "c", n=200, seed=1),
                          tmp_path / "run", steps=60, packing=True)  # fmt: skip
    _check_export(base, export)
    accuracy = colour_accuracy(export)
    assert accuracy >= 0.5, accuracy
    Image.new("RGB", (30, 30), (30, 40, 220)).save(tmp_path / "blue.png")
    proc = run_dsft(["chat", str(export), "--image", str(tmp_path / "blue.png"), "--prompt",
                     "What colour is this?", "--temperature", "0", "--max-new-tokens", "2"])  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip()[:1] in "RGBY", proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_image_sft_trains_and_exports(family: str, vlm_dirs, tmp_path: Path) -> None:
    from dsft.synthetic import write_colour_task

    base = vlm_dirs(family)
    data = write_colour_task(tmp_path / "c", n=40, seed=2)
    _check_export(base, _image_train(base, data, tmp_path / "run", steps=4, packing=True))


@pytest.mark.slow
@pytest.mark.parametrize("trained", [False, True], ids=["tower-frozen", "tower-trained"])
def test_image_sft_two_ranks_zero3_mixed_rows(vlm_dirs, tmp_path: Path, trained: bool) -> None:
    """Micro-batches of one image row or one text row each: a rank with no image in its
    micro-batch still runs the tower (a dummy image, where the model runs it), or ZeRO-3's
    gathers would mismatch (they did, before dsft.model.TowerTouch). Tower frozen, the run's
    step-0 evaluation (2 ranks) is also the base's on 1 and 3 ranks (`dsft eval`): the same
    loss, token accuracy and generations on image rows, whatever the shard sizes."""
    from dsft.synthetic import write_colour_task

    base = vlm_dirs("gemma3")
    data = write_colour_task(tmp_path / "c", n=40, seed=2, text_every=2)

    def config(stage: int) -> Path:
        # 5 validation and 3 test rows, image and text: uneven shards on 2 and 3 ranks
        tree = base_config(
            base, data, tmp_path / "run",
            data={"max_len": 64, "val_fraction": 0.125, "test_fraction": 0.075},
            train={"max_steps": 6, "grad_accum": 1, "micro_batch": 1, "fused_loss": True},
            model={"freeze": {"vision": not trained, "projector": not trained}},
            deepspeed={"zero_stage": stage},
            eval={"generate": not trained, "before_training": not trained, "micro_batch": 2,
                  "max_new_tokens": 2},
        )  # fmt: skip
        return write_config(tmp_path / f"c{stage}.yaml", tree)

    proc = run_dsft(["train", str(config(3))], nproc=2, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if trained:
        return
    _check_export(base, tmp_path / "run" / "final")
    two = read_summary(tmp_path / "run")["before"]
    for nproc, stage in ((1, 0), (3, 3)):
        out = tmp_path / f"eval{nproc}"
        cmd = ["eval", str(config(stage)), "--checkpoint", str(base), "--out", str(out)]
        proc = run_dsft(cmd, nproc=nproc, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads((out / "results.json").read_text())
        assert r["val"]["examples"] == 5 and r["test_generation"]["examples"] == 3
        assert r["val"]["tokens"] == two["val"]["tokens"]
        assert r["val"]["loss"] == pytest.approx(two["val"]["loss"], rel=1e-5)
        assert r["val"]["token_acc"] == pytest.approx(two["val"]["token_acc"], rel=1e-9)
        for k in ("exact_match", "f1", "examples"):
            assert r["test_generation"][k] == two["test"][k]
        # greedy decoding about the same images: the same text, sharded and gathered (before
        # Job.tower_toucher / TowerTouch.before_generate, ZeRO-3 on 3 ranks hung here)
        said = [x["prediction"] for x in r["test_generation"]["samples"]]
        assert said == [x["prediction"] for x in two["test"]["samples"]] and len(said) == 3
