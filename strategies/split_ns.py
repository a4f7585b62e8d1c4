"""`split_ns`: whole matrices on one owner each, the largest split across a few ranks.

Where whole-matrix ownership cannot balance (96 MLP matrices on 64 ranks: some rank owns two),
Newton-Schulz of one matrix is split across a group of ranks (the "distributed" mode of the
field's TP-aware Muon): with X the k x l view (k the short side), each member holds a block of
X's l columns (a block of the parameter's rows if it is tall, of its columns if it is wide) and,
per NS step, (1) computes its partial Gram matrix X_j X_j^T, (2) exchanges it with the other
members and sums all partials in block order (float32, so every member holds bitwise the same
A), (3) computes its rows of A A and B = b A + c A A, (4) exchanges its rows of B, and (5)
updates X_j <- a X_j + B X_j locally. The norm that starts the iteration is likewise a sum of the
members' partial sums of squares. Members run exactly the whole matrix's FLOPs between them.
Who splits what is `split_plan.assign` (by FLOPs against the rounds' bytes and latency, groups
inside one node with `ranks_per_node`; see its docstring).

Communication:
- forward: one `all_to_all_single` over the strategy's group; every rank sends each owner its
  row shard of the owner's whole matrices and each member the piece of its shard inside the
  member's block;
- split rounds: 1 + 2 * steps rounds (norm partials, then per step Gram partials and B rows)
  among the members only, as batched point-to-point messages (`batch_isend_irecv` on the
  strategy's group: nothing to create, any group, any P): per round a member sends each fellow
  member one message carrying every split matrix the two share, and receives one. A round's
  latency is therefore (g - 1) messages for a g-rank split, not an all-to-all over all P ranks;
  the planner weighs each message as `flop_per_peer`. Ranks in no split send nothing and never
  wait for the split groups. (On NCCL a batch of point-to-point ops must not be the first call
  on its group; the forward all-to-all always precedes the rounds.)
- return: one `all_to_all_single`; owners and members send every rank its rows of their
  results.

Exactness: the only rounding that differs from the reference is the order of the two sums, the
Gram matrix's l products (block partial sums, added in block order) and the norm's; both are a
reordering of one dot product, inside the float32 error model of tests/tolerances.py (a sum of
n terms is within ~sqrt(n) u whatever its order), so the reference bound holds unchanged. B's
rows are computed as in the reference (same inner products) and travel losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dist_ortho.core.newton_schulz import matmul_add, normalized, step_coefficients
from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.balanced import orthogonalize_owned
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy
from dist_ortho.strategies.collectives import exchange
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register
from dist_ortho.strategies.split_plan import (SPLIT_POLICIES, Part, assign, part_flops,
                                              piece_numel, piece_numels, round_traffic,
                                              split_dims)

__all__ = ["SplitNSOptions", "SplitNS", "piece_numel"]


@dataclass(frozen=True)
class SplitNSOptions:
    """max_group: most ranks one matrix is split over. flop_per_byte: what one byte of the split
    rounds costs in NS FLOPs when the planner compares candidates (default 100: roughly this
    CPU's NS rate over gloo's bandwidth; an H100 node over NVLink is ~1400, across
    InfiniBand ~12000). flop_per_peer: what one message of a split round costs its member in NS
    FLOPs, the link's latency per message times the NS rate; a member of a g-rank split sends
    g - 1 per round, 1 + 2 ns_steps rounds (default 0: latency ignored). ranks_per_node: GPUs
    per node (ranks [n G, (n + 1) G) on node n); when set, every split group lies inside one
    node and flop_per_byte / flop_per_peer should be that node's link (None: groups may span
    nodes). flop_per_byte_exchange: what one byte of the forward / return all-to-alls (over all
    ranks) costs in NS FLOPs; the planner keeps a split only if its busiest rank plus its
    busiest forward and return bytes beat LPT's (default 0: those bytes not weighed). The cost
    model prices the split rounds with these same weights (`SplitNS.sharded_time`); `dist-ortho
    project` sets them from the priced machine. split: "auto" (the planner decides) or "all"
    (every splittable matrix evenly over min(max_group, P, ranks_per_node) ranks).
    batch_same_shape: as in `balanced`, for whole matrices."""

    max_group: int = 4
    flop_per_byte: float = 100.0
    split: str = "auto"
    batch_same_shape: bool = True
    flop_per_peer: float = 0.0
    ranks_per_node: int | None = None
    flop_per_byte_exchange: float = 0.0

    def __post_init__(self) -> None:
        if (not isinstance(self.max_group, int) or isinstance(self.max_group, bool)
                or self.max_group < 1):
            raise ValueError(f"split_ns option 'max_group' must be an int >= 1 (1: never split), "
                             f"got {self.max_group!r}")
        _check_weight("flop_per_byte", self.flop_per_byte, "FLOPs one byte of a split round "
                      "costs")
        _check_weight("flop_per_peer", self.flop_per_peer, "one message's latency times the NS "
                      "FLOP rate; 0 ignores latency")
        _check_weight("flop_per_byte_exchange", self.flop_per_byte_exchange, "the forward/return "
                      "all-to-all's seconds per byte times the NS FLOP rate; 0 ignores them")
        if self.ranks_per_node is not None and (
                not isinstance(self.ranks_per_node, int) or isinstance(self.ranks_per_node, bool)
                or self.ranks_per_node < 1):
            raise ValueError(f"split_ns option 'ranks_per_node' must be None (groups may span "
                             f"nodes) or the GPUs per node, an int >= 1, got "
                             f"{self.ranks_per_node!r}")
        if self.split not in SPLIT_POLICIES:
            raise ValueError(f"split_ns option 'split' must be one of {SPLIT_POLICIES}, got "
                             f"{self.split!r}")
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")


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


def _check_weight(name: str, value, meaning: str) -> None:
    """One clear line for a planner weight that is not a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")):
        raise ValueError(f"split_ns option {name!r} must be a finite number >= 0 ({meaning}), "
                         f"got {value!r}")


