"""Strategy `overlapped` with schedule backward: orthogonalization started from FSDP2's
post-reduce-scatter hooks during backward equals the single-process reference (within the float32
bound of tests/tolerances.py) and is bitwise equal to the same plan run after backward, on the GPT
presets at P = 1..4, with and without gradient accumulation; bytes counted at the collectives and
FLOPs counted at the orthogonalizer equal the plan's. Workers: tests/strategies/overlap_cases.py.

P = 2 runs in the default suite; P = 1, 3 and 4 (same cases) are `slow` (CI runs them).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist_ortho import NorMuon, strategies
from dist_ortho.optim.overlap import fsdp_units
from dist_ortho.testing.processes import spawn
from tests.strategies import overlap_cases
from tests.strategies.test_every_strategy_matches_the_reference import (assert_bytes_equal,
                                                                        assert_ratios)

STEPS = 3
# (preset, micro-batches, reduce on every micro-batch)
TRAIN = [("gpt-tiny", 1, True), ("gpt-tiny", 2, False), ("gpt-tiny", 2, True),
         ("gpt-mini", 1, True), ("gpt-mini", 2, False)]


def cases() -> list[dict]:
    out = [dict(kind="train", preset=p, steps=STEPS, micro=m, sync_every=s) for p, m, s in TRAIN]
    # several buckets per unit, two forwards in flight
    out.append(dict(kind="train", preset="gpt-mini", steps=2, micro=1, sync_every=True,
                    options=dict(bucket_bytes=4 * 32 * 128, lag=2, max_in_flight=1)))
    # gradients rescaled after backward (clipping): must fall back to step time
    out.append(dict(kind="train", preset="gpt-tiny", steps=2, micro=1, sync_every=True,
                    scale_after_backward=0.5))
    out.append(dict(kind="manual"))
    return out


@functools.lru_cache(maxsize=None)
def run(world_size: int) -> list[dict]:
    return spawn(overlap_cases.overlap_worker, world_size, args=(cases(),))


def check(world_size: int) -> None:
    results = run(world_size)
    for k, case in enumerate(cases()):
        per_rank = [r[k] for r in results]
        if case["kind"] == "manual":
            for r in per_rank:
                assert r["hooks"], "build_optimizers should install the hooks on an FSDP2 model"
                assert all(r["equal"]), (world_size, "manual grads")
            continue
        restarting = case["micro"] > 1 and case["sync_every"]
        clipped = case.get("scale_after_backward") is not None
        for rank, r in enumerate(per_rank):
            context = (world_size, rank, case)
            # schedule backward and schedule step run the same plan on the same gradients
            assert all(all(e) for e in r["equal"]), context
            if not clipped:
                assert_ratios([x for step in r["ratios"] for x in step],
                              "overlapped (backward) FSDP2 training weights", context)
            assert r["executed_flops"] >= r["planned_flops"], context
            # the work really ran in backward, except where it must not have been used
            if world_size > 1:
                assert r["overlap_phases"] == ["forward_backward/overlap"], context
            # the profiler counts every redo after backward, one per step
            assert r["redos"] == [1.0 if clipped else 0.0] * case["steps"], (context, r["redos"])
            if clipped:
                assert r["fallbacks"] == case["steps"], context
            elif restarting:
                assert r["restarts"] == case["steps"] * (case["micro"] - 1), context
                assert r["fallbacks"] == 0, context
            else:
                assert r["restarts"] == r["fallbacks"] == 0, context
                assert r["executed_flops"] == r["planned_flops"], context
                assert_bytes_equal(r["counted"][0], r["planned"][0], context)
            assert_bytes_equal(r["counted"][1], r["planned"][1], context)  # schedule step
            # buckets follow the units in backward order: the last block's matrices first
            n_layers = overlap_cases.PRESETS[case["preset"]]["n_layers"]
            assert r["unit_order"][0][0].startswith(f"blocks.{n_layers - 1}."), context
            assert sorted(set(r["units"])) == list(range(n_layers)), context
        # the plan (owners, FLOPs) is the same on every rank
        assert len({tuple(r["flops_per_rank"]) for r in per_rank}) == 1


@pytest.mark.exactness
def test_overlapped_backward_matches_reference_and_plan_p2():
    check(2)


@pytest.mark.slow
@pytest.mark.exactness
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_overlapped_backward_matches_reference_and_plan(world_size):
    check(world_size)


def test_units_follow_backward_order_and_bad_input_is_named():
    from dist_ortho.models import build_model

    model = build_model("gpt-tiny", **overlap_cases.PRESETS["gpt-tiny"])
    # without fully_shard there are no units: nothing to order by
    assert fsdp_units(model) == []
    opt = NorMuon([p for p in model.parameters() if p.dim() == 2][:2], strategy="balanced")
    with pytest.raises(ValueError, match="overlapped"):
        opt.overlap_with_backward(model)
    opt = NorMuon([torch.nn.Parameter(torch.randn(4, 4))], strategy="overlapped")
    with pytest.raises(ValueError, match="not managed by an FSDP2"):
        opt.overlap_with_backward(model)
    with pytest.raises(ValueError, match="schedule"):
        strategies.build("overlapped", schedule="later")
