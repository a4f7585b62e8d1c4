"""Who runs what under `split_ns`: whole matrices on one owner, the largest split over a few ranks.

Pure planning, shared by `split_ns.plan()` and its `execute()`. A matrix is a list of `Part`s: a
whole matrix is one part (its owner, all rows); a split matrix of 2-D view (rows, cols) with
k = min(rows, cols) and l = max(rows, cols) is cut along l into g contiguous blocks, one per
member rank, and its k x k products are cut by rows: member j also owns rows [alo, ahi) of
A A. Per NS step a member with a block of l_j long-side elements and a_j rows of A runs
4 k^2 l_j + 2 a_j k^2 FLOPs (its share of X X^T and B X, and its rows of A A), so the members
together run exactly the whole matrix's FLOPs: splitting costs bytes, not FLOPs.

Choice (`assign`): greedy LPT over whole matrices is the baseline. Then a target cost per rank is
bisected between the even split (sum of FLOPs / P) and LPT's: for a target, matrices go largest
first whole onto the rank with the least room that still fits them (best fit), and a matrix that
fits nowhere is split over the fewest ranks with the most room (at most `max_group`), each block
as large as its rank's room allows. A rank's cost (`rank_costs`) is its NS FLOPs, plus, if it is a
member of any split, `flop_per_byte` times the bytes it sends in the split rounds and
`flop_per_peer` for each message of those rounds: the rounds run among the members only, one
message per round to each fellow member (`round_traffic`; all split matrices two ranks share
travel in one), so a member of a g-rank split waits (g - 1) latencies per round, whatever P. The lowest
feasible target wins if its busiest rank's cost, plus `flop_per_byte_exchange` times the busiest
rank's bytes of the forward and of the return all-to-all (`exchange_bytes`: packing the small
matrices tightly can pile bytes on a few ranks), is below the same sum for LPT (which sends nothing
in rounds), so the planner never picks a split that its own pricing says is slower.
With `ranks_per_node` (G) every split group lies inside one node (ranks [n G, (n + 1) G)): the
candidate groups are the G-rank nodes that hold the ranks with the most room, and the weights are
then the intra-node link's. `split="all"` splits every splittable matrix evenly over
min(max_group, P, G) ranks (tests and comparisons).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from dist_ortho.core.sharding import MatrixSpec, chunk_sizes, dtype_size

__all__ = ["Part", "Assignment", "assign", "piece_numels", "split_dims", "part_flops",
           "gram_itemsizes", "rank_costs", "round_traffic", "SPLIT_POLICIES"]

SPLIT_POLICIES = ("auto", "all")
# node-local groups: candidate nodes per group size, those holding the ranks with the most room
# (a node further down that order has less room on its best rank; trying all would cost O(P))
NODES_TRIED = 8


@dataclass(frozen=True)
class Part:
    """A block of a matrix held by `member`: rows [lo, hi) of its (rows, row_numel) view if
    axis == 0, columns [lo, hi) if axis == 1, and rows [alo, ahi) of its k x k products. A whole
    matrix is one part on axis 0."""

    member: int
    axis: int
    lo: int
    hi: int
    alo: int = 0
    ahi: int = 0


@dataclass(frozen=True)
class Assignment:
    """parts[k]: the parts of matrix k (position in the planned list), in block order."""

    parts: tuple[tuple[Part, ...], ...]
    flops: tuple[int, ...]  # per rank: NS FLOPs, split shares included
    cost: tuple[float, ...] = ()  # per rank: flops + priced split-round bytes and latency

    def is_split(self, k: int) -> bool:
        return len(self.parts[k]) > 1


def split_dims(m: MatrixSpec) -> tuple[int, int, int] | None:
    """(axis, k, l) of a splittable matrix (2-D view, sharded, standard NS form: the split rounds
    run the standard iteration), else None. Square matrices split
    their columns: NS does not transpose them, so X = G and its long side is dim 1."""
    if not m.sharded or len(m.view_shape) != 2 or m.ns_form != "standard":
        return None
    rows, cols = m.shape[0], m.row_numel
    if rows > cols:
        return 0, cols, rows
    return 1, rows, cols


def part_flops(m: MatrixSpec, k: int, block: int, arows: int) -> int:
    return m.ns_steps * (4 * k * k * block + 2 * arows * k * k)


def gram_itemsizes(m: MatrixSpec) -> tuple[int, int]:
    """Bytes per element of the exchanged norm partial sums and Gram partials: float32, or
    float64 for float64 inputs (what `split_ns` sends)."""
    norm = torch.promote_types(m.dtype, torch.float32)
    out = m.out_dtype if m.out_dtype is not None else m.dtype
    return dtype_size(norm), dtype_size(torch.promote_types(out, torch.float32))


def gram_send_bytes(m: MatrixSpec, k: int, g: int, arows: int) -> int:
    """Bytes one member sends in all of a split matrix's rounds: its norm partial, then per step
    its Gram partial (k x k) and its rows of B, to each of the g - 1 other members."""
    b_norm, b_gram = gram_itemsizes(m)
    return (g - 1) * (b_norm + m.ns_steps * k * (k * b_gram + arows * m.out_itemsize))


def piece_numel(m: MatrixSpec, part: Part, rank: int) -> int:
    """Elements of rank's row shard that lie in `part`."""
    if part.axis == 1:
        return m.dim0_sizes[rank] * (part.hi - part.lo)
    start = m.shard_offset(rank)
    return max(0, min(start + m.dim0_sizes[rank], part.hi) - max(start, part.lo)) * m.row_numel


