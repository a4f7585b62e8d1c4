"""Communication split in two: transfer time and waiting for a slower rank.

A rank blocked in a collective is either moving bytes or waiting for a peer that has not arrived
yet (it is still computing, or on a shared host it was descheduled). The cost model prices the
first; the second belongs to the peer's compute. `TransferClock` tells them apart. While it is
active it listens to `profiling.comm.CommCounter` (which must be active too) and records, per
collective over the whole group, when this rank issued it and when it completed (from the Work's
future, so an asynchronous collective's end is its completion, not when someone waited for it).
`split(group)` (collective: every rank calls it) gathers the records of every rank; per
collective, the last rank's arrival is max(issue), and

- in flight: from the last arrival to max(completion), the bytes moving once everyone is there;
- wait (per rank) = last arrival - its own issue: the time it waited for the slowest rank.

The transfer time of a window is the length of the union of the in-flight intervals, the time the
group's link was busy. Summing them instead would count queueing twice: collectives issued
asynchronously at once (round_robin's gathers, bucketed_async's buckets) run one after another on
the backend, so each later one's interval also holds the transfers of those ahead of it.

Times are the host's wall clock (`time.time_ns`), which all ranks of one machine share. Messages
among a few ranks (split_ns's point-to-point rounds) are not aligned across ranks and are left
out: the whole-group collectives are.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ortho.profiling import comm
from dist_ortho.profiling.interconnect import future_of
from dist_ortho.profiling.timeline import _work_of

__all__ = ["TransferClock", "CommSplit", "busy_seconds"]


@dataclass(frozen=True)
class CommSplit:
    """Seconds of one window: transfer (the union of the collectives' in-flight intervals, the
    same on every rank), this rank's wait (summed over collectives), and the largest wait of any
    rank; collectives: how many were aligned."""

    transfer_s: float
    wait_s: float
    max_wait_s: float
    collectives: int


def busy_seconds(starts: torch.Tensor, ends: torch.Tensor) -> float:
    """Seconds (inputs in ns) covered by at least one interval [starts[j], ends[j]]: the length
    of their union; empty intervals (end <= start) cover nothing."""
    total, reach = 0, None
    for s, e in sorted(zip(starts.tolist(), ends.tolist())):
        if e <= s:
            continue
        if reach is None or s > reach:
            total += e - s
            reach = e
        elif e > reach:
            total += e - reach
            reach = e
    return total * 1e-9


class TransferClock:
    """`with TransferClock(): ...` records (issue, completion) of every whole-group collective
    this rank takes part in; `split(group)` turns them into a `CommSplit`."""

    def __init__(self) -> None:
        self._spans: list[list[int]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "TransferClock":
        comm.add_listener(self._on_collective)
        return self

    def __exit__(self, *exc) -> None:
        comm.remove_listener(self._on_collective)

    def _on_collective(self, record, issued_ns: int, out) -> None:
        if record.kind in ("send", "recv"):
            return
        span = [issued_ns, issued_ns]
        work = _work_of(out)
        if work is None:
            span[1] = time.time_ns()  # a synchronous call has returned
        else:
            def done(_fut, span=span):
                span[1] = time.time_ns()
            future_of(work).add_done_callback(done)
        with self._lock:
            self._spans.append(span)

    def split(self, group=None) -> CommSplit:
        """Collective over `group`: every rank's spans, aligned call by call."""
        with self._lock:
            spans = torch.tensor(self._spans or [[0, 0]], dtype=torch.int64)[:len(self._spans)]
        n = torch.tensor([len(spans)], dtype=torch.int64)
        P = dist.get_world_size(group) if dist.is_initialized() else 1
        if P > 1:
            counts = [torch.zeros_like(n) for _ in range(P)]
            dist.all_gather(counts, n, group=group)
            assert len({int(c) for c in counts}) == 1, "ranks recorded different collectives"
            everyone = [torch.zeros_like(spans) for _ in range(P)]
            dist.all_gather(everyone, spans.contiguous(), group=group)
            stacked = torch.stack(everyone)  # (rank, collective, [issue, done])
        else:
            stacked = spans.unsqueeze(0)
        if not len(spans):
            return CommSplit(0.0, 0.0, 0.0, 0)
        last = stacked[:, :, 0].max(dim=0).values
        transfer = busy_seconds(last, stacked[:, :, 1].max(dim=0).values)
        wait = last.unsqueeze(0) - stacked[:, :, 0]
        me = dist.get_rank(group) if P > 1 else 0
        return CommSplit(transfer, float(wait[me].sum()) * 1e-9,
                         float(wait.sum(dim=1).max()) * 1e-9, len(spans))
