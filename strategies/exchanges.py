"""Transports: how an exchange of a schedule packs its pieces and which collective carries them.

Each transport is one registered object with three faces, so that a schedule is run, counted and
priced from one description:
- `items(plan, exchange)`: per rank, the `CommItem`s of the call(s) (the byte convention of
  `dist_ortho.core.plan`): the counter's source, compared with what the profiler counts;
- `buffer_bytes(plan, exchange, items)`: per rank, the send and receive buffers it holds while in
  flight;
- `start(run, exchange)` / `finish(run, exchange, handle)`: the executor's code; `start` issues the
  collective (asynchronously where the backend allows) and `finish` waits and unpacks into the
  run's `full` (forward: whole matrices on the ranks that compute them) or `out` (return: this
  rank's rows of each result).

Registered here: `owner_rows` (one all-to-all with exact split sizes between every rank and each
matrix's owner; `two_level` inside the node first with `ranks_per_node`), `all_rows` (one
all-gather of every rank's zero-padded shards: every rank gets every matrix), `owner_gather`
(one gather per matrix to its owner forward, one scatter back, zero-padded rows), `broadcast`
(a plain matrix's result from its owner to all) and `shape_blocks` (megabatch's dense per-shape
blocks with zero matrices). The split Newton-Schulz rounds register theirs in
`strategies.split_rounds`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dist_ortho.core.plan import EVERY_RANK, CommItem, Plan
from dist_ortho.core.schedule import Exchange
from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies import two_level
from dist_ortho.strategies.collectives import (all_gather_flat, full_batches, ns_batches,
                                               pack_batches)

__all__ = ["Transport", "register_transport", "transport", "TRANSPORTS"]

TRANSPORTS: dict[str, "Transport"] = {}


def register_transport(t: "Transport") -> "Transport":
    assert t.name not in TRANSPORTS or TRANSPORTS[t.name] is t, t.name
    TRANSPORTS[t.name] = t
    return t


def transport(name: str) -> "Transport":
    return TRANSPORTS[name]


class Transport:
    name = "transport"

    def items(self, plan: Plan, ex: Exchange) -> list[list[CommItem]]:
        raise NotImplementedError

    def buffer_bytes(self, plan: Plan, ex: Exchange, items: list[list[CommItem]]) -> list[int]:
        """Per rank, the buffers held while in flight, given the exchange's `items`. Default:
        what each rank sends and receives."""
        return [int(sum(c.send_bytes + c.recv_bytes for c in its)) for its in items]

    def start(self, run, ex: Exchange):
        raise NotImplementedError

    def finish(self, run, ex: Exchange, handle) -> None:
        raise NotImplementedError


def _parts(plan: Plan, ex: Exchange):
    ms = [plan.matrices[i] for i in ex.matrices]
    return ms, [plan.owner[i] for i in ex.matrices]


def _itemsize(plan: Plan, ex: Exchange) -> int:
    """Bytes per element on the wire: the parameters' dtype forward, the NS result's back."""
    m = plan.matrices[ex.matrices[0]]
    return dtype_size(m.dtype) if ex.phase == "forward" else m.out_itemsize


class OwnerRows(Transport):
    """Every rank's rows of each matrix to (forward) or from (return) the matrix's owner, in one
    `all_to_all_single` with exact split sizes (`owner_exchange`); with the plan's
    `ranks_per_node` set on the exchange, node-aware in two stages of point-to-point messages
    (`two_level`)."""

    name = "owner_rows"

    def items(self, plan, ex):
        P = plan.world_size
        if P == 1:
            return [[]]
        ms, owners = _parts(plan, ex)
        b = _itemsize(plan, ex)
        G = ex.ranks_per_node
        if G is None:
            sizes = ox.exchange_bytes(ms, owners, P, b, ex.phase)
            return [[CommItem("all_to_all", s, r, ex.phase)] for s, r in sizes]
        src, dst, n = ox.owner_pairs(ms, owners, P)
        if ex.phase == "return":
            src, dst = dst, src
        stages = two_level.link_traffic(src, dst, n, P, G)
        return [two_level.link_items(stages, r, b, ex.phase) for r in range(P)]

    def start(self, run, ex):
        ms, owners = _parts(run.plan, ex)
        ctx, P, me = run.ctx, run.ctx.world_size, run.ctx.rank
        G = ex.ranks_per_node
        if ex.phase == "forward":
            inputs = [run.shard[i] for i in ex.matrices]
            if G is None:
                return ox.send_forward(ms, owners, inputs, ctx, async_op=True)
            owned = _owned_lists(owners, P)
            return two_level.two_level_exchange(
                ox.forward_send(ms, owners, me, P, inputs),
                lambda s, d: sum(ms[k].shard_numel(s) for k in owned[d]), me, P, G, ctx.group)
        results = {k: run.result[i] for k, i in enumerate(ex.matrices) if owners[k] == me}
        if G is None:
            return ox.send_back(ms, owners, results, ctx, async_op=True)
        owned = _owned_lists(owners, P)
        return two_level.two_level_exchange(
            ox.return_send(ms, owners, me, P, results, ctx.out_dtype, ctx.device),
            lambda s, d: sum(ms[k].shard_numel(d) for k in owned[s]), me, P, G, ctx.group)

    def finish(self, run, ex, handle):
        ms, owners = _parts(run.plan, ex)
        P, me = run.ctx.world_size, run.ctx.rank
        pieces = handle if isinstance(handle, list) else handle.wait()
        if ex.phase == "forward":
            for k, full in ox.assemble(ms, owners, me, P, pieces).items():
                run.full[ex.matrices[k]] = full
        else:
            for i, out in zip(ex.matrices, ox.split_returns(ms, owners, me, P, pieces)):
                run.out[i] = out


def _owned_lists(owners, P: int) -> list[list[int]]:
    owned: list[list[int]] = [[] for _ in range(P)]
    for k, o in enumerate(owners):
        owned[o].append(k)
    return owned


class AllRows(Transport):
    """Forward only: every rank's shards of all the matrices, each zero-padded to ceil(rows / P)
    rows and laid out batch by batch, in one `all_gather_into_tensor`; every rank rebuilds the
    full matrices it computes (all of them where the owner is every rank), one stack per NS
    batch."""

    name = "all_rows"

    def items(self, plan, ex):
        P = plan.world_size
        if P == 1:
            return [[]]
        wire = (P - 1) * _slot_bytes(plan, ex)
        return [[CommItem("all_gather", wire, wire, "forward")] for _ in range(P)]

    def buffer_bytes(self, plan, ex, items):
        return [(plan.world_size + 1) * _slot_bytes(plan, ex)] * plan.world_size

    def start(self, run, ex):
        ms = [run.plan.matrices[i] for i in ex.matrices]
        groups = ns_batches(ms)
        flat = pack_batches(ms, groups, [run.shard[i] for i in ex.matrices], run.ctx.rank,
                            run.ctx.device)
        gathered, work = all_gather_flat(flat, run.ctx.group, run.ctx.world_size, async_op=True)
        return groups, gathered, work, flat  # the send buffer lives until the wait

    def finish(self, run, ex, handle):
        groups, gathered, work, _ = handle
        if work is not None:
            work.wait()
        ms = [run.plan.matrices[i] for i in ex.matrices]
        me = run.ctx.rank
        owners = [run.plan.owner[i] for i in ex.matrices]
        wanted = [any(owners[k] in (me, EVERY_RANK) for k in ks) for ks in groups]
        for ks, batch in zip(groups, full_batches(ms, groups, gathered, wanted)):
            if batch is None:
                continue
            if all(owners[k] == EVERY_RANK for k in ks):  # computed as one stack: no copy
                run.stacks[tuple(ex.matrices[k] for k in ks)] = batch
                continue
            for k, x in zip(ks, batch.unbind(0)):
                if owners[k] in (me, EVERY_RANK):
                    run.full[ex.matrices[k]] = x


def _slot_bytes(plan: Plan, ex: Exchange) -> int:
    ms = [plan.matrices[i] for i in ex.matrices]
    return sum(m.padded_rows * m.row_numel for m in ms) * dtype_size(ms[0].dtype)


class OwnerGather(Transport):
    """One `gather` per matrix of its zero-padded row shards to its owner (forward), or one
    `scatter` of its result's padded row shards from the owner (return)."""

    name = "owner_gather"

    def items(self, plan, ex):
        forward = ex.phase == "forward"
        return _rooted_items(plan, ex, "gather" if forward else "scatter", lambda m: (
            m.padded_rows * m.row_numel * (dtype_size(m.dtype) if forward else m.out_itemsize)),
            root_sends=not forward)

    def buffer_bytes(self, plan, ex, items):
        held = [0] * plan.world_size
        for i in ex.matrices:
            m = plan.matrices[i]
            b = dtype_size(m.dtype) if ex.phase == "forward" else m.out_itemsize
            held[plan.owner[i]] += plan.world_size * m.padded_rows * m.row_numel * b
        return held

    def start(self, run, ex):
        ctx, P, me = run.ctx, run.ctx.world_size, run.ctx.rank
        works = []
        for i in ex.matrices:
            m, o = run.plan.matrices[i], run.plan.owner[i]
            if ex.phase == "forward":
                x = run.shard[i]
                if P == 1:
                    works.append((i, [x], None, None))
                    continue
                send = _padded(x, m.padded_rows)
                recv = [torch.empty_like(send) for _ in range(P)] if me == o else None
                works.append((i, recv, dist.gather(send, recv, group=ctx.group, group_dst=o,
                                                   async_op=True), send))
            else:
                pieces = None
                if me == o:
                    rows = run.result[i].contiguous().split(list(m.dim0_sizes), dim=0)
                    pieces = [_padded(p, m.padded_rows) for p in rows]
                if P == 1:
                    works.append((i, pieces, None, None))
                    continue
                recv = torch.empty((m.padded_rows,) + tuple(m.shape[1:]), dtype=ctx.out_dtype,
                                   device=ctx.device)
                works.append((i, recv, dist.scatter(recv, pieces, group=ctx.group, group_src=o,
                                                    async_op=True), pieces))
        return works

    def finish(self, run, ex, works):
        me = run.ctx.rank
        for i, got, work, _ in works:
            if work is not None:
                work.wait()
            m = run.plan.matrices[i]
            if ex.phase == "forward":
                if got is None:
                    continue
                pieces = [p if p.shape[0] == rows else p[:rows]
                          for p, rows in zip(got, m.dim0_sizes)]
                run.full[i] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            else:
                out = got[0] if isinstance(got, list) else got
                rows = m.dim0_sizes[me]
                run.out[i] = out if out.shape[0] == rows else out[:rows]


