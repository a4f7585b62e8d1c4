"""`blockwise` (INEXACT): Newton-Schulz on each rank's own rows, with no exchange at all.

Each rank orthogonalizes the block of rows it holds (its FSDP2 dim-0 shard; on a 2-D/3-D mesh, its
rows of the row group the mesh scheduler hands the strategy) as if it were the whole matrix, and
keeps the result. Nothing travels and each rank runs NS on 1/P of the rows, so the step is as cheap
as it gets; but NS of a block is not the block of NS, so the update depends on how the matrix is
split: it changes with the world size, and with the TP degree on a mesh. This is Megatron's old
per-TP-block default and DeepSpeed AutoTP's per-shard NS, offered to measure that price
(`dist_ortho.profiling.deviation`, docs/exact-or-not.md), never as a default.

Its own definition, the test oracle: `dist_ortho.optim.inexact_reference.blockwise_orthogonalize`
(NS of each row block of the full matrix). Plain (unsharded) matrices are whole on every rank, so
each rank orthogonalizes them itself (exact, no broadcast). An empty shard has nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import synchronous
from dist_ortho.strategies.base import EVERY_RANK, Strategy
from dist_ortho.strategies.registry import register

__all__ = ["BlockwiseOptions", "Blockwise"]


@dataclass(frozen=True)
class BlockwiseOptions:
    """No options: the block is whatever this rank holds."""


@register
class Blockwise(Strategy):
    name = "blockwise"
    Options = BlockwiseOptions
    exact = False

    def __init__(self, options: BlockwiseOptions | None = None) -> None:
        super().__init__(options or BlockwiseOptions())

    def assign_owners(self, matrices, world_size):
        return [EVERY_RANK] * len(matrices)

    def schedule(self, matrices, world_size):
        return (self.assign_owners(matrices, world_size),
                synchronous([m.index for m in matrices], None, "blocks", None))
