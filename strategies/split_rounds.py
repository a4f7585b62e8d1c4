"""The split Newton-Schulz's transports and kernels: one matrix's NS shared by a few ranks.

`split_ns` cuts a matrix too large for one owner into blocks of its long side, one per member
(`split_plan.Part`; the plan's schedule lists them in `Schedule.splits`). With X the k x l view
(k the short side) and X_j member j's block of its l columns (a block of the parameter's rows if
it is tall, of its columns if it is wide), the schedule runs, per NS step, lockstep rounds among
each split's members:

    split_norm     each member's partial sum of squares of X_j          -> round 0
    split_start    X_j / ||X|| (the sum of the partials, in block order)
    split_gram     X_j X_j^T (float32)                                   -> round 1 + 2 t
    split_b        A = the partials' sum in block order; my rows of B = b A + c A A
                                                                         -> round 2 + 2 t
    split_update   X_j <- a X_j + B X_j
    split_finish   the result block (and its FLOPs)

A round (`split_round`) is one batch of point-to-point messages (`batch_isend_irecv` on the
strategy's group): a member sends each fellow member one message carrying every split matrix
the two share, and receives one. Ranks in no split send nothing. `split_pieces` is the forward
and return all-to-all: every rank sends each owner its row shard of the owner's whole matrices
and each member the piece of its shard inside the member's block, and back.

Exactness: the Gram matrix's l products (block partial sums, added in block order) and the
norm's are a reordering of one dot product, inside the float32 error model of
tests/tolerances.py; B's rows are computed as in the reference and travel losslessly.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist

from dist_ortho.core.newton_schulz import matmul_add, normalized, step_coefficients
from dist_ortho.core.plan import CommItem, Plan
from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.collectives import exchange
from dist_ortho.strategies.exchanges import Transport, register_transport
from dist_ortho.strategies.kernels import Kernel, Work, register_kernel
from dist_ortho.strategies.split_plan import (Part, part_flops, piece_numel, piece_numels,
                                              round_traffic, split_dims)

__all__ = ["parts_of", "split_indices"]


def parts_of(plan: Plan) -> dict[int, tuple[Part, ...]]:
    """{plan index: its parts in block order} of every sharded matrix of a split plan."""
    return dict(plan.schedule.splits)


def split_indices(plan: Plan, indices) -> list[int]:
    parts = parts_of(plan)
    return [i for i in indices if len(parts[i]) > 1]


def _mine(plan: Plan, indices, rank: int) -> list[tuple[int, Part]]:
    parts = parts_of(plan)
    return [(i, p) for i in indices for p in parts[i] if p.member == rank]


def _overlap(a0: int, a1: int, b0: int, b1: int) -> tuple[int, int]:
    lo, hi = max(a0, b0), min(a1, b1)
    return lo, max(lo, hi)


def _cut(m: MatrixSpec, part: Part, rank: int, shard: torch.Tensor) -> torch.Tensor:
    """The piece of rank's shard (local_shape(rank)) in `part`, flat."""
    start, count = m.shard_offset(rank), m.dim0_sizes[rank]
    if part.axis == 0 and part.lo <= start and start + count <= part.hi:
        return shard.reshape(-1)  # the whole shard: one view, no slicing
    rows = shard.reshape(count, m.row_numel)
    if part.axis == 1:
        return rows[:, part.lo:part.hi].reshape(-1)
    lo, hi = _overlap(start, start + count, part.lo, part.hi)
    return rows[lo - start:hi - start].reshape(-1)


