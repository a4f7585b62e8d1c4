"""The optimizer's mesh path: parameters on 2-D/3-D meshes (HSDP spread, tensor and expert
parallel), planned by `strategies.mesh` and run by `strategies.mesh_exec`.

`OrthogonalizedOptimizer` takes this path when some parameter's rows live on no single group
(`ParamLayout.one_group` is None: placements beyond FSDP's one `Shard(0)` mesh dim plus
`Replicate()` dims), or when `replicas="spread"` (the default) and some parameter has a
`Replicate()` dim of size > 1 (HSDP's replica groups share the work): `needs_mesh`. Everything
else (1-D FSDP, HSDP with `replicas="repeat"`, plain tensors) takes the one-group path
(`step_runs.FlatRun`).

At construction (`mesh_plan`): where each parameter's rows live (`param_layout.ParamLayout`, read
when it joined the optimizer) is analyzed into how the mesh scheduler cuts them
(`meshes.MatrixLayout.analyze`: a ValueError naming the parameter for placements that cannot be
scheduled exactly, e.g. Partial), its local shape is checked against that, then the plan is made
and only then the process groups it needs are made or looked up (`mesh_groups.group_for`).
So a mistake raises on every rank alike before any collective or group creation. With the plan
comes its `MeshRun`, the step's orthogonalize and normalize on the mesh (`step_runs.StepRun`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, Replicate

from dist_ortho.core.mesh_groups import common_root, group_for, root_mesh
from dist_ortho.core.meshes import MatrixLayout
from dist_ortho.core.orthogonalizer import FlopCount
from dist_ortho.core.param_layout import ParamLayout
from dist_ortho.core.sharding import Layout, local_tensor
from dist_ortho.optim.step_runs import StepInputs, StepRun
from dist_ortho.rules.base import UpdateRule
from dist_ortho.strategies import mesh_exec
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.mesh import MeshPlan, plan_mesh

__all__ = ["needs_mesh", "mesh_plan", "make_groups", "state_layout",
           "check_grads", "MeshRun"]


def needs_mesh(layouts: Sequence[ParamLayout], replicas: str) -> bool:
    """Whether these parameters take the mesh path (see the module docstring)."""
    if not any(lay.on_mesh for lay in layouts):
        return False
    if any(lay.one_group is None for lay in layouts):
        return True
    return replicas == "spread" and any(lay.replicate_dim for lay in layouts)


def _analyzed(params, layouts: Sequence[ParamLayout]) -> list[MatrixLayout]:
    """How the mesh scheduler cuts each parameter's rows, on the root mesh common to all."""
    common = common_root([(lay.root, lay.dims) for lay in layouts if lay.on_mesh])
    if common is None:
        raise ValueError("parameters live on different root device meshes; one optimizer "
                         "schedules on one mesh (use one optimizer per mesh)")
    root, dims = common
    on_root = iter(dims)  # each DTensor's dims, re-expressed on the common root
    all_dims = tuple((d,) for d in range(len(root.sizes)))
    # a plain tensor is whole on every rank of the mesh: Replicate() on every root dim
    described = [(next(on_root), lay.placements) if lay.on_mesh
                 else (all_dims, (Replicate(),) * len(all_dims)) for lay in layouts]
    # the root dims the optimizer spans: any parameter's mesh covers them (a plain tensor, all)
    span = tuple(sorted({d for pdims, _ in described for dd in pdims for d in dd}))
    return [MatrixLayout.analyze(lay.name, tuple(p.shape), root, pdims, placements, span)
            for p, lay, (pdims, placements) in zip(params, layouts, described)]


def mesh_plan(params: Sequence[torch.Tensor], layouts: Sequence[ParamLayout], strategy: Strategy,
              rule: UpdateRule, ns_steps: Sequence[int], out_dtype: torch.dtype, replicas: str,
              rank: int) -> MeshPlan:
    """Validate and plan (pure: no group is made here)."""
    if not strategy.on_mesh:  # placements are alike on every rank, so every rank raises here
        raise ValueError(f"strategy {strategy.name!r} runs on 1-D layouts only (FSDP2 or "
                         f"plain), and parameter {layouts[0].name!r} lives on a 2-D/3-D mesh "
                         f"(HSDP, TP or EP); use an exact strategy or 'blockwise' there")
    analyzed = _analyzed(params, layouts)
    for p, lay in zip(params, analyzed):
        want = lay.local_shape(rank)
        if tuple(local_tensor(p).shape) != want:
            raise ValueError(f"parameter {lay.name!r} holds a local tensor of shape "
                             f"{tuple(local_tensor(p).shape)} on rank {rank}, but its placements "
                             f"give {want} (torch.chunk, nested in mesh order); custom uneven "
                             f"shardings are not supported")
    dtypes = {}
    for p, lay in zip(params, layouts):
        dtypes.setdefault(p.dtype, lay.name)
    if len(dtypes) > 1:
        listed = ", ".join(f"{n!r}: {str(d).replace('torch.', '')}" for d, n in dtypes.items())
        raise ValueError(f"mixed parameter dtypes in one optimizer ({listed}); strategies pack "
                         f"matrices into shared communication buffers of one dtype. Cast the "
                         f"parameters to one dtype or give each dtype its own optimizer.")
    return plan_mesh(strategy, analyzed, rank, params[0].dtype, out_dtype, ns_steps,
                     rule.reductions, replicas)


def make_groups(plan: MeshPlan, layouts: Sequence[ParamLayout]) -> dict:
    """Every process group this rank's part of the plan uses, by member ranks."""
    candidates = []
    for lay in layouts:
        mesh = lay.device_mesh
        if mesh is None:
            continue
        for m in (mesh, root_mesh(mesh)):
            candidates += [m.get_group(i) for i in range(m.ndim) if m.size(i) > 1]
    groups = {}
    for ranks, label in plan.groups(plan.global_rank):
        if ranks not in groups:
            groups[ranks] = group_for(ranks, candidates)
    return groups


def state_layout(plan: MeshPlan, p_index: int, layout: ParamLayout, device) -> Layout:
    """How the update rule lays out its per-row state for parameter `p_index`: the row layout's
    local shape and placements (NorMuon's v)."""
    cut = plan.layouts[p_index]
    me = plan.global_rank
    if layout.device_mesh is None:
        return Layout(None, 0, 1, False, device, state_shape=cut.state_shape(me))
    return Layout(None, 0, 1, True, device, mesh=layout.device_mesh,
                  placements=layout.placements, state_shape=cut.state_shape(me),
                  state_placements=cut.state_placements())


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
                 params: Sequence[torch.Tensor], layouts: Sequence[ParamLayout],
                 device: torch.device, flops: FlopCount) -> None:
        self.plan = plan
        self.strategy = strategy
        self.rule = rule
        self.groups = groups
        self.device = device
        self.flops = flops
        self.layout = Layout(groups.get(plan.world), plan.rank, plan.world_size, True, device)
        self.state_layouts = {id(p): state_layout(plan, i, lay, device)
                              for i, (p, lay) in enumerate(zip(params, layouts))}
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
