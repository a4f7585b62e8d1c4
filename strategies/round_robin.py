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

import torch
import torch.distributed as dist

from dist_ortho.core.sharding import dtype_size
from dist_ortho.core.batching import stacked
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy, ns_batches
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

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        b_in = dtype_size(matrices[0].dtype)
        held = [0] * world_size
        for m, o in zip(matrices, self.assign_owners(matrices, world_size)):
            owner[m.index] = o
            ranks[o].computes.append(m.index)
            piece = m.padded_rows * m.row_numel
            held[o] += world_size * piece * (b_in + m.out_itemsize)
            if world_size == 1:
                continue
            for r, cost in enumerate(ranks):
                if r == o:
                    cost.comm.append(CommItem("gather", 0, (world_size - 1) * piece * b_in))
                    cost.comm.append(CommItem(
                        "scatter", (world_size - 1) * piece * m.out_itemsize, 0, "return"))
                else:
                    cost.comm.append(CommItem("gather", piece * b_in, 0))
                    cost.comm.append(CommItem("scatter", 0, piece * m.out_itemsize, "return"))
        for r, cost in enumerate(ranks):
            # every owned matrix is gathered (and its result split) before any is returned
            cost.transient_bytes = max(cost.transient_bytes, held[r])

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        P, me = ctx.world_size, ctx.rank
        matrices = [plan.matrices[i] for i in indices]

        def padded(t: torch.Tensor, rows: int) -> torch.Tensor:
            if t.shape[0] == rows:  # an even shard travels as it is
                return t
            out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
            out[:t.shape[0]].copy_(t)
            return out

        gathered: dict[int, list[torch.Tensor]] = {}
        handles = []
        with ctx.phase("comm_wait"):
            for m, x in zip(matrices, inputs):
                o = plan.owner[m.index]
                if P == 1:
                    gathered[m.index] = [x]
                    continue
                send = padded(x, m.padded_rows)
                recv = [torch.empty_like(send) for _ in range(P)] if me == o else None
                if recv is not None:
                    gathered[m.index] = recv
                handles.append((dist.gather(send, recv, group=ctx.group, group_dst=o,
                                            async_op=True), send))
            for h, _ in handles:
                h.wait()
        owned = [k for k, m in enumerate(matrices) if plan.owner[m.index] == me]
        results: dict[int, list[torch.Tensor]] = {}
        # one NS call per batch of the owned matrices of one shape
        for batch in ns_batches([matrices[k] for k in owned]):
            ks = [owned[j] for j in batch]
            m = matrices[ks[0]]
            fulls = []
            for k in ks:
                pieces = [piece if piece.shape[0] == rows else piece[:rows]
                          for piece, rows in zip(gathered[matrices[k].index], m.dim0_sizes)]
                fulls.append(pieces[0] if P == 1 else torch.cat(pieces))
            with ctx.phase("ns"):
                out = ctx.orthogonalizer.run([matrices[k].index for k in ks], stacked(fulls))
            # contiguous rows: every piece is then a plain view that a collective can send
            per_rank = [part.unbind(0) for part in
                        out.contiguous().split(list(m.dim0_sizes), dim=1)]
            for j, k in enumerate(ks):
                results[matrices[k].index] = [padded(per_rank[r][j], m.padded_rows)
                                              for r in range(P)]
        if P == 1:
            return [results[m.index][0] for m in matrices]
        outputs, handles = [], []
        with ctx.phase("comm_wait"):
            for m in matrices:
                o = plan.owner[m.index]
                recv = torch.empty((m.padded_rows,) + tuple(m.shape[1:]), dtype=ctx.out_dtype,
                                   device=ctx.device)
                handles.append(dist.scatter(recv, results.get(m.index), group=ctx.group,
                                            group_src=o, async_op=True))
                outputs.append(recv)
            for h in handles:
                h.wait()
        return [out if out.shape[0] == m.dim0_sizes[me] else out[:m.dim0_sizes[me]]
                for m, out in zip(matrices, outputs)]
