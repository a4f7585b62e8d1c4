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
as large as its rank's room allows. A rank's cost is its NS FLOPs plus `flop_per_byte` times the
bytes it sends in the Gram exchanges. The lowest feasible target wins, if it beats LPT.
`split="all"` splits every splittable matrix evenly over min(max_group, P) ranks (tests and
comparisons).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from dataclasses import dataclass

import torch

from dist_ortho.sharding import MatrixSpec, chunk_sizes, dtype_size

__all__ = ["Part", "Assignment", "assign", "split_dims", "part_flops", "gram_itemsizes",
           "SPLIT_POLICIES"]

SPLIT_POLICIES = ("auto", "all")


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


def _fill(matrices, world_size: int, order, target: float, max_group: int,
          flop_per_byte: float):
    """Pack every matrix under `target` cost per rank, largest first: whole on the rank with the
    least room that still fits it (best fit), or else, if splittable, over the ranks with the
    most room, each taking the largest block that fits (at most max_group ranks). Returns
    (parts, flops per rank) or None if the target cannot be met this way."""
    room = sorted((target, r) for r in range(world_size))  # ascending by room left
    parts: list = [None] * len(matrices)
    flops = [0] * world_size
    for k in order:
        m = matrices[k]
        f = m.flops
        pos = bisect.bisect_left(room, (f, -1))
        if pos < len(room):
            left, r = room.pop(pos)
            parts[k] = (Part(r, 0, 0, m.shape[0]),)
            flops[r] += f
            bisect.insort(room, (left - f, r))
            continue
        dims = split_dims(m)
        if dims is None:
            return None
        placed = _split_into(m, dims, room, max_group, flop_per_byte)
        if placed is None:
            return None
        parts[k] = placed
        for part in placed:
            share = part_flops(m, dims[1], part.hi - part.lo, part.ahi - part.alo)
            flops[part.member] += share
    return parts, flops


def _split_into(m: MatrixSpec, dims, room: list, max_group: int, flop_per_byte: float):
    """Split m over the fewest ranks with the most room (2..max_group) whose blocks cover its
    long side; takes their room from `room` (sorted (room, rank) pairs) and returns the parts,
    or None (room left unchanged) if no group size fits."""
    _, k, l = dims
    steps = m.ns_steps
    for g in range(2, min(max_group, len(room)) + 1):
        top = room[-g:][::-1]  # most room first
        blocks, left = [], l
        for (space, _), arows in zip(top, chunk_sizes(k, g)):
            usable = space - flop_per_byte * gram_send_bytes(m, k, g, arows)
            block = min(left, math.floor((usable / steps - 2 * arows * k * k) / (4 * k * k)))
            if block < 1:
                break
            blocks.append(block)
            left -= block
        if left or len(blocks) < g:
            continue
        del room[-g:]
        parts = _parts(m, dims, [r for _, r in top], blocks)
        for (space, r), part in zip(top, parts):
            arows = part.ahi - part.alo
            used = part_flops(m, k, part.hi - part.lo, arows) + flop_per_byte * gram_send_bytes(
                m, k, g, arows)
            bisect.insort(room, (space - used, r))
        return parts
    return None


@functools.lru_cache(maxsize=16)
def assign(matrices: tuple[MatrixSpec, ...], world_size: int, max_group: int,
           flop_per_byte: float, split: str) -> Assignment:
    """The parts of every (sharded) matrix; see the module docstring."""
    P = world_size
    g_max = min(max_group, P)
    splittable = sorted((k for k, m in enumerate(matrices) if split_dims(m) is not None
                         and split_dims(m)[2] >= 2),
                        key=lambda k: (-matrices[k].flops, matrices[k].index))
    if split == "all" and g_max >= 2:
        # every splittable matrix over g_max ranks (those whose long side has fewer elements
        # than g_max ranks split over as many as it has)
        cost = [0.0] * P
        flops = [0] * P
        parts: list = [None] * len(matrices)
        heap = [(0.0, r) for r in range(P)]
        for k in splittable:
            m = matrices[k]
            dims = split_dims(m)
            members = [heapq.heappop(heap)[1] for _ in range(min(g_max, dims[2]))]
            parts[k], shares = _split(m, dims, members)
            for part, f in zip(parts[k], shares):
                cost[part.member] += f
                flops[part.member] += f
            for r in members:
                heapq.heappush(heap, (cost[r], r))
        for k, m in enumerate(matrices):
            if parts[k] is None:
                c, r = heapq.heappop(heap)
                parts[k] = (Part(r, 0, 0, m.shape[0]),)
                cost[r] += m.flops
                flops[r] += m.flops
                heapq.heappush(heap, (cost[r], r))
        return Assignment(tuple(parts), tuple(flops))
    order = sorted(range(len(matrices)), key=lambda k: (-matrices[k].flops, matrices[k].index))
    parts, flops = _whole_lpt(matrices, P, order)
    best = (max(flops, default=0), parts, flops)
    if g_max >= 2 and splittable:
        ideal = sum(m.flops for m in matrices) / P
        for target in _targets(ideal, float(best[0])):
            packed = _fill(matrices, P, order, target, g_max, flop_per_byte)
            if packed is not None and max(packed[1]) < best[0]:
                best = (max(packed[1]), packed[0], packed[1])
                break
    return Assignment(tuple(best[1]), tuple(best[2]))


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
