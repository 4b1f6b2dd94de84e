"""The errors that end a run (dsft/errors.py): every one has its exit code, a configuration
error lists every problem, and the CLI turns them into one message, never a traceback."""

from __future__ import annotations

import pytest

from dsft.errors import USER_ERRORS, ConfigError, DataError, TrainingDiverged


def test_exit_codes() -> None:
    codes = {e.__name__: e.exit_code for e in USER_ERRORS}
    assert codes["ConfigError"] == codes["DataError"] == codes["HubError"] == 2
    assert codes["TrainingDiverged"] == 3 and codes["ExportError"] == 4
    assert codes["Preempted"] == 75  # EX_TEMPFAIL: a requeued Slurm job resumes


def test_config_error_lists_every_problem() -> None:
    e = ConfigError(["train.lr: must be > 0", "data.path: missing"])
    assert e.problems == ["train.lr: must be > 0", "data.path: missing"]
    assert str(e) == (
        "2 problem(s) in the configuration:\n  - train.lr: must be > 0\n  - data.path: missing"
    )


@pytest.mark.parametrize(
    "error", [ConfigError(["x: bad"]), DataError("d.jsonl:3: bad"), TrainingDiverged("nan")]
)
def test_the_cli_prints_one_message_and_returns_the_code(error, monkeypatch, capsys) -> None:
    from dsft import cli
    from dsft.recipes import plan

    def fail(ns):
        raise error

    monkeypatch.setattr(plan, "main", fail)
    assert cli.main(["plan", "llama-1b"]) == error.exit_code
    err = capsys.readouterr().err
    assert str(error).splitlines()[0] in err and "Traceback" not in err