def _rooted_items(plan: Plan, ex: Exchange, kind: str, piece_bytes, root_sends: bool
                  ) -> list[list[CommItem]]:
    """One rooted collective per matrix, rooted at its owner: every other rank sends (or, with
    `root_sends`, receives) `piece_bytes(m)` and the root receives (sends) that from (to) each of
    the P - 1 others."""
    P = plan.world_size
    out: list[list[CommItem]] = [[] for _ in range(P)]
    if P == 1:
        return out
    for i in ex.matrices:
        n, root = piece_bytes(plan.matrices[i]), plan.owner[i]
        for r in range(P):
            many, one = ((P - 1) * n, 0) if r == root else (0, n)
            send, recv = (many, one) if root_sends else (one, many)
            out[r].append(CommItem(kind, send, recv, ex.phase))
    return out


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:  # an even shard travels as it is
        return t
    out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]].copy_(t)
    return out


class Broadcast(Transport):
    """Return only, for plain (unsharded) matrices: the owner's result to every rank, one
    `broadcast` per matrix (nothing travels forward: every rank holds the whole matrix)."""

    name = "broadcast"

    def items(self, plan, ex):
        return _rooted_items(plan, ex, "broadcast", lambda m: m.numel * m.out_itemsize,
                             root_sends=True)

    def buffer_bytes(self, plan, ex, items):
        held = [0] * plan.world_size
        for i in ex.matrices:
            m = plan.matrices[i]
            held[plan.owner[i]] = max(held[plan.owner[i]], m.numel * m.out_itemsize)
        return held

    def start(self, run, ex):
        ctx = run.ctx
        for i in ex.matrices:
            o = run.plan.owner[i]
            out = run.result.get(i)
            if out is None:
                out = torch.empty(run.shard[i].shape, dtype=ctx.out_dtype, device=ctx.device)
            if ctx.world_size > 1:
                dist.broadcast(out, group=ctx.group, group_src=o)
            run.out[i] = out
        return None

    def finish(self, run, ex, handle):
        pass


