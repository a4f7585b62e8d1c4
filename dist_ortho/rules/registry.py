"""Update rules by name. Each rule's file registers it with the `@register` class decorator."""

from __future__ import annotations

from dist_ortho.rules.base import UpdateRule

__all__ = ["register", "available", "get"]

_REGISTRY: dict[str, UpdateRule] = {}


def register(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator: register one instance of an UpdateRule subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
        raise ValueError(f"register() takes an UpdateRule subclass, got {cls!r}")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"an update rule named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(rule: str | UpdateRule) -> UpdateRule:
    """The rule of that name (an UpdateRule instance passes through)."""
    if isinstance(rule, UpdateRule):
        return rule
    if not isinstance(rule, str) or rule not in _REGISTRY:
        raise ValueError(f"unknown update rule {rule!r}; available: {', '.join(available())}")
    return _REGISTRY[rule]