@register
class SplitNS(Strategy):
    name = "split_ns"
    Options = SplitNSOptions

    def __init__(self, options: SplitNSOptions | None = None) -> None:
        super().__init__(options or SplitNSOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def _assignment(self, matrices, world_size):
        o = self.options
        return assign(tuple(matrices), world_size, o.max_group, float(o.flop_per_byte), o.split,
                      float(o.flop_per_peer), o.ranks_per_node, float(o.flop_per_byte_exchange))

    def plan(self, matrices, world_size, rank) -> Plan:
        plan = super().plan(matrices, world_size, rank)
        sharded = [m for m in plan.matrices if m.sharded]
        if sharded:
            split_flops = self._assignment(sharded, world_size).flops
            plain = [sum(plan.matrices[i].flops for i in cost.computes
                         if not plan.matrices[i].sharded) for cost in plan.ranks]
            for cost, f, extra in zip(plan.ranks, split_flops, plain):
                cost.ns_flops = f + extra
        return plan

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        P = world_size
        a = self._assignment(matrices, P)
        b_in = dtype_size(matrices[0].dtype)
        b_out = matrices[0].out_itemsize
        # elements each rank sends the members of others' parts (forward) and gets back (return),
        # and elements each member gathers for its parts (forward) and sends back (return)
        sent = np.zeros(P, dtype=np.int64)
        gathered = np.zeros(P, dtype=np.int64)
        held = [0] * P
        for k, m in enumerate(matrices):
            parts = a.parts[k]
            owner[m.index] = parts[0].member  # a split matrix: its first block's member
            for part in parts:
                ranks[part.member].computes.append(m.index)
                pieces = piece_numels(m, part)
                pieces[part.member] = 0
                sent += pieces
                gathered[part.member] += pieces.sum()
                held[part.member] += _part_numel(m, part) * (b_in + b_out)
        fwd = [(int(sent[r]) * b_in, int(gathered[r]) * b_in) for r in range(P)]
        ret = [(int(gathered[r]) * b_out, int(sent[r]) * b_out) for r in range(P)]
        rounds = round_traffic(matrices, a.parts)
        for r, cost in enumerate(ranks):
            if P > 1:
                cost.comm.append(CommItem("all_to_all", fwd[r][0], fwd[r][1], "forward"))
                cost.comm.extend(_round_items(rounds, r))
                cost.comm.append(CommItem("all_to_all", ret[r][0], ret[r][1], "return"))
            cost.transient_bytes = max(cost.transient_bytes,
                                       held[r] + sum(fwd[r]) + sum(ret[r]))
        return None

    def sharded_time(self, plan, calls, compute):
        """Forward and return as synchronous calls; between them each rank runs its whole
        matrices and its shares of the split ones (at the fitted rate), and a member of a split
        also waits in the split rounds, priced as the planner prices them (`rank_costs`: bytes
        times flop_per_byte plus flop_per_peer per message, in NS FLOPs, so at the NS rate).
        `calls` are the forward and return all-to-alls (the member-only rounds are no call over
        the whole group)."""
        P = plan.world_size
        sharded = [m for m in plan.matrices if m.sharded]
        a = self._assignment(sharded, P)
        works = []
        for r in range(P):
            whole = [m for k, m in enumerate(sharded) if not a.is_split(k)
                     and a.parts[k][0].member == r]
            split = sum(1 for k in range(len(sharded)) if a.is_split(k)
                        and any(p.member == r for p in a.parts[k]))
            split_flops = a.flops[r] - sum(m.flops for m in whole)
            works.append(compute.ns_matrices_seconds(whole, self.batches_same_shape)
                         + (compute.ns_seconds(split_flops, split) if split else 0.0))
        rounds = self._round_seconds(a, compute)
        finish = compute.concurrent(works)
        ns_s = max(finish, default=0.0)
        step = max((f + w for f, w in zip(finish, rounds)), default=0.0)
        return sum(c.seconds for c in calls) + step, ns_s

    def member_comm_seconds(self, plan, compute) -> float:
        """The busiest member's seconds in the split rounds, as `sharded_time` prices them."""
        sharded = [m for m in plan.matrices if m.sharded]
        if not sharded:
            return 0.0
        return max(self._round_seconds(self._assignment(sharded, plan.world_size), compute),
                   default=0.0)

    @staticmethod
    def _round_seconds(a, compute) -> list[float]:
        return [compute.ns_seconds(c - f, 0) for c, f in zip(a.cost, a.flops)]

    # -- execution -------------------------------------------------------------------------------
    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        P, me = ctx.world_size, ctx.rank
        matrices = [plan.matrices[i] for i in indices]
        a = self._assignment(matrices, P)
        mine = [(k, p) for k, parts in enumerate(a.parts) for p in parts if p.member == me]
        send = [torch.cat([_cut(m, p, me, inputs[k]) for k, m in enumerate(matrices)
                           for p in a.parts[k] if p.member == d] or [inputs[0].new_empty(0)])
                for d in range(P)]
        recv = [sum(piece_numel(matrices[k], p, s) for k, p in mine) for s in range(P)]
        with ctx.phase("comm_wait"):
            pieces = exchange(send, recv, me, ctx.group, P).wait()
        per_source = [torch.split(pieces[s], [piece_numel(matrices[k], p, s) for k, p in mine])
                      for s in range(P)]
        blocks = {k: _block(matrices[k], p, [per_source[s][j] for s in range(P)])
                  for j, (k, p) in enumerate(mine)}
        results = _SplitRounds(matrices, a, ctx).run({k: blocks[k] for k, _ in mine
                                                      if a.is_split(k)})
        whole = {k: blocks[k].view(matrices[k].shape) for k, _ in mine if not a.is_split(k)}
        results.update(orthogonalize_owned(matrices, whole, ctx, self.options.batch_same_shape))
        back = [torch.cat([_result_piece(matrices[k], p, d, _as_block(matrices[k], p,
                                                                     results[k]))
                           for k, p in mine] or [torch.empty(0, dtype=ctx.out_dtype,
                                                             device=ctx.device)])
                for d in range(P)]
        back_numels = [sum(piece_numel(matrices[k], p, me) for k, parts in enumerate(a.parts)
                           for p in parts if p.member == s) for s in range(P)]
        with ctx.phase("comm_wait"):
            got = exchange(back, back_numels, me, ctx.group, P).wait()
        return _reassemble(matrices, a, me, P, got)


def _part_numel(m: MatrixSpec, part: Part) -> int:
    return (part.hi - part.lo) * (m.row_numel if part.axis == 0 else m.shape[0])


def _as_block(m: MatrixSpec, part: Part, result: torch.Tensor) -> torch.Tensor:
    """A result in the layout `_block` uses (a whole matrix: all its rows)."""
    if part.axis == 1:
        return result.reshape(m.shape[0], part.hi - part.lo)
    return result.reshape(part.hi - part.lo, m.row_numel)


def _reassemble(matrices, a, me: int, P: int, got: list[torch.Tensor]) -> list[torch.Tensor]:
    """My row shard of every result from the pieces each owner / member sent me."""
    sizes = [[] for _ in range(P)]
    for k, parts in enumerate(a.parts):
        for p in parts:
            sizes[p.member].append((k, p))
    chunks: dict[tuple[int, int], torch.Tensor] = {}
    for s in range(P):
        split = torch.split(got[s], [piece_numel(matrices[k], p, me) for k, p in sizes[s]])
        for (k, p), c in zip(sizes[s], split):
            chunks[(k, p.lo)] = c
    out = []
    for k, m in enumerate(matrices):
        rows = m.dim0_sizes[me]
        parts = a.parts[k]
        if len(parts) == 1:  # one owner sent all my rows: a view, no copy
            piece = chunks[(k, parts[0].lo)]
        elif parts[0].axis == 1:
            piece = torch.cat([chunks[(k, p.lo)].view(rows, p.hi - p.lo) for p in parts], dim=1)
        else:
            piece = torch.cat([chunks[(k, p.lo)].view(-1, m.row_numel) for p in parts])
        out.append(piece.view(m.local_shape(me)))
    return out


def _round_items(rounds, rank: int) -> list[CommItem]:
    """Rank's messages in the split rounds (`round_traffic`), in the order `_SplitRounds` posts
    them: per round, per fellow member (ascending), the send and then the receive."""
    items = []
    for peers in rounds:
        for q, (send, recv) in sorted(peers.get(rank, {}).items()):
            pair = (min(rank, q), max(rank, q))
            if send:
                items.append(CommItem("send", send, 0, "forward", group=pair))
            if recv:
                items.append(CommItem("recv", 0, recv, "forward", group=pair))
    return items


class _SplitRounds:
    """The split matrices' Newton-Schulz, in lockstep rounds of point-to-point messages among
    each split's members."""

    def __init__(self, matrices, a, ctx: ExecContext) -> None:
        self.matrices, self.a, self.ctx = matrices, a, ctx
        split = [k for k in range(len(matrices)) if a.is_split(k)]
        self.steps = max((matrices[k].ns_steps for k in split), default=0)
        # one dtype per round on every rank: what split_plan.gram_itemsizes plans
        self.norm_dtype = torch.promote_types(matrices[0].dtype, torch.float32)
        self.gram_dtype = torch.promote_types(ctx.out_dtype, torch.float32)
        self.dtypes = [self.norm_dtype] + [self.gram_dtype, ctx.out_dtype] * self.steps

    def _exchange(self, sends: dict[int, torch.Tensor], t: int) -> dict[int, list[torch.Tensor]]:
        """Send sends[k] to every other member of split matrix k, one message per fellow member
        (its matrices in order); returns per matrix the tensors of all its members in block
        order (mine included)."""
        ctx = self.ctx
        rows, dtype = t > 0 and t % 2 == 0, self.dtypes[t]
        out_pieces: dict[int, list] = {}  # fellow -> [(k, numel)] it sends me, in matrix order
        in_pieces: dict[int, list] = {}  # fellow -> my tensors for it
        for k, x in sends.items():
            for p in self.a.parts[k]:
                if p.member != ctx.rank:
                    in_pieces.setdefault(p.member, []).append(x.reshape(-1))
                    out_pieces.setdefault(p.member, []).append((k, self._size(p, x, rows)))
        ops, received = [], {}
        for q in sorted(in_pieces):
            send = torch.cat(in_pieces[q])
            recv = torch.empty(sum(n for _, n in out_pieces[q]), dtype=dtype, device=ctx.device)
            if send.numel():
                ops.append(dist.P2POp(dist.isend, send, group=ctx.group, group_peer=q))
            if recv.numel():
                ops.append(dist.P2POp(dist.irecv, recv, group=ctx.group, group_peer=q))
            received[q] = torch.split(recv, [n for _, n in out_pieces[q]])
        for work in dist.batch_isend_irecv(ops) if ops else ():
            work.wait()
        position = {q: 0 for q in received}
        out = {}
        for k, x in sends.items():
            tensors = []
            for p in self.a.parts[k]:
                if p.member == ctx.rank:
                    tensors.append(x)
                    continue
                tensors.append(received[p.member][position[p.member]])
                position[p.member] += 1
            out[k] = tensors
        return out

    @staticmethod
    def _size(p: Part, mine: torch.Tensor, rows: bool) -> int:
        """Elements member p sends in this round: as many as I do, but B rows are p's own."""
        return (p.ahi - p.alo) * mine.shape[-1] if rows else mine.numel()

    def run(self, blocks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """NS of my blocks of the split matrices; returns my result blocks (layout of `_block`).
        A rank without split blocks takes no part in the rounds."""
        ctx = self.ctx
        if not blocks or ctx.world_size == 1:
            return {}
        orth = ctx.orthogonalizer
        X, cfg, trans = {}, {}, {}
        for k, b in blocks.items():
            m = self.matrices[k]
            cfg[k] = orth.config(m.index)
            trans[k] = self.a.parts[k][0].axis == 0  # a tall matrix's block of rows: X = G^T
            X[k] = b.mT if trans[k] else b
        with ctx.phase("ns"):
            sq = {k: x.to(self.norm_dtype).square().sum().reshape(1) for k, x in X.items()}
        with ctx.phase("comm_wait"):
            sums = self._exchange(sq, 0)
        compute = {}
        with ctx.phase("ns"):
            for k, x in X.items():
                norm = torch.stack([s.reshape(()) for s in sums[k]]).sum().sqrt().to(x.dtype)
                compute[k] = cfg[k].torch_dtype(ctx.device)
                X[k] = normalized(x, norm, cfg[k].coefficients, cfg[k].eps).to(compute[k])
        gram_dtype = self.gram_dtype
        for t in range(self.steps):
            live = [k for k in X if t < cfg[k].steps]
            if not live:
                break
            with ctx.phase("ns"):
                partial = {k: X[k].to(gram_dtype) @ X[k].to(gram_dtype).mT for k in live}
            with ctx.phase("comm_wait"):
                grams = self._exchange(partial, 1 + 2 * t)
            rows = {}
            with ctx.phase("ns"):
                A = {}
                for k in live:
                    total = grams[k][0].view_as(partial[k]).clone()
                    for g in grams[k][1:]:
                        total += g.view_as(total)
                    A[k] = total.to(compute[k])
                    mine = next(p for p in self.a.parts[k] if p.member == ctx.rank)
                    _, b, c = step_coefficients(cfg[k].coefficients, t)
                    mine_rows = A[k][mine.alo:mine.ahi]
                    rows[k] = matmul_add(mine_rows, mine_rows, A[k], beta=b, alpha=c)
            with ctx.phase("comm_wait"):
                brows = self._exchange(rows, 2 + 2 * t)
            with ctx.phase("ns"):
                for k in live:
                    kk = A[k].shape[0]
                    B = torch.cat([r.view(-1, kk) for r in brows[k]])
                    a_coef, _, _ = step_coefficients(cfg[k].coefficients, t)
                    X[k] = matmul_add(X[k], B, X[k], beta=a_coef)
        for k in X:
            m, mine = self.matrices[k], next(p for p in self.a.parts[k]
                                             if p.member == ctx.rank)
            _, kk, _ = split_dims(m)
            orth.flops.total += part_flops(m, kk, mine.hi - mine.lo, mine.ahi - mine.alo)
        return {k: (x.mT if trans[k] else x) for k, x in X.items()}
