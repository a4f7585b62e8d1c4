"""Workers for tests/profiling/test_transfer_split.py: a collective that one rank reaches late."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from dist_ortho.profiling.comm import CommCounter
from dist_ortho.profiling.transfer import TransferClock

LATE_S = 1.0  # long beside the ranks' start-up skew after the barrier (tenths of a second)


def late_rank_worker(rank: int, world_size: int) -> dict:
    """Rank 1 arrives LATE_S late at an all-reduce, then an all-to-all is issued asynchronously
    and waited for; every rank reports its split."""
    dist.barrier()
    with CommCounter(), TransferClock() as clock:
        if rank == 1:
            time.sleep(LATE_S)
        t = torch.ones(1 << 16)
        dist.all_reduce(t)
        out = torch.empty(1 << 16)
        dist.all_to_all_single(out, torch.ones(1 << 16), async_op=True).wait()
    split = clock.split()
    return dict(transfer=split.transfer_s, wait=split.wait_s, max_wait=split.max_wait_s,
                collectives=split.collectives)


QUEUED = 8  # asynchronous all-to-alls issued at once, then waited for together


def queued_worker(rank: int, world_size: int) -> dict:
    """QUEUED asynchronous all-to-alls of 1 MiB issued back to back: the backend runs them one
    after another, so each one's in-flight interval also holds those queued ahead of it. Timed
    twice; the first round (connecting the ranks, the counter's first dispatch) is a warm-up."""
    send = torch.ones(world_size << 18)
    outs = [torch.empty_like(send) for _ in range(QUEUED)]
    for _ in range(2):
        dist.barrier()
        with CommCounter(), TransferClock() as clock:
            start = time.time_ns()
            works = [dist.all_to_all_single(o, send, async_op=True) for o in outs]
            for w in works:
                w.wait()
            window = (time.time_ns() - start) * 1e-9
        split = clock.split()
    # the slowest rank's window: every collective's completion lies inside it
    t = torch.tensor([window], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(transfer=split.transfer_s, window=t.item(), collectives=split.collectives)
