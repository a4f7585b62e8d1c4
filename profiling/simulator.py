"""The one simulator of schedules: what a plan's actions cost in time, for every strategy.

It walks the plan's schedule (`dist_ortho.core.schedule`) with one clock per rank and one link,
pricing each action with the time model:

- `Issue`: an exchange over the whole group starts once every rank has issued it and the link is
  free (collectives run one at a time on one link, in issue order, as on one NCCL stream); its
  duration is priced from the counted items of every rank (`price`, the busiest rank sets it).
  An exchange among a few members (point-to-point messages of a split round) starts when its
  members have issued it and occupies only them, each group of members on its own;
- `Wait`: the rank's clock moves to the exchange's end;
- `Compute`: every rank's share (the kernel's `shares`) is priced by the compute model, all ranks at
  once (`ComputeModel.concurrent`: ranks sharing a CPU share its cores);
- `Feed(b)`: with a backward pass modelled, the backward compute before bucket b's hook;
  `Drain`: the backward compute after the last hook (`tail`): backward ends there.

A strategy writes no time model: the transports and kernels its schedule names carry the sizes,
and this walk is the same for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dist_ortho.core.plan import CommItem, Plan
from dist_ortho.core.schedule import Compute, Drain, Feed, Issue, Schedule, Wait
from dist_ortho.strategies.exchanges import transport
from dist_ortho.strategies.kernels import kernel

__all__ = ["ScheduleTimes", "simulate"]


@dataclass
class ScheduleTimes:
    """Seconds from the start (of backward, if modelled, else of the orthogonalize phase), per
    rank: `backward_end` when backward returned (at `Drain`), `end` when its schedule
    is done, `ns_busy` its Newton-Schulz time, `comm_s` the exchanges' durations (whole-group
    calls once, a member group's rounds at their busiest member), `comm_by_kind` the same by the
    items' kind; `spans[r]`: (label, start, end, lane) of what rank r's thread ("thread") and the
    link ("link") did."""

    backward_end: list
    end: list
    ns_busy: list
    comm_s: float = 0.0
    comm_by_kind: dict = field(default_factory=dict)
    spans: list = field(default_factory=list)


def simulate(plan: Plan, price: Callable[[list[list[CommItem]]], dict[str, float]], compute,
             schedule: Schedule | None = None, backward: Sequence[float] | None = None,
             tail: float = 0.0,
             work_before: Sequence[Sequence[float]] | None = None) -> ScheduleTimes:
    """Walk `schedule` (the plan's unless given). `price(items)`: {kind: seconds} of one call from
    every rank's items (whole group) or of one member's messages (`items` of that member alone);
    `compute`: a ComputeModel. `backward[b]`: backward seconds before bucket b is fed (None: every
    bucket is there at the start); `tail`: backward after the last feed; `work_before[r][b]`:
    other thread seconds of rank r before feeding b."""
    schedule = schedule if schedule is not None else plan.schedule
    P = plan.world_size
    t = [0.0] * P
    link = 0.0
    ns_busy = [0.0] * P
    spans: list[list] = [[] for _ in range(P)]
    ends: dict[int, list[float]] = {}
    comm_s = 0.0
    by_kind: dict[str, float] = {}
    backward_end = None
    for action in schedule.actions:
        if isinstance(action, Feed):
            b = action.bucket
            for r in range(P):
                before = (backward[b] if backward is not None else 0.0)
                if before > 0:
                    spans[r].append(("backward", t[r], t[r] + before, "thread"))
                t[r] += before + (work_before[r][b] if work_before else 0.0)
        elif isinstance(action, Issue):
            ex = action.exchange
            items = transport(ex.transport).items(plan, ex)
            if not any(items):  # nothing travels (one rank)
                ends[action.tag] = list(t)
                continue
            if all(c.group is None for its in items for c in its):
                times = price(items)
                seconds = sum(times.values())
                begin = max(max(t), link)
                link = begin + seconds
                ends[action.tag] = [link] * P
                comm_s += seconds
                for kind, x in times.items():
                    by_kind[kind] = by_kind.get(kind, 0.0) + x
                for r in range(P):
                    spans[r].append((f"{ex.phase} {ex.transport}", begin, link, "link"))
            else:
                end = list(t)
                busiest = 0.0
                for members in _member_groups(items):
                    begin = max(t[r] for r in members)
                    seconds = max(sum(price([items[r]]).values()) for r in members)
                    busiest = max(busiest, seconds)
                    for r in members:
                        end[r] = begin + seconds
                ends[action.tag] = end
                comm_s += busiest
                by_kind["send"] = by_kind.get("send", 0.0) + busiest
        elif isinstance(action, Wait):
            end = ends.pop(action.tag)
            t = [max(a, b) for a, b in zip(t, end)]
        elif isinstance(action, Compute):
            works = [_seconds(compute, w) for w in kernel(action.kernel).shares(plan, action)]
            finish = compute.concurrent(works)
            for r in range(P):
                if works[r] > 0:
                    spans[r].append((f"ns {action.kernel}", t[r], t[r] + finish[r], "thread"))
                ns_busy[r] += finish[r]
                t[r] += finish[r]
        if isinstance(action, Drain) and backward_end is None:  # backward ends: the step drains
            t = [x + tail for x in t]
            backward_end = list(t)
    return ScheduleTimes(backward_end if backward_end is not None else [0.0] * P, t, ns_busy,
                         comm_s, by_kind, spans)


def _seconds(compute, work) -> float:
    s = compute.ns_matrices_seconds(work.matrices, work.batched) if work.matrices else 0.0
    if work.flops or work.calls:
        s += compute.ns_seconds(work.flops, work.calls)
    return s


def _member_groups(items: list[list[CommItem]]) -> list[list[int]]:
    """Ranks connected by a point-to-point message in these items, group by group."""
    parent = list(range(len(items)))

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    busy = set()
    for r, its in enumerate(items):
        for c in its:
            busy.add(r)
            for q in c.group or ():
                busy.add(q)
                parent[root(q)] = root(r)
    groups: dict[int, list[int]] = {}
    for r in sorted(busy):
        groups.setdefault(root(r), []).append(r)
    return list(groups.values())
