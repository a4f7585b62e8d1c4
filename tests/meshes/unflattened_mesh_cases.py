"""Workers for tests/meshes/test_unflattened_meshes.py: parameters on meshes built as torchtitan's
`ParallelDims` builds them, by `_unflatten` (and `_flatten`) of one 1-D world mesh, 4 gloo ranks.

Such a mesh is neither a slice nor a flattening of its root (the 1-D world): the optimizer reads
it from its rank tensor (`dist_ortho.core.mesh_groups`). The cases mirror mesh_cases' 2-D cases
(same shapes, placements and tolerance reasoning) with only the way the mesh is built changed:
- HSDP: (dp_replicate, fsdp) = world._unflatten(0, (2, 2)), Replicate x Shard(0), every strategy;
- FSDP x TP: (dp, tp) = world._unflatten(0, (2, 2)), parallelize_module + fully_shard;
- EP: expert stacks on a sparse (ep, efsdp) unflatten and dense weights on the 1-D world and on a
  flattening of the dense unflatten: different meshes over one world, described on one root;
- FSDP on a strided 1-D mesh: dense["dp"] of (dp, tp) steps by 2 through the world's ranks.
"""

from __future__ import annotations

from tests.meshes import mesh_cases
from tests.strategies import dist_cases


def _world():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (4,), mesh_dim_names=("world",))


def _case(name: str, bucket_bytes: int) -> dict:
    return dict(strategy=name, options={"bucket_bytes": bucket_bytes}
                if name == "bucketed_async" else {})


def hsdp_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    from torch.distributed.tensor import Replicate, Shard

    dense = _world()._unflatten(0, (2, 2), ("dp_replicate", "fsdp"))
    pl = [Replicate(), Shard(0)]
    out = {}
    for name in strategy_names:
        for replicas in ("spread", "repeat"):
            out[(name, replicas)] = mesh_cases.run_placed(
                _case(name, 1024), [(s, dense, pl) for s in dist_cases.MIXED], 2, replicas)
    return out


def tp_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    dense = _world()._unflatten(0, (2, 2), ("dp", "tp"))
    layouts = mesh_cases._tp_layouts(dense)
    out = {}
    for name in strategy_names:
        out[(name, "spread")] = mesh_cases.run_placed(_case(name, 600), layouts, 2, "spread")
    out[("balanced", "muon")] = mesh_cases.run_placed(dict(strategy="balanced", rule="muon"),
                                                      layouts, 2)
    return out


def ep_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    from torch.distributed.tensor import Shard

    world = _world()
    sparse = world._unflatten(0, (2, 2), ("ep", "efsdp"))
    dense = world._unflatten(0, (2, 2), ("dp_replicate", "fsdp"))
    E, I, H = 4, 6, 5
    layouts = [((E, 2 * I, H), sparse, [Shard(0), Shard(1)]),
               ((E, H, I), sparse, [Shard(0), Shard(1)]),
               ((9, 6), world, [Shard(0)]),
               ((7, 10), dense["dp_replicate", "fsdp"]._flatten("dp"), [Shard(0)]),
               ((6, 5), sparse["efsdp"], [Shard(0)])]
    return {(name, "mixed"): mesh_cases.run_placed(_case(name, 512), layouts, 2)
            for name in strategy_names}


def strided_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    from torch.distributed.tensor import Shard

    dp = _world()._unflatten(0, (2, 2), ("dp", "tp"))["dp"]
    return {(name, "strided"): mesh_cases.run_placed(
        _case(name, 1024), [(s, dp, [Shard(0)]) for s in dist_cases.MIXED], 2)
        for name in strategy_names}


def suite_worker(rank: int, world_size: int, jobs: list) -> dict:
    """All jobs in one process group (see dist_cases.suite_worker)."""
    return dist_cases.suite_worker(rank, world_size, jobs)
