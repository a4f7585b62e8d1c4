"""Running a `MeshPlan` (see `dist_ortho.strategies.mesh` for what each step does and why).

Three calls, in the order the optimizer makes them on every rank (the same order as the plan's
collectives): `to_rows` (column blocks -> row sub-chunks), `orthogonalize` (the strategy over each
domain's row group, then the replica exchange), and, after the update rule ran on the rows,
`from_rows` (updates back to the parameters' own local shapes). `groups` maps the member ranks of
every group the plan uses (`MeshPlan.groups`) to its process group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from dist_ortho.core.newton_schulz import NSConfig
from dist_ortho.core.orthogonalizer import FlopCount, Orthogonalizer
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer
from dist_ortho.strategies.base import ExecContext, Strategy
from dist_ortho.strategies.collectives import exchange
from dist_ortho.strategies.mesh import Domain, Instance, MeshPlan, col_dims_of

__all__ = ["to_rows", "orthogonalize", "from_rows", "unit_piece"]


def unit_piece(dom: Domain, k: int, local: torch.Tensor, me: int) -> torch.Tensor:
    """Unit k's part of its parameter's local tensor: the tensor, or one expert of a stack."""
    u = dom.units[k]
    if u.expert is None:
        return local
    return local[u.expert - u.layout.experts(me)[0]]


def _group(groups: Mapping, ranks: tuple[int, ...]):
    return groups[ranks] if len(ranks) > 1 else None


def _trade(dom: Domain, inst: Instance, dims, pieces: dict[int, torch.Tensor], me: int,
           groups: Mapping, to_rows_: bool) -> dict[int, torch.Tensor]:
    """One all-to-all in the column group over `dims`: rows for columns (to_rows_) or back."""
    plan_mesh = dom.units[inst.units[0]].layout.mesh
    peers = plan_mesh.members(me, dims)
    ks = [k for k in inst.units if dom.units[k].layout.col_dims == dims]
    send = [[] for _ in peers]
    recv = [0] * len(peers)
    shapes = {}
    for k in ks:
        lay = dom.units[k].layout
        col_dim = len(lay.shape) - 1
        split = lay.row_split(me)
        starts = [sum(split[:t]) for t in range(len(split))]
        t_me, _ = lay.col_position(me)
        x = pieces[k]
        for d, y in enumerate(peers):
            t_y, _ = lay.col_position(y)
            if to_rows_:  # my columns of y's row sub-chunk
                send[d].append(x[starts[t_y]:starts[t_y] + split[t_y]].reshape(-1))
                recv[d] += split[t_me] * lay.extent(col_dim, y)[1]
            else:  # y's columns of my rows
                off, n = lay.extent(col_dim, y)
                send[d].append(x[:, off:off + n].reshape(-1))
                recv[d] += split[t_y] * lay.extent(col_dim, me)[1]
        shapes[k] = (split, t_me, col_dim)
    dtype = next(iter(pieces.values())).dtype
    device = next(iter(pieces.values())).device
    flat = [torch.cat(s) if s else torch.empty(0, dtype=dtype, device=device) for s in send]
    got = exchange(flat, recv, peers.index(me), _group(groups, peers), len(peers)).wait()
    out, cursor = {}, [0] * len(peers)
    for k in ks:
        lay = dom.units[k].layout
        split, t_me, col_dim = shapes[k]
        parts = []
        for d, y in enumerate(peers):
            t_y, _ = lay.col_position(y)
            if to_rows_:
                shape = (split[t_me], lay.extent(col_dim, y)[1])
            else:
                shape = (split[t_y], lay.extent(col_dim, me)[1])
            n = shape[0] * shape[1]
            parts.append((t_y, got[d][cursor[d]:cursor[d] + n].view(shape)))
            cursor[d] += n
        parts = [p for _, p in sorted(parts, key=lambda item: item[0])]
        out[k] = torch.cat(parts, dim=1 if to_rows_ else 0)
    return out


def to_rows(plan: MeshPlan, inputs: Sequence[torch.Tensor], groups: Mapping,
            timer: PhaseTimer = NULL_TIMER) -> list[list[torch.Tensor]]:
    """Per domain, the row-layout input of every unit this rank's instance holds (in
    `Instance.units` order). inputs[p]: this rank's local tensor of parameter p."""
    me = plan.global_rank
    out = []
    for dom in plan.domains:
        inst = dom.instance(me)
        pieces = {k: unit_piece(dom, k, inputs[dom.units[k].param], me) for k in inst.units}
        for dims in col_dims_of(dom, inst):
            with timer.phase("comm_wait"):
                pieces.update(_trade(dom, inst, dims, pieces, me, groups, True))
        out.append([pieces[k].contiguous() for k in inst.units])
    return out


