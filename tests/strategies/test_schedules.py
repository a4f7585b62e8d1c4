"""Schedules are the one description of a strategy: what every registered strategy moves at its
collectives equals what its schedule says, per (kind, ranks) on 1-D and per (kind, mesh axis) on a
2 x 2 HSDP mesh; and a strategy declared in one file by its schedule alone (no byte formula, no
time model) is exact, counted as planned and priced by the cost model."""

from __future__ import annotations

import functools

import pytest

from dist_ortho.profiling import costmodel as cm
from dist_ortho.profiling.hardware import HARDWARE_PRESETS
from dist_ortho.testing.processes import spawn
from tests.strategies import schedule_cases
from tests.strategies.test_every_strategy_matches_the_reference import (assert_bytes_equal,
                                                                          assert_ratios)


@functools.lru_cache(maxsize=None)
def _spawn(worker, world_size: int):
    return spawn(worker, world_size)


def _same(counted: dict, planned: dict, context) -> None:
    assert counted.keys() == planned.keys(), (context, counted, planned)
    for key in counted:
        for c, p in zip(counted[key], planned[key]):
            assert c == pytest.approx(p, rel=1e-12, abs=1e-9), (context, key, c, p)


@pytest.mark.parametrize("world_size", [3])
def test_every_registered_schedule_is_counted_as_planned_per_group(world_size):
    per_rank = _spawn(schedule_cases.counted_by_group_worker, world_size)
    assert set(per_rank[0]) == {(n, str(o)) for n, o in schedule_cases.runs()}
    for rank, out in enumerate(per_rank):
        for key, r in out.items():
            for counted in r["counted"]:
                _same(counted, r["planned"], (rank, key))
    # something travelled among a few members (split rounds) and per link class (two-level)
    keys = {k for out in per_rank for r in out.values() for (_, k) in r["planned"]}
    assert any(isinstance(k, tuple) and len(k) == 2 for k in keys), keys
    assert {"intra_node", "inter_node"} <= keys, keys


def test_every_registered_schedule_is_counted_as_planned_per_mesh_axis():
    per_rank = _spawn(schedule_cases.counted_on_mesh_worker, 4)
    for rank, out in enumerate(per_rank):
        assert out, "no strategy ran on the mesh"
        for key, r in out.items():
            assert r["mesh_path"], key
            for counted in r["counted"]:
                _same(counted, r["planned"], (rank, key))


@pytest.mark.exactness
def test_a_strategy_declared_by_its_schedule_alone_is_exact_counted_and_priced():
    per_rank = _spawn(schedule_cases.declared_strategy_worker, 3)
    for rank, out in enumerate(per_rank):
        for rule, res in out.items():
            assert_ratios(res["ratios"], f"schedule-only strategy ({rule})", (rank, rule))
            for counted, planned in zip(res["counted"], res["planned"]):
                assert_bytes_equal(counted, planned, (rank, rule))
            assert res["executed_flops"] == res["planned_flops"], (rank, rule)
    assert len({tuple(r["normuon"]["owners"]) for r in per_rank}) == 1
    # priced by the cost model from the same actions: two buckets' pipelined exchanges
    P = 64
    shapes = [(4096, 4096)] * 8 + [(11008, 4096)] * 8
    preset = HARDWARE_PRESETS["h100"]
    mirrored = cm.predict(shapes, P, schedule_cases.MirroredPipeline(), constants=preset)
    balanced = cm.predict(shapes, P, "balanced", constants=preset)
    assert mirrored.time.total_s > 0 and mirrored.time.comm_s > 0
    # the mirrored owners do the same work as LPT's, on other ranks
    assert sorted(r.ns_flops for r in mirrored.ranks) == sorted(r.ns_flops for r in balanced.ranks)
    # overlap: with two buckets, part of the exchanges hides behind the other bucket's NS
    assert mirrored.time.overlap_s > 0
