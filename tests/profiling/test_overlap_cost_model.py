"""The cost model of backward overlap (profiling.overlap_model) on plans of strategy
`overlapped`: what is left after backward under each schedule, from the same durations the
emulator applies. Timings against emulated runs: bench/overlap_study.py (results/bench)."""

from __future__ import annotations

import dataclasses

import pytest

from dist_ortho import strategies
from dist_ortho.profiling.interconnect import emulated_link
from dist_ortho.profiling.overlap_model import interconnect_comm_model, predict_exposed
from dist_ortho.profiling.prediction import matrix_specs
from dist_ortho.core.schedule import Issue
from dist_ortho.profiling.timemodel import ComputeModel, exchange_seconds
from dist_ortho.strategies.exchanges import transport

# two blocks of a GPT (attention 4 x (64, 64), MLP (256, 64) and (64, 256)), backward order
BLOCK = [(64, 64)] * 4 + [(256, 64), (64, 256)]


def exchange_durations(p, comm, phase: str) -> list[float]:
    """Seconds of each of the plan's exchanges of `phase`, in issue order."""
    return [exchange_seconds(transport(a.exchange.transport).items(p, a.exchange), comm,
                             p.world_size)
            for a in p.schedule.actions
            if isinstance(a, Issue) and a.exchange.phase == phase]


def plan(P: int, **options):
    specs = matrix_specs(BLOCK * 2, P)
    specs = [dataclasses.replace(m, unit=1 - k // len(BLOCK)) for k, m in enumerate(specs)]
    strategy = strategies.build("overlapped", **options)
    return strategy, strategy.plan(specs, P, 0)


@pytest.mark.parametrize("P", [2, 4])
def test_lag_one_leaves_the_last_units_ns_and_return(P):
    strategy, p = plan(P)
    link = emulated_link("h100", "inter_node", 2e10)
    comm, compute = interconnect_comm_model(link), ComputeModel(ns_flops_per_s=2e10,
                                                                ns_call_s=1e-4)
    got = predict_exposed(p, strategy.options, comm, compute)
    last = len(p.buckets) - 1
    ns = max(compute.concurrent([compute.ns_matrices_seconds(
        [p.matrices[i] for i in p.buckets[last] if p.owner[i] == r], True) for r in range(P)]))
    ret = exchange_durations(p, comm, "return")
    assert got.backward_s == pytest.approx(ns + ret[last])
    # after backward, schedule step still has every bucket's forward, NS and return to do
    fwd = exchange_durations(p, comm, "forward")
    assert got.step_s >= sum(fwd) + ns + ret[last] - 1e-12
    assert got.difference_s == pytest.approx(got.step_s - got.backward_s) and got.difference_s > 0
    # the emulator's delay is the comm model's time
    assert comm.time("all_to_all", 1e5, P) == pytest.approx(link.seconds("all_to_all", 1e5, P))


def test_more_lag_leaves_more_and_a_faster_link_less():
    strategy, p = plan(2, lag=2)
    compute = ComputeModel(ns_flops_per_s=2e10)
    slow = interconnect_comm_model(emulated_link("h100", "inter_node", 2e10))
    fast = interconnect_comm_model(emulated_link("h100", "intra_node", 2e10))
    lag2 = predict_exposed(p, strategy.options, slow, compute)
    lag1 = predict_exposed(plan(2)[1], plan(2)[0].options, slow, compute)
    assert lag2.backward_s > lag1.backward_s
    assert predict_exposed(p, strategy.options, fast, compute).difference_s < lag2.difference_s
    with pytest.raises(ValueError, match="bucketed plan"):
        predict_exposed(strategies.build("balanced").plan(matrix_specs(BLOCK, 2), 2, 0),
                        strategy.options, slow, compute)
