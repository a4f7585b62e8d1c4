"""`periodic` (INEXACT): blockwise Newton-Schulz on most steps, the exact whole-matrix NS every k.

MuonBP's schedule (arXiv 2510.16981): on steps k, 2k, 3k, ... (counted by this strategy's own
executions, from 1) the step is exactly `balanced` (LPT owners, one all-to-all each way, NS of
each whole matrix); on every other step it is `blockwise` (each rank orthogonalizes its own rows,
no exchange). MuonBP's two learning rates: `full_lr_scale` multiplies the update of the full steps
(after the update rule, i.e. their learning rate), the block steps keep the group's lr. k = 1 is
the exact update on every step (times full_lr_scale), still labelled inexact.

The plan is the full step's (its bytes, its FLOPs): the block steps send nothing and run 1/P of
the rows, so counted traffic averages (1/k) of the plan. The step count lives in the strategy
(`steps_run`), not in the optimizer's state: a run resumed from a checkpoint restarts the cycle
unless it sets `steps_run`. 1-D layouts only (the mesh path runs a strategy once per row group).

Its own definition, the test oracle: `dist_ortho.optim.inexact_reference.periodic_is_full`
with the blockwise and exact references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_ortho.core.schedule import Compute, Feed, Schedule
from dist_ortho.strategies.balanced import Balanced, BalancedOptions
from dist_ortho.strategies.base import ExecContext, Plan
from dist_ortho.strategies.registry import register

__all__ = ["PeriodicOptions", "Periodic", "is_full_step"]


def is_full_step(step: int, k: int) -> bool:
    """Whether step `step` (1-based) runs the exact whole-matrix NS."""
    return step % k == 0


@dataclass(frozen=True)
class PeriodicOptions(BalancedOptions):
    """k: the exact whole-matrix NS every k-th step (blockwise in between); full_lr_scale: factor
    on the update of those full steps (MuonBP's second learning rate); batch_same_shape, exchange
    and ranks_per_node: as in `balanced`, for the full steps."""

    k: int = 4
    full_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"periodic option k must be an int >= 1 (the exact NS every k "
                             f"steps), got {self.k!r}")
        s = self.full_lr_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"periodic option full_lr_scale must be a finite number > 0, got {s!r}")


@register
class Periodic(Balanced):
    name = "periodic"
    Options = PeriodicOptions
    exact = False
    on_mesh = False

    def __init__(self, options: PeriodicOptions | None = None) -> None:
        super().__init__(options or PeriodicOptions())
        self.steps_run = 0  # executions so far; the next is step steps_run + 1
        self.last_full = False

    def execute(self, plan: Plan, inputs, ctx: ExecContext):
        self.steps_run += 1
        self.last_full = is_full_step(self.steps_run, self.options.k)
        return super().execute(plan, inputs, ctx)

    def step_schedule(self, plan: Plan) -> Schedule:
        """The full step's schedule (the plan's), or each bucket's blocks with no exchange."""
        if self.last_full:
            return plan.schedule
        buckets = plan.schedule.buckets
        actions = [a for b, members in enumerate(buckets)
                   for a in (Feed(b), Compute("blocks", members))]
        return Schedule(tuple(actions), buckets)

    def update_scale(self) -> float:
        return float(self.options.full_lr_scale) if self.last_full else 1.0
