"""`bucketed_async`: buckets of matrices whose transfers overlap the previous bucket's compute.

Matrices are grouped into buckets of at most `bucket_bytes` (full-matrix bytes, in order; with
`group_by_shape` same-shape matrices are put next to each other first so a bucket batches well).
Inside a bucket, owners come from LPT by Newton-Schulz FLOPs, seeded with the load of earlier
buckets, so every bucket's compute is spread over all ranks and the totals stay balanced.

Each bucket moves like `balanced`: one `all_to_all_single` sends row shards to owners, one brings
results back, exact split sizes. The difference is the schedule, with every collective issued
`async_op=True`:

    issue forward(0)
    for k in buckets:    issue forward(k+1); wait forward(k); NS(k); issue return(k)
    wait the returns, oldest first, keeping at most `max_in_flight` of them outstanding

so bucket k+1's transfer and bucket k-1's return travel while bucket k is being orthogonalized.
Every rank issues the collectives in the same order, which is what NCCL and gloo require. Transient
memory is bounded by about (2 + max_in_flight) buckets of buffers rather than the whole model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from dist_ortho.core.plan import ComputeTimes, TimedCall
from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies.balanced import orthogonalize_owned, owner_plan
from dist_ortho.strategies.base import ExecContext, Plan, Strategy
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["BucketedAsyncOptions", "BucketedAsync", "make_buckets"]


@dataclass(frozen=True)
class BucketedAsyncOptions:
    """bucket_bytes: most full-matrix bytes per bucket (must hold the largest matrix).
    max_in_flight: return transfers allowed outstanding while later buckets compute (>= 1).
    group_by_shape: order matrices by shape before bucketing so same-shape ones batch together.
    batch_same_shape: run an owner's same-shape matrices in a bucket as one batched NS call."""

    bucket_bytes: int = 64 * 2**20
    max_in_flight: int = 2
    group_by_shape: bool = True
    batch_same_shape: bool = True

    def __post_init__(self) -> None:
        if (not isinstance(self.bucket_bytes, int) or isinstance(self.bucket_bytes, bool)
                or self.bucket_bytes <= 0):
            raise ValueError(f"bucketed_async option 'bucket_bytes' must be a positive integer, "
                             f"got {self.bucket_bytes!r}")
        if (not isinstance(self.max_in_flight, int) or isinstance(self.max_in_flight, bool)
                or self.max_in_flight < 1):
            raise ValueError(f"bucketed_async option 'max_in_flight' must be an integer >= 1, "
                             f"got {self.max_in_flight!r}")
        for name in ("group_by_shape", "batch_same_shape"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"bucketed_async option {name!r} must be a bool")


def make_buckets(matrices, bucket_bytes: int, group_by_shape: bool) -> list[list[int]]:
    """Positions in `matrices` per bucket; a bucket closes when the next matrix would overflow
    it."""
    itemsize = dtype_size(matrices[0].dtype)
    too_big = [m for m in matrices if m.numel * itemsize > bucket_bytes]
    if too_big:
        m = max(too_big, key=lambda m: m.numel)
        raise ValueError(
            f"bucketed_async option 'bucket_bytes'={bucket_bytes} is smaller than parameter "
            f"{m.name!r} of shape {m.shape} ({m.numel * itemsize} bytes); raise bucket_bytes to at "
            f"least {m.numel * itemsize}.")
    order = list(range(len(matrices)))
    if group_by_shape:
        order.sort(key=lambda k: (tuple(matrices[k].shape), k))
    buckets: list[list[int]] = [[]]
    filled = 0
    for k in order:
        size = matrices[k].numel * itemsize
        if buckets[-1] and filled + size > bucket_bytes:
            buckets.append([])
            filled = 0
        buckets[-1].append(k)
        filled += size
    return buckets


