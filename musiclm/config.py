"""One configuration layer for every entry point: YAML files, ``base:`` inheritance, ``--set`` overrides,
and typed sections that reject unknown keys.

    cfg = load_config("launch/configs/coarse.yaml", ["train.max_steps=10", "data.shards=shards/x"])
    train = section(TrainConfig, cfg.get("train"), where="coarse.yaml: train")

- ``base: other.yaml`` (relative to the file, or absolute; a list merges in order) is merged under
  the file's own keys, recursively: a child's mapping refines the base's mapping key by key; any
  other value replaces it. ``base`` chains are followed; a cycle is an error.
- ``--set key.sub=value`` (repeatable; ``--set a=1 b=2`` works too) sets one key; the value is
  parsed as YAML (``3``, ``1e-3``, ``true``, ``[a, b]``, ``{x: 1}``, ``null``), so the syntax is the
  same in ``launch/train.py``, every ``ray_jobs/*.py`` and every ``musiclm`` subcommand.
- A typed section is a dataclass: its defaults are the one place a default lives; an unknown key
  is an error that names the file/section, the key and the closest valid name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "deep_merge",
    "apply_overrides",
    "load_config",
    "load_yaml",
    "load_json",
    "section",
    "check_keys",
    "require",
    "add_set_argument",
    "dump_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or section and the key."""


def deep_merge(base: dict, over: dict | None) -> dict:
    """A copy of ``base`` with ``over`` merged in: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """``key.sub=value`` strings (value parsed as YAML) applied to a copy of a config dict."""
    import yaml

    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part in {key!r}")
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return cfg


def _read_mapping(path: str, parse, what: str) -> dict:
    """``parse(text)`` of a local or fsspec (s3://...) file, as a mapping; errors name the file."""
    try:
        if "://" in path:  # s3://... configs for cluster jobs
            from musiclm.data import storage

            with storage.open_file(path, "rb") as f:
                text = f.read().decode()
        else:
            with open(path) as f:
                text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    try:
        data = parse(text)
    except ValueError as e:  # yaml.YAMLError and json.JSONDecodeError are ValueErrors here
        raise ConfigError(f"{path}: not valid {what}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def load_yaml(path: str) -> dict:
    """One YAML mapping from a file (an empty file is {}), with the file named in any error."""
    import yaml

    def parse(text):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(str(e)) from None

    return _read_mapping(path, parse, "YAML config")


def load_json(path: str) -> dict:
    """One JSON mapping from a file (e.g. a DeepSpeed config), with the file named in any error."""
    import json

    return _read_mapping(path, json.loads, "JSON config")


def _load_with_bases(path: str, seen: tuple[str, ...]) -> dict:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(seen + (real,))})")
    cfg = load_yaml(path)
    bases = cfg.pop("base", None)
    if not bases:
        return cfg
    merged: dict = {}
    for b in bases if isinstance(bases, list) else [bases]:
        bpath = b if os.path.isabs(b) or "://" in b else os.path.join(os.path.dirname(path), b)
        merged = deep_merge(merged, _load_with_bases(bpath, seen + (real,)))
    return deep_merge(merged, cfg)


def load_config(path: str | None, overrides: list[str] | None = None) -> dict:
    """A YAML config with its ``base:`` files merged under it and ``--set`` overrides applied on top."""
    cfg = _load_with_bases(path, ()) if path else {}
    return apply_overrides(cfg, overrides)


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(data: dict, valid: list[str] | tuple[str, ...], *, where: str) -> None:
    """ConfigError for the first key of ``data`` not in ``valid``, naming the closest valid one."""
    for key in data:
        if key not in valid:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_closest(str(key), list(valid))}; valid keys: {', '.join(valid)}"
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field type ``hint`` (int, float, bool, str, list, dict, ``X | None``);
    YAML already typed most values: this accepts 100 for a float and 1e3 for an int when whole,
    and refuses "ten" for an int with the key named."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: {value!r} is not allowed")
    if hint is Any:
        return value
    kind = origin or hint
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def section(cls: type[T], data: dict | None, *, where: str) -> T:
    """Build dataclass ``cls`` from a config mapping: unknown keys are a ConfigError naming ``where``
    (e.g. ``"launch/configs/coarse.yaml: train"``), the key and the closest valid one; values are
    checked against the field types (``train.warmup_steps: expected an integer, got 'ten'``), then
    the class's ``check()`` (if any) checks ranges and raises ConfigError itself."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(data, names, where=where)
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where)
    return obj


def require(ok: bool, where: str, message: str) -> None:
    """Raise ConfigError(f"{where}: {message}") unless ``ok`` (range checks in ``check()``)."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The one ``--set KEY=VALUE`` flag: repeatable, several values per flag, every one applies."""
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, value parsed as YAML (repeatable), e.g. --set train.max_steps=5",
    )


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML text, keys in their given order (printed and saved by every run)."""
    import yaml

    return yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=None, width=100)


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
