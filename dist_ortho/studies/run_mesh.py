"""The device mesh of a run, and what its optimizer plan sends on each mesh axis.

`train.replicate: R` (R > 1) makes a run HSDP: a 2-D (replicate R x shard P/R) DeviceMesh, so
`fully_shard` shards each weight's rows over the P/R ranks of a shard group and keeps R replicas
of it, one per replica group (FSDP2 reduce-scatters gradients inside a shard group and all-reduces
them across the replicate axis). The optimizer sees that layout in its DTensor parameters and,
with `optimizer.replicas: spread`, gives each replica group its share of the Newton-Schulz work,
then sends the results across the replicate axis (`repeat`: every replica group does all of it,
nothing crosses that axis). R = 1 is the plain 1-D FSDP2 mesh the runs always had.

`axis_facts(state)` is what run.json records about it: the mesh and the optimizer plan's bytes per
(collective kind, mesh axis) on every rank; the counted bytes equal these exactly (asserted per
axis in tests/meshes/test_meshes_match_the_reference.py), so the replicate axis's share is known
without a counter.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.strategies.mesh import MeshPlan, bytes_by_axis

__all__ = ["MESH_AXES", "build_mesh", "axis_facts"]

# axis names of an HSDP mesh, outermost first (the replicate axis usually spans nodes)
MESH_AXES = ("replicate", "shard")


def build_mesh(device_type: str, world_size: int, replicate: int = 1) -> DeviceMesh:
    """1-D mesh over every rank (replicate = 1), else (replicate, world_size / replicate)."""
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,))
    if world_size % replicate:  # preflight says this before launch; a direct call fails here
        raise ValueError(f"train.replicate={replicate} does not divide the world size "
                         f"{world_size}; choose a divisor of it (1 = no replica groups)")
    return init_device_mesh(device_type, (replicate, world_size // replicate),
                            mesh_dim_names=MESH_AXES)


def axis_facts(state) -> dict:
    """{"mesh": shape and axis names, "planned_bytes_by_axis": per rank, {"kind@axis": [send,
    recv]} summed over the matrix optimizers' plans}; every rank computes the whole job's plan."""
    mesh = state.mesh
    names = list(mesh.mesh_dim_names) if mesh.mesh_dim_names else ["shard"]
    per_rank: list[dict] = [{} for _ in range(state.world_size)]
    for opt in state.optimizer.optimizers:
        if not isinstance(opt, OrthogonalizedOptimizer):
            continue
        plan = opt.plan()
        for rank in range(state.world_size):
            if isinstance(plan, MeshPlan):  # indexed by its world
                cost = plan.ranks[plan.world.index(rank)]
            else:  # one shard group's plan (repeat: every replica group runs the same one);
                # global rank = replica x shard size + shard coordinate on a row-major mesh
                cost = plan.ranks[rank % len(plan.ranks)]
            for (kind, axis), (send, recv) in bytes_by_axis(cost.comm).items():
                acc = per_rank[rank].setdefault(f"{kind}@{axis}", [0.0, 0.0])
                acc[0] += send
                acc[1] += recv
    return {"mesh": {"shape": list(mesh.shape), "axes": names,
                     "replicas": getattr(state.config.optimizer, "replicas", "spread")},
            "planned_bytes_by_axis": per_rank}
