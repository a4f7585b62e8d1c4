"""`replicated`: every rank gathers every matrix and orthogonalizes all of them. The baseline.

Communication: each rank packs its row shards of all matrices into one flat buffer, every shard
zero-padded to ceil(rows / P) rows so the buffers are equal in size, and one
`all_gather_into_tensor` hands every rank every shard. Each rank then rebuilds each full matrix,
runs Newton-Schulz on it and keeps only its own rows. Nothing travels back.

Cost: every rank receives (P-1)/P of all matrix bytes (plus padding) and runs P times the FLOPs of
an owner-based scheme; its peak holds the whole gathered model. Simple, and the reference point
every other strategy is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.base import EVERY_RANK, CommItem, ExecContext, Plan, RankCost, Strategy
from dist_ortho.strategies.collectives import all_gather_flat, pack_padded
from dist_ortho.strategies.registry import register

__all__ = ["ReplicatedOptions", "Replicated"]


@dataclass(frozen=True)
class ReplicatedOptions:
    """No options: the baseline has nothing to tune."""


def padded_numels(matrices: list[MatrixSpec]) -> list[int]:
    return [m.padded_rows * m.row_numel for m in matrices]


def rebuild_full(m: MatrixSpec, gathered: torch.Tensor, offset: int) -> torch.Tensor:
    """Full tensor of matrix m from a (P, L) all-gathered buffer whose slot starts at `offset`."""
    pieces = [gathered[r, offset:offset + m.shard_numel(r)].view(m.local_shape(r))
              for r in range(m.world_size)]
    return torch.cat(pieces, dim=0)


@register
class Replicated(Strategy):
    name = "replicated"
    Options = ReplicatedOptions

    def __init__(self, options: ReplicatedOptions | None = None) -> None:
        super().__init__(options or ReplicatedOptions())

    def assign_owners(self, matrices, world_size):
        return [EVERY_RANK] * len(matrices)

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks: list[RankCost]):
        b_in = dtype_size(matrices[0].dtype)
        slot_bytes = sum(padded_numels(list(matrices))) * b_in
        largest_out = max(m.numel * m.out_itemsize for m in matrices)
        for cost in ranks:
            cost.computes.extend(m.index for m in matrices)
            if world_size > 1:
                wire = (world_size - 1) * slot_bytes
                cost.comm.append(CommItem("all_gather", wire, wire, "forward"))
            # own packed buffer + everyone's buffers + one full result at a time
            cost.transient_bytes = max(cost.transient_bytes,
                                       (world_size + 1) * slot_bytes + largest_out)
        for m in matrices:
            owner[m.index] = EVERY_RANK

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        matrices = [plan.matrices[i] for i in indices]
        slots = padded_numels(matrices)
        with ctx.phase("comm_wait"):
            flat = pack_padded(inputs, slots, inputs[0].dtype, ctx.device)
            gathered = all_gather_flat(flat, ctx.group, ctx.world_size)
        outputs, offset = [], 0
        for m, slot in zip(matrices, slots):
            full = rebuild_full(m, gathered, offset)
            offset += slot
            with ctx.phase("ns"):
                result = ctx.orthogonalizer.run([m.index], full.unsqueeze(0))[0]
            start = m.shard_offset(ctx.rank)
            # clone so the full result can be freed before the next matrix
            outputs.append(result[start:start + m.dim0_sizes[ctx.rank]].clone())
        return outputs