class ShapeBlocks(Transport):
    """megabatch's exchange of one shape group (the exchange's matrices, all of one shape): the
    group is padded with zero matrices to a multiple of P, matrix j (padding included) belongs to
    rank j mod P, every shard is zero-padded to ceil(rows / P) rows, and one `all_to_all_single`
    with equal splits moves a dense (P, blocks, padded rows, row) buffer each way. The forward
    leaves each rank a (blocks, *shape) stack in `run.stacks`; the return reads it back."""

    name = "shape_blocks"

    def items(self, plan, ex):
        P = plan.world_size
        if P == 1:
            return [[]]
        m = plan.matrices[ex.matrices[0]]
        b = _itemsize(plan, ex)
        piece = math.ceil(len(ex.matrices) / P) * m.padded_rows * m.row_numel
        wire = (P - 1) * piece * b
        return [[CommItem("all_to_all", wire, wire, ex.phase)] for _ in range(P)]

    def buffer_bytes(self, plan, ex, items):
        P = plan.world_size
        m = plan.matrices[ex.matrices[0]]
        b = _itemsize(plan, ex)
        piece = math.ceil(len(ex.matrices) / P) * m.padded_rows * m.row_numel
        return [2 * P * piece * b] * P

    def start(self, run, ex):
        ctx, P, me = run.ctx, run.ctx.world_size, run.ctx.rank
        m = run.plan.matrices[ex.matrices[0]]
        blocks = math.ceil(len(ex.matrices) / P)
        if ex.phase == "forward":
            # slot j = b*P + d goes to rank d: written straight into owner-major (P, blocks, ...)
            # order, one copy per shard; only padding (rows past this shard's, zero matrices) is
            # zeroed
            shards = [run.shard[i] for i in ex.matrices]
            send = torch.empty((P, blocks, m.padded_rows, m.row_numel), dtype=shards[0].dtype,
                               device=ctx.device)
            rows = m.dim0_sizes[me]
            for j, shard in enumerate(shards):
                send[j % P, j // P, :rows].copy_(shard.reshape(rows, m.row_numel))
            for j in range(len(shards), blocks * P):
                send[j % P, j // P].zero_()
            if rows < m.padded_rows:
                send[:, :, rows:].zero_()
        else:
            out = run.stacks[ex.matrices]
            flat = out.reshape(blocks, m.shape[0], m.row_numel)
            send = torch.empty((P, blocks, m.padded_rows, m.row_numel), dtype=ctx.out_dtype,
                               device=ctx.device)
            start = 0
            for d, rows in enumerate(m.dim0_sizes):
                send[d, :, :rows].copy_(flat[:, start:start + rows])
                send[d, :, rows:].zero_()  # padding rows: never read; no garbage on the wire
                start += rows
        if P == 1:
            return send, None
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=ctx.group, async_op=True)

    def finish(self, run, ex, handle):
        recv, work = handle
        if work is not None:
            work.wait()
        P, me = run.ctx.world_size, run.ctx.rank
        m = run.plan.matrices[ex.matrices[0]]
        if ex.phase == "forward":
            blocks = recv.shape[1]
            parts = [recv[s, :, :rows] for s, rows in enumerate(m.dim0_sizes) if rows]
            run.stacks[ex.matrices] = torch.cat(parts, dim=1).reshape((blocks,) + tuple(m.shape))
            return
        rows = m.dim0_sizes[me]
        for j, i in enumerate(ex.matrices):
            # recv[s, b] is my rows of matrix b*P + s
            run.out[i] = recv[j % P, j // P, :rows].reshape(m.local_shape(me))


for _t in (OwnerRows(), AllRows(), OwnerGather(), Broadcast(), ShapeBlocks()):
    register_transport(_t)
