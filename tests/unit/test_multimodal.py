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
    inputs.add(batch, splits.train, [0, 1])
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


def _target_logprobs(model, batch: dict[str, torch.Tensor]):
    """The log-probs of the targets (in order) and the gradients of their mean."""
    model.zero_grad()
    batch = dict(batch)
    labels = batch.pop("labels")[:, 1:]
    batch.pop("lengths")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    keep = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep]
    (-lp.mean()).backward()
    return lp.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("family", ["gemma3", "llava"])
def test_packed_image_rows_equal_unpacked(tmp_path: Path, family: str) -> None:
    """Packed image rows (text rows among them) = the same examples unpacked: every
    target's log-prob and every gradient, fp32. Gemma 3 also keeps each image's two-way
    attention inside its example (without dsft's masks its sliding layers leak)."""
    from transformers import AutoConfig

    from dsft.attention import mask_packed_images
    from dsft.data.collate import ImageInputs, collate
    from dsft.data.packing import collate_packed

    model_dir = build_vlm_dir(tmp_path / family, family)
    data = write_colour_task(tmp_path / "c", n=8, seed=3, text_every=3)
    tok, splits = _prepare(model_dir, data, packing=True)
    train, inputs = splits.train, ImageInputs(tok.dsft_processor, 10**7)
    assert sum(bool(train.example(i).images) for i in range(4)) >= 2
    cls = dsft_model.model_class(AutoConfig.from_pretrained(model_dir))
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    plain = collate([train[i] for i in range(4)], tok.pad_token_id)
    inputs.add(plain, train, [0, 1, 2, 3])
    packed = collate_packed([[train[0], train[1]], [train[2], train[3]]], tok.pad_token_id)
    inputs.add(packed, train, [0, 1, 2, 3])
    want, want_grads = _target_logprobs(model, plain)
    if family == "gemma3":  # the test can fail: transformers' own masks leak here
        leaky, _ = _target_logprobs(model, packed)
        assert not torch.allclose(leaky, want, atol=1e-4)
    mask_packed_images(model)  # as dsft.model.load_model does
    got, grads = _target_logprobs(model, packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_multimodal_rope_families_refuse_packed_image_rows(gemma3: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from dsft import data as dsft_data
    from dsft.config import DataConfig, ModelConfig
    from dsft.errors import ConfigError

    for family in ("qwen3_5", "qwen3_5_moe"):
        assert dsft_model.multimodal_rope(vlm_config(family, build_vlm_tokenizer(family)))
    for family in ("gemma3", "llava", "idefics3"):
        assert not dsft_model.multimodal_rope(vlm_config(family, build_vlm_tokenizer(family)))
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    assert dsft_model.multimodal_rope(Qwen2_5_VLConfig())
    assert dsft_model.multimodal_rope(Qwen3VLConfig())
    assert not dsft_model.multimodal_rope(AutoConfig.from_pretrained(gemma3))
    # Qwen's processor needs torchvision: the refusal is shown on Gemma 3's, marked mrope
    tok = dsft_model.load_tokenizer(ModelConfig(path=str(gemma3)))
    tok.dsft_mrope = True
    data = write_colour_task(tmp_path / "c", n=8, seed=3)
    cfg = DataConfig(path=[str(data)], max_len=96, val_fraction=0.0, packing=True)
    with pytest.raises(ConfigError, match=r"data\.packing: 8 rows have images .* multimodal RoPE"):
        dsft_data.prepare(cfg, tok)


def test_a_changed_image_at_the_same_path_rebuilds_the_cache(
    gemma3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache key covers the image files' bytes (the data file holds only their paths):
    an edited image rebuilds, a touched one (same bytes) does not, and a bad image's cached
    error is retried once the image is fixed."""
    import os

    import dsft.data.build as build
    from dsft.errors import DataError

    data = write_colour_task(tmp_path / "c", n=6, seed=3, forms=False)
    cache = {"cache_dir": str(tmp_path / "cache")}
    _prepare(gemma3, data, **cache)
    built = []
    encode = build.encode
    monkeypatch.setattr(build, "encode", lambda *a, **k: built.append(1) or encode(*a, **k))
    image = data.parent / "img" / "red.png"
    good = image.read_bytes()
    os.utime(image, ns=(1, 1))  # new mtime, same bytes: reused
    _prepare(gemma3, data, **cache)
    assert built == []
    from PIL import Image

    Image.new("RGB", (40, 30), (0, 0, 0)).save(image)
    _prepare(gemma3, data, **cache)
    assert built == [1]
    _prepare(gemma3, data, **cache)  # the edited image's entry, now reused
    assert built == [1]
    image.write_bytes(good[:20])
    with pytest.raises(DataError, match=r"red\.png: a truncated or corrupt image"):
        _prepare(gemma3, data, **cache)
    image.write_bytes(good)  # fixed: the recorded error is not raised again
    _prepare(gemma3, data, **cache)


def test_generation_metrics_on_image_rows_see_the_pixels(gemma3: Path, tmp_path: Path) -> None:
    """Generation (EM/F1) on image rows: the prompt is the processor's own layout and its
    pixels reach ``generate``, so the predictions are the model's answers about the picture
    (the same as generating from the processor's inputs directly)."""
    from transformers import AutoModelForImageTextToText

    from dsft.data.collate import ImageInputs
    from dsft.data.readers import open_image
    from dsft.eval.evaluator import generate_predictions, generation_scores

    data = write_colour_task(tmp_path / "c", n=4, seed=3, forms=False)
    tok, splits = _prepare(gemma3, data)
    examples = [splits.train.example(k) for k in range(len(splits.train))]
    model = AutoModelForImageTextToText.from_pretrained(gemma3).eval()
    seen = []
    generate = model.generate
    model.generate = lambda **kw: seen.append(kw) or generate(**kw)
    inputs = ImageInputs(tok.dsft_processor, 10**7)
    preds, _ = generate_predictions(model, tok, examples, 2, 3, False, images=inputs)
    assert all("token_type_ids" in kw for kw in seen)  # Gemma 3's image tokens
    assert sum(kw["pixel_values"].shape[0] for kw in seen) == len(examples) >= 3
    scores = generation_scores([(p["prediction"], p["reference"]) for p in preds])
    assert scores["examples"] == len(examples) and 0 <= scores["f1"] <= 1
    proc = tok.dsft_processor
    for ex, pred in zip(examples, preds, strict=True):
        ask = [{**ex.messages[0], "content": ex.messages[0]["content"].replace(
            "<image>", proc.image_token)}]  # fmt: skip
        text = tok.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
        want = proc(text=[text], images=[[open_image(ex.images[0])]],
                    add_special_tokens=False, return_tensors="pt")  # fmt: skip
        out = generate(**want, max_new_tokens=3, do_sample=False)
        answer = tok.decode(out[0, want["input_ids"].shape[1] :], skip_special_tokens=True)
        assert pred["prediction"] == answer.strip()


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_image_columns_of_parquet_and_saved_datasets(gemma3: Path, tmp_path: Path, form: str):
    """A datasets Image column (embedded bytes) in parquet or a save_to_disk folder: the rows
    train with their images, as the same rows from jsonl do."""
    import datasets
    from PIL import Image

    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "red.png")
    rows = [{"messages": [{"role": "user", "content": "<image>What colour is this?"},
                          {"role": "assistant", "content": "R"}],
             "images": [str(tmp_path / "red.png")]}] * 3  # fmt: skip
    features = datasets.Features(
        {
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    picture = Image.new("RGB", (20, 30), (200, 10, 10))  # no file: datasets embeds its bytes
    ds = datasets.Dataset.from_list([r | {"images": [picture]} for r in rows], features=features)
    path = tmp_path / ("d.parquet" if form == "parquet" else "d")
    ds.to_parquet(str(path)) if form == "parquet" else ds.save_to_disk(str(path))
    (tmp_path / "red.png").unlink()  # the bytes travel in the dataset
    tok, splits = _prepare(gemma3, path)
    soft = tok.convert_tokens_to_ids("<image_soft_token>")
    jsonl = tmp_path / "j.jsonl"
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "red.png")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, want = _prepare(gemma3, jsonl)
    for k in range(len(splits.train)):
        (ref,) = splits.train.example(k).images
        assert ref.startswith("data:image")
        assert soft in splits.train[k].input_ids
        assert splits.train[k].input_ids == want.train[k].input_ids
