"""Multimodal checkpoints: the class that loads them, the tower / projector / language split,
freezing defaults, LoRA targets, layer decay and the planner's counts, on meta models of
transformers' own classes (nothing is allocated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dsft import model as dsft_model
from dsft import optim, planner
from dsft.config import FreezeConfig, LoraConfig, TrainConfig
from dsft.flops import text_config
from dsft.synthetic import (
    build_vlm_dir,
    build_vlm_tokenizer,
    vlm_class,
    vlm_config,
    write_colour_task,
)


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


@pytest.mark.parametrize("family", ["gemma3", "llava"])
@pytest.mark.parametrize("trained", [False, True], ids=["tower-frozen", "tower-trained"])
def test_planner_counts_the_tower(family: str, trained: bool) -> None:
    """Memory: the tower's weights always, its gradients and optimizer state only when it
    trains; FLOPs per token leave it out (it runs per image)."""
    from dsft.planner.memory import Option, model_states

    config = vlm_config(family, build_vlm_tokenizer(family))
    freeze = FreezeConfig(vision=not trained, projector=not trained)
    facts = planner.model_facts(config, freeze=freeze)
    model = _meta(family)  # the real model of the config, on the meta device
    everything = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for n, p in model.named_parameters() if dsft_model.part(n) != "language")
    assert tower and facts.total_params == everything
    assert facts.tower_params == tower
    assert facts.trainable_params == everything - (0 if trained else tower)
    assert facts.tower_trainable == (tower if trained else 0)
    assert facts.active == (everything - tower, everything - tower)
    assert (facts.layers, facts.hidden) == (2, 32)
    hw = planner.Hardware(gpus_per_node=1, nodes=1, gpu_mem=80 * 2**30)
    held, step, _ = model_states(facts, Option(0), hw, "bf16")
    # bf16 weights of everything; bf16 gradients, fp32 master + Adam (12) and the step's
    # fp32 gradients (4) of the trainable parameters only
    assert (held, step) == (
        2 * everything + 14 * facts.trainable_params,
        4 * facts.trainable_params,
    )


def test_tower_flops_count_per_image_patch_not_per_token() -> None:
    """A 32-pixel Gemma 3 picture is 16 patches of 8 pixels; the tower's FLOPs follow the
    patches (forward only when frozen) and the language model's the tokens."""
    from dsft.flops import FlopCounter, image_patches, tower, train_flops

    model = _meta("gemma3")
    cfg = model.config
    dsft_model.freeze(model, FreezeConfig())
    frozen = dsft_model.part_params(model)
    t = tower(cfg, frozen)
    assert t is not None and (t.layers, t.hidden, t.patch) == (2, 32, 8)
    (nv, _), (np_, _), (nl, nlt) = frozen["vision"], frozen["projector"], frozen["language"]
    micro = {"pixel_values": torch.zeros(3, 3, 32, 32)}  # three images
    assert image_patches(micro, t) == (48, 3 * 16**2)
    assert image_patches({"input_ids": torch.zeros(2, 5)}, t) == (0, 0)
    # Qwen-VL's layout: flattened patches, t·h·w of them per image in image_grid_thw
    grid = {
        "pixel_values": torch.zeros(20, 384),
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 4, 4]]),
    }
    assert image_patches(grid, t) == (20, 4**2 + 16**2)
    counter = FlopCounter(nl + nv + np_, nlt, cfg, 0.0, t)
    text = train_flops(nl, nlt, 2, 32, 100, 2000)
    assert counter.flops(100, 2000) == text  # no image: no tower FLOPs at all
    forward = 2 * (nv + np_) * 48 + 4 * 2 * 32 * 768
    assert counter.flops(100, 2000, 48, 768) == text + forward
    trained = tower(cfg, {**frozen, "vision": (nv, nv), "projector": (np_, np_)})
    assert trained is not None
    full = 6 * (nv + np_) * 48 + 12 * 2 * 32 * 768  # the usual 6·N·P when all of it trains
    assert trained.flops(48, 768) == full
    assert tower(text_config(cfg), frozen) is None  # a text model has no tower


# ------------------------------------------------------------------------ image rows


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vlm_dir(tmp_path_factory.mktemp("vlm") / "gemma3", "gemma3")


def _prepare(model_dir: Path, data: Path, **data_cfg):
    from dsft import data as dsft_data
    from dsft.config import DataConfig, ModelConfig

    tok = dsft_model.load_tokenizer(ModelConfig(path=str(model_dir)))
    cfg = DataConfig(path=[str(data)], max_len=96, val_fraction=0.0, **data_cfg)
    return tok, dsft_data.prepare(cfg, tok)


