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

The schedule is the shared bucket pipeline (`dist_ortho.core.schedule.pipeline`) with `lag`
forwards in flight, fixed and timing-independent, so every rank issues the same collectives in
the same order:

    Feed(b):  issue forward(b) (async); while more than `lag` forwards are unprocessed:
              wait the oldest forward, NS it, issue its return (async); keep at most
              `max_in_flight` returns outstanding
    end:      process what is left, wait every return

With `schedule: backward` (the default) the optimizer feeds a unit's buckets to the executor's run
(`Strategy.start`) from FSDP2's post-reduce-scatter hook while backward continues on earlier
layers, and `step()` drains it; with `schedule: step`, or whenever hooks cannot be used (plain
tensors, gradients set by hand), `execute` feeds every bucket after backward (with lag 1 that is
`bucketed_async`'s schedule).
Either way the plan, the bytes and the FLOPs are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import pipeline
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.bucketing import by_unit, seeded_lpt
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["OverlappedOptions", "Overlapped", "SCHEDULES"]

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


@register
class Overlapped(Strategy):
    name = "overlapped"
    Options = OverlappedOptions
    follows_backward = True  # buckets follow MatrixSpec.unit (the optimizer fills it)

    def __init__(self, options: OverlappedOptions | None = None) -> None:
        super().__init__(options or OverlappedOptions())

    @property
    def runs_in_backward(self) -> bool:
        return self.options.schedule == "backward"

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def schedule(self, matrices, world_size):
        o = self.options
        buckets = by_unit(matrices, o.bucket_bytes)
        return (seeded_lpt(matrices, buckets, world_size),
                pipeline([[matrices[k].index for k in ks] for ks in buckets], "owner_rows",
                         "ns" if o.batch_same_shape else "ns_each", "owner_rows", lag=o.lag,
                         max_in_flight=o.max_in_flight))
