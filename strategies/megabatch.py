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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy
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


def _blocks(n: int, world_size: int) -> int:
    return math.ceil(n / world_size)


def padding(matrices, world_size: int) -> list[list[MatrixSpec]]:
    """Per rank, the zero matrices it orthogonalizes (as the spec of its group's first matrix)."""
    out: list[list[MatrixSpec]] = [[] for _ in range(world_size)]
    for group in shape_groups(m for m in matrices if m.sharded):
        n = len(group)
        for j in range(n, _blocks(n, world_size) * world_size):
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

    @property
    def batches_same_shape(self) -> bool:
        return True

    def assign_owners(self, matrices, world_size):
        # plain (replicated) matrices: round-robin within each shape group, like the sharded ones
        owners = {}
        for group in shape_groups(matrices):
            for j, m in enumerate(group):
                owners[m.index] = j % world_size
        return [owners[m.index] for m in matrices]

    def plan(self, matrices, world_size, rank) -> Plan:
        plan = super().plan(matrices, world_size, rank)
        for cost, extra in zip(plan.ranks, padding_flops(plan.matrices, world_size)):
            cost.ns_flops += extra
        return plan

    def sharded_time(self, plan, calls, compute):
        """Synchronous like the default, but the zero matrices' NS counts too."""
        pads = padding(plan.matrices, plan.world_size)
        works = [compute.ns_matrices_seconds(
            [plan.matrices[i] for i in cost.computes if plan.matrices[i].sharded] + pads[r], True)
            for r, cost in enumerate(plan.ranks)]
        ns_s = max(compute.concurrent(works), default=0.0)
        return sum(c.seconds for c in calls) + ns_s, ns_s

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        P = world_size
        b_in = dtype_size(matrices[0].dtype)
        held = [0] * P
        fwd, ret = [], []
        for g, group in enumerate(shape_groups(matrices)):
            for j, m in enumerate(group):
                owner[m.index] = j % P
                bucket[m.index] = g
                ranks[j % P].computes.append(m.index)
            m = group[0]
            blocks = _blocks(len(group), P)
            piece = blocks * m.padded_rows * m.row_numel  # elements per (source, owner) pair
            fwd.append((P - 1) * piece * b_in)
            ret.append((P - 1) * piece * m.out_itemsize)
            # send + receive buffers each way, and the owned full matrices and their results
            group_bytes = P * piece * 2 * (b_in + m.out_itemsize) + blocks * m.numel * (
                b_in + m.out_itemsize)
            for r in range(P):
                held[r] += group_bytes
        for cost in ranks:
            if P > 1:
                cost.comm.extend(CommItem("all_to_all", b, b, "forward") for b in fwd)
                cost.comm.extend(CommItem("all_to_all", b, b, "return") for b in ret)
            cost.transient_bytes = max(cost.transient_bytes, held[0])
        return None

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        P, me = ctx.world_size, ctx.rank
        matrices = [plan.matrices[i] for i in indices]
        local = {m.index: x for m, x in zip(matrices, inputs)}
        groups = shape_groups(matrices)
        # every forward exchange is in flight before the first NS starts
        with ctx.phase("comm_wait"):
            forward = [self._send(group, [local[m.index] for m in group], P, me, ctx)
                       for group in groups]
        returns = []
        for group, (recv, handle) in zip(groups, forward):
            with ctx.phase("comm_wait"):
                if handle is not None:
                    handle.wait()
            full = _assemble(group[0], recv)  # (blocks, *shape): block b holds matrix b*P + me
            slots = [b * P + me for b in range(full.shape[0])]
            # a padding slot runs with the group's first matrix's settings (same shape and steps)
            idx = [group[j].index if j < len(group) else group[0].index for j in slots]
            with ctx.phase("ns"):
                out = ctx.orthogonalizer.run(idx, full)
            with ctx.phase("comm_wait"):
                returns.append(self._send_back(group[0], out, P, ctx))
        outputs: dict[int, torch.Tensor] = {}
        with ctx.phase("comm_wait"):
            for group, (recv, handle) in zip(groups, returns):
                if handle is not None:
                    handle.wait()
                rows = group[0].dim0_sizes[me]
                for j, m in enumerate(group):
                    # recv[s, b] is my rows of matrix b*P + s
                    outputs[m.index] = recv[j % P, j // P, :rows].reshape(m.local_shape(me))
        return [outputs[m.index] for m in matrices]

    @staticmethod
    def _send(group, shards, P: int, me: int, ctx: ExecContext):
        """Start one group's forward all-to-all; returns (receive buffer, handle or None)."""
        m = group[0]
        blocks = _blocks(len(group), P)
        # slot j = b*P + d goes to rank d: written straight into owner-major (P, blocks, ...)
        # order, one copy per shard; only padding (rows past this shard's, zero matrices) is zeroed
        send = torch.empty((P, blocks, m.padded_rows, m.row_numel), dtype=shards[0].dtype,
                           device=ctx.device)
        rows = m.dim0_sizes[me]
        for j, shard in enumerate(shards):
            send[j % P, j // P, :rows].copy_(shard.reshape(rows, m.row_numel))
        for j in range(len(shards), blocks * P):
            send[j % P, j // P].zero_()
        if rows < m.padded_rows:
            send[:, :, rows:].zero_()
        if P == 1:
            return send, None
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=ctx.group, async_op=True)

    @staticmethod
    def _send_back(m: MatrixSpec, out: torch.Tensor, P: int, ctx: ExecContext):
        """Start one group's return all-to-all of this rank's results (blocks, *shape)."""
        blocks = out.shape[0]
        flat = out.reshape(blocks, m.shape[0], m.row_numel)
        send = torch.empty((P, blocks, m.padded_rows, m.row_numel), dtype=ctx.out_dtype,
                           device=ctx.device)
        start = 0
        for d, rows in enumerate(m.dim0_sizes):
            send[d, :, :rows].copy_(flat[:, start:start + rows])
            send[d, :, rows:].zero_()  # padding rows: a recipient never reads them; no garbage
            start += rows
        if P == 1:
            return send, None
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=ctx.group, async_op=True)


def _assemble(m: MatrixSpec, recv: torch.Tensor) -> torch.Tensor:
    """(blocks, *shape) full matrices from the received (P, blocks, padded rows, row) buffer."""
    blocks = recv.shape[1]
    parts = [recv[s, :, :rows] for s, rows in enumerate(m.dim0_sizes) if rows]
    return torch.cat(parts, dim=1).reshape((blocks,) + tuple(m.shape))
