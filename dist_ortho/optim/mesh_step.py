"""The optimizer's mesh path: parameters on 2-D/3-D meshes (HSDP spread, tensor and expert
parallel), planned by `strategies.mesh` and run by `strategies.mesh_exec`.

`OrthogonalizedOptimizer` takes this path when a parameter's placements are more than FSDP's one
`Shard(0)` mesh dim plus replicate dims, or when `replicas="spread"` (the default) and some
parameter has a replicate dim: `needs_mesh`. Everything else (1-D FSDP, HSDP with
`replicas="repeat"`, plain tensors) keeps the one-group path, whose plans and bytes are unchanged.

At construction (`mesh_plan`): every parameter's layout is analyzed (`meshes.MatrixLayout.analyze`:
a ValueError naming the parameter for placements that cannot be scheduled exactly, e.g. Partial),
its local shape is checked against the layout, then the plan is made and only then the process
groups it needs are made or looked up (`mesh_groups.group_for`).
So a mistake raises on every rank alike before any collective or group creation. With the plan
comes its `MeshRun`, the step's orthogonalize and normalize on the mesh (`step_runs.StepRun`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from dist_ortho.core.mesh_groups import common_root, describe, group_for, root_mesh
from dist_ortho.core.meshes import MatrixLayout, MeshSpec, is_strided
from dist_ortho.core.orthogonalizer import FlopCount
from dist_ortho.core.sharding import Layout, local_tensor
from dist_ortho.optim.step_runs import StepInputs, StepRun
from dist_ortho.rules.base import UpdateRule
from dist_ortho.strategies import mesh_exec
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.mesh import MeshPlan, plan_mesh

__all__ = ["MeshParam", "inspect_param", "needs_mesh", "mesh_plan", "make_groups", "state_layout",
           "check_grads", "MeshRun"]


@dataclass(frozen=True)
class MeshParam:
    """What construction learns about one parameter for the mesh path."""

    mesh: MeshSpec | None  # None for a plain tensor
    dims: tuple
    placements: tuple
    device_mesh: object | None
    one_group: bool  # FSDP/HSDP: one Shard(0) dim, the others Replicate
    replicated_dim: bool  # some dim of size > 1 is Replicate


def inspect_param(p: torch.Tensor, name: str) -> MeshParam:
    if not isinstance(p, DTensor):
        return MeshParam(None, (), (), None, True, False)
    mesh, dims, placements = describe(p, name)
    sizes = tuple(p.device_mesh.mesh.shape)
    shards = [pl for pl, s in zip(placements, sizes) if not isinstance(pl, Replicate) and s > 1]
    sharded = [pl for pl in placements if isinstance(pl, Shard)]
    one = (len(sharded) == 1 and sharded[0].dim == 0 and not is_strided(sharded[0])
           and all(isinstance(pl, (Shard, Replicate)) for pl in placements)
           and len(shards) <= 1)
    replicated = any(isinstance(pl, Replicate) and s > 1 for pl, s in zip(placements, sizes))
    return MeshParam(mesh, dims, placements, p.device_mesh, one, replicated)


def needs_mesh(infos: Sequence[MeshParam], replicas: str) -> bool:
    """Whether these parameters take the mesh path (see the module docstring)."""
    if all(i.mesh is None for i in infos):
        return False
    if any(not i.one_group for i in infos):
        return True
    return replicas == "spread" and any(i.replicated_dim for i in infos)


def _layouts(params, names, infos: Sequence[MeshParam]) -> list[MatrixLayout]:
    on_mesh = [i for i in infos if i.mesh is not None]
    common = common_root([(i.mesh, i.dims) for i in on_mesh])
    if common is None:
        raise ValueError("parameters live on different root device meshes; one optimizer "
                         "schedules on one mesh (use one optimizer per mesh)")
    root, dims = common
    infos = [i if i.mesh is None else replace(i, mesh=root, dims=next(it))
             for it in [iter(dims)] for i in infos]
    all_dims = tuple((d,) for d in range(len(root.sizes)))
    # the root dims the optimizer spans: any parameter's mesh covers them (a plain tensor, all)
    span = tuple(sorted({d for i in infos for dd in (all_dims if i.mesh is None else i.dims)
                         for d in dd}))
    out = []
    for p, name, info in zip(params, names, infos):
        if info.mesh is None:  # a plain tensor: replicated on every rank of the mesh
            out.append(MatrixLayout.analyze(name, tuple(p.shape), root, all_dims,
                                            (Replicate(),) * len(all_dims), span))
        else:
            out.append(MatrixLayout.analyze(name, tuple(p.shape), root, info.dims,
                                            info.placements, span))
    return out


def mesh_plan(params: Sequence[torch.Tensor], names: Sequence[str], infos: Sequence[MeshParam],
              strategy: Strategy, rule: UpdateRule, ns_steps: Sequence[int],
              out_dtype: torch.dtype, replicas: str, rank: int) -> MeshPlan:
    """Validate and plan (pure: no group is made here)."""
    if not strategy.on_mesh:  # placements are alike on every rank, so every rank raises here
        raise ValueError(f"strategy {strategy.name!r} runs on 1-D layouts only (FSDP2 or "
                         f"plain), and parameter {names[0]!r} lives on a 2-D/3-D mesh (HSDP, TP "
                         f"or EP); use an exact strategy or 'blockwise' there")
    layouts = _layouts(params, names, infos)
    for p, lay in zip(params, layouts):
        want = lay.local_shape(rank)
        if tuple(local_tensor(p).shape) != want:
            raise ValueError(f"parameter {lay.name!r} holds a local tensor of shape "
                             f"{tuple(local_tensor(p).shape)} on rank {rank}, but its placements "
                             f"give {want} (torch.chunk, nested in mesh order); custom uneven "
                             f"shardings are not supported")
    dtypes = {}
    for p, name in zip(params, names):
        dtypes.setdefault(p.dtype, name)
    if len(dtypes) > 1:
        listed = ", ".join(f"{n!r}: {str(d).replace('torch.', '')}" for d, n in dtypes.items())
        raise ValueError(f"mixed parameter dtypes in one optimizer ({listed}); strategies pack "
                         f"matrices into shared communication buffers of one dtype. Cast the "
                         f"parameters to one dtype or give each dtype its own optimizer.")
    return plan_mesh(strategy, layouts, rank, params[0].dtype, out_dtype, ns_steps,
                     rule.reductions, replicas)


def make_groups(plan: MeshPlan, infos: Sequence[MeshParam]) -> dict:
    """Every process group this rank's part of the plan uses, by member ranks."""
    candidates = []
    for info in infos:
        mesh = info.device_mesh
        if mesh is None:
            continue
        for m in (mesh, root_mesh(mesh)):
            candidates += [m.get_group(i) for i in range(m.ndim) if m.size(i) > 1]
    groups = {}
    for ranks, label in plan.groups(plan.global_rank):
        if ranks not in groups:
            groups[ranks] = group_for(ranks, candidates)
    return groups


