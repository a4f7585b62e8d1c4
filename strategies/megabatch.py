"""`megabatch`: the all-to-all schedule of dion's FSDP2 Muon/NorMuon, with global (exact) norms.

Matrices are grouped by (shape, dtype, NS steps), in order of first appearance. A group of n
matrices is padded with zero matrices to n' = ceil(n / P) * P and cut into n' / P blocks of P;
matrix j of the group (padding included) is owned by rank j mod P, so every rank owns exactly one
matrix of every block. Every row shard is zero-padded to ceil(rows / P) rows, so each rank's
send buffer for a group is a dense (P, blocks, padded rows, row) tensor and one
`all_to_all_single` with equal splits moves the whole group to its owners; each owner runs one
batched NS over its blocks (padding matrices included: they are orthogonalized as zeros), and one
more `all_to_all_single` per group returns each rank its rows.

Cost against `balanced` (the same owner exchange with exact split sizes and LPT ownership): the
padding matrices, the padded rows of uneven shards and the zero matrices' NS FLOPs are waste, and
all are in the plan (bytes per collective and each rank's `ns_flops`) and in what is counted.
Load balance is by count within a shape, not by FLOPs across shapes. Two collectives per group
each way instead of one in total. What it buys: no per-matrix packing on the send side (a
group's buffer is one strided copy) and one batched NS call per group.

Exactness: NorMuon's Frobenius norms are the optimizer's global all-reduce (dion computes them
shard-locally, which makes the update depend on P); NS of a zero matrix is exactly zero and is
never returned to anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import pipeline
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.registry import register

__all__ = ["MegabatchOptions", "Megabatch", "shape_groups", "padding", "padding_flops"]


@dataclass(frozen=True)
class MegabatchOptions:
    """No options: grouping, padding and ownership are the schedule's definition."""


def shape_groups(matrices) -> list[list[MatrixSpec]]:
    """Matrices grouped by (shape, dtype, NS steps and form), in order of first appearance."""
    groups: dict[tuple, list[MatrixSpec]] = {}
    for m in matrices:
        groups.setdefault((m.shape, m.dtype, m.ns_steps, m.ns_form), []).append(m)
    return list(groups.values())


def padding(matrices, world_size: int) -> list[list[MatrixSpec]]:
    """Per rank, the zero matrices it orthogonalizes (as the spec of its group's first matrix)."""
    out: list[list[MatrixSpec]] = [[] for _ in range(world_size)]
    for group in shape_groups(m for m in matrices if m.sharded):
        n = len(group)
        for j in range(n, -(-n // world_size) * world_size):
            out[j % world_size].append(group[0])
    return out


def padding_flops(matrices, world_size: int) -> list[int]:
    """NS FLOPs each rank spends on the zero matrices that pad its groups."""
    return [sum(m.flops for m in pads) for pads in padding(matrices, world_size)]


@register
class Megabatch(Strategy):
    name = "megabatch"
    Options = MegabatchOptions

    def __init__(self, options: MegabatchOptions | None = None) -> None:
        super().__init__(options or MegabatchOptions())

    def assign_owners(self, matrices, world_size):
        # round-robin within each shape group (padding slots included in the count)
        owners = {}
        for group in shape_groups(matrices):
            for j, m in enumerate(group):
                owners[m.index] = j % world_size
        return [owners[m.index] for m in matrices]

    def schedule(self, matrices, world_size):
        """Every group's forward in flight before the first NS starts; per group NS and its
        return; then every return waited for."""
        groups = [[m.index for m in g] for g in shape_groups(matrices)]
        return (self.assign_owners(matrices, world_size),
                pipeline(groups, "shape_blocks", "shape_blocks", "shape_blocks", lag=len(groups),
                         max_in_flight=len(groups)))
