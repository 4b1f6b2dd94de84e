"""Hugging Face Hub names for models (``model.path``) and datasets (``data.path`` entries).

A name resolves to a snapshot directory in the standard Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``, the layout ``models--org--name/snapshots/<commit>/...``): downloaded when the
Hub is reachable, read from the cache when it is not or when ``HF_HUB_OFFLINE=1``. A name that
is neither cached nor reachable is a one-line HubError (exit 2).

In a multi-rank job one process per node (local rank 0) downloads; the others wait for it,
polling a lock file next to the cache (dsft/locks.py, as the tokenisation cache does), so a
long download never runs into a collective's timeout.

Dataset names take options as a query: ``org/name?config=c&split=train&revision=v1``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dsft import locks
from dsft.config import is_hub_id
from dsft.errors import ConfigError, DataError, HubError

log = logging.getLogger("dsft")

# Weight formats dsft never loads: not downloaded with a model.
_SKIP = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*"]


@dataclass(frozen=True)
class HubDataset:
    """A ``data.path`` entry naming a Hub dataset."""

    repo: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


# A Hub revision: a branch or tag name, a commit, or refs/pr/N (git's ref name rules, as the
# Hub applies them: no "..", no leading or trailing "/", no control or special characters).
_REVISION = re.compile(r"^(?!/)(?!.*\.\.)(?!.*//)[\w.\-/]{1,200}(?<![/.])$")
_NAME = re.compile(r"^[\w.\-]{1,200}$")  # a dataset config or split name


def check_revision(revision: str | None, where: str) -> list[str]:
    """Problems with a Hub revision (none for a branch, tag, commit or refs/pr/N)."""
    if revision and not _REVISION.match(revision):
        return [f"{where}: {revision!r} is not a Hub revision (a branch, tag, commit or refs/pr/N)"]
    return []


def parse_dataset(spec: str) -> HubDataset:
    repo, _, query = spec.partition("?")
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(q) - {"config", "split", "revision"})
    if unknown:
        raise ConfigError(
            [
                f"data.path: {spec!r}: unknown option(s) {', '.join(unknown)} (config, split, revision)"
            ]
        )
    problems = check_revision(q.get("revision"), f"data.path: {spec!r}: revision")
    problems += [
        f"data.path: {spec!r}: {k}={q[k]!r} is not a config or split name"
        for k in ("config", "split")
        if q.get(k) and not _NAME.match(q[k])
    ]
    if problems:
        raise ConfigError(problems)
    return HubDataset(repo, q.get("config") or None, q.get("split") or "train", q.get("revision"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _download(repo: str, repo_type: str, revision: str | None, local_only: bool) -> str:
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"repo_type": repo_type, "revision": revision or None}
    if repo_type == "model":
        kwargs["ignore_patterns"] = _SKIP
        if not local_only:
            kwargs["ignore_patterns"] = _SKIP + _duplicate_weights(repo, revision)
    try:
        return snapshot_download(repo, local_files_only=local_only or _offline(), **kwargs)
    except Exception as e:  # not cached, not found, no network, gated: one line either way
        where = f"{repo}@{revision}" if revision else repo
        if _offline() or local_only:
            why = f"HF_HUB_OFFLINE=1 is set ({type(e).__name__})"
        else:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            why = f"the Hub could not provide it ({type(e).__name__}: {first})"
        raise HubError(
            f"{repo_type} {where!r} is not in the Hugging Face cache ({_cache_dir()}) and {why}"
        ) from None


def _duplicate_weights(repo: str, revision: str | None) -> list[str]:
    """PyTorch .bin weights when the repo also has safetensors (never load both)."""
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(repo, revision=revision or None)
    except Exception:  # offline or refused: snapshot_download reports it
        return []
    return ["*.bin", "*.pt", "*.pth"] if any(f.endswith(".safetensors") for f in files) else []


def _is_builder() -> bool:
    from dsft.distributed import discover

    return discover().local_rank == 0


def snapshot(repo: str, repo_type: str = "model", revision: str | None = None) -> str:
    """The local snapshot directory of a Hub repository (see the module docstring)."""
    problems = check_revision(revision, f"{repo_type} {repo!r}: revision")
    if problems:
        raise ConfigError(problems)
    # Lock and error files are named by a hash: a revision (refs/pr/1) or a name never
    # becomes a path of its own.
    key = hashlib.sha256(f"{repo_type}|{repo}|{revision or 'main'}".encode()).hexdigest()[:32]
    name = f"{repo_type}s--{key}"
    lock_dir = _cache_dir() / ".dsft-locks"
    lock, error = lock_dir / f"{name}.lock", lock_dir / f"{name}.error"
    if _is_builder():
        lock_dir.mkdir(parents=True, exist_ok=True)
        # held: another node's builder on a shared cache; wait for it like the others
        if locks.create(lock):
            error.unlink(missing_ok=True)
            try:
                return _download(repo, repo_type, revision, local_only=False)
            except HubError as e:
                error.write_text(str(e))  # the waiting ranks raise the same line
                raise
            finally:
                lock.unlink(missing_ok=True)
    waited = 0.0
    while lock.exists() and not locks.is_stale(lock):
        time.sleep(0.2)
        waited += 0.2
        if int(waited * 5) % 300 == 0:  # once a minute
            log.info("hub: waiting for local rank 0 to download %s", repo)
    if error.is_file() and not lock.exists():
        try:
            return _download(repo, repo_type, revision, local_only=True)
        except HubError:
            raise HubError(error.read_text()) from None
    return _download(repo, repo_type, revision, local_only=True)


def model_path(path: str, revision: str = "") -> str:
    """``model.path`` as a local directory: itself, or the Hub snapshot it names."""
    if not is_hub_id(path):
        return path
    return snapshot(path, "model", revision or None)


def dataset_snapshot(spec: str) -> tuple[HubDataset, str]:
    """A Hub dataset name's options and its local snapshot directory."""
    d = parse_dataset(spec)
    return d, snapshot(d.repo, "dataset", d.revision)


def dataset_digest(spec: str) -> str:
    """What identifies a Hub dataset's rows: the snapshot (its commit) and the options."""
    d, local = dataset_snapshot(spec)
    return hashlib.sha256(f"{Path(local).resolve()}|{d.config}|{d.split}".encode()).hexdigest()


def dataset_rows(spec: str) -> Any:
    """The rows of a Hub dataset split (a ``datasets.Dataset``), read from its snapshot."""
    d, local = dataset_snapshot(spec)
    import datasets

    try:
        return datasets.load_dataset(local, name=d.config, split=d.split)
    except Exception as e:  # unknown config or split, unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{spec}: cannot read the dataset ({type(e).__name__}: {first})") from None
