"""Scheduling on 2-D and 3-D meshes: HSDP replicas share the work, tensor and expert parallel.

Every strategy schedules matrices that are row-sharded over one process group. This module reduces
any mesh layout `dist_ortho.core.meshes` accepts to that, runs the chosen strategy unchanged on each
group, and adds what the mesh needs around it. Parameters whose mesh dims play the same roles form
a *domain*; a domain's ranks split into *instances* of its row group G (one per coordinate on the
other dims). Per optimizer step, in this order on every rank:

1. to rows (`to_rows`): a weight whose columns are split over a TP dim trades, inside that dim's
   group, column blocks for row sub-chunks (one all-to-all per domain), so each rank holds whole
   rows: then the matrix is row-sharded over G (rows in G's rank order; see `meshes`).
2. the strategy: each instance runs the strategy's own `plan()`/`execute()` over G on the matrices
   it orthogonalizes (its *share*). A 3-D expert stack is one matrix per expert: sharded on the
   expert dim only, G is the rank itself and the expert is orthogonalized where it lives, with no
   traffic; split by rows, it is scheduled like any other matrix.
3. replicas (`replicas="spread"`): instances that hold the same values (HSDP's replicate dim, or a
   TP dim a weight is replicated on) split the matrices between them instead of each doing all of
   them: the matrices go to R x |G| slots by LPT on Newton-Schulz FLOPs, instance h takes those in
   its slots, and after its strategy has returned the rows within G, one all-to-all over the
   replica group gives every replica the rows of the others' matrices. Each matrix is
   orthogonalized once in the job; NS FLOPs per rank drop by about R, and the rows of the results
   cross the replica dim once: (R-1)/R of a rank's rows (usually inter-node). `"repeat"`: every
   replica does all of its matrices (what HSDP does elsewhere), no replica traffic.
4. the update rule, per domain, on the row layout with G's group (NorMuon's row statistics are
   local, its Frobenius sums are all-reduced over G, which holds every row exactly once);
5. from rows (`from_rows`): the updates of column-split weights go back to column blocks (the
   inverse all-to-all, in the parameter dtype, to which they are cast before applying anyway).

`plan_mesh` is pure: from `MatrixLayout`s alone it predicts, for every rank of the optimizer's
world, each collective (kind, bytes, phase and the mesh axes it travels on: `CommItem.axis` is the
label of the group, e.g. "shard", "replicate", "tp", "shard+tp"), the NS FLOPs and the transient
bytes. Execution (`dist_ortho.strategies.mesh_exec`) issues exactly those collectives.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dist_ortho.core.meshes import MatrixLayout, MeshSpec, span_of
from dist_ortho.core.newton_schulz import ns_flops
from dist_ortho.core.plan import EVERY_RANK, CommItem, Plan, RankCost, all_reduce_bytes
from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import lpt_owners

__all__ = ["REPLICA_MODES", "DEFAULT_REPLICAS", "Unit", "Instance", "Domain", "MeshPlan",
           "plan_mesh", "check_replicas", "bytes_by_axis", "counted_by_axis"]

REPLICA_MODES = ("spread", "repeat")
# spread: NS FLOPs per rank drop by R for (R-1)/R of a rank's result rows over the replica axis;
# the cost model finds it faster for every strategy on the projected H100 meshes (docs/meshes.md);
# `dist-ortho project --mesh` says where repeat would win (slow inter-node links)
DEFAULT_REPLICAS = "spread"


def check_replicas(replicas) -> str:
    if replicas not in REPLICA_MODES:
        raise ValueError(f"replicas must be one of {REPLICA_MODES}, got {replicas!r}")
    return replicas


@dataclass(frozen=True)
class Unit:
    """One matrix a strategy orthogonalizes: a 2-D/4-D parameter, or one expert of a stack."""

    param: int  # position in the optimizer's parameter list
    expert: int | None  # global expert index of a 3-D stack
    layout: MatrixLayout

    @property
    def name(self) -> str:
        return self.layout.name + (f"[{self.expert}]" if self.expert is not None else "")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.matrix_shape

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])


@dataclass
class Instance:
    """One copy of a domain's row group G: who is in it, what they hold, what they compute."""

    members: tuple[int, ...]  # global ranks, ascending: the strategy's rank order
    expert_key: tuple[int, ...]  # root coordinates on the expert dims
    replica: int  # index among the instances holding the same units
    units: tuple[int, ...]  # Domain.units held (and updated) here
    share: tuple[int, ...]  # of those, the ones orthogonalized here
    plan: Plan  # the strategy's plan of `share` over `members` (rank 0's view)

    def specs(self, domain: "Domain", which: Sequence[int]) -> list[MatrixSpec]:
        return [dataclasses.replace(domain.spec(k, self.members), index=j)
                for j, k in enumerate(which)]


