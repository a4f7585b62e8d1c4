"""Where a parameter's rows live: one description per parameter, made once at construction.

Core module. `param_layout(param, name)` reads a parameter (a DTensor or a plain tensor) once, when
the optimizer is built, and validates what can be validated from the parameter alone, raising one
ValueError naming the parameter (before any collective, on every rank alike: placements are the
same everywhere). The optimizer keeps one `ParamLayout` per parameter; every later decision reads
it, never the parameter's placements again:

- `one_group`: the `sharding.Layout` of the one process group the rows are spread over, when one
  group holds them: FSDP2's `Shard(0)` on one mesh dim with every other dim `Replicate()` (1-D
  FSDP, HSDP), or a plain tensor, whole on every rank of `process_group`. The 1-D plans
  (`sharding.MatrixSpec`) are made from it. None for tensor and expert parallel placements, which
  only the mesh scheduler can cut.
- `root`, `dims`, `placements`, `device_mesh`: a DTensor's root mesh as plain data, the root dims
  each dim of its own mesh covers and its placements (`mesh_groups.describe`). The mesh scheduler
  derives from them how it cuts the rows (`meshes.MatrixLayout.analyze`); the mesh path's process
  groups and the rule state's DTensors are made on `device_mesh`.
- `replicate_dim`: some mesh dim of size > 1 places the parameter `Replicate()`: copies of it
  live on several ranks (HSDP's replica groups; the `replicas=` option says whether they spread
  or repeat the Newton-Schulz work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ortho.core.mesh_groups import describe
from dist_ortho.core.meshes import MeshSpec, is_strided
from dist_ortho.core.sharding import Layout, chunk_sizes, local_tensor

__all__ = ["ParamLayout", "param_layout"]


@dataclass(frozen=True)
class ParamLayout:
    """Where one parameter's rows live (see the module docstring). Build with `param_layout`."""

    name: str
    device: torch.device  # of the local tensor
    one_group: Layout | None  # None: placements only the mesh scheduler can cut (TP, EP)
    root: MeshSpec | None = None  # the root of its device mesh as plain data; None: plain tensor
    dims: tuple = ()  # root dims covered by each dim of the parameter's own mesh
    placements: tuple = ()
    device_mesh: object | None = None  # the DTensor's own DeviceMesh
    replicate_dim: bool = False  # some mesh dim of size > 1 places it Replicate()

    @property
    def on_mesh(self) -> bool:
        """A DTensor (placed on a device mesh), as opposed to a plain tensor."""
        return self.root is not None


def _fits_one_group(param: DTensor) -> bool:
    """FSDP2-style row sharding: one Shard(0) (not strided), every other dim Replicate()."""
    placements = tuple(param.placements)
    sharded = [pl for pl in placements if isinstance(pl, Shard)]
    return (len(sharded) == 1 and sharded[0].dim == 0 and not is_strided(sharded[0])
            and all(isinstance(pl, (Shard, Replicate)) for pl in placements))


def param_layout(param: torch.Tensor, name: str,
                 process_group: dist.ProcessGroup | None = None) -> ParamLayout:
    """Describe where `param`'s rows live; ValueError naming `name` for what cannot be scheduled:
    a mesh whose ranks are no strided grid over its root, or row shards that are not torch.chunk's
    (custom uneven shardings). Placements of TP/EP parameters are validated by the mesh scheduler
    (`meshes.MatrixLayout.analyze`) when the optimizer plans.

    `process_group`: a plain tensor is whole on every rank of it (default: the world group when
    initialized); a DTensor's groups come from its mesh."""
    device = local_tensor(param).device
    if not isinstance(param, DTensor):
        return ParamLayout(name, device, _checked(param, name, process_group))
    root, dims, placements = describe(param, name)
    sizes = tuple(param.device_mesh.mesh.shape)
    replicate_dim = any(isinstance(pl, Replicate) and s > 1 for pl, s in zip(placements, sizes))
    one_group = _checked(param, name, process_group) if _fits_one_group(param) else None
    return ParamLayout(name, device, one_group, root, dims, placements, param.device_mesh,
                       replicate_dim)


def _checked(param: torch.Tensor, name: str, process_group) -> Layout:
    """The one group's layout, with the local rows checked against FSDP2's torch.chunk."""
    layout = _one_group(param, process_group)
    if layout.sharded:
        expected = chunk_sizes(param.shape[0], layout.world_size)[layout.rank]
        if local_tensor(param).shape[0] != expected:
            raise ValueError(
                f"parameter {name!r} holds {local_tensor(param).shape[0]} rows on rank "
                f"{layout.rank}, but FSDP2's torch.chunk layout gives {expected}; custom "
                f"uneven shardings are not supported.")
    return layout


def _one_group(param: torch.Tensor, process_group) -> Layout:
    """The group the rows are spread over. DTensor (`_fits_one_group`): its Shard(0) mesh dim's
    group. Plain tensor: whole on every rank of `process_group` (default: the world group when
    initialized)."""
    if isinstance(param, DTensor):
        mesh, placements = param.device_mesh, tuple(param.placements)
        axis, = [a for a, pl in enumerate(placements) if isinstance(pl, Shard)]
        world = mesh.size(axis)
        group = mesh.get_group(axis) if world > 1 else None
        rank = mesh.get_local_rank(axis) if world > 1 else 0
        return Layout(group, rank, world, True, param.to_local().device, mesh, placements)
    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world > 1:
            return Layout(group, dist.get_rank(group), world, False, param.device)
    return Layout(None, 0, 1, False, param.device)
