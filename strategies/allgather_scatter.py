"""`allgather_scatter`: all-gather everything, compute only your own, send results to their rows.

Communication: like `replicated`, each rank packs all its row shards (padded to ceil(rows / P) rows)
into one buffer and a single `all_gather_into_tensor` gives every rank every matrix: one large
collective instead of one per matrix. Each rank orthogonalizes only the matrices assigned to it
(`assignment`: round-robin or LPT), then the owners scatter the results' row shards back, all owners
at once, as one `all_to_all_single` with exact split sizes.

Cost: forward bytes equal `replicated`'s (every rank receives (P-1)/P of everything) and peak memory
holds the gathered model, but compute is split P ways; the return meets the lower bound. It trades
bytes for fewer, larger collectives: good when latency, not bandwidth, dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import synchronous
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import OWNERSHIP_POLICIES, assign
from dist_ortho.strategies.registry import register

__all__ = ["AllGatherScatterOptions", "AllGatherScatter"]


@dataclass(frozen=True)
class AllGatherScatterOptions:
    """assignment: "round_robin" (matrix i to rank i mod P) or "lpt" (balanced by NS FLOPs)."""

    assignment: str = "round_robin"
    batch_same_shape: bool = True

    def __post_init__(self) -> None:
        if self.assignment not in OWNERSHIP_POLICIES:
            raise ValueError(f"allgather_scatter option 'assignment' must be one of "
                             f"{OWNERSHIP_POLICIES}, got {self.assignment!r}")
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")


@register
class AllGatherScatter(Strategy):
    name = "allgather_scatter"
    Options = AllGatherScatterOptions

    def __init__(self, options: AllGatherScatterOptions | None = None) -> None:
        super().__init__(options or AllGatherScatterOptions())

    def assign_owners(self, matrices, world_size):
        return assign(self.options.assignment, matrices, world_size)

    def schedule(self, matrices, world_size):
        kernel = "ns" if self.options.batch_same_shape else "ns_each"
        return (self.assign_owners(matrices, world_size),
                synchronous([m.index for m in matrices], "all_rows", kernel, "owner_rows"))