@dataclass
class Domain:
    """Parameters whose mesh dims play the same roles, scheduled together."""

    key: tuple
    label: str  # axes of G
    replica_label: str
    copies: int  # R: instances holding copies of the same units (on Replicate() dims)
    units: list[Unit]
    instances: list[Instance]
    dtype: torch.dtype
    out_dtype: torch.dtype
    ns_steps: tuple[int, ...]  # per parameter
    by_rank: dict[int, int] = field(default_factory=dict)  # global rank -> its instance

    def spec(self, k: int, members: Sequence[int]) -> MatrixSpec:
        u = self.units[k]
        return MatrixSpec(k, u.name, u.shape, self.dtype,
                          tuple(u.layout.rows(r) for r in members), True,
                          self.ns_steps[u.param], self.out_dtype)

    def instance(self, rank: int) -> Instance:
        return self.instances[self.by_rank[rank]]


@dataclass
class MeshPlan(Plan):
    """A Plan over the optimizer's whole world (ranks indexed by `world`), plus the domains."""

    mesh: MeshSpec | None = None
    world: tuple[int, ...] = ()  # global rank of each plan rank
    world_label: str = ""
    replicas: str = DEFAULT_REPLICAS  # the replicas= option: "spread" or "repeat"
    layouts: tuple[MatrixLayout, ...] = ()  # per parameter: how the scheduler cuts its rows
    domains: list[Domain] = field(default_factory=list)

    @property
    def global_rank(self) -> int:
        return self.world[self.rank]

    def groups(self, rank: int) -> list[tuple[tuple[int, ...], str]]:
        """(member ranks, axis label) of every group `rank` communicates on, in a fixed order."""
        out = [(self.world, self.world_label)]
        for dom in self.domains:
            inst = dom.instance(rank)
            out.append((inst.members, dom.label))
            if dom.copies > 1 and self.replicas == "spread":
                out.append((self.mesh.members(rank, dom.key[2]), dom.replica_label))
            for dims in col_dims_of(dom, inst):
                out.append((self.mesh.members(rank, dims), self.mesh.label(dims)))
        return [(ranks, label) for ranks, label in out if len(ranks) > 1]

    def axis_of(self, ranks) -> str:
        """The mesh axes a collective over the group of these global ranks travels on (the
        label this plan gives that group), so that counted bytes can be compared per axis. A
        message between two members (split_ns's rounds) travels on the smallest group holding
        both."""
        ranks = tuple(sorted(ranks))
        holding = []
        for members, label in self.groups(self.global_rank):
            if members == ranks:
                return label
            if set(ranks) <= set(members):
                holding.append((len(members), label))
        if holding:
            return min(holding)[1]
        raise KeyError(f"no group over ranks {ranks} in this plan")


def bytes_by_axis(items) -> dict[tuple[str, str], tuple[float, float]]:
    """{(kind, axis): (send bytes, recv bytes)} over plan items (CommItem.axis)."""
    out: dict[tuple[str, str], list[float]] = {}
    for c in items:
        acc = out.setdefault((c.kind, c.axis), [0.0, 0.0])
        acc[0] += c.send_bytes
        acc[1] += c.recv_bytes
    return {k: (v[0], v[1]) for k, v in out.items()}


def counted_by_axis(plan: Plan, records) -> dict[tuple[str, str], tuple[float, float]]:
    """The same sum over counted records (profiling.comm.CommRecord: kind, ranks), each put on
    the axis its group spans in `plan` (a one-group plan's items all travel on CommItem's
    default axis)."""
    default = CommItem("", 0, 0).axis
    return bytes_by_axis(dataclasses.replace(
        CommItem(r.kind, r.send_bytes, r.recv_bytes),
        axis=plan.axis_of(r.ranks) if isinstance(plan, MeshPlan) else default)
        for r in records)


def col_dims_of(domain: Domain, inst: Instance) -> list[tuple[int, ...]]:
    """Root dims of the column groups the units held by `inst` trade over, in first-use order."""
    out = []
    for k in inst.units:
        lay = domain.units[k].layout
        if lay.col_dims and lay.col_position(inst.members[0])[1] > 1 and lay.col_dims not in out:
            out.append(lay.col_dims)
    return out


def _relabel(items: Sequence[CommItem], axis: str) -> list[CommItem]:
    return [dataclasses.replace(c, axis=axis) for c in items]


def _units(layouts: Sequence[MatrixLayout], params: Sequence[int], rank: int) -> list[Unit]:
    out = []
    for p, lay in zip(params, layouts):
        if len(lay.shape) == 3:
            first, count = lay.experts(rank)
            out += [Unit(p, first + e, lay) for e in range(count)]
        else:
            out.append(Unit(p, None, lay))
    return out