def piece_numels(m: MatrixSpec, part: Part) -> np.ndarray:
    """piece_numel(m, part, r) for every rank r at once (int64): the planners of P = 4096 ask
    it for every rank of every matrix."""
    sizes = np.asarray(m.dim0_sizes, dtype=np.int64)
    if part.axis == 1:
        return sizes * (part.hi - part.lo)
    starts = np.asarray(m.dim0_starts, dtype=np.int64)
    overlap = np.minimum(starts[1:], part.hi) - np.maximum(starts[:-1], part.lo)
    return np.clip(overlap, 0, None) * m.row_numel


def exchange_bytes(matrices, parts, world_size: int, local: list[int]) -> tuple[float, float]:
    """The busiest rank's bytes (larger of send and receive) in the forward all-to-all (every
    rank sends each owner / member its piece of the part) and in the return (the way back), as
    `split_ns` plans them; local[r]: elements of rank r's shards of all matrices."""
    P = world_size
    own = [0] * P  # elements a rank keeps: its own pieces of its parts
    got = [0] * P  # elements a rank's parts take from the others
    b_in, b_out = dtype_size(matrices[0].dtype), matrices[0].out_itemsize
    for m, ps in zip(matrices, parts):
        for p in ps:
            mine = piece_numel(m, p, p.member)
            own[p.member] += mine
            n = (p.hi - p.lo) * (m.row_numel if p.axis == 0 else m.shape[0])
            got[p.member] += n - mine
    out = [max(local[r] - own[r], got[r]) for r in range(P)]
    return max(out, default=0) * b_in, max(out, default=0) * b_out


def _parts(m: MatrixSpec, dims, members, blocks) -> tuple[Part, ...]:
    axis, k, _ = dims
    parts, lo, alo = [], 0, 0
    for member, block, arows in zip(members, blocks, chunk_sizes(k, len(members))):
        parts.append(Part(member, axis, lo, lo + block, alo, alo + arows))
        lo += block
        alo += arows
    return tuple(parts)


def _split(m: MatrixSpec, dims, members: list[int]) -> tuple[tuple[Part, ...], list[int]]:
    parts = _parts(m, dims, sorted(members), chunk_sizes(dims[2], len(members)))
    return parts, [part_flops(m, dims[1], p.hi - p.lo, p.ahi - p.alo) for p in parts]


def round_traffic(matrices, parts) -> list[dict[int, dict[int, list[int]]]]:
    """Per split round (norm partials, then per NS step Gram partials and B rows): {member:
    {fellow member: [bytes sent to it, bytes received from it]}}, every split matrix the two
    share in one message each way. A matrix of s steps is in rounds 0 .. 2 s; a member with no
    rows of A sends no B rows (no message where both directions are empty)."""
    split = [k for k, p in enumerate(parts) if len(p) > 1]
    steps = max((matrices[k].ns_steps for k in split), default=0)
    out: list[dict] = [{} for _ in range(1 + 2 * steps)] if split else []
    for k in split:
        m = matrices[k]
        _, kk, _ = split_dims(m)
        b_norm, b_gram = gram_itemsizes(m)
        sizes = [b_norm] + [kk * kk * b_gram, 0] * m.ns_steps
        for p in parts[k]:
            for q in parts[k]:
                if q.member == p.member:
                    continue
                for t, n in enumerate(sizes):
                    if t and t % 2 == 0:  # B rows: p sends its own, receives q's
                        send, recv = ((p.ahi - p.alo) * kk * m.out_itemsize,
                                      (q.ahi - q.alo) * kk * m.out_itemsize)
                    else:
                        send = recv = n
                    if send or recv:
                        acc = out[t].setdefault(p.member, {}).setdefault(q.member, [0, 0])
                        acc[0] += send
                        acc[1] += recv
    return out


