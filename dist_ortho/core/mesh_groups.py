"""The runtime side of meshes: DTensors to `meshes` descriptions and process groups.

Core module. Two jobs:
- `describe(param)`: a DTensor's root mesh (`MeshSpec`), the root dims each dim of its own mesh
  covers (a sliced mesh covers one root dim per dim, a flattened one several, in order) and its
  placements. Pure data afterwards.
- `group_for(ranks, ...)`: a process group over exactly `ranks`: the default group or a mesh dim's
  own group when one matches, else one made once per process (`new_group` with local
  synchronization: only members call it) and reused. Made only after every parameter passed
  validation, so a ValueError never leaves a rank waiting in group creation.
Which mesh axes a collective travels on is not recorded here: the comm counter records the
ranks of each collective's group (`CommRecord.ranks`) and the plan maps them to its axis labels
(`MeshPlan.axis_of`), so no process-wide registry of labels is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
import torch.distributed.device_mesh as device_mesh

from dist_ortho.core.meshes import MeshSpec

__all__ = ["root_mesh", "mesh_spec", "describe", "group_for"]

_GROUPS: dict[tuple, object] = {}  # (id of the default group, ranks) -> group made here


def root_mesh(mesh):
    """The mesh `mesh` was sliced or flattened from (itself when it is a root)."""
    get = getattr(mesh, "_get_root_mesh", None)
    if callable(get):
        return get()
    resources = getattr(device_mesh, "_mesh_resources", None)  # where older torch keeps it
    if resources is not None and hasattr(resources, "get_root_mesh"):
        return resources.get_root_mesh(mesh)
    return mesh


def mesh_spec(mesh) -> MeshSpec:
    """A DeviceMesh as plain data (unnamed dims are called dim0, dim1, ...)."""
    names = tuple(mesh.mesh_dim_names or (f"dim{i}" for i in range(mesh.ndim)))
    return MeshSpec(names, tuple(int(s) for s in mesh.mesh.shape),
                    tuple(int(r) for r in mesh.mesh.flatten().tolist()))


def _param_dims(sub, root: MeshSpec) -> tuple[tuple[int, ...], ...] | None:
    """Root dims of each dim of `sub` (a mesh sliced/flattened from `root`), or None when `sub`
    is not such a mesh (ranks in another order)."""
    ranks = sub.mesh
    origin = root.coordinate(int(ranks.flatten()[0]))
    out = []
    for i in range(sub.ndim):
        # the root coordinates met walking along dim i, from the first rank of the mesh
        line = ranks.movedim(i, -1).reshape(-1, ranks.shape[i])[0].tolist()
        coords = [root.coordinate(int(r)) for r in line]
        moving = tuple(d for d in range(len(root.sizes))
                       if len({c[d] for c in coords}) > 1)
        # a flattened dim walks its root dims row-major
        expected = []
        for index in range(len(line)):
            c = list(origin)
            for d in reversed(moving):
                c[d] = index % root.sizes[d]
                index //= root.sizes[d]
            expected.append(tuple(c))
        if [tuple(c[d] for d in moving) for c in coords] != \
                [tuple(c[d] for d in moving) for c in expected]:
            return None
        out.append(moving)  # () for a dim of size 1: it moves nothing
    return tuple(out)


def describe(param, name: str) -> tuple[MeshSpec, tuple[tuple[int, ...], ...], tuple]:
    """(root mesh, root dims per dim of the parameter's mesh, placements) of a DTensor."""
    mesh = param.device_mesh
    root = root_mesh(mesh)
    spec = mesh_spec(root)
    dims = _param_dims(mesh, spec) if root is not mesh else tuple((d,) for d in range(mesh.ndim))
    if dims is None:
        raise ValueError(f"parameter {name!r} lives on a mesh {tuple(mesh.mesh.shape)} that is "
                         f"neither a slice nor a flattening of its root mesh "
                         f"{tuple(root.mesh.shape)}; build its mesh from the root with "
                         f"mesh['dim'] or flatten")
    return spec, dims, tuple(param.placements)


# -- groups ----------------------------------------------------------------------------------------

def group_for(ranks: Sequence[int], candidates: Sequence = ()):
    """A process group over exactly `ranks` (None for a single rank): the default group, one of
    `candidates` (mesh dim groups) with those ranks, or one made here once and reused."""
    ranks = tuple(sorted(ranks))
    if len(ranks) == 1:
        return None
    world = dist.group.WORLD
    if ranks == tuple(range(dist.get_world_size())):
        return world
    for group in candidates:
        if group is not None and tuple(sorted(dist.get_process_group_ranks(group))) == ranks:
            return group
    key = (id(world), ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[key]
