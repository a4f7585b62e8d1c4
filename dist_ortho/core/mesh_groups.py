"""The runtime side of meshes: DTensors to `meshes` descriptions and process groups.

Core module. Two jobs:
- `describe(param)`: a DTensor's root mesh (`MeshSpec`), the root dims each dim of its own mesh
  covers (a sliced mesh covers one root dim per dim, a flattened one several, in order) and its
  placements. Pure data afterwards. A mesh made by `_unflatten` of a 1-D world mesh (how
  torchtitan's `ParallelDims` builds every mesh) is neither a slice nor a flattening of that root;
  it is read from its own rank tensor instead: each of its dims steps through the root's ranks with
  a fixed stride, and the root is cut into "atoms" at every stride boundary (`_atom_root`), so the
  mesh's dims cover atoms as a flattened mesh covers root dims.
- `common_root(described)`: parameters on different meshes over the same ranks (torchtitan's dense
  and sparse meshes) described on one root, whose atoms are cut at every boundary any of them has.
- `group_for(ranks, ...)`: a process group over exactly `ranks`: the default group or a mesh dim's
  own group when one matches, else one made once per process (`new_group` with local
  synchronization: only members call it) and reused. Made only after every parameter passed
  validation, so a ValueError never leaves a rank waiting in group creation.
Which mesh axes a collective travels on is not recorded here: the comm counter records the
ranks of each collective's group (`CommRecord.ranks`) and the plan maps them to its axis labels
(`MeshPlan.axis_of`), so no process-wide registry of labels is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.device_mesh as device_mesh

from dist_ortho.core.meshes import MeshSpec

__all__ = ["root_mesh", "mesh_spec", "describe", "common_root", "group_for"]

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
        # a dim that walks part of a root dim (a dim of an unflattened 1-D root) covers none
        if math.prod(root.sizes[d] for d in moving) != ranks.shape[i] or \
                [tuple(c[d] for d in moving) for c in coords] != \
                [tuple(c[d] for d in moving) for c in expected]:
            return None
        out.append(moving)  # () for a dim of size 1: it moves nothing
    return tuple(out)


def _strides(sub, root) -> tuple[int, ...] | None:
    """Per dim of `sub`, how far one step along it moves in the root's flattened rank order, or
    None when `sub`'s ranks are not such a grid (then no root description exists)."""
    position = {int(r): i for i, r in enumerate(root.mesh.flatten().tolist())}
    where = torch.tensor([position[int(r)] for r in sub.mesh.flatten().tolist()])
    where = where.reshape(tuple(sub.mesh.shape))
    origin = int(where.flatten()[0])
    strides = []
    for i in range(sub.ndim):
        step = int(where.select(i, 1).flatten()[0]) - origin if sub.mesh.shape[i] > 1 else 1
        strides.append(step)
    grid = torch.full_like(where, origin)
    for i, step in enumerate(strides):
        shape = [1] * sub.ndim
        shape[i] = sub.mesh.shape[i]
        grid = grid + torch.arange(sub.mesh.shape[i]).reshape(shape) * step
    return tuple(strides) if torch.equal(grid, where) else None


