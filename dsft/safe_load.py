"""Checkpoint files are data, never code: every ``.pt`` dsft or DeepSpeed unpickles is read
with ``torch.load(weights_only=True)`` and an explicit allowlist of the Python globals
DeepSpeed writes.

A pickle can name any importable callable (``os.system``) and have the unpickler call it.
``weights_only=True`` refuses every global but tensors, containers and those allowed here;
a refused file is a :class:`~dsft.errors.CheckpointError` naming the file and the global,
unless the user trusts the checkpoint (``--trust-checkpoint``, ``checkpoint.trust``).

The allowlist is what real ZeRO-0/1/2/3 checkpoints of DeepSpeed hold (found with
``torch.serialization.get_unsafe_globals_in_checkpoint``), plus NumPy's array globals for
the RNG files of checkpoints written before dsft stored RNG state as safetensors.
DeepSpeed's own resume reads through :class:`VerifiedCheckpointEngine`, which loads the
same way, and :func:`verify_dir` checks a whole ``step_N`` before DeepSpeed's offline
``zero_to_fp32`` opens it.
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dsft.errors import CheckpointError

# "module.qualname" of each global DeepSpeed (0.15 - 0.19) writes into its checkpoints.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO-1/2/3 optimizer states
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same, with fp16
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO-1/2/3 optimizer states
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 optimizer states
)
# NumPy's RNG state in the rng_rank*.pt files of older dsft checkpoints.
NUMPY_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.Float64DType",
)


def _resolve(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(obj, attr, None)


@functools.cache
def allowed_globals() -> list[Any]:
    """The allowed globals that exist in this environment (their modules import)."""
    return [g for g in map(_resolve, DEEPSPEED_GLOBALS + NUMPY_GLOBALS) if g is not None]


def _allowed_names() -> set[str]:
    return set(DEEPSPEED_GLOBALS + NUMPY_GLOBALS)


def _refused(path: Path, error: Exception) -> CheckpointError:
    """The error for a file ``weights_only`` refused, naming the globals not allowed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: the unpickler's own words
        names = []
    unknown = [n for n in names if n not in _allowed_names()]
    what = ", ".join(unknown) if unknown else str(error).strip().splitlines()[0][:200]
    return CheckpointError(
        f"{path}: refused to unpickle: it names Python code dsft does not allow in a "
        f"checkpoint ({what}). A checkpoint is data; loading this file could run code. Pass "
        "--trust-checkpoint (checkpoint.trust=true) only if you made this checkpoint yourself"
    )


def load(
    path: str | Path, map_location: Any = None, trust: bool = False, mmap: bool = False
) -> Any:
    """``torch.load`` of a checkpoint file that runs no code from it (unless ``trust``)."""
    path = Path(path)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy format cannot be mapped
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot be read, the file is damaged ({first})") from None


def verify(path: str | Path, trust: bool = False) -> None:
    """Refuse ``path`` if unpickling it would call a global outside the allowlist.

    Reads the pickle only: the tensors' storage is memory-mapped, not read."""
    if not trust:
        load(path, map_location="cpu", mmap=True)


def verify_dir(tag_dir: Path, trust: bool = False) -> None:
    """:func:`verify` every ``.pt`` file of a checkpoint tag directory."""
    if trust:
        return
    for f in sorted(tag_dir.rglob("*.pt")):
        verify(f)


class VerifiedCheckpointEngine:
    """DeepSpeed's checkpoint engine with its ``load`` going through :func:`load`.

    Wraps the engine's own (saving, commit, decoupled writers are unchanged)."""

    def __init__(self, inner: Any, trust: bool = False):
        self._inner = inner
        self._trust = trust

    def load(self, path: str, map_location: Any = None) -> Any:
        return load(path, map_location=map_location, trust=self._trust)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def guard_engine(engine: Any, trust: bool = False) -> None:
    """Make DeepSpeed's ``load_checkpoint`` of ``engine`` read through :func:`load`."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is None or isinstance(current, VerifiedCheckpointEngine):
        return
    engine.checkpoint_engine = VerifiedCheckpointEngine(current, trust)
