"""The strategy registry: names to Strategy classes. Strategies register themselves with the
`@register` class decorator in their own file; `strategies/__init__.py` imports each file once."""

from __future__ import annotations

import dataclasses

from dist_ortho.strategies.base import Strategy

__all__ = ["register", "available", "available_exact", "options_class", "build"]

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a Strategy subclass (with `name` and `Options`) to the registry; usable as a
    decorator."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def available_exact() -> list[str]:
    """The strategies whose update is exactly NorMuon's/Muon's (`Strategy.exact`): what tests of
    exactness and default choices iterate; the inexact schedules are left out by that flag."""
    return [n for n in available() if _REGISTRY[n].exact]


def options_class(name: str):
    return _lookup(name).Options


def _lookup(name: str) -> type[Strategy]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, **options) -> Strategy:
    """Build a strategy by name; unknown names and options raise ValueError naming them."""
    cls = _lookup(name)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for strategy {name!r}; "
                         f"known: {sorted(known) or 'none'}")
    return cls(cls.Options(**options))