class _PlanCache:
    """Strategy plans by what they depend on (shapes, row splits, steps), so that identical
    instances (experts on every EP rank, replicas) are planned once."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.plans: dict[tuple, Plan] = {}

    def plan(self, specs: list[MatrixSpec], world_size: int) -> Plan:
        key = (world_size,) + tuple((s.shape, s.dim0_sizes, s.ns_steps) for s in specs)
        if key not in self.plans:
            self.plans[key] = self.strategy.plan(specs, world_size, 0)
        cached = self.plans[key]
        return dataclasses.replace(cached, matrices=tuple(specs))


def plan_mesh(strategy: Strategy, layouts: Sequence[MatrixLayout], rank: int,
              dtype: torch.dtype, out_dtype: torch.dtype, ns_steps: Sequence[int],
              reductions: Callable[[Sequence[MatrixSpec], int], list[CommItem]],
              replicas: str = DEFAULT_REPLICAS, check_bytes: int = 4) -> MeshPlan:
    """The plan of one optimizer step on a mesh, as seen by global rank `rank`.

    layouts: one per parameter (one root mesh); ns_steps: per parameter; reductions: the update
    rule's `reductions(specs, world_size)`; check_bytes: the non-finite check's all-reduce."""
    check_replicas(replicas)
    layouts = tuple(layouts)
    mesh = layouts[0].mesh
    if any(lay.mesh != mesh for lay in layouts):
        raise ValueError("parameters live on different root meshes; one optimizer schedules on "
                         "one mesh (use one optimizer per mesh)")
    span = span_of(layouts)
    world = mesh.members(rank, span)
    where = {r: w for w, r in enumerate(world)}
    ranks = [RankCost() for _ in world]
    W = len(world)
    world_label = mesh.label(span)
    if W > 1:
        flag = all_reduce_bytes(check_bytes, W)
        for cost in ranks:
            cost.comm.append(CommItem("all_reduce", flag, flag, "nonfinite_check", world_label))
    cache = _PlanCache(strategy)
    keys: dict[tuple, list[int]] = {}
    for p, lay in enumerate(layouts):
        keys.setdefault(lay.domain_key, []).append(p)
    domains = [_plan_domain(key, params, layouts, world, mesh, cache, dtype, out_dtype,
                            tuple(ns_steps), replicas) for key, params in keys.items()]
    b_in, b_out = dtype_size(dtype), dtype_size(out_dtype)
    held = [0] * W
    for dom in domains:  # 1-3: to rows, the strategy, replicas
        for inst in dom.instances:
            _convert_items(dom, inst, ranks, where, mesh, b_in, "to_rows", held)
            for g, member in enumerate(inst.members):
                cost, sub = ranks[where[member]], inst.plan.ranks[g]
                cost.comm += _relabel(sub.comm, dom.label)
                cost.ns_flops += sub.ns_flops
                cost.computes += sorted({dom.units[inst.share[j]].param for j in sub.computes}
                                        - set(cost.computes))
                held[where[member]] += sub.transient_bytes
        if dom.copies > 1 and replicas == "spread":  # repeat: the copies exchange nothing
            _replica_items(dom, ranks, where, mesh, b_out, held)
    for dom in domains:  # 4: the update rule's reductions, per domain on G
        for inst in dom.instances:
            items = _relabel(reductions(inst.specs(dom, inst.units), len(inst.members)),
                             dom.label)
            for member in inst.members:
                ranks[where[member]].comm += items
    for dom in domains:  # 5: updates back to column blocks
        for inst in dom.instances:
            _convert_items(dom, inst, ranks, where, mesh, b_in, "from_rows", held)
    for w, cost in enumerate(ranks):
        cost.transient_bytes = held[w]
    owner = [EVERY_RANK] * len(layouts)
    for dom in domains:
        for inst in reversed(dom.instances):  # the first instance's owner wins
            for j, k in enumerate(inst.share):
                o = inst.plan.owner[j]
                owner[dom.units[k].param] = o if o == EVERY_RANK else inst.members[o]
    matrices = tuple(MatrixSpec(p, lay.name, lay.shape, dtype,
                                tuple(lay.local_shape(r)[0] for r in world), True, ns_steps[p],
                                out_dtype) for p, lay in enumerate(layouts))
    return MeshPlan(strategy.name, W, where[rank], matrices, tuple(owner), (0,) * len(layouts),
                    ranks, mesh=mesh, world=world, world_label=world_label, replicas=replicas,
                    layouts=layouts, domains=domains)


def _plan_domain(key, params, layouts, world, mesh: MeshSpec, cache: _PlanCache, dtype,
                 out_dtype, ns_steps, replicas: str) -> Domain:
    group_dims, expert_dims, replica_dims = key
    R = math.prod(mesh.sizes[d] for d in replica_dims)
    dom = Domain(key, mesh.label(group_dims), mesh.label(replica_dims), R, [], [], dtype,
                 out_dtype, ns_steps)
    doms_layouts = [layouts[p] for p in params]
    seen: dict[tuple[int, ...], int] = {}
    by_expert: dict[tuple, list[int]] = {}  # expert key -> instance indices
    unit_index: dict[tuple, int] = {}
    pending = []
    for r in world:
        members = mesh.members(r, group_dims)
        if members in seen:
            dom.by_rank[r] = seen[members]
            continue
        coord = mesh.coordinate(r)
        expert_key = tuple(coord[d] for d in expert_dims)
        replica = 0
        for d in replica_dims:
            replica = replica * mesh.sizes[d] + coord[d]
        held = []
        for u in _units(doms_layouts, params, r):
            ident = (u.param, u.expert)
            if ident not in unit_index:
                unit_index[ident] = len(dom.units)
                dom.units.append(u)
            held.append(unit_index[ident])
        seen[members] = len(pending)
        dom.by_rank[r] = len(pending)
        by_expert.setdefault(expert_key, []).append(len(pending))
        pending.append((members, expert_key, replica, tuple(held)))
    shares: dict[int, tuple[int, ...]] = {}
    for expert_key, insts in by_expert.items():
        members, _, _, held = pending[insts[0]]
        if replicas == "repeat" or R == 1:
            for i in insts:
                shares[i] = pending[i][3]
            continue
        # spread: LPT over R x |G| slots, by NS FLOPs; replica h takes the units in its slots
        specs = [dataclasses.replace(dom.spec(k, members), index=j) for j, k in enumerate(held)]
        slots = lpt_owners(specs, R * len(members))
        for i in insts:
            h = pending[i][2]
            shares[i] = tuple(k for k, s in zip(held, slots) if s // len(members) == h)
    for i, (members, expert_key, replica, held) in enumerate(pending):
        share = shares[i]
        specs = [dataclasses.replace(dom.spec(k, members), index=j) for j, k in enumerate(share)]
        dom.instances.append(Instance(members, expert_key, replica, held, share,
                                      cache.plan(specs, len(members))))
    return dom


def _convert_items(dom: Domain, inst: Instance, ranks, where, mesh: MeshSpec, itemsize: int,
                   phase: str, held: list[int]) -> None:
    """One all-to-all per column group: rows for columns (`to_rows`) or back (`from_rows`)."""
    for dims in col_dims_of(dom, inst):
        label = mesh.label(dims)
        # units of one shape and layout (the same weight of every layer, every expert of a
        # stack) trade the same pieces: count each kind once (planning 1024 ranks stays fast)
        kinds: dict[tuple, list] = {}
        for k in inst.units:
            lay = dom.units[k].layout
            if lay.col_dims == dims:
                kinds.setdefault((lay.shape, lay.placements, lay.dims), [lay, 0])[1] += 1
        for x in inst.members:
            send = recv = 0
            peers = mesh.members(x, dims)
            for lay, count in kinds.values():
                col_dim = len(lay.shape) - 1
                t, _ = lay.col_position(x)
                split = lay.row_split(x)
                for y in peers:
                    if y == x:
                        continue
                    ty, _ = lay.col_position(y)
                    out_el = split[ty] * lay.extent(col_dim, x)[1]  # my columns of y's rows
                    in_el = split[t] * lay.extent(col_dim, y)[1]  # y's columns of my rows
                    send += count * (out_el if phase == "to_rows" else in_el)
                    recv += count * (in_el if phase == "to_rows" else out_el)
            ranks[where[x]].comm.append(CommItem("all_to_all", send * itemsize,
                                                 recv * itemsize, phase, label))
            held[where[x]] = max(held[where[x]], 2 * (send + recv) * itemsize)


def _replica_items(dom: Domain, ranks, where, mesh: MeshSpec, itemsize: int,
                   held: list[int]) -> None:
    """Spread: every rank sends its rows of its instance's share to the other replicas."""
    done = set()
    for inst in dom.instances:
        for x in inst.members:
            group = mesh.members(x, dom.key[2])
            if group in done:
                continue
            done.add(group)
            rows = {y: sum(dom.units[k].layout.rows(y) * dom.units[k].row_numel
                           for k in dom.instance(y).share) for y in group}
            if not any(rows.values()):
                continue  # nothing to share: every member skips the collective alike
            for y in group:
                send = (len(group) - 1) * rows[y] * itemsize
                recv = sum(rows[z] for z in group if z != y) * itemsize
                ranks[where[y]].comm.append(CommItem("all_to_all", send, recv, "replicas",
                                                     dom.replica_label))
                held[where[y]] = max(held[where[y]], send + recv + rows[y] * itemsize)