@register
class BucketedAsync(Strategy):
    name = "bucketed_async"
    Options = BucketedAsyncOptions

    def __init__(self, options: BucketedAsyncOptions | None = None) -> None:
        super().__init__(options or BucketedAsyncOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def _bucket_owners(self, matrices, world_size):
        buckets = make_buckets(matrices, self.options.bucket_bytes, self.options.group_by_shape)
        owners = [0] * len(matrices)
        load = [0] * world_size
        for ks in buckets:
            for k, o in zip(ks, lpt_owners([matrices[k] for k in ks], world_size, load)):
                owners[k] = o
                load[o] += matrices[k].flops
        return buckets, owners

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        buckets, owners = self._bucket_owners(matrices, world_size)
        held_per_bucket = []
        for b, ks in enumerate(buckets):
            for k in ks:
                owner[matrices[k].index] = owners[k]
                bucket[matrices[k].index] = b
                ranks[owners[k]].computes.append(matrices[k].index)
            held_per_bucket.append(owner_plan([matrices[k] for k in ks], [owners[k] for k in ks],
                                              world_size, ranks))
        depth = self.options.max_in_flight + 2  # computing, prefetching, and returns in flight
        for r, cost in enumerate(ranks):
            held = [h[r] for h in held_per_bucket]
            window = max(sum(held[b:b + depth]) for b in range(len(held)))
            cost.transient_bytes = max(cost.transient_bytes, window)
        return tuple(tuple(matrices[k].index for k in ks) for ks in buckets)

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        P, me = ctx.world_size, ctx.rank
        matrices = [plan.matrices[i] for i in indices]
        position = {i: k for k, i in enumerate(indices)}
        buckets = [[position[i] for i in b] for b in plan.buckets]
        outputs = [None] * len(matrices)

        def forward(ks):
            ms, os_ = [matrices[k] for k in ks], [plan.owner[matrices[k].index] for k in ks]
            return ox.send_forward(ms, os_, [inputs[k] for k in ks], ctx, async_op=True)

        def finish(pending_return):
            ks, handle = pending_return
            ms, os_ = [matrices[k] for k in ks], [plan.owner[matrices[k].index] for k in ks]
            with ctx.phase("comm_wait"):
                pieces = handle.wait()
            for k, out in zip(ks, ox.split_returns(ms, os_, me, P, pieces)):
                outputs[k] = out

        returns: deque = deque()
        in_flight = forward(buckets[0])
        for b, ks in enumerate(buckets):
            following = forward(buckets[b + 1]) if b + 1 < len(buckets) else None
            with ctx.phase("comm_wait"):
                pieces = in_flight.wait()
            ms, os_ = [matrices[k] for k in ks], [plan.owner[matrices[k].index] for k in ks]
            full = ox.assemble(ms, os_, me, P, pieces)
            results = orthogonalize_owned(ms, full, ctx, self.options.batch_same_shape)
            returns.append((ks, ox.send_back(ms, os_, results, ctx, async_op=True)))
            while len(returns) > self.options.max_in_flight:
                finish(returns.popleft())
            in_flight = following
        while returns:
            finish(returns.popleft())
        return outputs

    # -- timing model ----------------------------------------------------------------------------
    def sharded_time(self, plan: Plan, calls: Sequence[TimedCall],
                     compute: ComputeTimes) -> tuple[float, float]:
        """Simulate `_execute_sharded`: (time of the orthogonalize phase, NS time of the slowest
        rank). Collectives run one at a time on the channel, in issue order (one communicator,
        as on one NCCL stream); a collective starts when the last rank has issued it; every rank's
        NS of bucket k waits for forward(k); at most `max_in_flight` returns stay outstanding. So
        the pipeline takes about sum over buckets of max(compute_k, comm_k+1) plus the ends."""
        P = plan.world_size
        buckets = plan.buckets
        batched = self.batches_same_shape
        max_in_flight = self.options.max_in_flight
        fwd = [c.seconds for c in calls if c.phase == "forward"]
        ret = [c.seconds for c in calls if c.phase == "return"]
        if P > 1 and (len(fwd) != len(buckets) or len(ret) != len(buckets)):
            raise ValueError(f"bucketed plan has {len(buckets)} buckets but {len(fwd)} forward "
                             f"and {len(ret)} return collectives")
        if P == 1:
            fwd = ret = [0.0] * len(buckets)
        owned = [[[] for _ in buckets] for _ in range(P)]
        for b, members in enumerate(buckets):
            for i in members:
                owned[plan.owner[i]][b].append(i)
        channel = 0.0
        t = [0.0] * P

        def issue(duration: float) -> float:
            nonlocal channel
            start = max(max(t), channel)
            channel = start + duration
            return channel

        ns_busy = [0.0] * P
        pending = issue(fwd[0])
        returns: deque = deque()
        for b in range(len(buckets)):
            following = issue(fwd[b + 1]) if b + 1 < len(buckets) else None
            t = [max(x, pending) for x in t]
            works = [compute.ns_matrices_seconds([plan.matrices[i] for i in owned[r][b]], batched)
                     for r in range(P)]
            done = compute.concurrent(works)
            for r in range(P):
                ns_busy[r] += done[r]
            t = [x + d for x, d in zip(t, done)]
            returns.append(issue(ret[b]))
            while len(returns) > max_in_flight:
                end = returns.popleft()
                t = [max(x, end) for x in t]
            pending = following
        while returns:
            end = returns.popleft()
            t = [max(x, end) for x in t]
        return max(t), max(ns_busy)
