"""Building a :class:`Config`: YAML files, ``key=value`` overrides, type checks of every value
against its field's annotation, and writing the resolved tree back as YAML.

Unknown keys and wrong types raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ptmrec_dist.config.schema import Config
from ptmrec_dist.errors import ConfigError
from ptmrec_dist.io import atomic_write_text


# --------------------------------------------------------------------------- type checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
    """Check ``value`` against ``tp``; ``raw`` is the override's text (taken as-is for str)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, raw)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):     # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and value is not None and not isinstance(value, (list, dict)):
            return raw  # `data.path=2024` is the string "2024"
        raise bad
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, "
                          f"got {data!r}")
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key)
        tp = hints[name]
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) \
            else _coerce(value, tp, key)
    return cls(**kwargs)


# --------------------------------------------------------------------------- overrides and files

def set_key(cfg: Config, key: str, raw: str) -> None:
    """Apply one override ``key=raw``; the value is parsed as YAML (``0.5``, ``true``, ``[a, b]``)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in _fields(type(obj)):
            raise _unknown(key)
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    tp = _hints(type(obj))[parts[-1]]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key '{key}' is a section; set one of its keys, "
                          f"e.g. '{key}.{next(iter(_fields(tp)))}=...'")
    if tp is str:   # paths and names are taken verbatim, never YAML-parsed
        setattr(obj, parts[-1], raw)
        return
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    setattr(obj, parts[-1], _coerce(value, tp, key, raw=raw))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: Config | None = None) -> Config:
    """Defaults (or ``base``) <- YAML file <- ``key=value`` overrides; then validated."""
    cfg = base if base is not None else Config()
    if path:
        path = Path(path)
        data = read_yaml(path, "config file")
        try:
            cfg = _build(Config, merge_dicts(to_dict(cfg), data, path), "")
        except ConfigError as exc:            # an unknown key, a wrong type: name the file too
            if str(path) in str(exc):
                raise
            raise ConfigError(f"{path}: {exc}") from None
    for item in overrides:
        set_key(cfg, *parse_override(item))
    return cfg.validate()


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice (``line`` of the second, 1-based; ``key`` dotted)."""

    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"line {line}: key '{key}' given more than once (first at line "
                         f"{first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth (plain
    YAML loaders keep the last one silently). Keys merged in with ``<<`` may be overridden, as
    YAML's merge defines."""

    def construct_document(self, node):
        self._check_unique(node, "", set())
        return super().construct_document(node)

    def _check_unique(self, node, prefix: str, seen_nodes: set) -> None:
        if id(node) in seen_nodes:              # an alias: checked where its anchor is
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for k, child in enumerate(node.value):
                self._check_unique(child, f"{prefix}[{k}]", seen_nodes)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            name = f"{prefix}.{key}" if prefix else str(key)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKey(name, line, first[key])
                first[key] = line
            except TypeError:                   # an unhashable key: SafeLoader's own error
                pass
            self._check_unique(value_node, name, seen_nodes)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing file, bad YAML or a key given twice
    (:class:`UniqueKeyLoader`) names the file (and the line and key)."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except DuplicateKey as exc:
        raise ConfigError(f"{path}:{exc.line}: config key '{exc.key}' is given more than once "
                          f"(first at line {exc.first_line}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a YAML config is "
                          "text") from None


def merge_into(cfg: Config, sections: dict, source: Path | str = "") -> Config:
    """``cfg`` with YAML-like ``sections`` (``{"stage2": {"epochs": 4}}``) merged over it;
    unknown keys and wrong types name ``source``."""
    try:
        return _build(Config, merge_dicts(to_dict(cfg), sections, source), "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def merge_dicts(base: dict, update: Any, source: Path | str = "") -> dict:
    if not isinstance(update, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v, source)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- serialisation

def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    return path
