"""train.fused_loss (dsft/loss.py) against the full-logits path on DeepSpeed engines: the same
loss and the same gradient of every parameter (fp32, 1e-5), on 1 rank and on 2 ranks at
ZeRO 0, 2 and 3 (the head's weight partitioned), packed and padded, with a tied, untied,
frozen and LoRA(+trained head) model; and whole training runs that log the same steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dsft.distributed import local_launch_argv
from dsft.synthetic import build_model_dir

from ..conftest import ROOT, cpu_env, run_dsft, short_run_config, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = "tests.integration.fused_loss_worker"  # run as a module from the repository root


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shape = {"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False}  # fmt: skip
    return build_model_dir(tmp_path_factory.mktemp("untied") / "m", shape=shape)


@pytest.mark.parametrize(("nproc", "stages"), [(1, "0"), (2, "0,2,3")])
def test_fused_loss_and_every_gradient_equal_full_logits_on_engines(
    nproc: int, stages: str, tiny_model: Path, untied_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    argv = [WORKER, str(tiny_model), str(untied_model), str(tiny_data), str(out), stages]
    cmd = local_launch_argv(nproc, argv)
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert len(report) == 8 * len(stages.split(","))
    for case, r in report.items():
        assert r["loss_fused"] == pytest.approx(r["loss_full"], rel=1e-5), case
        assert r["grad_rel_err"] < 1e-5, (case, r)
        assert r["params_with_grad"] > 0, case
        assert r["head_grad"] == any(v in case for v in ("untied", "lora")), case


def test_training_run_logs_the_same_steps_with_and_without_fused_loss(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """The training loop on 2 ranks at ZeRO-3 with packing: per-step loss and gradient norm
    of fused_loss=true equal fused_loss=false, and validation too."""
    rows = {}
    for fused in (False, True):
        out = tmp_path / f"run{fused}"
        tree = short_run_config(tiny_model, tiny_data, out, 3, 2)
        tree["data"]["packing"] = True
        tree["train"].update(max_steps=3, fused_loss=fused)
        tree["eval"]["before_training"] = True
        cfg = write_config(tmp_path / f"c{fused}.yaml", tree)
        assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
        rows[fused] = (train_rows(out), json.loads((out / "summary.json").read_text()))
    (plain, s_plain), (fused, s_fused) = rows[False], rows[True]
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert [r["grad_norm"] for r in fused] == pytest.approx(
        [r["grad_norm"] for r in plain], rel=1e-5
    )
    for when in ("before", "after"):
        a, b = s_plain[when]["val"], s_fused[when]["val"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens"], b["token_acc"]) == (a["tokens"], a["token_acc"])
