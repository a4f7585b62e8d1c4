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

from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.base import (EVERY_RANK, CommItem, ExecContext, Plan, RankCost, Strategy,
                                        ns_batches)
from dist_ortho.strategies.collectives import all_gather_flat, full_batches, pack_batches
from dist_ortho.strategies.registry import register

__all__ = ["ReplicatedOptions", "Replicated"]


@dataclass(frozen=True)
class ReplicatedOptions:
    """No options: the baseline has nothing to tune."""


def padded_numels(matrices: list[MatrixSpec]) -> list[int]:
    return [m.padded_rows * m.row_numel for m in matrices]


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
        largest_out = max(sum(matrices[k].numel * matrices[k].out_itemsize for k in ks)
                          for ks in ns_batches(matrices))
        for cost in ranks:
            cost.computes.extend(m.index for m in matrices)
            if world_size > 1:
                wire = (world_size - 1) * slot_bytes
                cost.comm.append(CommItem("all_gather", wire, wire, "forward"))
            # own packed buffer + everyone's buffers + one batch's full results at a time
            cost.transient_bytes = max(cost.transient_bytes,
                                       (world_size + 1) * slot_bytes + largest_out)
        for m in matrices:
            owner[m.index] = EVERY_RANK

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        matrices = [plan.matrices[i] for i in indices]
        groups = ns_batches(matrices)  # one stacked copy, one NS call per batch of one shape
        with ctx.phase("comm_wait"):
            flat = pack_batches(matrices, groups, inputs, ctx.rank, ctx.device)
            gathered = all_gather_flat(flat, ctx.group, ctx.world_size)
        outputs: list = [None] * len(matrices)
        for ks, full in zip(groups, full_batches(matrices, groups, gathered)):
            with ctx.phase("ns"):
                result = ctx.orthogonalizer.run([matrices[k].index for k in ks], full)
            m = matrices[ks[0]]
            start = m.shard_offset(ctx.rank)
            # a copy, so the batch's full results can be freed before the next batch; row-major,
            # so the update rule reads rows that lie together (a tall matrix's NS result is the
            # transpose of its working copy)
            mine = result[:, start:start + m.dim0_sizes[ctx.rank]].contiguous()
            for k, out in zip(ks, mine.unbind(0)):
                outputs[k] = out
        return outputs
