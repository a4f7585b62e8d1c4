"""`overlapped`: buckets that follow the backward pass, so orthogonalization can run during it.

Every other strategy starts after `loss.backward()` returns. Under FSDP2 a matrix's gradient is
final as soon as its `fully_shard` unit has reduce-scattered it, and the last layers finish first.
This strategy plans for that:

- buckets are the FSDP2 units in backward order (`MatrixSpec.unit`: 0 finishes first; the
  optimizer fills it from the model, see `dist_ortho.optim.overlap`), optionally cut further into
  buckets of at most `bucket_bytes`; matrices of an unknown unit form one bucket;
- owners come from LPT by Newton-Schulz FLOPs inside each bucket, seeded with the load of the
  buckets before it, so that every bucket's work is spread over the ranks and the step's total
  stays balanced (the same rule as `bucketed_async`, in backward order);
- each bucket moves like `balanced`: one `all_to_all_single` to the owners, one back.

`BucketPipeline` runs the buckets in plan order with a fixed, timing-independent schedule, so
every rank issues the same collectives in the same order:

    push(b):  issue forward(b) (async); while more than `lag` forwards are unprocessed:
              wait the oldest forward, NS it, issue its return (async); keep at most
              `max_in_flight` returns outstanding
    drain():  process what is left, wait every return

With `schedule: backward` (the default) the optimizer pushes a unit's buckets from FSDP2's
post-reduce-scatter hook while backward continues on earlier layers, and `step()` drains;
with `schedule: step`, or whenever hooks cannot be used (plain tensors, gradients set by hand),
`execute` pushes every bucket after backward, which is `bucketed_async`'s schedule (lag 1).
Either way the plan, the bytes and the FLOPs are the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ortho.core.plan import ComputeTimes, TimedCall
from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies.balanced import orthogonalize_owned, owner_plan
from dist_ortho.strategies.base import ExecContext, Plan, Strategy
from dist_ortho.strategies.bucketed_async import make_buckets
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["OverlappedOptions", "Overlapped", "BucketPipeline", "unit_buckets", "SCHEDULES",
           "PipelineTimes", "simulate_pipeline"]

SCHEDULES = ("backward", "step")


@dataclass(frozen=True)
class OverlappedOptions:
    """schedule: "backward" runs buckets from FSDP2's post-reduce-scatter hooks, "step" after
    backward (same plan). bucket_bytes: also cut a unit into buckets of at most this many
    full-matrix bytes (None: one bucket per unit). lag: forwards left in flight before the oldest
    is waited for and orthogonalized (>= 1). max_in_flight: returns left outstanding (>= 1).
    batch_same_shape: one batched NS call per owner, shape and NS setting in a bucket."""

    schedule: str = "backward"
    bucket_bytes: int | None = None
    lag: int = 1
    max_in_flight: int = 2
    batch_same_shape: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"overlapped option 'schedule' must be one of {SCHEDULES}, got "
                             f"{self.schedule!r}")
        b = self.bucket_bytes
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b <= 0):
            raise ValueError(f"overlapped option 'bucket_bytes' must be a positive integer or "
                             f"None, got {b!r}")
        for name in ("lag", "max_in_flight"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"overlapped option {name!r} must be an integer >= 1, got {v!r}")
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError("overlapped option 'batch_same_shape' must be a bool")


def unit_buckets(matrices, bucket_bytes: int | None) -> list[list[int]]:
    """Positions in `matrices` per bucket, in backward order: by unit (None counts as one unit
    after the known ones), then, with `bucket_bytes`, `bucketed_async`'s cut within a unit."""
    units: dict = {}
    for k, m in enumerate(matrices):
        units.setdefault(m.unit, []).append(k)
    order = sorted(units, key=lambda u: (u is None, u if u is not None else 0))
    buckets = []
    for u in order:
        ks = units[u]
        if bucket_bytes is None:
            buckets.append(ks)
        else:
            buckets += [[ks[j] for j in b] for b in make_buckets([matrices[k] for k in ks],
                                                                  bucket_bytes, True)]
    return buckets


