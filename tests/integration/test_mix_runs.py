"""data.mix end to end: proportions reported per source, exact after a kill and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsft.synthetic import generate_tasks, write_tasks

from ..conftest import base_config, read_summary, run_dsft, train_rows, write_config

pytestmark = [pytest.mark.slow]


def test_mix_proportions_and_exact_resume(tiny_model: Path, tmp_path: Path) -> None:
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    write_tasks(big, generate_tasks(n=300, seed=1))
    write_tasks(small, generate_tasks(n=40, seed=2))

    def config(out: Path) -> Path:
        tree = base_config(
            tiny_model,
            big,
            out,
            train={"max_steps": 8, "micro_batch": 4, "grad_accum": 2},
            eval={"generate": False, "before_training": False},
            checkpoint={"every": 3, "keep_last": 1, "export": False},
            logging={"every": 1},
        )
        tree["data"].update(path=[str(big), str(small)], mix=[0.75, 0.25])
        return write_config(out.parent / f"{out.name}.yaml", tree)

    straight = tmp_path / "straight"
    assert run_dsft(["train", str(config(straight))]).returncode == 0
    out = tmp_path / "run"
    cfg = config(out)
    assert run_dsft(["train", str(cfg)], env={"DSFT_FAULT_KILL_AT_STEP": "5"}).returncode != 0
    assert run_dsft(["train", str(cfg)]).returncode == 0

    a, b = train_rows(straight), train_rows(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"], x["step"]  # fp32 on CPU: bit-identical
        assert x["mix/big"] == y["mix/big"] and x["mix/small"] == y["mix/small"]
    mix = read_summary(out)["mix"]
    # 8 steps x 8 samples: 48 from big, 16 from small (the small file is 2 % of the rows)
    assert mix["big"]["drawn"] + mix["small"]["drawn"] == 64
    assert abs(mix["small"]["drawn"] - 16) <= 2 and mix["small"]["target"] == 0.25
    assert b[-1]["mix/small"] == mix["small"]["drawn"]
