"""FSDP2 glue: how a parameter is laid out across ranks, described as plain data.

FSDP2 (`fully_shard`) turns every parameter into a DTensor placed `Shard(0)` over the mesh's shard
axis: rank r holds rows [r*c, (r+1)*c) of dim 0 with c = ceil(rows / P) (torch.chunk semantics, so
trailing ranks may hold fewer rows or none: 10 rows over 4 ranks are 3,3,3,1; 3 rows are 1,1,1,0).
`to_local()` is that unpadded shard. A 2-D HSDP mesh (replicate x shard) places (Replicate(),
Shard(0)); every replica group does the same work, so we schedule across the shard axis only.

Core module: imports nothing of dist_ortho but `newton_schulz`.

`MatrixSpec` is what a strategy's `plan()` needs: global shape, dtype and each rank's dim-0 extent.
It holds no tensors, so planning is pure and identical on every rank. Validation happens here, when
the optimizer is built, so that a bad parameter raises on every rank before any collective starts.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ortho.core.newton_schulz import matrix_view_shape, ns_flops

__all__ = ["MatrixSpec", "Layout", "chunk_sizes", "resolve_layout", "local_tensor", "dtype_size"]


def chunk_sizes(n: int, world_size: int) -> tuple[int, ...]:
    """dim-0 extent of each rank's shard under torch.chunk semantics (what FSDP2 uses)."""
    if n == 0:
        return (0,) * world_size
    c = math.ceil(n / world_size)
    return tuple(max(0, min(c, n - r * c)) for r in range(world_size))


def dtype_size(dtype: torch.dtype) -> int:
    # planning calls this P x M times (10 s for a 70B plan at P = 1024 when it allocated a tensor)
    return dtype.itemsize


@dataclass(frozen=True)
class MatrixSpec:
    """One parameter as the planner sees it. Pure data, equal on every rank."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    dim0_sizes: tuple[int, ...]  # rows (dim 0) held by each rank; all equal to shape[0] if not sharded
    sharded: bool = True
    ns_steps: int = 5
    out_dtype: torch.dtype | None = None  # dtype of NS results on the wire (the NS compute dtype)
    # position, in backward order, of the FSDP2 unit (`fully_shard` module) holding this matrix:
    # 0 finishes backward first. None when unknown; only the `overlapped` strategy reads it.
    unit: int | None = None
    ns_form: str = "standard"  # NSConfig.form: "gram" iterates in the k x k Gram space

    @property
    def out_itemsize(self) -> int:
        return dtype_size(self.out_dtype if self.out_dtype is not None else self.dtype)

    @property
    def world_size(self) -> int:
        return len(self.dim0_sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        """Elements per dim-0 slice (a row of a matrix, a whole matrix of a 3-D stack)."""
        return math.prod(self.shape[1:])

    @property
    def view_shape(self) -> tuple[int, ...]:
        return matrix_view_shape(self.shape)

    @property
    def flops(self) -> int:
        return ns_flops(self.shape, self.ns_steps, self.ns_form)

    @property
    def padded_rows(self) -> int:
        """Rows per rank once every shard is padded to the largest (for equal-size collectives)."""
        return math.ceil(self.shape[0] / self.world_size) if self.sharded else self.shape[0]

    def shard_numel(self, rank: int) -> int:
        return self.dim0_sizes[rank] * self.row_numel

    @functools.cached_property
    def dim0_starts(self) -> tuple[int, ...]:
        """shard_offset of every rank, and the row count last (P + 1 entries)."""
        return tuple(itertools.accumulate(self.dim0_sizes, initial=0))

    def shard_offset(self, rank: int) -> int:
        """First dim-0 index held by `rank` (a lookup: planners ask it for every rank of every
        matrix, which summed the sizes over again was O(P^2) per matrix at P = 4096)."""
        return self.dim0_starts[rank]

    def local_shape(self, rank: int) -> tuple[int, ...]:
        return (self.dim0_sizes[rank],) + tuple(self.shape[1:])


@dataclass(frozen=True)
class Layout:
    """Where a parameter lives: the process group its shards span and this rank's place in it."""

    group: dist.ProcessGroup | None  # None: a single process, nothing to communicate
    rank: int
    world_size: int
    sharded: bool
    device: torch.device
    mesh: object | None = None  # the DTensor's DeviceMesh, kept to rebuild state DTensors
    placements: tuple | None = None
    # mesh path (dist_ortho.optim.mesh_step): the local shape and placements of a per-row state
    # (NorMuon's v) in the row layout the update rule sees, when they differ from the parameter's
    # own (a column-split TP weight, a stack split by rows); None: derived from the parameter
    state_shape: tuple[int, ...] | None = None
    state_placements: tuple | None = None


def _describe(name: str) -> str:
    return f"parameter {name!r}"


def resolve_layout(param: torch.Tensor, name: str,
                   process_group: dist.ProcessGroup | None = None) -> Layout:
    """Find the shard group of `param`, raising ValueError for layouts we cannot schedule.

    DTensor: exactly one mesh axis may be Shard(0), every other axis Replicate (FSDP or HSDP).
    Plain tensor: replicated on `process_group` (default: the world group when initialized).
    """
    if isinstance(param, DTensor):
        mesh, placements = param.device_mesh, tuple(param.placements)
        shard_axes = [a for a, pl in enumerate(placements) if isinstance(pl, Shard)]
        others_ok = all(isinstance(pl, (Shard, Replicate)) for pl in placements)
        if (len(shard_axes) != 1 or not others_ok
                or any(placements[a].dim != 0 for a in shard_axes)):
            raise ValueError(
                f"{_describe(name)} has placements {placements} on a mesh of shape "
                f"{tuple(mesh.shape)}; dist_ortho schedules FSDP2-style row sharding only: exactly "
                f"one mesh axis Shard(0) and the others Replicate(). For tensor parallel (Shard(1)) "
                f"or partial tensors, orthogonalize those parameters with another optimizer.")
        axis = shard_axes[0]
        group = mesh.get_group(axis) if mesh.size(axis) > 1 else None
        world = mesh.size(axis)
        rank = mesh.get_local_rank(axis) if world > 1 else 0
        return Layout(group, rank, world, True, param.to_local().device, mesh, placements)
    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world > 1:
            return Layout(group, dist.get_rank(group), world, False, param.device)
    return Layout(None, 0, 1, False, param.device)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a (possibly DTensor) tensor; writes to it update the parameter."""
    return t.to_local() if isinstance(t, DTensor) else t
