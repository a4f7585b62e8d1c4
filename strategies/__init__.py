"""Orthogonalization strategies for NorMuon/Muon under FSDP2: a registry of names to builders.

    strategies.available()                     -> ['allgather_scatter', 'balanced', ...]
    strategies.build("bucketed_async", bucket_bytes=2**24)

Each strategy lives in its own file with a typed options dataclass; see `strategies.base` for the
plan/execute contract and the byte convention.
"""

from __future__ import annotations

import dataclasses

from dist_ortho.strategies.allgather_scatter import AllGatherScatter, AllGatherScatterOptions
from dist_ortho.strategies.balanced import Balanced, BalancedOptions
from dist_ortho.strategies.base import EVERY_RANK, CommItem, ExecContext, Plan, RankCost, Strategy
from dist_ortho.strategies.bucketed_async import BucketedAsync, BucketedAsyncOptions
from dist_ortho.strategies.replicated import Replicated, ReplicatedOptions
from dist_ortho.strategies.round_robin import RoundRobin, RoundRobinOptions

__all__ = ["available", "build", "register", "Strategy", "Plan", "RankCost", "CommItem",
           "ExecContext", "EVERY_RANK", "options_class", "ReplicatedOptions", "RoundRobinOptions",
           "AllGatherScatterOptions", "BucketedAsyncOptions", "BalancedOptions"]

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a Strategy subclass (with `name` and `Options`) to the registry."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Replicated, RoundRobin, AllGatherScatter, BucketedAsync, Balanced):
    register(_cls)


def available() -> list[str]:
    return sorted(_REGISTRY)


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