class BucketPipeline:
    """Runs a bucketed owner plan bucket by bucket (see the module docstring). Buckets must be
    pushed in plan order; `inputs` of a bucket are this rank's shards of its matrices, in the
    order of `plan.buckets[b]`. `drain()` returns {matrix index: this rank's shard of NS(U)}."""

    def __init__(self, plan: Plan, ctx: ExecContext, lag: int, max_in_flight: int,
                 batch_same_shape: bool) -> None:
        self.plan, self.ctx = plan, ctx
        self.lag, self.max_in_flight, self.batched = lag, max_in_flight, batch_same_shape
        self.pushed = 0
        self.outputs: dict[int, torch.Tensor] = {}
        self._forwards: deque = deque()
        self._returns: deque = deque()

    def _bucket(self, b: int):
        indices = list(self.plan.buckets[b])
        return (indices, [self.plan.matrices[i] for i in indices],
                [self.plan.owner[i] for i in indices])

    def push(self, b: int, inputs: Sequence[torch.Tensor]) -> None:
        if b != self.pushed:
            raise RuntimeError(f"bucket {b} pushed out of order (expected {self.pushed}); every "
                               f"rank must issue the buckets' collectives in plan order")
        self.pushed += 1
        _, ms, os_ = self._bucket(b)
        self._forwards.append((b, ox.send_forward(ms, os_, inputs, self.ctx, async_op=True)))
        while len(self._forwards) > self.lag:
            self._compute_oldest()

    def _compute_oldest(self) -> None:
        b, handle = self._forwards.popleft()
        _, ms, os_ = self._bucket(b)
        ctx = self.ctx
        with ctx.phase("comm_wait"):
            pieces = handle.wait()
        full = ox.assemble(ms, os_, ctx.rank, ctx.world_size, pieces)
        results = orthogonalize_owned(ms, full, ctx, self.batched)
        del full
        self._returns.append((b, ox.send_back(ms, os_, results, ctx, async_op=True)))
        while len(self._returns) > self.max_in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        b, handle = self._returns.popleft()
        indices, ms, os_ = self._bucket(b)
        with self.ctx.phase("comm_wait"):
            pieces = handle.wait()
        for i, out in zip(indices, ox.split_returns(ms, os_, self.ctx.rank, self.ctx.world_size,
                                                    pieces)):
            self.outputs[i] = out

    def drain(self) -> dict[int, torch.Tensor]:
        if self.pushed != len(self.plan.buckets):
            raise RuntimeError(f"drain() after {self.pushed} of {len(self.plan.buckets)} buckets")
        while self._forwards:
            self._compute_oldest()
        while self._returns:
            self._finish_oldest()
        return self.outputs

    def abandon(self) -> None:
        """Wait for every collective issued so far and drop the results (all ranks abandon at the
        same point, so no rank is left waiting for a collective the others skip)."""
        for _, handle in list(self._forwards) + list(self._returns):
            handle.wait()
        self._forwards.clear()
        self._returns.clear()
        self.outputs = {}


@register
class Overlapped(Strategy):
    name = "overlapped"
    Options = OverlappedOptions

    def __init__(self, options: OverlappedOptions | None = None) -> None:
        super().__init__(options or OverlappedOptions())

    follows_backward = True  # buckets follow MatrixSpec.unit (the optimizer fills it)

    @property
    def runs_in_backward(self) -> bool:
        """Whether the optimizer should run this strategy's buckets from backward hooks."""
        return self.options.schedule == "backward"

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        buckets = unit_buckets(matrices, self.options.bucket_bytes)
        load = [0] * world_size
        held_per_bucket = []
        for b, ks in enumerate(buckets):
            owners = lpt_owners([matrices[k] for k in ks], world_size, load)
            for k, o in zip(ks, owners):
                owner[matrices[k].index] = o
                bucket[matrices[k].index] = b
                ranks[o].computes.append(matrices[k].index)
                load[o] += matrices[k].flops
            held_per_bucket.append(owner_plan([matrices[k] for k in ks], owners, world_size,
                                              ranks))
        depth = self.options.lag + 1 + self.options.max_in_flight
        itemsize = dtype_size(matrices[0].dtype)
        for r, cost in enumerate(ranks):
            held = [h[r] for h in held_per_bucket]
            window = max(sum(held[b:b + depth]) for b in range(len(held)))
            if self.runs_in_backward:  # the new momentum rows wait for step() to commit them
                window += sum(m.shard_numel(r) for m in matrices) * itemsize
            cost.transient_bytes = max(cost.transient_bytes, window)
        return tuple(tuple(matrices[k].index for k in ks) for ks in buckets)

    def pipeline(self, plan: Plan, ctx: ExecContext) -> BucketPipeline:
        o = self.options
        return BucketPipeline(plan, ctx, o.lag, o.max_in_flight, o.batch_same_shape)

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        by_index = dict(zip(indices, inputs))
        pipe = self.pipeline(plan, ctx)
        for b, members in enumerate(plan.buckets):
            pipe.push(b, [by_index[i] for i in members])
        outputs = pipe.drain()
        return [outputs[i] for i in indices]

    # -- timing model ----------------------------------------------------------------------------
    def sharded_time(self, plan: Plan, calls: Sequence[TimedCall],
                     compute: ComputeTimes) -> tuple[float, float]:
        """The step-time schedule (every bucket ready at once), simulated by
        `simulate_pipeline` with no backward: (orthogonalize seconds, slowest rank's NS)."""
        fwd = [c.seconds for c in calls if c.phase == "forward"]
        ret = [c.seconds for c in calls if c.phase == "return"]
        result = simulate_pipeline(plan, self.options, fwd, ret, compute)
        return max(result.end), max(result.ns_busy, default=0.0)


