"""Plan types: what a strategy decides and what every rank is predicted to pay for it. Core module.

A `Plan` is pure data: per matrix its owner and bucket, per rank the collectives it takes part in
(`CommItem`s, in issue order), the Newton-Schulz FLOPs it runs and the transient bytes it holds.
Strategies build plans (`strategies.base.Strategy.plan`), the optimizer completes them with its own
all-reduces (`optimizer.plan_step`), the profiler records them beside the measurements and the cost
model turns them into times.

Byte convention (shared with the counter in `profiling.comm`): bytes are the payload this rank
sends to / receives from *other* ranks; its own slice is not traffic. all-gather of s bytes per
rank: (P-1)s each way; gather/scatter: the root receives/sends the other ranks' pieces; all-to-all:
the off-diagonal splits; broadcast: the root sends (P-1)n, the others receive n; all-reduce of n
bytes: 2(P-1)/P n each way (reduce-scatter then all-gather).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from dist_ortho.core.schedule import Schedule
from dist_ortho.core.sharding import MatrixSpec

__all__ = ["CommItem", "RankCost", "Plan", "EVERY_RANK", "all_reduce_bytes", "bytes_by_kind",
           "owner_bound_bytes", "TimedCall", "bytes_by_group"]

# owner value of a matrix that every rank orthogonalizes (every matrix under the strategy
# `replicated`)
EVERY_RANK = -1


def all_reduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in an all-reduce of `nbytes` under the convention."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


def owner_bound_bytes(world_size: int, matrix_numel: int, itemsize_in: int,
                      itemsize_out: int | None = None) -> float:
    """Bytes each rank sends per step, at least, in any scheme where each matrix is assembled once
    on an owner and its result returned once: (P-1)/P^2 * N * (b_in + b_out), which is
    2(P-1)/P^2 * N * b when both directions use b bytes per element. N: elements of the sharded
    matrices; b_in: parameter (gradient) bytes per element; b_out: Newton-Schulz result bytes."""
    itemsize_out = itemsize_in if itemsize_out is None else itemsize_out
    p = world_size
    return (p - 1) / p ** 2 * matrix_numel * (itemsize_in + itemsize_out)


def bytes_by_kind(items: Iterable) -> dict[str, tuple[float, float]]:
    """{kind: (send bytes, recv bytes)} summed over items with .kind, .send_bytes, .recv_bytes
    (plan items and counted records alike)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for c in items:
        out[c.kind][0] += c.send_bytes
        out[c.kind][1] += c.recv_bytes
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass(frozen=True)
class CommItem:
    """One collective call as seen by one rank."""

    kind: str  # all_gather | gather | scatter | all_to_all | broadcast | all_reduce
    send_bytes: float
    recv_bytes: float
    phase: str = "forward"  # forward: pieces travel to the computing rank; return: results back;
    # or the optimizer's own: nonfinite_check, normalize (the update rule's reductions)
    axis: str = "shard"  # the mesh axis the bytes travel on (FSDP's shard axis unless stated)
    # ranks (in the strategy's group) the call runs among when not the whole group: a
    # point-to-point message's two ranks, sorted; None: every rank of the group
    group: tuple[int, ...] | None = None
    # a node-aware exchange's sends or receives on one link class ("intra_node" or
    # "inter_node"), standing for `messages` point-to-point messages; None: one call
    link: str | None = None
    messages: int = 0


def bytes_by_group(items, whole: tuple[int, ...]) -> dict[tuple[str, tuple[int, ...]], tuple[float,
                                                                                      float]]:
    """{(kind, ranks): (send bytes, recv bytes)}: plan items by their `group` (None: `whole`),
    counted records (`profiling.comm.CommRecord`) by the ranks they ran among."""
    out: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for c in items:
        ranks = c.group if isinstance(c, CommItem) else c.ranks
        key = (c.kind, tuple(ranks) if ranks else tuple(whole))
        out[key][0] += c.send_bytes
        out[key][1] += c.recv_bytes
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass
class RankCost:
    """What one rank is predicted to spend."""

    comm: list[CommItem] = field(default_factory=list)
    ns_flops: int = 0
    ns_calls: int = 0  # Newton-Schulz calls (a batch of one shape is one call)
    transient_bytes: int = 0
    computes: list[int] = field(default_factory=list)  # indices of matrices this rank orthogonalizes

    @property
    def send_bytes(self) -> float:
        return sum(c.send_bytes for c in self.comm)

    @property
    def recv_bytes(self) -> float:
        return sum(c.recv_bytes for c in self.comm)

    def bytes_by_kind(self) -> dict[str, tuple[float, float]]:
        return bytes_by_kind(self.comm)


@dataclass
class Plan:
    """Who does what, and what every rank will pay for it. Identical on every rank but `rank`.

    `buckets`: matrix indices per bucket, in the order the schedule is fed. A plan holds no
    process group: the `StepRun` made with it (`optim.step_runs`) holds the group it runs on."""

    strategy: str
    world_size: int
    rank: int
    matrices: tuple[MatrixSpec, ...]
    owner: tuple[int, ...]  # per matrix; EVERY_RANK when all ranks compute it
    bucket: tuple[int, ...]  # per matrix; 0 for strategies without buckets
    ranks: list[RankCost]  # indexed by rank
    buckets: tuple[tuple[int, ...], ...] | None = None
    schedule: Schedule | None = None  # the actions the strategy declared (None: made by hand)

    @property
    def mine(self) -> RankCost:
        return self.ranks[self.rank]

    @property
    def total_ns_flops(self) -> int:
        return sum(r.ns_flops for r in self.ranks)

    @property
    def flops_imbalance(self) -> float:
        """max over ranks / mean over ranks of NS FLOPs (1.0 is perfect balance)."""
        flops = [r.ns_flops for r in self.ranks]
        mean = sum(flops) / len(flops)
        return max(flops) / mean if mean > 0 else 1.0


# -- what the time model reports per call ---------------------------------------------------------

@dataclass(frozen=True)
class TimedCall:
    """One collective call of a plan with its predicted duration (set by the busiest rank)."""

    kind: str
    phase: str
    seconds: float