def rank_costs(matrices, parts, world_size: int, flop_per_byte: float,
               flop_per_peer: float) -> list[float]:
    """Per rank: its NS FLOPs plus, if it is in a split group, the priced bytes it sends in the
    split rounds and the latency of each message it exchanges there (`round_traffic`)."""
    cost = [0.0] * world_size
    for k, m in enumerate(matrices):
        dims = split_dims(m) if len(parts[k]) > 1 else None
        for p in parts[k]:
            cost[p.member] += (m.flops if dims is None else
                               part_flops(m, dims[1], p.hi - p.lo, p.ahi - p.alo))
    for peers in round_traffic(matrices, parts):
        for r, fellows in peers.items():
            cost[r] += (flop_per_byte * sum(s for s, _ in fellows.values())
                        + flop_per_peer * len(fellows))
    return cost


def _whole_lpt(matrices, world_size: int, order) -> tuple[list, list[int]]:
    parts: list = [None] * len(matrices)
    flops = [0] * world_size
    heap = [(0, r) for r in range(world_size)]
    for k in order:
        f, r = heapq.heappop(heap)
        parts[k] = (Part(r, 0, 0, matrices[k].shape[0]),)
        flops[r] += matrices[k].flops
        heapq.heappush(heap, (flops[r], r))
    return parts, flops


class _Room:
    """Room left per rank under a target cost: `sorted` (room, rank) ascending for best fit, and
    `left[rank]` for node-local group choices."""

    def __init__(self, target: float, world_size: int) -> None:
        self.left = [target] * world_size
        self.sorted = [(target, r) for r in range(world_size)]

    def take(self, r: int, used: float) -> None:
        self.sorted.pop(bisect.bisect_left(self.sorted, (self.left[r], r)))
        self.left[r] -= used
        bisect.insort(self.sorted, (self.left[r], r))


def _fill(matrices, world_size: int, order, target: float, max_group: int,
          flop_per_byte: float, flop_per_peer: float, ranks_per_node: int | None):
    """Pack every matrix under `target` cost per rank, largest first: whole on the rank with the
    least room that still fits it (best fit), or else, if splittable, over the ranks with the
    most room (inside one node with `ranks_per_node`), each taking the largest block that fits
    (at most max_group ranks). Returns (parts, flops per rank) or None if the target cannot be
    met this way."""
    room = _Room(target, world_size)
    parts: list = [None] * len(matrices)
    flops = [0] * world_size
    for k in order:
        m = matrices[k]
        f = m.flops
        pos = bisect.bisect_left(room.sorted, (f, -1))
        if pos < len(room.sorted):
            r = room.sorted[pos][1]
            parts[k] = (Part(r, 0, 0, m.shape[0]),)
            flops[r] += f
            room.take(r, f)
            continue
        dims = split_dims(m)
        if dims is None:
            return None
        placed = _split_into(m, dims, room, max_group, flop_per_byte, flop_per_peer,
                             ranks_per_node)
        if placed is None:
            return None
        parts[k] = placed
        for part in placed:
            flops[part.member] += part_flops(m, dims[1], part.hi - part.lo, part.ahi - part.alo)
    return parts, flops


def _groups(room: _Room, g: int, ranks_per_node: int | None):
    """Candidate groups of g ranks, (room, rank) most room first: the g ranks with the most
    room, or per node (the NODES_TRIED nodes holding the ranks with the most room) its g ranks
    with the most room."""
    if ranks_per_node is None:
        yield room.sorted[-g:][::-1]
        return
    P, seen = len(room.left), []
    for _, r in reversed(room.sorted):
        n = r // ranks_per_node
        if n in seen:
            continue
        seen.append(n)
        ranks = range(n * ranks_per_node, min((n + 1) * ranks_per_node, P))
        if len(ranks) >= g:
            yield sorted(((room.left[q], q) for q in ranks), reverse=True)[:g]
        if len(seen) == NODES_TRIED:
            return


def _split_into(m: MatrixSpec, dims, room: _Room, max_group: int, flop_per_byte: float,
                flop_per_peer: float, ranks_per_node: int | None):
    """Split m over the fewest ranks with the most room (2..max_group, inside one node with
    ranks_per_node) whose blocks cover its long side; takes their room and returns the parts,
    or None (room unchanged) if no group fits. Each member also pays the rounds' latency, one
    message per round to each of the g - 1 others (an upper bound where two splits share
    members: `rank_costs` counts each pair's message once)."""
    _, k, l = dims
    steps = m.ns_steps
    for g in range(2, min(max_group, len(room.left)) + 1):
        latency = flop_per_peer * (g - 1) * (1 + 2 * steps)
        for top in _groups(room, g, ranks_per_node):
            blocks, left = [], l
            for (space, r), arows in zip(top, chunk_sizes(k, g)):
                usable = space - flop_per_byte * gram_send_bytes(m, k, g, arows) - latency
                block = min(left, math.floor((usable / steps - 2 * arows * k * k) / (4 * k * k)))
                if block < 1:
                    break
                blocks.append(block)
                left -= block
            if left or len(blocks) < g:
                continue
            parts = _parts(m, dims, [r for _, r in top], blocks)
            for part in parts:
                arows = part.ahi - part.alo
                used = (part_flops(m, k, part.hi - part.lo, arows)
                        + flop_per_byte * gram_send_bytes(m, k, g, arows)
                        + latency)
                room.take(part.member, used)
            return parts
    return None


