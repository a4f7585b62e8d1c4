"""FSDP2 row arithmetic and the plain data plans are made of.

FSDP2 (`fully_shard`) turns every parameter into a DTensor placed `Shard(0)` over the mesh's shard
axis: rank r holds rows [r*c, (r+1)*c) of dim 0 with c = ceil(rows / P) (torch.chunk semantics, so
trailing ranks may hold fewer rows or none: 10 rows over 4 ranks are 3,3,3,1; 3 rows are 1,1,1,0).
`to_local()` is that unpadded shard. A 2-D HSDP mesh (replicate x shard) places (Replicate(),
Shard(0)): each replica group holds a copy of the same shards. The 1-D plans schedule across the
shard axis only, every replica group repeating the work (`replicas="repeat"`); the mesh path can
spread it over the replica groups instead (`replicas="spread"`, `optim.mesh_step`).

Core module: imports nothing of dist_ortho but `newton_schulz`.

- `Layout`: a process group some rows are spread over and this rank's place in it, with how
  per-row state is placed. Collectives, the non-finite check and an update rule's reductions run
  on one; `param_layout.ParamLayout.one_group` is the one a parameter's rows live on.
- `MatrixSpec`: what a strategy's 1-D `plan()` needs of one matrix: global shape, dtype, each
  rank's dim-0 extent (from the parameter's `ParamLayout.one_group`) and its param group's
  Newton-Schulz settings. It holds no tensors, so planning is pure and identical on every rank.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_ortho.core.newton_schulz import matrix_view_shape, ns_flops

__all__ = ["MatrixSpec", "Layout", "chunk_sizes", "local_tensor", "dtype_size"]


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
    """One matrix as a 1-D plan sees it: pure data, equal on every rank. Where the parameter's
    rows live is its `param_layout.ParamLayout` (read once, at construction); this is the part a
    strategy plans with: the shape, the rows each rank holds, and the Newton-Schulz settings. The
    mesh scheduler's counterpart is `meshes.MatrixLayout`."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    dim0_sizes: tuple[int, ...]  # rows (dim 0) held by each rank; all equal to shape[0] if not sharded
    sharded: bool = True  # False: a plain tensor, whole on every rank
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
    """A process group rows are spread over, this rank's place in it and the device; for rule
    state, how its per-row tensors are placed. A parameter's rows live on the one in its
    `ParamLayout.one_group` (1-D FSDP, HSDP, plain tensors); a `StepRun` holds the one its step's
    non-finite check agrees over, and hands an update rule the one it reduces on and the ones its
    state is made in."""

    group: dist.ProcessGroup | None  # None: a single process, nothing to communicate
    rank: int
    world_size: int
    sharded: bool  # rows split over the group (FSDP2); False: whole on every rank (plain tensor)
    device: torch.device
    mesh: object | None = None  # the DTensor's DeviceMesh, kept to rebuild state DTensors
    placements: tuple | None = None
    # mesh path (dist_ortho.optim.mesh_step): the local shape and placements of a per-row state
    # (NorMuon's v) in the row layout the update rule sees, when they differ from the parameter's
    # own (a column-split TP weight, a stack split by rows); None: derived from the parameter
    state_shape: tuple[int, ...] | None = None
    state_placements: tuple | None = None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local storage of a (possibly DTensor) tensor; writes to it update the parameter."""
    return t.to_local() if isinstance(t, DTensor) else t
