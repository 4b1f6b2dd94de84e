"""Loading a config: YAML and dotted overrides, type coercion with every problem collected,
relative paths, and saving the resolved config."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from dsft.config.schema import Config, validate
from dsft.errors import ConfigError


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Literal, typing.Union, types.UnionType):
        return " | ".join(repr(a) if isinstance(a, str) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            sub: list[str] = []
            out = _coerce(value, arg, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        return {
            _coerce(k, key_tp, f"{where} key", problems): _coerce(
                v, val_tp, f"{where}.{k}", problems
            )
            for k, v in value.items()
        }
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # `data.path=file.jsonl` is the common one-element case
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            problems.append(f"{where}: expected null")
        return value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any or isinstance(value, tp):
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, collecting problems."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])] or list(fields)
            problems.append(f"{where}: unknown key (valid keys here: {', '.join(close)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {tp.__name__} fields")
                continue
            kwargs[key] = _build(tp, value, f"{where}.", problems)
        else:
            kwargs[key] = _coerce(value, tp, where, problems)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str], problems: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=2e-5", ...]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=2e-5")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "2e-5" as a string; numbers are what users mean.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value) if any(c in value for c in ".eE") else int(value)
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and dotted overrides.

    Relative paths in the YAML file (``model.path``, ``data.path``) are resolved
    against the file's directory, so a config travels with its data.
    """
    problems: list[str] = []
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError([f"{path}: config file not found"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"])
        _resolve_relative_paths(loaded, path.parent)
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or [], problems))
    cfg = _build(Config, tree, "", problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A Config from saved plain data (e.g. a checkpoint's), type-checked but not validated
    against the file system (the run's data may have moved since)."""
    problems: list[str] = []
    cfg = _build(Config, tree, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute():
            candidate = base / p
            if candidate.exists():
                return str(candidate)
        return p

    model = tree.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = fix(model["path"])
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("path", "val_path", "test_path", "template"):
            if key in data:
                v = data[key]
                data[key] = [fix(p) for p in v] if isinstance(v, list) else fix(v)
    ev = tree.get("eval")
    bench = ev.get("benchmarks") if isinstance(ev, dict) else None
    if isinstance(bench, dict) and "include_path" in bench:
        bench["include_path"] = fix(bench["include_path"])


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved configuration as plain data (what is saved with the run)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML; it loads back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
