"""Sequence parallelism and tiled compute: the pure pieces (config, batch geometry, slicing,
the whole-row mask, the planner; the tiled MLP: test_tiled_mlp.py). Multi-rank equality:
tests/integration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dsft import planner
from dsft import sequence_parallel as seqpar
from dsft.config import Config, TrainConfig, batch_shape, load_config
from dsft.data.tokenize import IGNORE_INDEX
from dsft.distributed import SequenceParallelGroups
from dsft.errors import ConfigError

GB = 2**30


def _llama(heads: int = 4, kv: int = 4, attn: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _config(tiny_model: Path, tiny_data: Path, *overrides: str) -> Config:
    return load_config(
        None, [f"model.path={tiny_model}", f"data.path={tiny_data}", "output_dir=x", *overrides]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.sequence_parallel=4", "data.max_len=50"],
            "50 is not divisible by train.sequence_parallel=4",
        ),
        (["train.sequence_parallel=3", "data.max_len=48"], "4 attention heads are not divisible"),
        (["train.sequence_parallel=2", "model.attn_implementation=flex_attention"], "flex"),
        (["train.sequence_parallel=0"], "must be >= 1"),
    ],
)
def test_config_refuses_what_cannot_be_split(
    overrides: list[str], message: str, tiny_model: Path, tiny_data: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tiny_model, tiny_data, *overrides)
    assert _config(tiny_model, tiny_data, "train.sequence_parallel=2").train.sequence_parallel == 2
    assert _config(tiny_model, tiny_data, "train.sequence_parallel=auto")


def test_config_refuses_kv_heads_not_divisible(tmp_path: Path, tiny_data: Path) -> None:
    model = tmp_path / "gqa"
    model.mkdir()  # what validation reads: the config.json of a grouped-query model
    (model / "config.json").write_text(
        json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64})
    )
    with pytest.raises(ConfigError, match="2 key/value heads are not divisible by 4"):
        _config(model, tiny_data, "train.sequence_parallel=4")
    _config(model, tiny_data, "train.sequence_parallel=2")


def test_batch_geometry_counts_data_parallel_ranks_only() -> None:
    t = TrainConfig(micro_batch=4, grad_accum=1, sequence_parallel=2)
    p = batch_shape(t, 4)
    assert (p.data_parallel, p.global_batch) == (2, 8)
    p = batch_shape(dataclasses.replace(t, global_batch=16), 4)
    assert (p.grad_accum, p.global_batch, p.sequence_parallel) == (2, 16, 2)
    with pytest.raises(ConfigError, match="does not divide the 3 ranks"):
        batch_shape(t, 3)
    with pytest.raises(ConfigError, match="resolve it"):
        batch_shape(dataclasses.replace(t, sequence_parallel="auto"), 4)


def test_deepspeed_divides_by_data_parallel_ranks_except_zero3() -> None:
    assert seqpar.gradient_divisor(2, 2, 2) == 2
    assert seqpar.gradient_divisor(2, 2, 3) == 4
    assert seqpar.gradient_divisor(4, 1, 3) == 4


def _sp(rank: int, size: int = 2, model: torch.nn.Module | None = None) -> seqpar.SequenceParallel:
    groups = SequenceParallelGroups(size, rank, 1, 0)
    return seqpar.SequenceParallel(groups, model or _llama())


def test_shard_shifts_labels_before_the_split_and_pads_to_a_multiple() -> None:
    ids = torch.arange(14).reshape(2, 7)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt
    micro = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    parts = [_sp(r).shard(micro, labels) for r in range(2)]
    local = [p[0] for p in parts]
    assert all(set(m) == {"input_ids", "position_ids"} for m in local)  # mask rebuilt, not cut
    assert [m["input_ids"].shape[1] for m in local] == [4, 4]  # 7 padded to 8
    whole_ids = torch.cat([m["input_ids"] for m in local], 1)
    assert torch.equal(whole_ids[:, :7], ids)
    positions = torch.cat([m["position_ids"] for m in local], 1)
    assert torch.equal(positions, torch.arange(8).expand(2, 8))  # global positions (RoPE)
    targets = torch.cat([p[1] for p in parts], 1)
    assert torch.equal(targets[:, :6], labels[:, 1:])  # the token after the cut counted once
    assert (targets[:, 6:] == IGNORE_INDEX).all()
    # one rank: the micro-batch whole, targets aligned with its positions
    whole, t = _sp(0, size=1).shard(micro, labels)
    assert whole is micro and torch.equal(t[:, :-1], labels[:, 1:])


def test_whole_row_mask_is_transformers_packed_mask() -> None:
    """The mask attention gets after the exchange is the one transformers builds for the
    unsplit packed row (causal, within each example), and none for unpacked sdpa rows."""
    from transformers.masking_utils import create_causal_mask

    model = _llama()
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]])
    sp = _sp(0, model=model)
    sp.shard({"input_ids": torch.zeros_like(pos), "position_ids": pos}, torch.zeros_like(pos))
    ours = sp.row_mask(torch.float32)
    theirs = create_causal_mask(model.config, torch.zeros(2, 8, 32), None, None, position_ids=pos)
    assert ours is not None and torch.equal(ours, theirs.expand_as(ours))
    sp.shard({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, torch.zeros(2, 8).long())
    assert sp.row_mask(torch.float32) is None  # unpacked: sdpa's causal kernel
    eager = _sp(0, model=_llama(attn="eager"))
    eager.shard({"input_ids": torch.zeros_like(pos), "position_ids": pos}, torch.zeros_like(pos))
    additive = eager.row_mask(torch.float32)
    assert additive is not None and torch.equal(additive == 0, theirs.expand_as(additive))


def test_sequence_parallel_refuses_heads_it_cannot_split() -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        _sp(0, size=4, model=_llama(heads=4, kv=2))


# --------------------------------------------------------------------------- planner


def test_planner_divides_activations_by_the_degree_and_tiling_cuts_them() -> None:
    f = planner.model_facts("llama-8b")
    w = planner.Workload(seq=65536, global_batch=8, micro_batch=1, checkpointing=True)
    act1, logits1 = planner.activation_bytes(f, w)
    act4, logits4 = planner.activation_bytes(f, dataclasses.replace(w, sequence_parallel=4))
    assert act4 == act1 // 4 and logits4 == logits1 // 4
    tiled = dataclasses.replace(w, sequence_parallel=4, tiled_mlp=True, chunked_loss=True)
    act_t, logits_t = planner.activation_bytes(f, tiled)
    # the fused loss keeps no logits per sequence: one chunk per micro-batch (loss_bytes)
    assert act_t < act4 and logits_t == 0 < planner.loss_bytes(f, tiled) < logits4 // 8


def test_smallest_degree_that_fits_and_auto_resolution() -> None:
    f = planner.model_facts("llama-8b")
    hw = planner.Hardware(8, 1, 80 * GB)
    w = planner.Workload(seq=131072, global_batch=8, micro_batch=1, checkpointing=True)
    assert planner.sp_degrees(f, hw, w.seq) == [1, 2, 4, 8]
    assert planner.choose(f, hw, w).choice is None  # whole rows do not fit
    plan = planner.smallest_sp(f, hw, w)
    assert plan is not None and plan.choice is not None
    n = plan.workload.sequence_parallel
    assert (
        n > 1
        and planner.choose(f, hw, dataclasses.replace(w, sequence_parallel=n // 2)).choice is None
    )
    # deepspeed.zero_stage=auto with train.sequence_parallel=auto picks the degree too
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, max_len=131072),
        model=dataclasses.replace(cfg.model, gradient_checkpointing=True),
        train=dataclasses.replace(
            # the full-logits loss, as the Workload above (the fused loss needs fewer ranks)
            cfg.train,
            micro_batch=1,
            global_batch=8,
            sequence_parallel="auto",
            fused_loss=False,
        ),
    )
    resolved, record = planner.resolve(cfg, hw, facts=f)
    assert resolved.train.sequence_parallel == n == record.sequence_parallel
    assert record.micro_batch * record.grad_accum * 8 // n == 8
    table = planner.render_sequence_parallel([f], hw, w)
    assert f"llama-8b    SP {n}" in table and "tiled" in table


def test_plan_command_shows_the_degrees_for_long_rows(capsys: pytest.CaptureFixture) -> None:
    from dsft.cli import main

    assert main(["plan", "--seq", "131072", "--gpus", "8", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "sequence parallelism at seq 131072" in out
    assert all(name in out for name in planner.SHAPES)


def test_long_seq_benchmark_table_relates_growth_to_whole_rows(tmp_path: Path) -> None:
    from benchmarks.seq_parallel_scaling import table, write_rows

    write_rows(tmp_path / "rows.jsonl", 64, 2)
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [len(r["text"]) for r in rows] == [64, 64]
    points = [
        {"seq": s, "sp": sp, "tiled": False, "step_s": 1.0, "peak_gib": peak}
        for s, sp, peak in [(256, 1, 0.5), (256, 2, 0.5), (4096, 1, 1.5), (4096, 2, 1.0)]
    ]
    out = table(points, [(1, False), (2, False)], 256)
    assert "| 4096 | SP=2 | 1.0 | 1.00 | 0.50 | 0.50 |" in out