def test_image_rows_are_rendered_by_the_processor_and_never_trained(
    gemma3: Path, tmp_path: Path
) -> None:
    """Token layout = the processor's own output for the rendered row; only the answer (and
    the turn end) carries loss; the batch gets the processor's pixels and token types."""
    from dsft.data.collate import ImageInputs, collate
    from dsft.data.readers import open_image

    data = write_colour_task(tmp_path / "c", n=12, seed=3)
    tok, splits = _prepare(gemma3, data)
    proc = tok.dsft_processor
    soft = tok.convert_tokens_to_ids("<image_soft_token>")
    for k in range(len(splits.train)):
        ex, item = splits.train.example(k), splits.train[k]
        (ref,) = ex.images
        assert Path(ref).is_absolute() or ref.startswith("data:")
        messages = [{**m, "content": m["content"].replace("<image>", proc.image_token)}
                    for m in ex.messages]  # fmt: skip
        text = tok.apply_chat_template(messages, tokenize=False)
        want = proc(text=[text], images=[[open_image(ref)]], add_special_tokens=False)
        assert item.input_ids == list(want["input_ids"][0])
        trained = [t for t, y in zip(item.input_ids, item.labels, strict=True) if y != -100]
        assert tok.decode(trained) == ex.messages[-1]["content"] + "<|end|>"
        assert soft in item.input_ids
    inputs = ImageInputs(proc, 10**7)
    batch = collate([splits.train[0], splits.train[1]], tok.pad_token_id)
    inputs.add(batch, splits.train, [0, 1], packed=False)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == soft).long())


def _bad_corpus(folder: Path) -> Path:
    import base64
    import io

    from PIL import Image

    folder.mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "ok.png")
    good = (folder / "ok.png").read_bytes()
    (folder / "trunc.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("not an image")
    Image.new("L", (400, 300)).save(folder / "big.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def row(content, images=None):
        r = {"messages": [{"role": "user", "content": content},
                          {"role": "assistant", "content": "ok"}]}  # fmt: skip
        return r | ({"images": images} if images is not None else {})

    part = lambda p: [{"type": "image", "path": p}, {"type": "text", "text": "?"}]  # noqa: E731
    rows = [
        row(part("ok.png")),  # 1 good
        row(part("missing.png")),  # 2
        row(part("trunc.png")),  # 3
        row(part("text.png")),  # 4
        row(part("big.png")),  # 5 above the pixel limit
        row("<image><image>two placeholders", ["ok.png"]),  # 6 mismatch
        row([{"type": "image", "url": uri}, {"type": "text", "text": "?"}]),  # 7 good
        row([{"type": "image", "url": "data:image/png;base64,@@@"}]),  # 8 bad URI
    ]
    path = folder / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (2, r"image 1: .*missing\.png: no such image file"),
        (3, r"image 1: .*trunc\.png: a truncated or corrupt image"),
        (4, r"image 1: .*text\.png: not an image"),
        (5, r"image 1: .*big\.png: 400x300 = 120,000 pixels, above data\.max_image_pixels"),
        (6, r"2 image placeholder\(s\) \('<image>'\) but 1 image\(s\)"),
        (8, r"image 1: a data: URI: not a valid data: URI"),
    ],
)
def test_bad_images_are_located_errors(gemma3: Path, tmp_path: Path, line: int, message: str):
    from dsft.errors import DataError

    path = _bad_corpus(tmp_path / "bad")
    one = path.parent / "one.jsonl"  # its images are relative to this folder
    one.write_text(path.read_text().splitlines(keepends=True)[line - 1])
    with pytest.raises(DataError, match=rf"one\.jsonl:1: {message}"):
        _prepare(gemma3, one, max_image_pixels=100_000)


def test_bad_images_are_counted_skips(gemma3: Path, tmp_path: Path) -> None:
    path = _bad_corpus(tmp_path / "bad")
    _, splits = _prepare(gemma3, path, max_image_pixels=100_000, on_bad_row="skip")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 2
    assert splits.stats["skipped_rows"] == 6


def test_image_row_on_a_text_only_model_names_both(tiny_model: Path, tmp_path: Path) -> None:
    from dsft.errors import DataError

    data = write_colour_task(tmp_path / "c", n=4, seed=3)
    with pytest.raises(
        DataError, match=r"data\.jsonl:1: the row has an image, but the model is text-only"
    ):
        _prepare(tiny_model, data)


def test_image_rows_are_not_packed(gemma3: Path, tmp_path: Path) -> None:
    from dsft.errors import DataError

    data = write_colour_task(tmp_path / "c", n=8, seed=3)
    with pytest.raises(DataError, match=r"data\.packing: 8 rows have images"):
        _prepare(gemma3, data, packing=True)
