"""Exceptions that end a run with a clear message and an exit code, never a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more problems with the run configuration (all listed in the message)."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class DataError(ValueError):
    """A problem with the user's data, located to file, line and field."""

    exit_code = 2


class HubError(ValueError):
    """A Hub name that is neither in the Hugging Face cache nor downloadable (one line)."""

    exit_code = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used safely: code in a pickle, a damaged file, a run
    folder in use or changed settings on resume (one line, naming the file)."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""

    exit_code = 3


class Preempted(RuntimeError):
    """SIGTERM/SIGUSR1 arrived: the run saved a checkpoint and stops, to be resumed."""

    exit_code = 75  # EX_TEMPFAIL: try again later (a requeued Slurm job resumes)


class ExportError(RuntimeError):
    """An exported model would not match the trained one (missing tensor, empty adapter)."""

    exit_code = 4


USER_ERRORS = (
    ConfigError,
    DataError,
    HubError,
    CheckpointError,
    TrainingDiverged,
    Preempted,
    ExportError,
)