def _block(m: MatrixSpec, part: Part, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The member's block, (hi - lo, row_numel) on axis 0 or (rows, hi - lo) on axis 1, from
    every rank's piece in rank order."""
    if part.axis == 1:
        return torch.cat([p.view(m.dim0_sizes[s], part.hi - part.lo)
                          for s, p in enumerate(pieces)])
    return torch.cat([p.view(-1, m.row_numel) for p in pieces])


def _result_piece(m: MatrixSpec, part: Part, rank: int, block: torch.Tensor) -> torch.Tensor:
    """The rows of `rank` in a result block laid out as `_block` returns it, flat."""
    if part.axis == 1:
        start = m.shard_offset(rank)
        return block[start:start + m.dim0_sizes[rank]].reshape(-1)
    start = m.shard_offset(rank)
    lo, hi = _overlap(start, start + m.dim0_sizes[rank], part.lo, part.hi)
    if (lo - part.lo, hi - part.lo) == (0, block.shape[0]):
        return block.reshape(-1)  # all of the block: one view, no slicing
    return block[lo - part.lo:hi - part.lo].reshape(-1)



def _part_numel(m: MatrixSpec, part: Part) -> int:
    return (part.hi - part.lo) * (m.row_numel if part.axis == 0 else m.shape[0])


def _as_block(m: MatrixSpec, part: Part, result: torch.Tensor) -> torch.Tensor:
    """A result in the layout `_block` uses (a whole matrix: all its rows)."""
    if part.axis == 1:
        return result.reshape(m.shape[0], part.hi - part.lo)
    return result.reshape(part.hi - part.lo, m.row_numel)


def _reassemble(matrices, parts, me: int, P: int, got: list[torch.Tensor]) -> list[torch.Tensor]:
    """My row shard of every result from the pieces each owner / member sent me."""
    sizes = [[] for _ in range(P)]
    for k, ps in enumerate(parts):
        for p in ps:
            sizes[p.member].append((k, p))
    chunks: dict[tuple[int, int], torch.Tensor] = {}
    for s in range(P):
        split = torch.split(got[s], [piece_numel(matrices[k], p, me) for k, p in sizes[s]])
        for (k, p), c in zip(sizes[s], split):
            chunks[(k, p.lo)] = c
    out = []
    for k, m in enumerate(matrices):
        rows = m.dim0_sizes[me]
        ps = parts[k]
        if len(ps) == 1:  # one owner sent all my rows: a view, no copy
            piece = chunks[(k, ps[0].lo)]
        elif ps[0].axis == 1:
            piece = torch.cat([chunks[(k, p.lo)].view(rows, p.hi - p.lo) for p in ps], dim=1)
        else:
            piece = torch.cat([chunks[(k, p.lo)].view(-1, m.row_numel) for p in ps])
        out.append(piece.view(m.local_shape(me)))
    return out



def _round_items(peers: dict, rank: int, link: str | None) -> list[CommItem]:
    """Rank's messages in one split round (an entry of `round_traffic`), in the order
    `SplitRound.start` posts them: per fellow member (ascending), the send and then the receive,
    one message each on `link`."""
    items = []
    for q, (send, recv) in sorted(peers.get(rank, {}).items()):
        pair = (min(rank, q), max(rank, q))
        if send:
            items.append(CommItem("send", send, 0, "forward", group=pair, link=link, messages=1))
        if recv:
            items.append(CommItem("recv", 0, recv, "forward", group=pair, link=link, messages=1))
    return items


@functools.lru_cache(maxsize=8)
def _rounds(matrices: tuple[MatrixSpec, ...], parts: tuple) -> tuple:
    """`round_traffic` of a plan's split matrices, once for all its rounds (the counter and the
    simulator ask round by round)."""
    return tuple(round_traffic(list(matrices), list(parts)))




class SplitPieces(Transport):
    """The forward / return all-to-all of a split plan (exact split sizes, no padding)."""

    name = "split_pieces"

    def items(self, plan, ex):
        P = plan.world_size
        if P == 1:
            return [[]]
        parts = parts_of(plan)
        b = dtype_size(plan.matrices[ex.matrices[0]].dtype) if ex.phase == "forward" else \
            plan.matrices[ex.matrices[0]].out_itemsize
        # elements each rank sends the members of others' parts, and each member gathers
        sent = np.zeros(P, dtype=np.int64)
        gathered = np.zeros(P, dtype=np.int64)
        for i in ex.matrices:
            m = plan.matrices[i]
            for part in parts[i]:
                pieces = piece_numels(m, part)
                pieces[part.member] = 0
                sent += pieces
                gathered[part.member] += pieces.sum()
        if ex.phase == "forward":
            return [[CommItem("all_to_all", int(sent[r]) * b, int(gathered[r]) * b, "forward")]
                    for r in range(P)]
        return [[CommItem("all_to_all", int(gathered[r]) * b, int(sent[r]) * b, "return")]
                for r in range(P)]

    def start(self, run, ex):
        plan, ctx = run.plan, run.ctx
        P, me = ctx.world_size, ctx.rank
        parts = parts_of(plan)
        ms = {i: plan.matrices[i] for i in ex.matrices}
        mine = _mine(plan, ex.matrices, me)
        if ex.phase == "forward":
            send = [torch.cat([_cut(ms[i], p, me, run.shard[i]) for i in ex.matrices
                               for p in parts[i] if p.member == d]
                              or [run.shard[ex.matrices[0]].new_empty(0)]) for d in range(P)]
            recv = [sum(piece_numel(ms[i], p, s) for i, p in mine) for s in range(P)]
        else:
            blocks = run.scratch.get("result", {})
            send = [torch.cat([_result_piece(ms[i], p, d, blocks[i] if i in blocks else
                                             _as_block(ms[i], p, run.result[i]))
                               for i, p in mine]
                              or [torch.empty(0, dtype=ctx.out_dtype, device=ctx.device)])
                    for d in range(P)]
            recv = [sum(piece_numel(ms[i], p, me) for i in ex.matrices for p in parts[i]
                        if p.member == s) for s in range(P)]
        return exchange(send, recv, me, ctx.group, P, async_op=True)

    def finish(self, run, ex, handle):
        plan, P, me = run.plan, run.ctx.world_size, run.ctx.rank
        parts = parts_of(plan)
        pieces = handle.wait()
        if ex.phase == "return":
            ms = [plan.matrices[i] for i in ex.matrices]
            outs = _reassemble(ms, [parts[i] for i in ex.matrices], me, P, pieces)
            run.out.update(zip(ex.matrices, outs))
            run.scratch.pop("result", None)
            return
        mine = _mine(plan, ex.matrices, me)
        per_source = [torch.split(pieces[s], [piece_numel(plan.matrices[i], p, s)
                                              for i, p in mine]) for s in range(P)]
        for j, (i, p) in enumerate(mine):
            m = plan.matrices[i]
            block = _block(m, p, [per_source[s][j] for s in range(P)])
            if len(parts[i]) > 1:
                run.scratch.setdefault("block", {})[i] = block
            else:
                run.full[i] = block.view(m.shape)


def _round_dtype(run, step: int) -> torch.dtype:
    """One dtype per round on every rank: what split_plan.gram_itemsizes plans."""
    if step == 0:
        return torch.promote_types(run.plan.matrices[0].dtype, torch.float32)
    if step % 2:
        return torch.promote_types(run.ctx.out_dtype, torch.float32)
    return run.ctx.out_dtype


class SplitRound(Transport):
    """One lockstep round among each split's members (see the module docstring)."""

    name = "split_round"

    def items(self, plan, ex):
        parts = parts_of(plan)
        idx = [i for i in ex.matrices if len(parts[i]) > 1]
        rounds = _rounds(tuple(plan.matrices[i] for i in idx), tuple(parts[i] for i in idx))
        peers = rounds[ex.step] if ex.step < len(rounds) else {}
        # groups inside one node (the planner's ranks_per_node) talk on the intra-node link
        link = "intra_node" if ex.ranks_per_node is not None else None
        return [_round_items(peers, r, link) if plan.world_size > 1 else []
                for r in range(plan.world_size)]

    def start(self, run, ex):
        ctx, me = run.ctx, run.ctx.rank
        parts = parts_of(run.plan)
        sends = run.scratch.pop("send", {})
        rows, dtype = ex.step > 0 and ex.step % 2 == 0, _round_dtype(run, ex.step)
        out_pieces: dict[int, list] = {}  # fellow -> [(k, numel)] it sends me, in matrix order
        in_pieces: dict[int, list] = {}  # fellow -> my tensors for it
        for i, x in sends.items():
            for p in parts[i]:
                if p.member != me:
                    in_pieces.setdefault(p.member, []).append(x.reshape(-1))
                    n = (p.ahi - p.alo) * x.shape[-1] if rows else x.numel()
                    out_pieces.setdefault(p.member, []).append((i, n))
        ops, received = [], {}
        for q in sorted(in_pieces):
            send = torch.cat(in_pieces[q])
            recv = torch.empty(sum(n for _, n in out_pieces[q]), dtype=dtype, device=ctx.device)
            if send.numel():
                ops.append(dist.P2POp(dist.isend, send, group=ctx.group, group_peer=q))
            if recv.numel():
                ops.append(dist.P2POp(dist.irecv, recv, group=ctx.group, group_peer=q))
            received[q] = torch.split(recv, [n for _, n in out_pieces[q]])
        works = dist.batch_isend_irecv(ops) if ops else []
        return sends, received, works, ops

    def finish(self, run, ex, handle):
        sends, received, works, _ = handle
        for work in works:
            work.wait()
        me = run.ctx.rank
        parts = parts_of(run.plan)
        position = {q: 0 for q in received}
        got = {}
        for i, x in sends.items():
            tensors = []
            for p in parts[i]:
                if p.member == me:
                    tensors.append(x)
                    continue
                tensors.append(received[p.member][position[p.member]])
                position[p.member] += 1
            got[i] = tensors
        run.scratch["got"] = got


class SplitKernel(Kernel):
    """One stage of the split iteration on this rank's blocks (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def shares(self, plan, c):
        """Every member holds its blocks through all the stages; the last stage carries the
        matrices it computes and their FLOPs (one call per block)."""
        out = [Work() for _ in range(plan.world_size)]
        parts = parts_of(plan)
        last = self.name == "split_finish"
        for i in c.matrices:
            if len(parts[i]) < 2:
                continue
            m = plan.matrices[i]
            k = split_dims(m)[1]
            for p in parts[i]:
                w = out[p.member]
                w.extra_bytes += _part_numel(m, p) * (dtype_size(m.dtype) + m.out_itemsize)
                if last:
                    w.indices.append(i)
                    w.flops += part_flops(m, k, p.hi - p.lo, p.ahi - p.alo)
                    w.calls += 1
        return out

    def run(self, run, c):
        mine = dict(_mine(run.plan, split_indices(run.plan, c.matrices), run.ctx.rank))
        if mine:
            getattr(self, "_" + self.name)(run, c, mine, run.scratch)

    @staticmethod
    def _split_norm(run, c, mine, s):
        ctx = run.ctx
        orth = ctx.orthogonalizer
        s["X"], s["cfg"], s["trans"] = {}, {}, {}
        norm_dtype = _round_dtype(run, 0)
        blocks = s.pop("block")
        for i in mine:
            s["cfg"][i] = orth.config(i)
            s["trans"][i] = mine[i].axis == 0  # a tall matrix's block of rows: X = G^T
            s["X"][i] = blocks[i].mT if s["trans"][i] else blocks[i]
        with ctx.phase("ns"):
            s["send"] = {i: x.to(norm_dtype).square().sum().reshape(1)
                         for i, x in s["X"].items()}

    @staticmethod
    def _split_start(run, c, mine, s):
        ctx = run.ctx
        s["compute"] = {}
        with ctx.phase("ns"):
            for i, x in s["X"].items():
                cfg = s["cfg"][i]
                norm = torch.stack([t.reshape(()) for t in s["got"][i]]).sum().sqrt().to(x.dtype)
                s["compute"][i] = cfg.torch_dtype(ctx.device)
                s["X"][i] = normalized(x, norm, cfg.coefficients, cfg.eps).to(s["compute"][i])

    @staticmethod
    def _live(s, t: int) -> list[int]:
        return [i for i in s["X"] if t < s["cfg"][i].steps]

    @staticmethod
    def _split_gram(run, c, mine, s):
        g = _round_dtype(run, 1)
        with run.ctx.phase("ns"):
            s["partial"] = {i: s["X"][i].to(g) @ s["X"][i].to(g).mT
                            for i in SplitKernel._live(s, c.step)}
        s["send"] = dict(s["partial"])

    @staticmethod
    def _split_b(run, c, mine, s):
        rows, s["A"] = {}, {}
        with run.ctx.phase("ns"):
            for i in SplitKernel._live(s, c.step):
                grams = s["got"][i]
                total = grams[0].view_as(s["partial"][i]).clone()
                for g in grams[1:]:
                    total += g.view_as(total)
                A = s["A"][i] = total.to(s["compute"][i])
                _, b, cc = step_coefficients(s["cfg"][i].coefficients, c.step)
                mine_rows = A[mine[i].alo:mine[i].ahi]
                rows[i] = matmul_add(mine_rows, mine_rows, A, beta=b, alpha=cc)
        s["send"] = rows

    @staticmethod
    def _split_update(run, c, mine, s):
        with run.ctx.phase("ns"):
            for i in SplitKernel._live(s, c.step):
                kk = s["A"][i].shape[0]
                B = torch.cat([r.view(-1, kk) for r in s["got"][i]])
                a_coef, _, _ = step_coefficients(s["cfg"][i].coefficients, c.step)
                s["X"][i] = matmul_add(s["X"][i], B, s["X"][i], beta=a_coef)

    @staticmethod
    def _split_finish(run, c, mine, s):
        orth = run.ctx.orthogonalizer
        for i, p in mine.items():
            m = run.plan.matrices[i]
            orth.flops.total += part_flops(m, split_dims(m)[1], p.hi - p.lo, p.ahi - p.alo)
        s["result"] = {i: (x.mT if s["trans"][i] else x) for i, x in s.pop("X").items()}
        for key in ("cfg", "trans", "compute", "partial", "A", "got"):
            s.pop(key, None)


for _t in (SplitPieces(), SplitRound()):
    register_transport(_t)
for _name in ("split_norm", "split_start", "split_gram", "split_b", "split_update",
              "split_finish"):
    register_kernel(SplitKernel(_name))