def _split_all(matrices, P: int, g_max: int, splittable, ranks_per_node: int | None):
    """Every splittable matrix evenly over g_max ranks (fewer if its long side or its node is
    smaller): the least loaded rank and the least loaded others of its node (of all ranks
    without ranks_per_node); the rest whole by LPT."""
    cost = [0] * P
    parts: list = [None] * len(matrices)
    for k in splittable:
        m = matrices[k]
        dims = split_dims(m)
        first = min(range(P), key=lambda r: (cost[r], r))
        pool = (range(P) if ranks_per_node is None else
                range(first // ranks_per_node * ranks_per_node,
                      min((first // ranks_per_node + 1) * ranks_per_node, P)))
        others = sorted((r for r in pool if r != first), key=lambda r: (cost[r], r))
        members = [first] + others[:min(g_max, dims[2]) - 1]
        if len(members) < 2:
            continue  # a one-rank node: whole, below
        parts[k], shares = _split(m, dims, members)
        for part, f in zip(parts[k], shares):
            cost[part.member] += f
    heap = [(cost[r], r) for r in range(P)]
    heapq.heapify(heap)
    for k, m in enumerate(matrices):
        if parts[k] is None:
            c, r = heapq.heappop(heap)
            parts[k] = (Part(r, 0, 0, m.shape[0]),)
            cost[r] += m.flops
            heapq.heappush(heap, (cost[r], r))
    return parts, cost


@functools.lru_cache(maxsize=16)
def assign(matrices: tuple[MatrixSpec, ...], world_size: int, max_group: int,
           flop_per_byte: float, split: str, flop_per_peer: float = 0.0,
           ranks_per_node: int | None = None, flop_per_byte_exchange: float = 0.0) -> Assignment:
    """The parts of every (sharded) matrix; see the module docstring."""
    P = world_size
    g_max = min(max_group, P, ranks_per_node or P)
    splittable = sorted((k for k, m in enumerate(matrices) if split_dims(m) is not None
                         and split_dims(m)[2] >= 2),
                        key=lambda k: (-matrices[k].flops, matrices[k].index))
    if split == "all" and g_max >= 2:
        parts, flops = _split_all(matrices, P, g_max, splittable, ranks_per_node)
        cost = rank_costs(matrices, parts, P, flop_per_byte, flop_per_peer)
        return Assignment(tuple(parts), tuple(flops), tuple(cost))
    order = sorted(range(len(matrices)), key=lambda k: (-matrices[k].flops, matrices[k].index))
    parts, flops = _whole_lpt(matrices, P, order)
    w = flop_per_byte_exchange
    local = [0] * P
    if w:
        for m in matrices:
            for r, rows in enumerate(m.dim0_sizes):
                local[r] += rows * m.row_numel

    def objective(parts, cost) -> float:
        """The busiest rank's cost, plus the busiest forward and return bytes (weighed)."""
        return max(cost, default=0.0) + (w * sum(exchange_bytes(matrices, parts, P, local))
                                         if w else 0.0)

    best = (parts, flops, [float(f) for f in flops])
    lpt = max(flops, default=0)
    lpt_objective = objective(parts, best[2])
    if g_max >= 2 and splittable:
        ideal = sum(m.flops for m in matrices) / P
        for target in _targets(ideal, float(lpt)):
            packed = _fill(matrices, P, order, target, g_max, flop_per_byte, flop_per_peer,
                           ranks_per_node)
            if packed is None:
                continue
            cost = rank_costs(matrices, packed[0], P, flop_per_byte, flop_per_peer)
            # never a split its own pricing calls slower than LPT
            if max(cost) < lpt and objective(packed[0], cost) < lpt_objective:
                best = (packed[0], packed[1], cost)
                break
    return Assignment(tuple(best[0]), tuple(best[1]), tuple(best[2]))


def _targets(ideal: float, lpt: float) -> list[float]:
    """Busiest-rank costs to try, smallest first: 0.25% steps up to 20% above the even split
    (best-fit packing is not monotone in the target, so a bisection could step over the
    smallest one that packs), then a bisection grid up to LPT's."""
    out = [ideal * (1 + 0.0025 * i) for i in range(81) if ideal * (1 + 0.0025 * i) < lpt]
    lo = ideal * 1.2
    while lo < lpt and len(out) < 200:
        out.append(lo)
        lo *= 1.05
    return out