def state_layout(plan: MeshPlan, p_index: int, info: MeshParam, device) -> Layout:
    """How the update rule lays out its per-row state for parameter `p_index`: the row layout's
    local shape and placements (NorMuon's v)."""
    lay = plan.layouts[p_index]
    me = plan.global_rank
    if info.device_mesh is None:
        return Layout(None, 0, 1, False, device, state_shape=lay.state_shape(me))
    return Layout(None, 0, 1, True, device, mesh=info.device_mesh,
                  placements=info.placements, state_shape=lay.state_shape(me),
                  state_placements=lay.state_placements())


def check_grads(entries: Sequence[tuple[dict, torch.Tensor]]) -> None:
    """The mesh path reads gradients in their parameter's layout; a gradient left in another one
    (a Partial sum a TP module did not reduce) would be orthogonalized wrong, so refuse it. The
    placements are the same on every rank, so every rank raises alike, before any collective."""
    for _, p in entries:
        g = p.grad
        if isinstance(p, DTensor) and (not isinstance(g, DTensor)
                                       or tuple(g.placements) != tuple(p.placements)):
            have = tuple(g.placements) if isinstance(g, DTensor) else type(g).__name__
            raise ValueError(f"a gradient has placements {have} but its parameter has "
                             f"{tuple(p.placements)}; reduce it to the parameter's placements "
                             f"(redistribute) before the optimizer step")


class MeshRun(StepRun):
    """A `MeshPlan`'s step (`step_runs.StepRun`): everything fixed when the plan is made (the
    plan, its process groups by member ranks, the layouts the rule runs on per row group and of
    each parameter's rule state); each step brings only its `StepInputs`."""

    def __init__(self, plan: MeshPlan, *, strategy: Strategy, rule: UpdateRule, groups: dict,
                 params: Sequence[torch.Tensor], infos: Sequence[MeshParam],
                 device: torch.device, flops: FlopCount) -> None:
        self.plan = plan
        self.strategy = strategy
        self.rule = rule
        self.groups = groups
        self.device = device
        self.flops = flops
        self.layout = Layout(groups.get(plan.world), plan.rank, plan.world_size, True, device)
        self.state_layouts = {id(p): state_layout(plan, i, info, device)
                              for i, (p, info) in enumerate(zip(params, infos))}
        me = plan.global_rank
        self._row_layouts = []  # per domain: the row group this rank's instance normalizes on
        for dom in plan.domains:
            inst = dom.instance(me)
            self._row_layouts.append(Layout(groups.get(inst.members), inst.members.index(me),
                                            len(inst.members), True, device))

    def check(self, entries: Sequence[tuple[dict, torch.Tensor]]) -> None:
        check_grads(entries)

    def orthogonalize(self, step: StepInputs, directions) -> list[list[torch.Tensor]]:
        """Per domain, this rank's rows of NS of each unit its instance holds."""
        rows = mesh_exec.to_rows(self.plan, directions, self.groups, step.timer)
        return mesh_exec.orthogonalize(self.plan, self.strategy, rows, self.groups, step.configs,
                                       self.device, self.flops, step.timer)

    def normalize(self, step: StepInputs, results) -> list[torch.Tensor]:
        """The rule per row group, then the updates back to each parameter's local shape."""
        me = self.plan.global_rank
        groups = step.groups
        updates = []
        for dom, res, layout in zip(self.plan.domains, results, self._row_layouts):
            inst = dom.instance(me)
            params = [dom.units[k].param for k in inst.units]
            unit_states = [{key: mesh_exec.unit_piece(dom, k, local_tensor(step.states[p][key]),
                                                      me)
                            for key in self.rule.float32_state}
                           for k, p in zip(inst.units, params)]
            updates.append(self.rule.updates([groups[p] for p in params], unit_states,
                                             inst.specs(dom, inst.units), res, layout))
        return mesh_exec.from_rows(self.plan, updates, [local_tensor(p) for p in step.params],
                                   self.groups, step.timer)
