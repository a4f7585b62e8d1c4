"""Device meshes as plain data, and how the mesh scheduler cuts a parameter's rows on one.

Core module (no communication, no process group): the optimizer derives these from where each
parameter's rows live (`param_layout.ParamLayout`, read from the DTensor at construction through
`mesh_groups.describe`), the cost model builds them from shapes and a mesh shape, and the mesh
scheduler (`dist_ortho.strategies.mesh`) plans from them alone, so a plan for 1024 ranks can be
made on a laptop and is the same on every rank.

A parameter is a DTensor on a mesh with one placement per mesh dim; we describe that mesh by the
*root* mesh it was sliced or flattened from (`MeshSpec`: dim names, sizes, global ranks) plus, per
dim of the parameter's own mesh, the root dims it covers (`dims`). Placements:

- `Shard(d)` / `_StridedShard(d, sf)` on a tensor dim d. Matrix views have roles per dim: a 2-D
  weight (m, n) has rows (0) and columns (1); a 3-D expert stack (E, m, n) has experts (0), rows
  (1) and columns (2); a 4-D conv weight (out, in, kh, kw) may only be sharded on rows (0).
  Several mesh dims may shard one tensor dim: they split it one after the other, in mesh order, by
  torch.chunk (so uneven and empty pieces are the same as DTensor's). A `_StridedShard` (what FSDP2
  makes on top of a column-parallel TP weight) splits *each* piece of the later mesh dims, so it is
  applied last; we accept it first in the list with split_factor = the product of the later dims'
  sizes, which is the only form FSDP2 and torchtitan produce.
- `Replicate()`: every rank along that dim holds the same values (HSDP's replicate dim, a TP dim
  of a weight that is not tensor-parallel). Root dims that the optimizer's other parameters span
  but this parameter's mesh does not cover are replicas too (FSDP2 keeps a weight that TP left
  alone on the data-parallel sub-mesh: every TP rank holds the same copy).
- `Partial`: rejected; a partial sum is not a matrix anyone can orthogonalize.

From the placements, `MatrixLayout.analyze` derives (and validates, raising one ValueError that
names the parameter and the fix) the roles of the mesh dims:

- row dims: shard the rows (dim 0 of 2-D/4-D, dim 1 of a stack);
- the column dim (at most one, after the row dims in mesh order; TP's `Shard(1)`): the scheduler
  first trades column blocks for row blocks inside that dim's group (one all-to-all), so that every
  rank holds whole rows: a torch.chunk sub-chunk of its row block, by its column coordinate;
- expert dims (stacks only): shard the experts; each expert stays whole on its rank;
- replica dims: explicit `Replicate()` and implicit ones (above). What the replicas do with the
  Newton-Schulz work is the `replicas=` option's choice (spread it or repeat it; see
  `strategies.mesh`).

The row and column dims together form the "row group" G: after the column exchange the matrix is
row-sharded over G's ranks, which is exactly what every strategy schedules. Rows are held in the
order of G's ranks (ascending global rank), which may be a permutation of the matrix's rows; that is
harmless: Newton-Schulz is equivariant under row permutations (NS(P W) = P NS(W)), and NorMuon's
row statistics and Frobenius norms do not depend on the order, so every rank gets exactly its own
rows of the update.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Partial

from dist_ortho.core.sharding import chunk_sizes

try:  # torch >= 2.5; FSDP2 on top of TP makes it
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch has no strided placement to meet
    _StridedShard = None

__all__ = ["MeshSpec", "MatrixLayout", "ROWS", "COLS", "EXPERTS", "tensor_roles", "is_strided",
           "placement_text", "span_of"]

ROWS, COLS, EXPERTS = "rows", "columns", "experts"


def tensor_roles(ndim: int) -> dict[int, str]:
    """Which tensor dims a mesh may shard, and what they are to the matrix view."""
    if ndim == 2:
        return {0: ROWS, 1: COLS}
    if ndim == 3:
        return {0: EXPERTS, 1: ROWS, 2: COLS}
    if ndim == 4:
        return {0: ROWS}  # (out, in, kh, kw) viewed as (out, in*kh*kw): rows only
    return {}


def is_strided(placement) -> bool:
    return _StridedShard is not None and isinstance(placement, _StridedShard)


def placement_text(placement) -> str:
    if is_strided(placement):
        return f"_StridedShard(dim={placement.dim}, sf={placement.split_factor})"
    if isinstance(placement, Shard):
        return f"Shard({placement.dim})"
    if isinstance(placement, Replicate):
        return "Replicate()"
    return repr(placement)


@dataclass(frozen=True)
class MeshSpec:
    """A root device mesh: dim names, sizes and the global rank at each coordinate (row-major;
    None means 0, 1, 2, ... as `init_device_mesh` makes them)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes) or not self.sizes:
            raise ValueError(f"mesh needs one name per dim, got {self.names} for {self.sizes}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"mesh dim names must be unique, got {self.names}")
        if any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"mesh dim sizes must be positive integers, got {self.sizes}")
        if self.ranks is None:
            object.__setattr__(self, "ranks", tuple(range(math.prod(self.sizes))))
        if len(self.ranks) != math.prod(self.sizes) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"mesh of shape {self.sizes} needs {math.prod(self.sizes)} distinct "
                             f"ranks, got {len(self.ranks)}")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @cached_property
    def _position(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.ranks)}

    def coordinate(self, rank: int) -> tuple[int, ...]:
        index = self._position[rank]
        coord = []
        for s in reversed(self.sizes):
            coord.append(index % s)
            index //= s
        return tuple(reversed(coord))

    def rank_at(self, coord: Sequence[int]) -> int:
        index = 0
        for c, s in zip(coord, self.sizes):
            index = index * s + c
        return self.ranks[index]

    def members(self, rank: int, dims: Iterable[int]) -> tuple[int, ...]:
        """Global ranks that differ from `rank` only along `dims`, ascending (a process group's
        rank order)."""
        cache = self.__dict__.setdefault("_members_cache", {})  # planning asks it per rank and unit
        key = (rank, tuple(sorted(set(dims))))
        if key not in cache:
            cache[key] = self._members(rank, key[1])
        return cache[key]

    def _members(self, rank: int, dims: tuple[int, ...]) -> tuple[int, ...]:
        base = list(self.coordinate(rank))
        out = []
        for sub in _product([self.sizes[d] for d in dims]):
            for d, c in zip(dims, sub):
                base[d] = c
            out.append(self.rank_at(base))
        return tuple(sorted(out))

    def label(self, dims: Iterable[int]) -> str:
        """The name of the group spanning `dims` ("shard", "shard+tp"; "local" for none)."""
        dims = sorted(d for d in set(dims) if self.sizes[d] > 1)
        return "+".join(self.names[d] for d in dims) if dims else "local"


