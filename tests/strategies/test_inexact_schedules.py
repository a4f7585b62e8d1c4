"""The inexact schedules (blockwise, local_norms, periodic) equal the single-process reference of
their own definition (dist_ortho.optim.inexact_reference) on real gloo groups at P = 1..4, on 1-D
FSDP2 shards with uneven and empty ones, on plain tensors and (blockwise) on a 2x2 FSDP x TP mesh;
they are far from the exact update where they differ from it, move exactly the bytes their plan
says, are labelled inexact, never chosen by default, and refused with one line where they cannot
apply. Bounds: tests/strategies/inexact_cases.py (the module docstring) and tests/tolerances.py."""

from __future__ import annotations

import functools

import pytest

from dist_ortho import strategies
from dist_ortho.studies.config import StrategyConfig
from dist_ortho.studies.sweep import Grid
from dist_ortho.testing.processes import spawn
from tests.strategies import inexact_cases
from tests.strategies.test_every_strategy_matches_the_reference import (assert_bytes_equal,
                                                                        assert_ratios)

CASES = inexact_cases.schedule_cases()
PLAIN = [c for c in CASES if c["rule"] == "normuon" and c["ns_dtype"] == "float32"]
INEXACT = ("blockwise", "local_norms", "periodic")


@functools.lru_cache(maxsize=None)
def fsdp(world_size: int) -> list[list[dict]]:
    return spawn(inexact_cases.fsdp_worker, world_size, args=(CASES,), timeout_s=300)


def case_id(case) -> str:
    opts = ",".join(f"{k}={v}" for k, v in case["options"].items())
    return f"{case['strategy']}[{opts}]-{case['rule']}-{case['ns_dtype']}"


def _counted_equals_plan(case, res, world_size, context) -> None:
    """Every step moves the plan's bytes; periodic's block steps (all but every k-th) skip the
    plan's all-to-alls and nothing else."""
    k = case["options"].get("k")
    for step, counted in enumerate(res["counted"], start=1):
        planned = res["planned"]
        if case["strategy"] == "periodic" and step % k:
            planned = {key: v for key, v in planned.items() if key[0] != "all_to_all"}
        assert_bytes_equal(counted, planned, (context, step))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("k", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_schedule_matches_its_own_reference_on_fsdp_shards(world_size, k):
    case = CASES[k]
    for rank, ranks in enumerate(fsdp(world_size)):
        res = ranks[k]
        assert_ratios(res["ratios"], f"inexact schedules vs own reference, {case['ns_dtype']}",
                      (case_id(case), rank))
        assert not res["unparsed"], res["unparsed"]
        _counted_equals_plan(case, res, world_size, rank)
        if case["strategy"] == "blockwise":  # the FLOPs of this rank's blocks, as planned
            assert res["executed_flops"] == inexact_cases.STEPS * res["plan_flops"], rank
        assert "INEXACT" in res["describe"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_schedules_differ_from_the_exact_update_where_their_definition_does(world_size):
    """At P > 1 blockwise and periodic (always) and local_norms under NorMuon are many bounds
    away from the exact update (over 10 bounds; float32 cases over 100): the test above would catch one that silently ran the exact path.
    local_norms under Muon (no global statistic) is the exact update."""
    for k, case in enumerate(CASES):
        res = fsdp(world_size)[0][k]
        far = max(res["exact_ratios"])
        if case["strategy"] == "local_norms" and case["rule"] == "muon":
            assert far <= 1.0, (case_id(case), far)
        else:
            assert far > (100.0 if case["ns_dtype"] == "float32" else 10.0), (case_id(case), far)


def test_schedules_on_a_single_block_are_the_exact_update_p1():
    """At P = 1 (one block) every schedule is the exact update (periodic: when its full-step lr
    scale is 1), which pins the references to the exact one."""
    for k, case in enumerate(CASES):
        if case["options"].get("full_lr_scale", 1.0) == 1.0:
            res = fsdp(1)[0][k]
            assert max(res["exact_ratios"]) <= 1.0, (case_id(case), res["exact_ratios"])


def test_schedules_on_plain_tensors_match_their_reference_p3():
    for rank in spawn(inexact_cases.plain_worker, 3, args=(PLAIN,), timeout_s=300):
        for case, res in zip(PLAIN, rank):
            assert_ratios(res["ratios"], "inexact schedules on plain tensors", case_id(case))


@functools.lru_cache(maxsize=None)
def tp() -> list[dict]:
    return spawn(inexact_cases.tp_worker, 4, timeout_s=300)


def test_blockwise_on_fsdp_x_tp_mesh_matches_its_reference_2x2():
    for rank, out in enumerate(tp()):
        for key, res in out.items():
            assert res["mesh_path"], key
            assert_ratios(res["ratios"], "blockwise on a 2x2 FSDP x TP mesh", (key, rank))
            assert res["executed_flops"] == 3 * res["plan_flops"], (key, rank)
            assert max(res["exact_ratios"]) > 10.0, (key, rank, res["exact_ratios"])


def test_refused_with_one_line_where_they_cannot_apply():
    out = spawn(inexact_cases.refusal_worker, 4, timeout_s=120)
    for key, message in out[0].items():
        assert message is not None, f"{key} did not raise ValueError"
        assert "\n" not in message, message
        assert all(o[key] == message for o in out), "every rank raises the same error"
    assert "'periodic'" in out[0]["periodic_on_mesh"] and "1-D" in out[0]["periodic_on_mesh"]
    assert "'local_norms'" in out[0]["local_norms_on_mesh"]
    assert "k must be an int >= 1" in out[0]["periodic_k0"]
    assert "full_lr_scale" in out[0]["periodic_scale"]


def test_exactness_suite_and_defaults_leave_inexact_schedules_out_by_their_flag():
    exact = strategies.available_exact()
    for name in INEXACT:
        assert name in strategies.available() and name not in exact
        assert strategies.build(name).exact is False
        assert "INEXACT" in strategies.build(name).describe()
    assert all(strategies.build(n).exact for n in exact)
    assert StrategyConfig().name in exact
    grid = Grid(strategies="all", world_sizes=[2])
    grid.check("grid")
    assert not set(INEXACT) & {e.name for e in grid.strategies}
