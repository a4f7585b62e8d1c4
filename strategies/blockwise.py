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

import dataclasses
from dataclasses import dataclass

import torch

from dist_ortho.core.batching import batches, stacked
from dist_ortho.core.newton_schulz import ns_flops
from dist_ortho.core.plan import ComputeTimes, Plan, TimedCall
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.strategies.base import EVERY_RANK, ExecContext, Strategy
from dist_ortho.strategies.registry import register

__all__ = ["BlockwiseOptions", "Blockwise", "block_flops", "orthogonalize_blocks"]


@dataclass(frozen=True)
class BlockwiseOptions:
    """No options: the block is whatever this rank holds."""


def block_flops(m: MatrixSpec, rank: int) -> int:
    """NS FLOPs of rank `rank`'s block of `m` (the whole matrix if it is not sharded)."""
    if not m.sharded:
        return m.flops
    rows = m.dim0_sizes[rank]
    return ns_flops(m.local_shape(rank), m.ns_steps, m.ns_form) if rows else 0


def orthogonalize_blocks(indices, inputs, ctx: ExecContext) -> list[torch.Tensor]:
    """NS of each local block on its own, one batched call per block shape (the orthogonalizer
    splits a batch further where NS settings differ); an empty block stays empty."""
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    for pos, x in enumerate(inputs):
        if x.shape[0] == 0:
            outputs[pos] = torch.empty(x.shape, dtype=ctx.out_dtype, device=x.device)
    full = [pos for pos, out in enumerate(outputs) if out is None]
    for batch in batches(tuple(inputs[pos].shape) for pos in full):
        positions = [full[j] for j in batch]
        with ctx.phase("ns"):
            out = ctx.orthogonalizer.run([indices[pos] for pos in positions],
                                         stacked([inputs[pos] for pos in positions]))
        for pos, o in zip(positions, out.unbind(0)):
            outputs[pos] = o.contiguous()
    return outputs  # type: ignore[return-value]


@register
class Blockwise(Strategy):
    name = "blockwise"
    Options = BlockwiseOptions
    exact = False

    def __init__(self, options: BlockwiseOptions | None = None) -> None:
        super().__init__(options or BlockwiseOptions())

    def assign_owners(self, matrices, world_size):
        return [EVERY_RANK] * len(matrices)

    def plan(self, matrices, world_size, rank) -> Plan:
        plan = super().plan(matrices, world_size, rank)
        for r, cost in enumerate(plan.ranks):  # each rank runs NS on its block, not the matrix
            cost.ns_flops = sum(block_flops(plan.matrices[i], r) for i in cost.computes)
        return plan

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        for m in matrices:
            owner[m.index] = EVERY_RANK
            for cost in ranks:
                cost.computes.append(m.index)

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        return orthogonalize_blocks(indices, inputs, ctx)

    def _execute_plain(self, plan: Plan, indices, inputs, ctx: ExecContext):
        return orthogonalize_blocks(indices, [inputs[i] for i in indices], ctx)

    def sharded_time(self, plan: Plan, calls: list[TimedCall],
                     compute: ComputeTimes) -> tuple[float, float]:
        """No collectives; the slowest rank's NS of its own blocks."""
        works = [compute.ns_matrices_seconds(
            [dataclasses.replace(plan.matrices[i], shape=plan.matrices[i].local_shape(r))
             for i in plan.ranks[r].computes
             if plan.matrices[i].sharded and plan.matrices[i].dim0_sizes[r]], False)
            for r in range(plan.world_size)]
        ns_s = max(compute.concurrent(works), default=0.0)
        return ns_s, ns_s
