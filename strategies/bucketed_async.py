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
This is the shared bucket pipeline (`dist_ortho.core.schedule.pipeline`) with lag 1, bucketed
`strategies.bucketing.by_bytes` and owned by `strategies.bucketing.seeded_lpt`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import pipeline
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.bucketing import by_bytes, seeded_lpt
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["BucketedAsyncOptions", "BucketedAsync"]


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


@register
class BucketedAsync(Strategy):
    name = "bucketed_async"
    Options = BucketedAsyncOptions

    def __init__(self, options: BucketedAsyncOptions | None = None) -> None:
        super().__init__(options or BucketedAsyncOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def schedule(self, matrices, world_size):
        o = self.options
        buckets = by_bytes(matrices, o.bucket_bytes, o.group_by_shape)
        return (seeded_lpt(matrices, buckets, world_size),
                pipeline([[matrices[k].index for k in ks] for ks in buckets], "owner_rows",
                         "ns" if o.batch_same_shape else "ns_each", "owner_rows", lag=1,
                         max_in_flight=o.max_in_flight))
