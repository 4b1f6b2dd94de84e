"""Config: YAML + dotted overrides, unknown keys and wrong types, validation, batch plan."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dsft.config import (
    Config,
    ConfigError,
    TrainConfig,
    batch_shape,
    load_config,
    parse_overrides,
    save_config,
)


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  path: model\ndata:\n  path: [d.jsonl]\ntrain:\n  lr: 1.0e-4\n")
    return cfg


def test_yaml_and_overrides(valid: Path) -> None:
    cfg = load_config(
        valid,
        [
            "train.lr=2e-5",
            "data.max_len=512",
            "deepspeed.zero_stage=3",
            "train.betas=[0.8,0.95]",
            "eval.generate=false",
        ],
    )
    assert cfg.train.lr == pytest.approx(2e-5)
    assert isinstance(cfg.train.lr, float)
    assert cfg.data.max_len == 512
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.train.betas == [0.8, 0.95]
    assert cfg.eval.generate is False
    # relative paths resolve against the YAML file's directory
    assert Path(cfg.model.path) == valid.parent / "model"
    assert cfg.train.epochs == TrainConfig().epochs  # untouched fields keep defaults


def test_every_problem_reported_at_once(valid: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            valid,
            [
                "train.lrr=1",
                "train.micro_batch=abc",
                "model.bogus=1",
                "train.precision=fp8",
                "nonsense",
            ],
        )
    msg = str(e.value)
    assert len(e.value.problems) == 5, msg
    assert "train.lrr: unknown key" in msg
    assert "train.micro_batch: expected int" in msg
    assert "model.bogus: unknown key" in msg
    assert "train.precision" in msg and "'fp32'" in msg
    assert "expected key=value" in msg


def test_semantic_validation_lists_all(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "deepspeed.zero_stage=5",
                "data.val_fraction=0.6",
                "data.test_fraction=0.5",
                "train.lr=-1",
                "deepspeed.offload_params=true",
            ],
        )
    msg = str(e.value)
    for needle in (
        "model.path: required",
        "data.path: required",
        "zero_stage: 5",
        "must leave examples",
        "train.lr",
        "offload_params: needs",
    ):
        assert needle in msg, needle


def test_bool_is_not_int(valid: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got bool"):
        load_config(valid, ["train.epochs=true"])


def test_unknown_top_level_section(tmp_path: Path, valid: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(valid.read_text() + "optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optimiser: unknown key"):
        load_config(bad)


def test_saved_config_round_trips(valid: Path, tmp_path: Path) -> None:
    cfg = load_config(valid, ["train.lr=3e-4", "model.lora.enabled=true"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_parse_overrides_nested() -> None:
    problems: list[str] = []
    tree = parse_overrides(["a.b.c=1", "a.b.d=x", "e=2.5"], problems)
    assert tree == {"a": {"b": {"c": 1, "d": "x"}}, "e": 2.5}
    assert not problems


def test_batch_plan_derives_accumulation_once() -> None:
    t = TrainConfig(micro_batch=4, grad_accum=3)
    assert batch_shape(t, 2).global_batch == 24
    t = TrainConfig(micro_batch=4, global_batch=64)
    p = batch_shape(t, 2)
    assert (p.micro_batch, p.grad_accum, p.world_size, p.global_batch) == (4, 8, 2, 64)
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_shape(TrainConfig(micro_batch=4, global_batch=20), 3)


def test_defaults_live_in_dataclasses() -> None:
    assert Config().train.max_grad_norm == 1.0
    assert Config().model.trust_remote_code is False


def test_zero_stage_and_micro_batch_auto(valid: Path) -> None:
    cfg = load_config(valid)
    assert cfg.deepspeed.zero_stage == "auto" and cfg.train.micro_batch == 4  # the defaults
    cfg = load_config(valid, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"])
    assert cfg.deepspeed.zero_stage == 2
    # with auto, offloads are requirements the planner honours
    cfg = load_config(valid, ["deepspeed.offload_params=true", "deepspeed.offload_optimizer=true"])
    assert cfg.deepspeed.zero_stage == "auto"
    cfg = load_config(valid, ["train.micro_batch=auto", "train.global_batch=64"])
    assert cfg.train.micro_batch == "auto"
    with pytest.raises(ConfigError) as e:
        load_config(valid, ["deepspeed.zero_stage=automatic", "train.micro_batch=-1"])
    assert "deepspeed.zero_stage: expected int | 'auto', got str 'automatic'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(valid, ["train.micro_batch=auto", "deepspeed.zero_stage=1"])
    assert "train.micro_batch=auto: needs train.global_batch" in str(e.value)
    with pytest.raises(ConfigError, match=r"offload_params: needs deepspeed\.zero_stage=3"):
        load_config(valid, ["deepspeed.zero_stage=2", "deepspeed.offload_params=true"])


# ------------------------------------------------------------------ bad config files


def _bad_file(tmp_path: Path, kind: str) -> Path:
    f = tmp_path / f"{kind}.yaml"
    if kind == "latin1":
        f.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    elif kind == "folder":
        f.mkdir()
    elif kind == "deep":
        f.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "bomb":  # "billion laughs": 9**9 strings once expanded
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
        f.write_text("\n".join([*lines, "train: {lr: *a9}"]) + "\n")
    elif kind == "duplicate":
        f.write_text("train:\n  lr: 1.0e-3\ntrain:\n  epochs: 2\n")
    return f


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("latin1", "not UTF-8 text"),
        ("folder", "is a folder"),
        ("deep", "nested deeper than"),
        ("bomb", "alias bomb"),
        ("duplicate", "duplicate key 'train' on line 3"),
    ],
)
def test_bad_config_files_are_one_line_errors(kind: str, message: str, tmp_path: Path) -> None:
    t0 = time.time()
    with pytest.raises(ConfigError, match=message) as e:
        load_config(_bad_file(tmp_path, kind))
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]
    assert time.time() - t0 < 10


def test_empty_output_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output_dir: required"):
        load_config(None, ["output_dir="])


def test_max_len_above_the_model_context_warns(caplog) -> None:
    from transformers import LlamaConfig

    from dsft.model import warn_beyond_context

    conf = LlamaConfig(max_position_embeddings=128)
    with caplog.at_level("WARNING", logger="dsft"):
        assert not warn_beyond_context(conf, 128)
        assert warn_beyond_context(conf, 512)
    assert "data.max_len=512 is above the model's context of 128 tokens" in caplog.text
