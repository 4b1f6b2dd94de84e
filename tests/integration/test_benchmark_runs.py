"""lm-eval benchmarks end to end: `dsft eval MODEL --tasks` on 1 and 2 ranks (identical
scores), and a training run's eval.benchmarks (base vs fine-tuned in the summary, the
report and the model card). The tasks are the local YAML tasks in tests/fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import base_config, read_summary, run_dsft, write_config

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval_tasks"


def _scores(out: Path) -> dict:
    res = json.loads((out / "lm_eval_results.json").read_text())
    return {t: {k: v for k, v in m.items() if "," in k} for t, m in res["results"].items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_tasks_on_one_and_two_ranks_give_identical_scores(
    tiny_model: Path, tmp_path: Path
) -> None:
    args = ["eval", str(tiny_model), "--tasks", "dsft_demo_mc,dsft_demo_gen", "--include-path",
            str(TASKS), "--limit", "6", "--batch-size", "1", "--max-new-tokens", "6"]  # fmt: skip
    one = run_dsft([*args, "--out", str(tmp_path / "one")], timeout=600)
    assert one.returncode == 0
    assert "dsft_demo_mc   acc" in one.stdout and "dsft_demo_gen  exact_match" in one.stdout
    two = run_dsft([*args, "--out", str(tmp_path / "two")], nproc=2, timeout=600)
    assert two.returncode == 0
    s1, s2 = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert s1 == s2 and set(s1) == {"dsft_demo_mc", "dsft_demo_gen"}
    meta = json.loads((tmp_path / "two" / "lm_eval_results.json").read_text())["dsft"]
    assert meta["ranks"] == 2 and meta["apply_chat_template"] is True  # the demo model's


@pytest.mark.slow
def test_training_run_reports_base_vs_fine_tuned(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    tree = base_config(
        tiny_model,
        tiny_data,
        out,
        train={"max_steps": 4},
        eval={
            "generate": False,
            "before_training": False,
            "benchmarks": {
                "tasks": ["dsft_demo_mc", "dsft_demo_gen"],
                "include_path": str(TASKS),
                "limit": 4,
                "max_new_tokens": 6,
                "max_drop": 0.0,
            },
        },
        checkpoint={"save_final": False},
    )
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)], timeout=600).returncode == 0
    bench = read_summary(out)["benchmarks"]
    assert set(bench["base"]) == set(bench["tuned"]) == {"dsft_demo_mc", "dsft_demo_gen"}
    rows = {(r["task"], r["metric"]): r for r in bench["rows"]}
    mc = rows[("dsft_demo_mc", "acc")]
    assert mc["delta"] == pytest.approx(mc["tuned"] - mc["base"])
    assert bench["model"] == str(out / "final")
    card = (out / "final" / "README.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in card and "| dsft_demo_mc | acc |" in card
    assert (out / "benchmarks" / "base.json").is_file()
    assert (out / "benchmarks" / "table.md").read_text().startswith("| task | metric | base |")
    from dsft.recipes.report import write_report

    page = write_report([out], tmp_path / "report").read_text()
    assert "<h3>Benchmarks</h3>" in page and "dsft_demo_gen" in page
