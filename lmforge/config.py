"""Dataclass configs: load from TOML/YAML/JSON, override with `--section.key value`, validate strictly.

Every stage has one dataclass config (fields may be nested dataclasses, called sections). A config is built from
defaults, then a file, then command-line overrides, in that order. An unknown key or a value of the wrong type is a
`ConfigError` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import ConfigError

T = TypeVar("T")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict (chosen by extension)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: expected a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"config file {path}: cannot parse: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from a file or a command-line string) to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}': cannot be None")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and value.strip().startswith("["):  # a JSON list: ["alpha_words", "min_chars"]
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"config key '{key}': {value!r} starts like a JSON list but is not one; give "
                                  "comma-separated values or a JSON list of strings") from None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if dataclasses.is_dataclass(item_tp) and hasattr(item_tp, "from_str"):
            # shorthand specs may be comma-separated: --sources wordnet,kjv:0.5
            parts = [v.split(",") if isinstance(v, str) else [v] for v in value]
            value = [p.strip() if isinstance(p, str) else p for group in parts for p in group
                     if not isinstance(p, str) or p.strip()]
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_str"):
            return tp.from_str(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return build_config(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if ("e" in value.lower() and float(value).is_integer()) else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _section_defaults(cls: type, name: str) -> dict[str, Any]:
    """The values a section's own default sets apart from its class's defaults: a stage whose `train` section
    defaults to TrainConfig(lr=3e-4, weight_decay=0.0) keeps them when a file or `--train.max_steps` sets other
    keys of that section (only the differing values, so fields derived in __post_init__ are derived anew)."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    section = _field_types(cls)[name]
    if not dataclasses.is_dataclass(default) or not isinstance(default, section):
        return {}
    try:
        plain = section()
    except (TypeError, ValueError, ConfigError):  # a section with required fields: keep all of the default
        plain = None
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(section)
            if f.init and (plain is None or getattr(default, f.name) != getattr(plain, f.name))}


def build_config(cls: type[T], data: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types. A section given as a
    dict starts from the section's default in `cls` (see _section_defaults), then takes the dict's keys."""
    data = dict(data or {})
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            known = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key '{prefix}{key}' (known keys: {known})")
        if dataclasses.is_dataclass(types_[key]) and isinstance(value, dict):
            value = {**_section_defaults(cls, key), **value}
        kwargs[key] = _coerce(value, types_[key], f"{prefix}{key}")
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config {prefix.rstrip('.') or cls.__name__}: {exc}") from None
    return cfg


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`train.lr` -> data['train']['lr']) on a nested dict, returning a new dict."""
    out = json.loads(json.dumps(data, default=str)) if data else {}
    for dotted, value in overrides.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
            node = child
        node[last] = value
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then the file at `path` (if any), then dotted `overrides`; validated into `cls`."""
    data = read_config_file(path) if path else {}
    return build_config(cls, apply_overrides(data, overrides or {}))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (for run dirs and `config.json`)."""
    return dataclasses.asdict(cfg)


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def _source_comments(source: str) -> dict[str, str]:
    """Field name -> its trailing comment; a comment-only line whose '#' stands in the same column as the comment
    above it continues that comment (long help wraps that way)."""
    comments: dict[str, str] = {}
    field_name, column = None, -1
    for line in source.splitlines():
        match = _FIELD_COMMENT.match(line)
        if match:
            field_name, column = match.group(1), line.index("#")
            comments[field_name] = match.group(2)
        elif field_name and line.strip().startswith("#") and line.index("#") == column:
            comments[field_name] += " " + line.strip()[1:].strip()
        else:
            field_name = None
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source: the CLI shows it as the option's help.

    Comments are merged over the dataclass bases, base classes first, so a subclass inherits its bases' help and
    overrides it where it redeclares a field with a comment.
    """
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(_source_comments(source))
    return comments


def flat_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) for every leaf field of `cls`, used to build CLI options."""
    out = []
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(flat_fields(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f"{prefix}{f.name}", tp, default, comments.get(f.name, "")))
    return out