def orthogonalize(plan: MeshPlan, strategy: Strategy, rows: list[list[torch.Tensor]],
                  groups: Mapping, configs: Sequence[NSConfig], device: torch.device,
                  flops: FlopCount, timer: PhaseTimer = NULL_TIMER) -> list[list[torch.Tensor]]:
    """Per domain, this rank's rows of NS of every unit its instance holds: the strategy on the
    instance's share, then (spread) the replica exchange brings the other replicas' shares."""
    me = plan.global_rank
    out = []
    for dom, inputs in zip(plan.domains, rows):
        inst = dom.instance(me)
        position = {k: j for j, k in enumerate(inst.units)}
        g = inst.members.index(me)
        sub = dataclasses.replace(inst.plan, rank=g)
        ctx = ExecContext(_group(groups, inst.members), g, len(inst.members),
                          Orthogonalizer([configs[dom.units[k].param] for k in inst.share],
                                         device, flops),
                          dom.out_dtype, device, timer)
        results = {}
        if inst.share:
            done = strategy.execute(sub, [inputs[position[k]] for k in inst.share], ctx)
            results.update(zip(inst.share, done))
        if dom.copies > 1 and plan.replicas == "spread":
            results.update(_share_replicas(plan, dom, inst, results, groups, device, timer))
        out.append([results[k] for k in inst.units])
    return out


def _share_replicas(plan: MeshPlan, dom: Domain, inst: Instance, results: dict, groups,
                    device, timer) -> dict[int, torch.Tensor]:
    """Spread: send my rows of my share's results to the other replicas, receive theirs."""
    me = plan.global_rank
    peers = plan.mesh.members(me, dom.key[2])
    rows = {k: dom.units[k].layout.rows(me) for k in inst.units}
    numel = [sum(rows[k] * dom.units[k].row_numel for k in dom.instance(y).share) for y in peers]
    if not any(numel):
        return {}
    mine = [results[k].reshape(-1) for k in inst.share]
    flat = torch.cat(mine) if mine else torch.empty(0, dtype=dom.out_dtype, device=device)
    with timer.phase("comm_wait"):
        got = exchange([flat] * len(peers), numel, peers.index(me), _group(groups, peers),
                       len(peers)).wait()
    out = {}
    for y, piece in zip(peers, got):
        if y == me:
            continue
        share = dom.instance(y).share
        sizes = [rows[k] * dom.units[k].row_numel for k in share]
        for k, chunk in zip(share, torch.split(piece, sizes)):
            out[k] = chunk.view((rows[k],) + tuple(dom.units[k].shape[1:]))
    return out


def from_rows(plan: MeshPlan, updates: list[list[torch.Tensor]], locals_: Sequence[torch.Tensor],
              groups: Mapping, timer: PhaseTimer = NULL_TIMER) -> list[torch.Tensor]:
    """This rank's update of every parameter, shaped like its local tensor `locals_[p]`, from the
    rule's row-layout updates (per domain, in `Instance.units` order). Updates that travel back to
    column blocks are cast to the parameter dtype first (applying them casts them anyway)."""
    me = plan.global_rank
    per_param: dict[int, list[torch.Tensor]] = {}
    for dom, ups in zip(plan.domains, updates):
        inst = dom.instance(me)
        pieces = {}
        for k, up in zip(inst.units, ups):
            lay = dom.units[k].layout
            local = locals_[dom.units[k].param]
            shape = (lay.rows(me),) + tuple(dom.units[k].shape[1:])
            up = up.reshape(shape)
            pieces[k] = up.to(local.dtype) if lay.col_dims else up
        for dims in col_dims_of(dom, inst):
            with timer.phase("comm_wait"):
                pieces.update(_trade(dom, inst, dims, pieces, me, groups, False))
        for k in inst.units:
            per_param.setdefault(dom.units[k].param, []).append(pieces[k])
    out = []
    for p, local in enumerate(locals_):
        parts = per_param.get(p, [])
        if plan.layouts[p].shape.__len__() == 3:
            out.append(torch.stack(parts) if parts else
                       torch.zeros(local.shape, dtype=torch.float32, device=local.device))
        else:
            out.append(parts[0].reshape(local.shape))
    return out
