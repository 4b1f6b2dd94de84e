"""lm-evaluation-harness benchmarks (dsft/eval/harness.py): task folders, Hub-cached tasks
offline, the base vs fine-tuned table and its forgetting flag, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dsft.cli import main
from dsft.errors import ConfigError, HubError
from dsft.eval import harness

from .test_hub import hub_repo

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "lm_eval_tasks"


def test_task_folder_data_files_resolve_against_the_yaml(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "t.yaml").write_text(
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\n"
        "process_docs: !function utils.process\n"
    )
    out = Path(harness._resolved_tasks_folder(str(src), tmp_path / "copy"))
    loader, _ = harness._yaml_codecs()
    doc = yaml.load((out / "sub" / "t.yaml").read_text(), Loader=loader)  # a SafeLoader
    assert doc["dataset_kwargs"]["data_files"]["test"] == str((src / "sub" / "d.jsonl").resolve())
    tag = doc["process_docs"]  # lm-eval's !function tag kept as written
    assert (tag.tag, tag.value) == ("!function", "utils.process")
    assert "d.jsonl\n" in (src / "sub" / "t.yaml").read_text()  # the user's file untouched


def test_scores_compare_and_forgetting() -> None:
    results = {
        "results": {
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                      "exact_match_stderr,strict-match": 0.1},
            "arc_easy": {"acc,none": 0.7, "acc_norm,none": 0.72, "acc_stderr,none": 0.01},
        }
    }  # fmt: skip
    base = harness.scores(results)
    assert base == {
        "gsm8k": {"exact_match,strict-match": 0.5},
        "arc_easy": {"acc": 0.7, "acc_norm": 0.72},
    }
    tuned = {"gsm8k": {"exact_match,strict-match": 0.6}, "arc_easy": {"acc": 0.6, "acc_norm": 0.71}}
    rows, forgot = harness.compare(base, tuned, max_drop=0.02)
    assert forgot == ["arc_easy acc: 0.7000 -> 0.6000 (-0.1000)"]  # acc_norm: -0.01 is allowed
    assert {(r["task"], r["metric"]): round(r["delta"], 4) for r in rows} == {
        ("arc_easy", "acc"): -0.1,
        ("arc_easy", "acc_norm"): -0.01,
        ("gsm8k", "exact_match,strict-match"): 0.1,
    }
    text = harness.table(rows)
    assert text.splitlines()[0].split() == ["task", "metric", "base", "fine-tuned", "delta"]
    assert "| gsm8k | exact_match,strict-match | 0.5000 | 0.6000 | +0.1000 |" in harness.table(
        rows, markdown=True
    )


def test_backend_choice_and_missing_vllm() -> None:
    with pytest.raises(ConfigError, match=r"vLLM"):
        harness.choose_backend("vllm")  # not installed here
    assert harness.choose_backend("auto") == "hf"  # no GPU


def test_cli_eval_errors_exit_2(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """An unknown task (neither lm-eval's nor in --include-path) is named before any model
    loads; `dsft eval CONFIG` with neither --checkpoint nor --tasks says what it needs."""
    rc = main(["eval", str(tiny_model), "--tasks", "dsft_demo_mc,nope_task",
               "--include-path", str(TASKS)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "task 'nope_task': not an lm-eval task" in err and "Traceback" not in err
    assert "dsft_demo_mc" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}, "data": {"path": ["x"]}}))
    assert main(["eval", str(cfg)]) == 2  # neither --checkpoint nor --tasks
    assert "needs --checkpoint" in capsys.readouterr().err


def test_hub_cached_task_runs_offline_and_a_missing_one_is_one_line(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose dataset_path is a Hub name reads the dataset's snapshot in a Hub cache
    laid out as the Hub lays it out (blobs/, snapshots/<commit>/, refs/main), offline."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    rows = (TASKS / "data" / "demo_mc.jsonl").read_bytes()
    hub_repo(cache, "dsft-test/demo-mc", {"data/test.jsonl": rows}, "dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = yaml.safe_load((TASKS / "dsft_demo_mc.yaml").read_text())
    spec.update(task="hub_mc", dataset_path="dsft-test/demo-mc")
    del spec["dataset_kwargs"]
    (folder / "hub_mc.yaml").write_text(yaml.safe_dump(spec))
    spec.update(task="hub_missing", dataset_path="dsft-test/absent")
    (folder / "hub_missing.yaml").write_text(yaml.safe_dump(spec))

    opts = harness.HarnessOptions(tasks=["hub_mc"], include_path=str(folder), limit=4)
    manager = harness.prepare_tasks(opts, tmp_path / "w1")
    res = harness.evaluate_dir(tiny_model, opts, manager)
    assert res is not None and res["results"]["hub_mc"]["sample_len"] == 4
    assert 0.0 <= harness.scores(res)["hub_mc"]["acc"] <= 1.0

    opts = harness.HarnessOptions(tasks=["hub_missing"], include_path=str(folder), limit=4)
    with pytest.raises(HubError) as e:
        harness.evaluate_dir(tiny_model, opts, harness.prepare_tasks(opts, tmp_path / "w2"))
    msg = str(e.value)
    assert msg.startswith("tasks hub_missing: dataset 'dsft-test/absent' is not in the Hugging")
    assert "\n" not in msg


def test_sweep_ranks_on_a_benchmark_metric(tmp_path: Path) -> None:
    from dsft.recipes import sweep

    summary = {"benchmarks": {"tuned": {"gsm8k": {"exact_match,strict-match": 0.25}}}}
    assert sweep._final(summary, "bench/gsm8k/exact_match,strict-match") == 0.25
    assert sweep._final(summary, "bench/gsm8k/acc") is None
    bad = tmp_path / "s.yaml"
    bad.write_text(json.dumps({"parameters": {"train.lr": [1e-3]}, "metric": "bench/gsm8k"}))
    with pytest.raises(ConfigError, match="bench/<task>/<metric>"):
        sweep.load_sweep(bad)
