"""A schedule: what every rank does in one orthogonalize phase, as a list of actions. Core module.

A strategy's `plan()` decides who owns what and returns its schedule; everything else reads that
one description (the idea of torch.distributed.pipelining's action lists, applied to one step):

- the executor (`strategies.executor`) runs it, the same code at step time or from backward hooks;
- the counter (`strategies.executor.count`) turns it into each rank's bytes per collective, NS FLOPs
  and transient memory: the plan the profiler compares with what it counts;
- the simulator (`profiling.simulator`) prices it for the cost model.

Actions, in the order every rank performs them (collectives must be issued in one order on every
rank, so the list is the same on all ranks; what differs per rank, which matrices it owns and what it
sends, follows from the plan):

    Feed(b)               the inputs of bucket b are needed from here on (at step time all are
                          there; from backward hooks, the executor pauses here until they arrive)
    Drain()               what follows runs when the optimizer's step drains the run, not inside
                          the backward hook that fed the last bucket
    Issue(tag, exchange)  start an exchange, asynchronously
    Wait(tag)             wait for it and unpack what it brought
    Compute(kernel, ...)  run a compute kernel (Newton-Schulz of the owned matrices, or one round of
                          a split Newton-Schulz) on the matrices it names

An `Exchange` names its transport: how the pieces are packed and which collective carries them
(`strategies.exchanges`); a `Compute` names its kernel (`strategies.kernels`). Both registries give
the executor its code and the counter and simulator their sizes, so a strategy that composes
registered transports and kernels writes no byte formula and no time model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Exchange", "Issue", "Wait", "Compute", "Feed", "Drain", "Action", "Schedule",
           "pipeline", "synchronous"]


@dataclass(frozen=True)
class Exchange:
    """Rows of some matrices travelling between ranks.

    transport: a registered transport name (`strategies.exchanges`); phase: "forward" (pieces to
    the computing ranks), "return" (results back) or "round" (a split Newton-Schulz round);
    matrices: plan indices carried, in packing order; step: the round of a split exchange;
    ranks_per_node: for a transport that can travel node-aware, the node size."""

    transport: str
    phase: str
    matrices: tuple[int, ...]
    step: int = 0
    ranks_per_node: int | None = None  # node-aware: ranks [n G, (n + 1) G) share node n


@dataclass(frozen=True)
class Issue:
    tag: int
    exchange: Exchange


@dataclass(frozen=True)
class Wait:
    tag: int


@dataclass(frozen=True)
class Compute:
    """kernel: a registered kernel name (`strategies.kernels`); matrices: plan indices it covers
    (each rank computes its own share of them, as the kernel and the plan's owners say); step: the
    round of a split kernel."""

    kernel: str
    matrices: tuple[int, ...]
    step: int = 0


@dataclass(frozen=True)
class Feed:
    bucket: int


@dataclass(frozen=True)
class Drain:
    pass


Action = Issue | Wait | Compute | Feed | Drain


@dataclass(frozen=True)
class Schedule:
    """The actions, and the matrices of each bucket (plan indices, in feeding order). `splits`:
    for a schedule that shares one matrix's Newton-Schulz among a few ranks, (plan index, its
    blocks in block order) per matrix (`strategies.split_rounds`)."""

    actions: tuple[Action, ...]
    buckets: tuple[tuple[int, ...], ...]
    splits: tuple[tuple[int, tuple], ...] = ()

    def __post_init__(self) -> None:
        issued: set[int] = set()
        waited: set[int] = set()
        fed = 0
        for a in self.actions:
            if isinstance(a, Issue):
                assert a.tag not in issued, f"tag {a.tag} issued twice"
                issued.add(a.tag)
            elif isinstance(a, Wait):
                assert a.tag in issued and a.tag not in waited, f"wait for tag {a.tag}"
                waited.add(a.tag)
            elif isinstance(a, Feed):
                assert a.bucket == fed, f"bucket {a.bucket} fed out of order"
                fed += 1
        assert issued == waited, f"issued but never waited: {sorted(issued - waited)}"
        assert fed == len(self.buckets), (fed, len(self.buckets))

    def exchanges(self) -> list[Issue]:
        return [a for a in self.actions if isinstance(a, Issue)]


def pipeline(buckets: Sequence[Sequence[int]], forward: str | None, kernel: str,
             back: str | None, lag: int = 1, max_in_flight: int = 1,
             ranks_per_node: int | None = None) -> Schedule:
    """The bucket pipeline every owner strategy runs: per bucket, one forward exchange to the
    owners, one compute, one return exchange.

        Feed(b); Issue forward(b); while more than `lag` forwards are unprocessed:
            Wait the oldest forward; Compute it; Issue its return; while more than
            `max_in_flight` returns are outstanding: Wait the oldest return
        Drain; then process what is left, then Wait every return

    lag 1 and one bucket is the synchronous schedule (forward, compute, return); with more
    buckets, bucket k + 1's forward and bucket k - 1's return travel while bucket k computes.
    `forward` / `back` None: no exchange that way (the matrices are already where they compute,
    or the results stay)."""
    assert lag >= 1 and max_in_flight >= 1
    actions: list[Action] = []
    tag = 0
    forwards: deque = deque()
    returns: deque = deque()

    def compute_oldest() -> None:
        nonlocal tag
        b, t = forwards.popleft()
        if t is not None:
            actions.append(Wait(t))
        ms = tuple(buckets[b])
        actions.append(Compute(kernel, ms))
        if back is not None:
            actions.append(Issue(tag, Exchange(back, "return", ms, ranks_per_node=ranks_per_node)))
            returns.append(tag)
            tag += 1
        while len(returns) > max_in_flight:
            actions.append(Wait(returns.popleft()))

    for b, ms in enumerate(buckets):
        actions.append(Feed(b))
        if forward is not None:
            actions.append(Issue(tag, Exchange(forward, "forward", tuple(ms),
                                                   ranks_per_node=ranks_per_node)))
            forwards.append((b, tag))
            tag += 1
        else:
            forwards.append((b, None))
        while len(forwards) > lag:
            compute_oldest()
    actions.append(Drain())
    while forwards:
        compute_oldest()
    while returns:
        actions.append(Wait(returns.popleft()))
    return Schedule(tuple(actions), tuple(tuple(b) for b in buckets))


def synchronous(matrices: Sequence[int], forward: str | None, kernel: str,
                back: str | None, ranks_per_node: int | None = None) -> Schedule:
    """One bucket: forward, wait, compute, return, wait."""
    return pipeline([tuple(matrices)], forward, kernel, back, ranks_per_node=ranks_per_node)
