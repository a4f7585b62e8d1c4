"""The cost model of backward overlap: how much optimizer time is left after backward ends.

Exposed optimizer time = step end - backward end. For strategy `overlapped` it is modelled as
the collectives and compute that are common to both schedules (the non-finite and the update
rule's all-reduces, the local element-wise work: the same in both, so they cancel in the
difference and are left out) plus the bucket pipeline's part that runs after backward:

- schedule step: the whole pipeline, every bucket fed at once after backward, as the schedule
  simulator (`profiling.simulator`) walks it (forward all-to-alls one at a time on the link in
  issue order, each bucket's NS on the slowest owner when its forward has arrived, returns behind
  them, at most `max_in_flight` outstanding);
- schedule backward: only the last `lag` buckets. Every earlier bucket was pushed, waited for,
  orthogonalized and its return issued from the hooks of later units, during backward. What can
  start when: bucket b's forward is issued when its unit's reduce-scatter is done (its hook); its
  NS runs on the rank's thread when the hook of the bucket `lag` places later fires; its return
  follows on the link. FSDP2's later collectives share the link (one NIC), in issue order, and
  the root unit's reduce-scatter, the last thing of backward, is issued after the last hook and
  is synchronous, so when backward returns the link has carried every forward and every return
  issued before it. What remains is the NS of the last `lag` buckets, one after another on the
  thread, each return issued on the link when its NS ends.

The difference step - backward is the time overlap takes off the step's exposed optimizer time
(bench/overlap_study.py and the report compare it with emulated runs). It says nothing about
what backward pays for it: the NS of every bucket but the last `lag` now runs on the backward
thread, and the optimizer's transfers queue with FSDP2's on the link (the Gantt charts show it).

Durations: collectives from a `CommModel` (e.g. the emulated link: `interconnect_comm_model`),
NS from a `ComputeModel` (this CPU's calibrated rate and per-call cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.plan import Plan
from dist_ortho.core.schedule import Issue
from dist_ortho.profiling.interconnect import EmulatedLink
from dist_ortho.profiling.simulator import simulate
from dist_ortho.profiling.timemodel import (KINDS, CommModel, ComputeModel, exchange_seconds,
                                             exchange_times)
from dist_ortho.strategies.exchanges import transport
from dist_ortho.strategies.overlapped import OverlappedOptions

__all__ = ["ExposedPrediction", "predict_exposed", "interconnect_comm_model"]


@dataclass(frozen=True)
class ExposedPrediction:
    """Seconds of the bucket pipeline left after backward, per schedule, and their difference."""

    step_s: float
    backward_s: float

    @property
    def difference_s(self) -> float:
        return self.step_s - self.backward_s

    def to_dict(self) -> dict:
        return dict(step_s=self.step_s, backward_s=self.backward_s,
                    difference_s=self.difference_s)


def interconnect_comm_model(link: EmulatedLink) -> CommModel:
    """The emulated link as a CommModel: what the emulator delays each collective by."""
    alpha = {k: link.scale * link.latency_s for k in KINDS}
    beta = {k: link.scale / link.bytes_per_s for k in KINDS}
    return CommModel(alpha_s=alpha, beta_s_per_byte=beta)


def predict_exposed(plan: Plan, options: OverlappedOptions, comm: CommModel,
                    compute: ComputeModel) -> ExposedPrediction:
    """See the module docstring. `plan`: an `overlapped` plan (buckets in backward order)."""
    if plan.strategy != "overlapped":
        raise ValueError(f"predict_exposed needs a bucketed plan that follows the backward pass "
                         f"(strategy overlapped), got {plan.strategy!r}")
    P = plan.world_size
    step = simulate(plan, lambda items: exchange_times(items, comm, P), compute)
    returns = {a.exchange.matrices: exchange_seconds(
        transport(a.exchange.transport).items(plan, a.exchange), comm, P)
        for a in plan.schedule.actions if isinstance(a, Issue) and a.exchange.phase == "return"}
    t = link = 0.0
    for b in range(max(0, len(plan.buckets) - options.lag), len(plan.buckets)):
        works = [compute.ns_matrices_seconds(
            [plan.matrices[i] for i in plan.buckets[b] if plan.owner[i] == r],
            options.batch_same_shape) for r in range(P)]
        t += max(compute.concurrent(works), default=0.0)
        link = max(link, t) + (returns.get(tuple(plan.buckets[b]), 0.0) if P > 1 else 0.0)
    return ExposedPrediction(max(step.end), max(t, link))
