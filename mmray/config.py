"""The config engine: dataclass schemas from plain data, YAML includes, `key=value` overrides.

It knows nothing of mmray: each layer owns its schemas (a dataset source its config, a method its
`Config`, the training loop, the sweep and the report theirs) and this module turns YAML into them.
Every problem in a config is gathered into one `ConfigError` that names each key path and what is
accepted, and it is raised before any work starts (no Ray, no data, no MLflow touched).

A schema is a dataclass with a comment per field; `bounds(...)` in a field's metadata bounds a
number, `path_field()` marks a local path, and an optional `validate(path, errors)` method adds
checks that span fields.

YAML files may carry `include: [other.yaml, ...]` in any mapping; included files are merged first
(paths relative to the including file), then the mapping's own keys on top.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """All problems found in one config, one per line, each naming its key path."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n  - " + "\n  - ".join(errors))


def bounds(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def path_field(default: str = "") -> Any:
    """A str field (or the str values of a dict field) naming a local file or folder. It is made
    absolute when the config is built, against the folder it is loaded from (`from_dict`'s
    `base_dir`, default the working folder): Ray trials and jobs run in other folders."""
    return field(default=default, metadata={"path": True})


# The folder relative paths are resolved against while a config is being built.
_BASE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("base_dir", default=None)


def _absolute(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    if not isinstance(value, str) or not value or "://" in value:
        return value
    return str(((_BASE_DIR.get() or Path.cwd()) / Path(value).expanduser()).resolve())



# --------------------------------------------------------------------------------------------
# Conversion from plain data, gathering errors
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_range(value: Any, meta: Mapping, path: str, errors: list[str]) -> None:
    if "range" not in meta or not isinstance(value, int | float):
        return
    lo, hi, lo_open = meta["range"]
    ok = (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        accepted = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        errors.append(f"{path}: {value!r} is out of range; accepted: {accepted}")


def convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
            return None
        hints = get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key in value:
            if key not in fields:
                where = f"{path}.{key}" if path else str(key)
                errors.append(f"{where}: unknown key; known: {sorted(fields)}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                continue
            sub = f"{path}.{name}" if path else name
            n_before = len(errors)
            converted = convert(hints[name], value[name], sub, errors)
            if len(errors) == n_before:
                _check_range(converted, f.metadata, sub, errors)
                kwargs[name] = _absolute(converted) if f.metadata.get("path") else converted
        obj = tp(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate(path, errors)
        return obj
    if origin is Literal:
        if value not in get_args(tp):
            errors.append(f"{path}: {value!r} is not accepted; accepted: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            trial: list[str] = []
            out = convert(arg, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            errors.append(f"{path}: expected a list, got {value!r}")
            return value
        (item_tp, *_) = get_args(tp) or (Any,)
        return [convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return value
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): convert(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls: type, data: Mapping, source: str | None = None,
              base_dir: str | Path | None = None):
    """Build and validate `cls` from plain data; raise one ConfigError listing every problem.
    Relative paths (`path_field`s) are resolved against `base_dir` (default: the working folder)."""
    errors: list[str] = []
    token = _BASE_DIR.set(Path(base_dir).resolve() if base_dir else None)
    try:
        obj = convert(cls, data, "", errors)
    finally:
        _BASE_DIR.reset(token)
    if errors:
        raise ConfigError(errors, source)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# YAML, includes, overrides
# --------------------------------------------------------------------------------------------


def deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _resolve_includes(node: Any, here: Path, seen: tuple[Path, ...]) -> Any:
    if not isinstance(node, Mapping):
        return node
    merged: dict = {}
    includes = node.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes:
        inc_path = (here / inc).resolve()
        if inc_path in seen:
            raise ConfigError([f"include: {inc_path} includes itself"], str(seen[-1]))
        if not inc_path.is_file():
            raise ConfigError([f"include: file {inc} not found (looked at {inc_path})"], str(seen[-1]))
        merged = deep_merge(merged, read_yaml(inc_path, seen + (inc_path,)))
    own = {k: _resolve_includes(v, here, seen) for k, v in node.items() if k != "include"}
    return deep_merge(merged, own)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping with its includes resolved."""
    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if not isinstance(data, Mapping):
        raise ConfigError(["the top level must be a mapping"], str(path))
    return _resolve_includes(data, path.parent, _seen or (path,))


def has_path(d: Mapping, key: str) -> bool:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def set_path(d: dict, key: str, value: Any) -> dict:
    """Set a dotted key in nested dicts, creating mappings as needed; returns d."""
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return d


def merge_path(d: dict, key: str, value: Any) -> dict:
    """Like `set_path`, but a mapping value is merged into the mapping already there (so a grid
    value `{name: mla, options: {...}}` keeps the base's other method settings)."""
    parts = key.split(".")
    node: Any = d
    for part in parts:
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(value, Mapping) and isinstance(node, dict):
        value = deep_merge(node, value)
    return set_path(d, key, value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings; values parse as YAML (numbers, bools, lists)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: expected key.path=value"])
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] = (), *, cls: type,
                prefix: str = "", own_keys: set[str] = frozenset()):
    """Load a config of schema `cls` from YAML (or defaults when path is None) plus overrides.
    An override whose first key is not in `own_keys` gets `prefix` put before it (an ablation's
    `train.epochs=2` means `experiment.train.epochs=2`)."""
    data = read_yaml(path) if path else {}
    for key, value in parse_overrides(list(overrides)):
        if prefix and key.split(".")[0] not in own_keys:
            key = f"{prefix}.{key}"
        set_path(data, key, value)
    return from_dict(cls, data, str(path) if path else None)


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's content (for tags and trial identity)."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (lists kept as values), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
