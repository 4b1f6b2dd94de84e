"""Sequence parallelism (train.sequence_parallel) against one plain process, on real ranks.

Every run trains on the same global batches, so the losses, gradient norms and the final
validation metrics of a run whose rows are split over 2 ranks (and of 2 x 2 ranks) must equal
those of one process holding whole rows: fp32, 1e-5 relative. The runs are shared by the
assertions (module-scoped), so the suite pays for each once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dsft.synthetic import DEMO_DATA, build_model_dir

from ..conftest import base_config, read_summary, run_dsft, train_rows, weights, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REL = 1e-5


def _config(model: Path, data: Path, out: Path, packed: bool, **train: Any) -> dict[str, Any]:
    # Packed: the demo model on rows of 4x the demo's max_len (64), 2 rows per step, full
    # fine-tuning, exported. Unpacked: the tiny model with LoRA (no dropout: the ranks of a
    # group would draw different masks) on padded examples, 8 per step.
    return base_config(
        model,
        data,
        out,
        data={"packing": True, "max_len": 256, "val_size": 32, "test_size": 8} if packed else {},
        train={
            "max_steps": 4 if packed else 6,
            "global_batch": 2 if packed else 8,
            "micro_batch": 1 if packed else 4,
            **train,
        },
        model={} if packed else {"lora": {"enabled": True, "r": 4, "dropout": 0.0}},
        deepspeed={"zero_stage": 0},
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 3, "keep_last": 1, "save_final": False, "export": packed},
        logging={"every": 1},
    )


def _run(tmp: Path, tree: dict[str, Any], nproc: int, *overrides: str, env=None) -> Path:
    cfg = write_config(tmp / "c.yaml", tree)
    proc = run_dsft(["train", str(cfg), *overrides], nproc=nproc, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(tree["output_dir"])


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("demo") / "model")  # the demo's shape


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tiny_data: Path, demo_model: Path, tmp_path_factory) -> dict:
    """name -> output dir. ``ref-*``: one process, whole rows."""
    out: dict[str, Path] = {}

    def run(name: str, packed: bool, nproc: int, *overrides: str) -> None:
        tmp = tmp_path_factory.mktemp(name)
        model, data = (demo_model, DEMO_DATA) if packed else (tiny_model, tiny_data)
        out[name] = _run(tmp, _config(model, data, tmp / "run", packed), nproc, *overrides)

    run("ref-unpacked", False, 1)
    run("ref-packed", True, 1)
    run("sp2-zero2-unpacked", False, 2, "train.sequence_parallel=2", "deepspeed.zero_stage=2")
    run("sp2-zero3-packed-tiled", True, 2, "train.sequence_parallel=2",
        "deepspeed.zero_stage=3", "model.tiled_mlp=true")  # fmt: skip
    run("sp2xdp2-zero3-packed", True, 4, "train.sequence_parallel=2", "deepspeed.zero_stage=3")
    return out


def _steps(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in train_rows(run)}


def _assert_same_steps(a: Path, b: Path, rel: float = REL) -> None:
    sa, sb = _steps(a), _steps(b)
    assert sorted(sa) == sorted(sb)
    for step in sa:
        for key in ("loss", "grad_norm"):
            assert sb[step][key] == pytest.approx(sa[step][key], rel=rel), (step, key)


@pytest.mark.parametrize(
    ("run", "ref"),
    [
        ("sp2-zero2-unpacked", "ref-unpacked"),
        ("sp2-zero3-packed-tiled", "ref-packed"),
        ("sp2xdp2-zero3-packed", "ref-packed"),
    ],
)
def test_split_rows_train_like_whole_rows(runs: dict, run: str, ref: str) -> None:
    """Each step's loss and gradient norm, and the validation metrics (computed on whole rows,
    shared out over all ranks) equal the reference's."""
    _assert_same_steps(runs[ref], runs[run])
    got, want = read_summary(runs[run]), read_summary(runs[ref])
    for key in ("loss", "token_acc"):
        assert got["after"]["val"][key] == pytest.approx(want["after"]["val"][key], rel=REL)
    assert got["sequence_parallel"] == (2 if run.startswith("sp2") else 1)
    assert got["global_batch"] == want["global_batch"]


def test_packed_rows_split_at_4x_demo_length(runs: dict) -> None:
    """Done-when: the demo model trains on rows of 4x the demo's max_len split over 2 ranks."""
    rows = train_rows(runs["sp2-zero3-packed-tiled"])
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    text = (runs["sp2-zero3-packed-tiled"] / "config.yaml").read_text()
    assert "sequence_parallel: 2" in text and "max_len: 256" in text


def test_kill_then_resume_is_bit_identical_and_resumes_onto_another_degree(
    runs: dict, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Killed after step 5 (checkpoint at 3): resuming with the same degree replays steps 4-6
    bit for bit; resuming the same checkpoint without sequence parallelism (2 data-parallel
    ranks, same ZeRO partitioning, so DeepSpeed loads it as saved) continues the same run."""
    straight = runs["sp2-zero2-unpacked"]
    tree = _config(tiny_model, tiny_data, tmp_path / "run", False)
    sp2 = ("train.sequence_parallel=2", "deepspeed.zero_stage=2")
    cfg = write_config(tmp_path / "c.yaml", tree)
    killed = run_dsft(["train", str(cfg), *sp2], nproc=2, env={"DSFT_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"
    shutil.copytree(tmp_path / "run", tmp_path / "other")

    resumed = _run(tmp_path, tree, 2, *sp2)
    a, b = _steps(straight), _steps(resumed)
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert b[step]["loss"] == a[step]["loss"], step  # fp32 on CPU: bit-identical
        assert b[step]["grad_norm"] == a[step]["grad_norm"], step

    tree["output_dir"] = str(tmp_path / "other")
    other = _run(tmp_path, tree, 2, "train.sequence_parallel=1", "deepspeed.zero_stage=2")
    c = _steps(other)
    for step in range(4, 7):
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=REL), step


def test_export_of_a_split_run_matches_the_whole_row_run(runs: dict) -> None:
    a = weights(runs["ref-packed"] / "final")
    b = weights(runs["sp2-zero3-packed-tiled"] / "final")
    assert sorted(a) == sorted(b)
    for k in a:  # Adam turns fp-noise-sized gradients into lr-sized steps: compare norms
        assert float((b[k] - a[k]).norm() / a[k].norm()) < 1e-4, k