def _atoms(sizes: Sequence[int], strides: Sequence[int], total: int) -> tuple[int, ...] | None:
    """Atom sizes, outermost first, of a row-major root of `total` positions cut at every stride
    boundary of dims (size, stride); None when the boundaries do not divide one another or two
    dims overlap."""
    cuts = {1, total}
    spans = []
    for size, stride in zip(sizes, strides):
        if size > 1:
            if stride < 1:
                return None
            cuts |= {stride, stride * size}
            spans.append((stride, stride * size))
    cuts = sorted(cuts)
    if cuts[-1] != total or any(b % a for a, b in zip(cuts, cuts[1:])):
        return None
    spans.sort()
    if any(hi > lo for (_, hi), (lo, _) in zip(spans, spans[1:])):
        return None
    return tuple(b // a for a, b in zip(cuts, cuts[1:]))[::-1]


def _covered(atoms: Sequence[int], size: int, stride: int) -> tuple[int, ...]:
    """Indices (outermost first) of the atoms a dim of (size, stride) walks; () for size 1."""
    out, step = [], 1
    for index in reversed(range(len(atoms))):
        if size > 1 and stride <= step < stride * size:
            out.append(index)
        step *= atoms[index]
    return tuple(sorted(out))


def _atom_root(sub, root) -> tuple[MeshSpec, tuple[tuple[int, ...], ...]] | None:
    """The root cut into atoms at `sub`'s stride boundaries, and the atoms each dim of `sub`
    covers; None when `sub` is not a strided grid over the root's ranks."""
    strides = _strides(sub, root)
    if strides is None:
        return None
    sizes = tuple(int(s) for s in sub.mesh.shape)
    atoms = _atoms(sizes, strides, root.mesh.numel())
    if atoms is None:
        return None
    dims = tuple(_covered(atoms, s, t) for s, t in zip(sizes, strides))
    names = tuple(sub.mesh_dim_names or (f"dim{i}" for i in range(sub.ndim)))
    return _named(atoms, dims, names, tuple(int(r) for r in root.mesh.flatten().tolist())), dims


def _named(atoms, dims, names, ranks) -> MeshSpec:
    """A root of `atoms` named after the mesh dims covering them ("fsdp" for an atom one dim
    covers alone, "fsdp.0", "fsdp.1" for atoms a dim splits into, "atom2" for one none covers)."""
    atom_names = [[] for _ in atoms]
    for name, covered in zip(names, dims):
        for k, atom in enumerate(covered):
            atom_names[atom].append(name if len(covered) == 1 else f"{name}.{k}")
    out = [("/".join(dict.fromkeys(n)) if n else f"atom{i}") for i, n in enumerate(atom_names)]
    if len(set(out)) < len(out):  # one name on atoms of different meshes
        out = [f"{n}#{i}" for i, n in enumerate(out)]
    return MeshSpec(tuple(out), tuple(atoms), ranks)


def describe(param, name: str) -> tuple[MeshSpec, tuple[tuple[int, ...], ...], tuple]:
    """(root mesh, root dims per dim of the parameter's mesh, placements) of a DTensor."""
    mesh = param.device_mesh
    root = root_mesh(mesh)
    spec = mesh_spec(root)
    dims = _param_dims(mesh, spec) if root is not mesh else tuple((d,) for d in range(mesh.ndim))
    if dims is None:
        atomized = _atom_root(mesh, root)
        if atomized is None:
            raise ValueError(f"parameter {name!r} lives on a mesh {tuple(mesh.mesh.shape)} whose "
                             f"ranks are not a strided grid over its root mesh "
                             f"{tuple(root.mesh.shape)}; build its mesh from the root with "
                             f"mesh['dim'], _flatten or _unflatten")
        spec, dims = atomized
    return spec, dims, tuple(param.placements)


def common_root(described: Sequence[tuple[MeshSpec, tuple[tuple[int, ...], ...]]]
                ) -> tuple[MeshSpec, list[tuple[tuple[int, ...], ...]]] | None:
    """One root for meshes described on roots over the same ranks in the same order: cut where
    any of them is cut; each mesh's dims mapped onto it. None when the roots hold different ranks
    or their cuts do not nest."""
    specs = list(dict.fromkeys(spec for spec, _ in described))
    if len(specs) == 1:
        return specs[0], [dims for _, dims in described]
    if len({spec.ranks for spec in specs}) > 1:
        return None
    total = len(specs[0].ranks)
    cuts = set()
    for spec in specs:
        step = 1
        for size in reversed(spec.sizes):
            cuts |= {step, step * size}
            step *= size
    cuts = sorted(cuts)
    if any(b % a for a, b in zip(cuts, cuts[1:])):
        return None
    atoms = tuple(b // a for a, b in zip(cuts, cuts[1:]))[::-1]
    out, all_dims, all_names = [], [], []
    for spec, dims in described:
        strides = [math.prod(spec.sizes[d + 1:]) for d in range(len(spec.sizes))]
        root_dims = [_covered(atoms, spec.sizes[d], strides[d]) for d in range(len(spec.sizes))]
        out.append(tuple(tuple(sorted(a for d in dd for a in root_dims[d])) for dd in dims))
        all_dims += root_dims
        all_names += spec.names
    assert total == math.prod(atoms)
    return _named(atoms, all_dims, all_names, specs[0].ranks), out


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
