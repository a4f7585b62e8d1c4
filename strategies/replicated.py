"""`replicated`: every rank gathers every matrix and orthogonalizes all of them. The baseline.

Communication: each rank packs its row shards of all matrices into one flat buffer, every shard
zero-padded to ceil(rows / P) rows so the buffers are equal in size, and one `all_gather_into_tensor`
hands every rank every shard. Each rank then rebuilds the full matrices, runs Newton-Schulz once per
batch of one shape and keeps only its own rows. Nothing travels back. The buffer is laid out batch by
batch (`collectives.pack_batches`), so packing and rebuilding are one copy per batch too.

Cost: every rank receives (P-1)/P of all matrix bytes (plus padding) and runs P times the FLOPs of
an owner-based scheme; its peak holds the whole gathered model. Simple, and the reference point
every other strategy is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import synchronous
from dist_ortho.strategies.base import EVERY_RANK, Strategy
from dist_ortho.strategies.registry import register

__all__ = ["ReplicatedOptions", "Replicated"]


@dataclass(frozen=True)
class ReplicatedOptions:
    """No options: the baseline has nothing to tune."""


@register
class Replicated(Strategy):
    name = "replicated"
    Options = ReplicatedOptions

    def __init__(self, options: ReplicatedOptions | None = None) -> None:
        super().__init__(options or ReplicatedOptions())

    def assign_owners(self, matrices, world_size):
        return [EVERY_RANK] * len(matrices)

    def schedule(self, matrices, world_size):
        return (self.assign_owners(matrices, world_size),
                synchronous([m.index for m in matrices], "all_rows", "ns_own_rows", None))