@dataclass
class PipelineTimes:
    """What `simulate_pipeline` predicts, in seconds from the start of backward (or of the
    optimizer step, with no backward), on one clock for all ranks. `backward_end`: when each
    rank's backward returns; `end`: when its pipeline is drained. `spans[r]`: (label, start, end,
    lane) of what rank r's thread ("thread") and the link ("link") did."""

    backward_end: list
    end: list
    ns_busy: list
    spans: list


def simulate_pipeline(plan: Plan, options: OverlappedOptions, fwd: Sequence[float],
                      ret: Sequence[float], compute: ComputeTimes,
                      backward: Sequence[float] | None = None, tail: float = 0.0,
                      work_before: Sequence[Sequence[float]] | None = None) -> PipelineTimes:
    """Simulate `BucketPipeline` on every rank. `fwd[b]`/`ret[b]`: duration of bucket b's forward
    and return all-to-all. `backward[b]`: backward compute each rank's thread does before it
    pushes bucket b (since the previous push; None: no backward, every bucket is pushed at once,
    the step-time schedule); the pipeline's own waits and NS run on the same thread, so they
    delay the backward that follows. `tail`: backward compute after the last push, before
    `drain()`. `work_before[r][b]`: other thread seconds before pushing b (e.g. momentum).
    Collectives run one at a time on one link in issue order; one starts once every rank has
    issued it, and its end releases every rank waiting for it."""
    P = plan.world_size
    nb = len(plan.buckets)
    if P == 1:
        fwd, ret = [0.0] * nb, [0.0] * nb
    if len(fwd) != nb or len(ret) != nb:
        raise ValueError(f"plan has {nb} buckets but {len(fwd)} forward and {len(ret)} return "
                         f"collectives")
    backward = list(backward) if backward is not None else [0.0] * nb
    owned = [[[i for i in plan.buckets[b] if plan.owner[i] == r] for b in range(nb)]
             for r in range(P)]
    t = [0.0] * P  # each rank's thread
    link = 0.0
    spans: list[list] = [[] for _ in range(P)]
    ns_busy = [0.0] * P
    forwards: deque = deque()
    returns: deque = deque()

    def issue(duration: float, label: str) -> float:
        nonlocal link
        begin = max(max(t), link)
        link = begin + duration
        for r in range(P):
            spans[r].append((label, begin, link, "link"))
        return link

    def wait(end: float) -> None:
        for r in range(P):
            t[r] = max(t[r], end)

    def compute_oldest() -> None:
        b, done = forwards.popleft()
        wait(done)
        works = [compute.ns_matrices_seconds([plan.matrices[i] for i in owned[r][b]],
                                             options.batch_same_shape) for r in range(P)]
        finish = compute.concurrent(works)
        for r in range(P):
            if works[r] > 0:
                spans[r].append((f"ns b{b}", t[r], t[r] + finish[r], "thread"))
            ns_busy[r] += finish[r]
            t[r] += finish[r]
        returns.append(issue(ret[b], f"return b{b}"))
        while len(returns) > options.max_in_flight:
            wait(returns.popleft())

    for b in range(nb):
        for r in range(P):
            if backward[b] > 0:
                spans[r].append(("backward", t[r], t[r] + backward[b], "thread"))
            t[r] += backward[b] + (work_before[r][b] if work_before else 0.0)
        forwards.append((b, issue(fwd[b], f"forward b{b}")))
        while len(forwards) > options.lag:
            compute_oldest()
    for r in range(P):
        if tail > 0:
            spans[r].append(("backward", t[r], t[r] + tail, "thread"))
        t[r] += tail
    backward_end = list(t)
    while forwards:
        compute_oldest()
    while returns:
        wait(returns.popleft())
    return PipelineTimes(backward_end, list(t), ns_busy, spans)
