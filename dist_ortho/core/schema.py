"""The one typed config loader: dataclasses from YAML data, strict, every error naming its key.

Every config in the project (a run's `Config`, a sweep's study file, the convergence study file,
the testing aids of `dist_ortho.studies.faults`) is a tree of dataclasses read by `build`, so
unknown keys, did-you-mean hints, type errors and range errors look the same everywhere.

How a section or a field is declared. A section is a dataclass; a field is an annotated attribute:

    @dataclass
    class EvalConfig:
        every: int = 25                                  # "must be an integer"
        batches: int = 8
        dtype: Literal["float32", "bfloat16"] = "float32"   # "must be one of float32, bfloat16"
        seeds: list[int] = field(default_factory=lambda: [0])
        window: tuple[float, float] = (0.0, 1.0)         # "a list of 2 numbers"
        label: str | None = None                        # null allowed
        extra: dict = field(default_factory=dict)       # free-form mapping (any sub-keys)
        sweep: SweepConfig = field(default_factory=SweepConfig)   # a nested section
        name: str                                       # no default: "is required"

        def check(self, key: str) -> None:              # optional: ranges and cross-field rules
            at_least(f"{key}.every", self.every, 1)

Supported types: bool, int, float (ints accepted), str, Literal[...], X | None, unions tried in
order, list[X], tuple[X, Y] and tuple[X, ...], dict and dict[K, V] (K a str or a Literal), Any,
and nested dataclasses. `check(key)` runs after the section is built, with `key` its dotted path
("" at the root), nested sections first; raise `ConfigError(f"{key}.field", "...")` there (the
helpers below do). To add a section to a config, add a field whose type is the new dataclass.

Overrides (`--set a.b=value`): `parse_overrides` reads values as YAML (`3e-4`, `[1, 2]`, `null`);
`apply_overrides(data, overrides, schema)` walks the dotted key through the schema, so a typo fails
naming the key before anything is built; under a free-form `dict` any sub-key is accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_ortho.core.errors import ConfigError

__all__ = ["ConfigError", "build", "to_dict", "yaml_load", "read_yaml", "parse_overrides",
           "apply_overrides", "join", "positive", "nonnegative", "unit", "at_least", "fraction",
           "plain_name", "literal_values"]


def join(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# --- YAML ---------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 / 3E+4 (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML file that must hold a mapping (empty file: {}); errors are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{what} file {str(path)!r} does not exist")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: a {what} file must be a mapping of keys to values, got "
                              f"{type(data).__name__}")
    return dict(data)


# --- building -----------------------------------------------------------------------------------

def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def literal_values(tp) -> tuple:
    """The allowed values of a Literal type (or of a Literal inside `X | None`)."""
    if _is_union(tp):
        return tuple(v for a in typing.get_args(tp) for v in literal_values(a))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _type_name(a)
                           for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list"
        return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'items'}"
    if origin is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown(key: str, name, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"unknown key{hint} (known: {', '.join(known) or 'none'})")


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        # a mapping for a union with one section: that section's own (more precise) error
        sections = [e for a, e in zip([a for a in args if a is not type(None)], errors)
                    if dataclasses.is_dataclass(a) and isinstance(value, Mapping)]
        if sections:
            raise sections[0]
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, "
                                   f"got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        item = (typing.get_args(tp) or (Any,))[0]
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            if literal_values(key_tp) and k not in literal_values(key_tp):
                raise ConfigError(join(key, k), f"unknown name; use one of "
                                                f"{', '.join(map(str, literal_values(key_tp)))}")
            out[k] = _coerce(join(key, k), v, value_tp)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has a type the loader does not support: {tp!r}")


def build(cls: type, data, key: str = ""):
    """An instance of dataclass `cls` from plain data, checked (see the module docstring)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"must be a mapping of keys to values, got {data!r}")
    hints = _hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        if name not in fields_:
            raise _unknown(join(key, name), name, fields_)
        kwargs[name] = _coerce(join(key, name), value, hints[name])
    for name, f in fields_.items():
        if (name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError(join(key, name), "is required")
    instance = cls(**kwargs)
    check = getattr(instance, "check", None)
    if callable(check):
        check(key)
    return instance


def to_dict(obj) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass tree; `build` reads it back."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return copy.deepcopy(obj)


# --- overrides ----------------------------------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """["optimizer.lr=0.01", ...] -> {"optimizer.lr": 0.01, ...}; values are parsed as YAML."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key, f"override {item!r} must look like section.key=value, e.g. "
                                   f"optimizer.lr=0.01")
        try:
            out[key] = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"value {raw!r} is not valid YAML: "
                                   f"{' '.join(str(exc).split())}") from None
    return out


def _field_type(schema, name: str, key: str):
    """The type of `name` under `schema` (a dataclass or a mapping type); raises for others."""
    base = schema
    if _is_union(base):  # `Section | None`: the section
        inner = [a for a in typing.get_args(base) if a is not type(None)]
        base = inner[0] if len(inner) == 1 else base
    if dataclasses.is_dataclass(base):
        fields_ = [f.name for f in dataclasses.fields(base) if f.init]
        if name not in fields_:
            raise _unknown(key, name, fields_)
        return _hints(base)[name]
    if typing.get_origin(base) is dict or base is dict or base is Any:
        key_tp, value_tp = typing.get_args(base) or (Any, Any)
        if literal_values(key_tp) and name not in literal_values(key_tp):
            raise ConfigError(key, f"unknown name; use one of "
                                   f"{', '.join(map(str, literal_values(key_tp)))}")
        return value_tp
    parent = key.rsplit(".", 1)[0]
    raise ConfigError(key, f"too deep: {parent} is a single value, not a section")


def apply_overrides(data: Mapping | None, overrides: Mapping[str, object] | Sequence[str],
                    schema: type) -> dict:
    """A deep copy of `data` with dotted-key overrides applied, each key checked against `schema`
    (a dataclass) on the way, so `optimizer.lrr=1` fails here naming `optimizer.lrr`."""
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    out = copy.deepcopy(dict(data or {}))
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(key, "an override key is dotted names, e.g. optimizer.lr")
        tp, node = schema, out
        for i, part in enumerate(parts):
            tp = _field_type(tp, part, ".".join(parts[:i + 1]))
            if i == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[:i + 1]), f"must be a mapping, got {child!r}")
            node = child
    return out


# --- range helpers for check() ------------------------------------------------------------------

def positive(key: str, value: float, hint: str = "") -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0{' ' + hint if hint else ''}, "
                               f"got {value!r}")


def nonnegative(key: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")


def unit(key: str, value: float) -> None:
    if not math.isfinite(value) or not 0 <= value < 1:
        raise ConfigError(key, f"must be in [0, 1), got {value!r}")


def fraction(key: str, value: float) -> None:
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(key, f"must be a number in [0, 1], got {value!r}")


def at_least(key: str, value: int | None, minimum: int, hint: str = "") -> None:
    if value is not None and value < minimum:
        raise ConfigError(key, f"must be >= {minimum}{' ' + hint if hint else ''}, got {value}")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._+=-]+")


def plain_name(key: str, value: str) -> None:
    """A name used as a file name: letters, digits and '._+=-' only."""
    if not _PLAIN_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(key, f"must be a plain file name (letters, digits, '._+=-'), "
                               f"got {value!r}")
