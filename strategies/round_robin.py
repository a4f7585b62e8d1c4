"""`round_robin`: matrix i is owned by rank i mod P, which gathers it, orthogonalizes it and
scatters the row shards back.

Order: the optimizer's parameter order (param groups in order, parameters in order within a group).

Communication, per matrix: one `gather` of the row shards to the owner, then one `scatter` of the
result's row shards from it. Shards are zero-padded to ceil(rows / P) rows because gather/scatter
need equal pieces. All gathers are issued asynchronously at once and every rank waits for all of
them to complete before it orthogonalizes anything; ranks then orthogonalize their own matrices in
parallel (one batched NS call per owned shape), and the scatters go out together at the end.

Cost: meets the owner-based lower bound up to padding, but with two collectives per matrix
(latency-bound on many small matrices) and ownership blind to cost (a few large matrices can land on
one rank; see `balanced`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import Compute, Exchange, Feed, Issue, Schedule, Wait
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import round_robin_owners
from dist_ortho.strategies.registry import register

__all__ = ["RoundRobinOptions", "RoundRobin"]


@dataclass(frozen=True)
class RoundRobinOptions:
    """No options: ownership is i mod P by definition."""


@register
class RoundRobin(Strategy):
    name = "round_robin"
    Options = RoundRobinOptions

    def __init__(self, options: RoundRobinOptions | None = None) -> None:
        super().__init__(options or RoundRobinOptions())

    def assign_owners(self, matrices, world_size):
        return round_robin_owners(matrices, world_size)

    def schedule(self, matrices, world_size):
        """Every gather in flight at once, then every owned batch's NS, then every scatter."""
        idx = [m.index for m in matrices]
        n = len(idx)
        actions = ([Feed(0)]
                   + [Issue(t, Exchange("owner_gather", "forward", (i,)))
                      for t, i in enumerate(idx)]
                   + [Wait(t) for t in range(n)]
                   + [Compute("ns", tuple(idx))]
                   + [Issue(n + t, Exchange("owner_gather", "return", (i,)))
                      for t, i in enumerate(idx)]
                   + [Wait(n + t) for t in range(n)])
        return self.assign_owners(matrices, world_size), Schedule(tuple(actions), (tuple(idx),))
