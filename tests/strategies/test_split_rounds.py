"""split_ns's split rounds run among each split's members only, on real gloo groups at P = 1..4:
every splittable matrix split (wide, tall, uneven and empty shards, overlapping groups, groups
inside 2-rank nodes), the update equals the single-process reference within the derived bound,
and the bytes counted at every collective and point-to-point message equal the plan's per
(kind, ranks it ran among): the rounds' messages name exactly two members, never a rank
outside the split."""

from __future__ import annotations

import functools

import pytest

from dist_ortho.testing.processes import spawn
from tests import tolerances
from tests.strategies import split_cases

CASES = split_cases.cases()


@functools.lru_cache(maxsize=None)
def results(world_size: int) -> list[list[dict]]:
    return spawn(split_cases.member_rounds_worker, world_size, args=(CASES,))


def _members(case: dict, world_size: int) -> list[set[int]]:
    """Member ranks of every split matrix, from the plan alone."""
    from dist_ortho import strategies
    from dist_ortho.profiling import costmodel as cm

    shapes = [s for s in case["shapes"]]
    specs = cm.matrix_specs(shapes, world_size)
    strategy = strategies.build("split_ns", **case["options"])
    a = strategy._assignment([m for m in specs if m.sharded], world_size)
    return [{p.member for p in parts} for parts in a.parts if len(parts) > 1]


@pytest.mark.exactness
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_split_rounds_among_members_match_reference_and_plan_per_group(world_size):
    splits = 0
    for k, case in enumerate(CASES):
        per_rank = [r[k] for r in results(world_size)]
        members = _members(case, world_size)
        splits += len(members)
        for rank, res in enumerate(per_rank):
            tolerances.report("split_ns member-only rounds vs reference, float32", res["ratios"])
            assert max(res["ratios"]) <= 1.0, (case, rank, res["ratios"])
            assert res["counted"].keys() == res["planned"].keys(), (case, rank, res["counted"],
                                                                    res["planned"])
            for key, (send, recv) in res["counted"].items():
                assert send == pytest.approx(res["planned"][key][0], rel=1e-12), (case, key)
                assert recv == pytest.approx(res["planned"][key][1], rel=1e-12), (case, key)
            assert res["messages"] == res["planned_messages"], (case, rank)
            assert res["executed_flops"] == res["planned_flops"], (case, rank)
            # a message runs between two members of one split; every other call spans all ranks
            for kind, ranks in res["counted"]:
                if kind in ("send", "recv"):
                    assert len(ranks) == 2 and rank in ranks
                    assert any(set(ranks) <= g for g in members), (case, ranks, members)
                else:
                    assert ranks == tuple(range(world_size)), (case, kind, ranks)
        if world_size == 1:
            assert not any(r["counted"] for r in per_rank)
    if world_size > 1:
        assert splits >= len(CASES)  # every case splits something