def _product(sizes: Sequence[int]):
    if not sizes:
        yield ()
        return
    for head in range(sizes[0]):
        for tail in _product(sizes[1:]):
            yield (head,) + tail


@functools.lru_cache(maxsize=None)
def _nested_chunk(length: int, pieces: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(offset, length) after splitting `length` by torch.chunk into n pieces and taking piece c,
    for each (n, c) in turn."""
    offset = 0
    for n, c in pieces:
        sizes = chunk_sizes(length, n)
        offset += sum(sizes[:c])
        length = sizes[c]
    return offset, length


def span_of(layouts: Sequence["MatrixLayout"]) -> tuple[int, ...]:
    """Root dims spanned by any parameter's mesh: the optimizer's world varies along these."""
    return tuple(sorted({d for lay in layouts for dd in lay.dims for d in dd}))


@dataclass(frozen=True)
class MatrixLayout:
    """How the mesh scheduler cuts one parameter's rows on a root mesh: the roles of its mesh dims
    (row, column, expert and replica dims; see the module docstring). Derived, by `analyze`, from
    where the rows live (`param_layout.ParamLayout`: placements and root dims) or, in the cost
    model, from a shape and a mesh shape alone. Pure data, equal on every rank."""

    name: str
    shape: tuple[int, ...]
    mesh: MeshSpec
    dims: tuple[tuple[int, ...], ...]  # root dims covered by each dim of the parameter's mesh
    placements: tuple
    span: tuple[int, ...]  # root dims the optimizer spans (implicit replicas are in here)
    order: tuple[tuple[int, ...], ...] = field(default=())  # per tensor dim: param-mesh dims
    # that shard it, in the order they apply
    col_pdim: int | None = None

    # -- construction and validation -----------------------------------------------------------
    @classmethod
    def analyze(cls, name: str, shape: Sequence[int], mesh: MeshSpec,
                dims: Sequence[Sequence[int]], placements: Sequence, span: Sequence[int]
                ) -> "MatrixLayout":
        """Validate the placements of parameter `name` and derive its roles; ValueError (naming
        the parameter, its placements and the fix) for layouts that cannot be scheduled exactly."""
        shape, dims, placements = tuple(shape), tuple(tuple(d) for d in dims), tuple(placements)
        where = (f"parameter {name!r} of shape {shape} has placements "
                 f"({', '.join(placement_text(p) for p in placements)}) on mesh dims "
                 f"{tuple('+'.join(mesh.names[d] for d in dd) for dd in dims)}")
        if len(dims) != len(placements):
            raise ValueError(f"{where}: one placement per mesh dim is needed")
        roles = tensor_roles(len(shape))
        sizes = [math.prod(mesh.sizes[d] for d in dd) for dd in dims]
        per_dim: dict[int, list[int]] = {}
        for p, pl in enumerate(placements):
            if isinstance(pl, Partial):
                raise ValueError(f"{where}: a Partial placement is a sum still to be reduced, not "
                                 f"a matrix; reduce it (redistribute to Shard/Replicate) before "
                                 f"the optimizer step, as FSDP2 does for gradients")
            if isinstance(pl, Replicate):
                continue
            if not (isinstance(pl, Shard) or is_strided(pl)):  # torch 2.13: not a Shard
                raise ValueError(f"{where}: placement {pl!r} is not supported; use Shard, "
                                 f"Replicate or FSDP2's _StridedShard")
            if pl.dim not in roles:
                allowed = ", ".join(f"Shard({d}) ({r})" for d, r in roles.items())
                raise ValueError(f"{where}: {len(shape)}-D parameters may be sharded on "
                                 f"{allowed or 'no dim'} only; Shard({pl.dim}) would cut the "
                                 f"matrix view in a way no strategy can reassemble")
            if sizes[p] > 1:
                per_dim.setdefault(pl.dim, []).append(p)
        order = [() for _ in shape]
        for d, pdims in per_dim.items():
            strided = [p for p in pdims if is_strided(placements[p])]
            if not strided:
                order[d] = tuple(pdims)
                continue
            later = pdims[1:]
            sf = placements[strided[0]].split_factor
            if (len(strided) > 1 or strided[0] != pdims[0]
                    or sf != math.prod(sizes[p] for p in later)):
                raise ValueError(
                    f"{where}: _StridedShard is accepted as FSDP2 makes it on top of tensor "
                    f"parallelism: on the first mesh dim sharding tensor dim {d}, with "
                    f"split_factor equal to the product of the later sharding dims' sizes")
            order[d] = tuple(later) + (pdims[0],)  # the strided dim splits each later piece
        col = [p for d, r in roles.items() if r == COLS for p in order[d]]
        if len(col) > 1:
            raise ValueError(f"{where}: columns are split over {len(col)} mesh dims; at most "
                             f"one (the tensor-parallel dim) is supported")
        col_pdim = col[0] if col else None
        if col_pdim is not None:
            row_dim = next(d for d, r in roles.items() if r == ROWS)
            if any(p > col_pdim for p in order[row_dim]):
                raise ValueError(f"{where}: the mesh dim that splits columns must come after "
                                 f"every mesh dim that splits rows (put the tensor-parallel dim "
                                 f"last, as torchtitan does)")
        covered = {d for dd in dims for d in dd}
        if not covered <= set(span):
            raise ValueError(f"{where}: internal: span {span} misses mesh dims {covered}")
        return cls(name, shape, mesh, dims, placements, tuple(sorted(span)), tuple(order),
                   col_pdim)

    # -- roles ---------------------------------------------------------------------------------
    @cached_property
    def roles(self) -> dict[int, str]:
        return tensor_roles(len(self.shape))

    def _root(self, pdims: Iterable[int]) -> tuple[int, ...]:
        return tuple(sorted({d for p in pdims for d in self.dims[p]}))

    def _tensor_dim(self, role: str) -> int | None:
        return next((d for d, r in self.roles.items() if r == role), None)

    @cached_property
    def row_pdims(self) -> tuple[int, ...]:
        d = self._tensor_dim(ROWS)
        return self.order[d] if d is not None else ()

    @cached_property
    def expert_pdims(self) -> tuple[int, ...]:
        d = self._tensor_dim(EXPERTS)
        return self.order[d] if d is not None else ()

    @cached_property
    def group_dims(self) -> tuple[int, ...]:
        """Root dims of the row group G (rows and columns)."""
        col = (self.col_pdim,) if self.col_pdim is not None else ()
        return self._root(self.row_pdims + col)

    @cached_property
    def col_dims(self) -> tuple[int, ...]:
        return self._root((self.col_pdim,)) if self.col_pdim is not None else ()

    @cached_property
    def expert_dims(self) -> tuple[int, ...]:
        return self._root(self.expert_pdims)

    @cached_property
    def replica_dims(self) -> tuple[int, ...]:
        """Root dims along which ranks hold the same values of this parameter."""
        sharding = set(self.group_dims) | set(self.expert_dims)
        return tuple(d for d in self.span if d not in sharding and self.mesh.sizes[d] > 1)

    @property
    def domain_key(self) -> tuple:
        """Parameters with equal keys are scheduled together (same groups)."""
        return (self.group_dims, self.expert_dims, self.replica_dims)

    # -- where the pieces are ------------------------------------------------------------------
    def param_coordinate(self, rank: int) -> tuple[int, ...]:
        # planning a 1024-rank mesh asks this millions of times: cache per layout
        cache = self.__dict__.setdefault("_coordinates", {})
        if rank not in cache:
            cache[rank] = self._param_coordinate(rank)
        return cache[rank]

    def _param_coordinate(self, rank: int) -> tuple[int, ...]:
        root = self.mesh.coordinate(rank)
        out = []
        for dd in self.dims:
            index = 0
            for d in dd:
                index = index * self.mesh.sizes[d] + root[d]
            out.append(index)
        return tuple(out)

    def _pdim_size(self, p: int) -> int:
        return math.prod(self.mesh.sizes[d] for d in self.dims[p])

    def extent(self, tensor_dim: int, rank: int) -> tuple[int, int]:
        """(offset, length) of the piece of `tensor_dim` that `rank` holds (torch.chunk,
        nested in the order the mesh dims apply)."""
        cache = self.__dict__.setdefault("_extents", {})
        key = (tensor_dim, rank)
        if key not in cache:
            coord = self.param_coordinate(rank)
            cache[key] = _nested_chunk(self.shape[tensor_dim], tuple(
                (self._pdim_size(p), coord[p]) for p in self.order[tensor_dim]))
        return cache[key]

    def local_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of `rank`'s local tensor (what DTensor.to_local() returns)."""
        return tuple(self.extent(d, rank)[1] for d in range(len(self.shape)))

    def col_position(self, rank: int) -> tuple[int, int]:
        """(coordinate, size) of `rank` along the column dim ((0, 1) without one)."""
        if self.col_pdim is None:
            return 0, 1
        return self.param_coordinate(rank)[self.col_pdim], self._pdim_size(self.col_pdim)

    def row_split(self, rank: int) -> tuple[int, ...]:
        """Row counts of the sub-chunks the column exchange cuts `rank`'s row block into, one per
        column coordinate (just the row block without a column dim)."""
        rows = self.extent(self._tensor_dim(ROWS), rank)[1]
        return chunk_sizes(rows, self.col_position(rank)[1])

    def rows(self, rank: int) -> int:
        """Rows of each matrix that `rank` holds once columns are traded for rows."""
        t, _ = self.col_position(rank)
        return self.row_split(rank)[t]

    def experts(self, rank: int) -> tuple[int, int]:
        """(first global expert, count) held by `rank`; (0, 1) for 2-D and 4-D parameters."""
        d = self._tensor_dim(EXPERTS)
        return self.extent(d, rank) if d is not None else (0, 1)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of one matrix the strategies orthogonalize: (m, n) per expert of a stack."""
        return self.shape[1:] if len(self.shape) == 3 else self.shape

    def state_shape(self, rank: int) -> tuple[int, ...]:
        """Local shape of a per-row state (NorMuon's v) in the row layout: (rows,) or
        (experts, rows)."""
        if len(self.shape) == 3:
            return (self.experts(rank)[1], self.rows(rank))
        return (self.rows(rank),)

    def state_placements(self) -> tuple:
        """Placements of a per-row state tensor (view shape without the last dim): the
        parameter's, with the column dim turned into a split of rows (the column exchange's
        sub-chunks, which nested Shard placements in mesh order describe exactly)."""
        row_dim = self._tensor_dim(ROWS)
        return tuple(Shard(row_dim) if p == self.col_pdim else pl
                     for p, pl in enumerate(self.placements))
