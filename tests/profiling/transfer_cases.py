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
