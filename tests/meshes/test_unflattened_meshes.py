"""Meshes built as torchtitan builds them (`_unflatten` / `_flatten` of a 1-D world mesh), 4 gloo
ranks: HSDP, FSDP x TP, expert parallel on a sparse mesh beside dense weights on other meshes of
the same world, FSDP on a strided 1-D mesh. Every strategy equals the single-process reference
within the derived float32 bound, and the bytes counted equal the plan's per (kind, mesh axis)
(tests/meshes/unflattened_mesh_cases.py; the checks are test_mesh_dist's)."""

from __future__ import annotations

import functools

import pytest
import torch

from dist_ortho import NorMuon, strategies
from dist_ortho.core import mesh_groups
from dist_ortho.core.meshes import MeshSpec
from dist_ortho.testing.processes import spawn
from tests.meshes import unflattened_mesh_cases
from tests.meshes.test_meshes_match_the_reference import check_run

STRATEGIES = strategies.available_exact()
JOBS = [("hsdp", unflattened_mesh_cases.hsdp_worker, (STRATEGIES,)),
        ("tp", unflattened_mesh_cases.tp_worker, (STRATEGIES,)),
        ("ep", unflattened_mesh_cases.ep_worker, (STRATEGIES,)),
        ("strided", unflattened_mesh_cases.strided_worker, (STRATEGIES,))]


@functools.lru_cache(maxsize=None)
def suite() -> list[dict]:
    return spawn(unflattened_mesh_cases.suite_worker, 4, args=(JOBS,))


def runs(job: str) -> dict:
    per_rank = [rank[job] for rank in suite()]
    return {key: [r[key] for r in per_rank] for key in per_rank[0]}


def _check(job: str, expected_cases: int, mesh_path: bool | None = True) -> None:
    cases = runs(job)
    assert len(cases) == expected_cases, sorted(cases)
    for key, per_rank in cases.items():
        for rank, res in enumerate(per_rank):
            check_run(res, (job, key, rank))
            if mesh_path is not None:
                assert res["mesh_path"] == mesh_path, (job, key)


@pytest.mark.exactness
def test_hsdp_on_an_unflattened_world_matches_reference_and_plan():
    _check("hsdp", 2 * len(STRATEGIES), mesh_path=None)
    for (name, replicas), per_rank in runs("hsdp").items():
        # spread crosses the replicate axis with one all-to-all: the axis is known by its name
        crosses = ("all_to_all", "dp_replicate") in per_rank[0]["counted"][0]
        assert crosses == (replicas == "spread"), (name, replicas, per_rank[0]["counted"][0])


@pytest.mark.exactness
def test_fsdp_x_tp_on_an_unflattened_world_matches_reference_and_plan():
    _check("tp", len(STRATEGIES) + 1)


@pytest.mark.exactness
def test_experts_and_dense_weights_on_different_unflattenings_match_reference():
    _check("ep", len(STRATEGIES))


@pytest.mark.exactness
def test_fsdp_on_a_strided_slice_of_an_unflattened_world_matches_reference():
    _check("strided", len(STRATEGIES), mesh_path=None)


def test_common_root_cuts_where_any_mesh_is_cut():
    world = MeshSpec(("world",), (8,))
    sparse = MeshSpec(("ep", "efsdp"), (2, 4))
    dense = MeshSpec(("dp", "tp"), (4, 2))
    root, dims = mesh_groups.common_root([(world, ((0,),)), (sparse, ((0,), (1,))),
                                          (dense, ((0,), (1,)))])
    assert root.sizes == (2, 2, 2)
    assert dims == [((0, 1, 2),), ((0,), (1, 2)), ((0, 1), (2,))]
    # cuts that do not nest (3 x 4 against 4 x 3 of 12): no common root
    assert mesh_groups.common_root([(MeshSpec(("a", "b"), (3, 4)), ((0,), (1,))),
                                    (MeshSpec(("c", "d"), (4, 3)), ((0,), (1,)))]) is None


def test_atoms_refuse_overlapping_or_non_nesting_dims():
    assert mesh_groups._atoms((2, 2), (2, 1), 4) == (2, 2)
    assert mesh_groups._atoms((4,), (1,), 8) == (2, 4)
    assert mesh_groups._atoms((2, 4), (2, 1), 8) is None  # dims overlap
    assert mesh_groups._atoms((3, 4), (4, 1), 12) == (3, 4)
    assert mesh_groups._atoms((3,), (4,), 24) == (2, 3, 4)
    assert mesh_groups._atoms((2,), (5,), 12) is None  # 10 does not divide 12
