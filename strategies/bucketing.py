"""Bucketing policies for the shared bucket pipeline (`dist_ortho.core.schedule.pipeline`), and
the ownership that goes with them.

- `by_bytes`: matrices in order (with `group_by_shape`, same-shape ones next to each other first,
  so a bucket batches well) in buckets of at most `bucket_bytes` full-matrix bytes;
- `by_unit`: FSDP2 units in backward order (`MatrixSpec.unit`: 0 finishes first; None counts as
  one unit after the known ones), each optionally cut further `by_bytes`.

`seeded_lpt` gives owners bucket by bucket: LPT by Newton-Schulz FLOPs inside each bucket, seeded
with the load of the buckets before it, so every bucket's work is spread over all ranks and the
step's total stays balanced.
"""

from __future__ import annotations

from collections.abc import Sequence

from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.ownership import lpt_owners

__all__ = ["by_bytes", "by_unit", "seeded_lpt"]


def by_bytes(matrices: Sequence[MatrixSpec], bucket_bytes: int, group_by_shape: bool,
             option: str = "bucketed_async option 'bucket_bytes'") -> list[list[int]]:
    """Positions in `matrices` per bucket; a bucket closes when the next matrix would overflow
    it. Raises ValueError (naming `option`) when a matrix alone is larger than a bucket."""
    itemsize = dtype_size(matrices[0].dtype)
    too_big = [m for m in matrices if m.numel * itemsize > bucket_bytes]
    if too_big:
        m = max(too_big, key=lambda m: m.numel)
        raise ValueError(
            f"{option}={bucket_bytes} is smaller than parameter {m.name!r} of shape {m.shape} "
            f"({m.numel * itemsize} bytes); raise bucket_bytes to at least {m.numel * itemsize}.")
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


def by_unit(matrices: Sequence[MatrixSpec], bucket_bytes: int | None,
            option: str = "overlapped option 'bucket_bytes'") -> list[list[int]]:
    """Positions in `matrices` per bucket, in backward order (see the module docstring)."""
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
            buckets += [[ks[j] for j in b] for b in by_bytes([matrices[k] for k in ks],
                                                             bucket_bytes, True, option)]
    return buckets


def seeded_lpt(matrices: Sequence[MatrixSpec], buckets: Sequence[Sequence[int]],
               world_size: int) -> list[int]:
    """Owner of each matrix (positions of `matrices`), bucket by bucket."""
    owners = [0] * len(matrices)
    load = [0] * world_size
    for ks in buckets:
        for k, o in zip(ks, lpt_owners([matrices[k] for k in ks], world_size, load)):
            owners[k] = o
            load[o] += matrices[k].flops
    return owners
