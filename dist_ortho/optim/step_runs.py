"""How the middle of an optimizer step runs for one plan: momentum, orthogonalize, normalize.

`OrthogonalizedOptimizer.step()` is one path for every layout and schedule:

    non-finite check -> run.momentum -> run.orthogonalize -> run.normalize -> apply

`run` is a `StepRun` made together with its plan (`OrthogonalizedOptimizer.plan`, cached by which
parameters take part), so what differs between layouts is decided once there, not in the step:

- `FlatRun`: the parameters share one process group (1-D FSDP, HSDP with replicas="repeat", plain
  tensors). The strategy executes the plan on that group, the rule normalizes on it (on a world
  of one rank when the strategy keeps its statistics local), then the strategy's update scale.
- `BackwardRun`: a `FlatRun` whose strategy runs in backward (`overlapped`, schedule backward).
  When the backward hooks started the pipeline (`dist_ortho.optim.overlap`), momentum was computed
  there, so `momentum` has nothing left to do, and `orthogonalize` drains the pipeline and commits
  the momentum the hooks computed. When they did not, or their work cannot be used, it runs as a
  `FlatRun`. Its non-finite all-reduce carries the "usable" flag as well.
- `MeshRun` (`dist_ortho.optim.mesh_step`): 2-D/3-D meshes. Column blocks are traded for rows,
  the strategy runs on each row group, replicas exchange their shares, the rule runs per row
  group, and the updates go back to each parameter's local layout.

The 1-D case stays a plan and a run of its own rather than a mesh with one axis: its plans carry
what the mesh path's do not (strategies that refuse meshes, like local statistics and periodic
steps; `overlapped`'s FSDP unit order and backward pipeline; Gram Newton-Schulz). Both kinds sit
behind this one interface.

`StepInputs` holds one step's inputs, gathered once by the optimizer after the non-finite check.
`ok` is the device's verdict under `nonfinite="mask"` (None otherwise). Every write a run makes to
the momentum and the step counters obeys it; the optimizer masks the rule's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_ortho.core.newton_schulz import NSConfig
from dist_ortho.core.orthogonalizer import FlopCount, Orthogonalizer
from dist_ortho.core.plan import Plan
from dist_ortho.core.sharding import Layout, local_tensor
from dist_ortho.core.timing import PhaseTimer
from dist_ortho.optim.nonfinite import where_ok
from dist_ortho.optim.step_ops import apply_updates, momentum_directions
from dist_ortho.rules.base import UpdateRule
from dist_ortho.strategies.base import ExecContext, Strategy

__all__ = ["StepInputs", "StepRun", "FlatRun", "BackwardRun", "step_momentum", "step_apply"]

# a gradient's fingerprint changed after its hook: the reason every rank gives when only another
# rank saw it
CHANGED_AFTER_HOOK = ("a gradient changed after its backward hook (clipping? unscaling?) on this "
                      "or another rank")


@dataclass
class StepInputs:
    """One step's inputs, in the order of the parameters with a gradient."""

    entries: list[tuple[dict, torch.Tensor]]  # (param group, parameter)
    grads: list[torch.Tensor]  # local gradient shards
    states: list[dict]  # each parameter's optimizer state
    configs: list[NSConfig]  # each parameter's Newton-Schulz settings (from its param group)
    timer: PhaseTimer
    ok: torch.Tensor | None = None  # "mask": the device's verdict, a 0-d bool

    @property
    def groups(self) -> list[dict]:
        return [g for g, _ in self.entries]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.entries]


class StepRun:
    """The part of a step that depends on the plan's kind (see the module docstring).

    `layout`: the process group the non-finite check agrees over. `state_layouts`: by id of each
    parameter, the layout its rule state is created in (`UpdateRule.init_state`)."""

    layout: Layout
    state_layouts: dict[int, Layout]
    # the non-finite all-reduce's flag must be read on the host (host_syncs_per_step)
    reads_verdict: bool = False

    def check(self, entries: Sequence[tuple[dict, torch.Tensor]]) -> None:
        """Raise ValueError for gradients this run cannot use, on every rank alike, before the
        step's first collective (default: none)."""

    def verdict(self, entries) -> tuple[str | None, torch.Tensor | None]:
        """(reason, flag): a one-element float tensor joining the non-finite all-reduce, 1 where
        this rank cannot use work started before step(), with the reason if known on the host.
        (None, None): no such work (default)."""
        return None, None

    def discard(self) -> None:
        """The step is skipped: drop any work started before step() (default: none)."""

    def fall_back(self, reason: str | None) -> None:
        """Some rank cannot use the work started before step(): every rank drops it."""

    def momentum(self, step: StepInputs) -> list[torch.Tensor] | None:
        """Update the momentum in place; return the Newton-Schulz inputs."""
        return step_momentum(step)

    def orthogonalize(self, step: StepInputs, directions) -> list:
        raise NotImplementedError

    def normalize(self, step: StepInputs, results: list) -> list[torch.Tensor]:
        """This rank's float32 update of each parameter's local tensor (or rows of it)."""
        raise NotImplementedError


class FlatRun(StepRun):
    """A plan on one process group: the strategy's `execute`, then the rule on that group."""

    def __init__(self, plan: Plan, *, strategy: Strategy, rule: UpdateRule, layout: Layout,
                 state_layouts: dict[int, Layout], flops: FlopCount) -> None:
        self.plan = plan
        self.strategy = strategy
        self.rule = rule
        self.layout = layout
        self.state_layouts = state_layouts
        self.flops = flops
        # local statistics (strategy local_norms): the rule sees a world of one rank
        self.stats_layout = (layout if strategy.global_statistics
                             else dataclasses.replace(layout, group=None, world_size=1))

    def context(self, configs: Sequence[NSConfig], timer: PhaseTimer,
                group=None) -> ExecContext:
        """The strategy's `ExecContext` for this plan, on `group` (default: the parameters')."""
        lay = self.layout
        return ExecContext(lay.group if group is None else group, lay.rank, lay.world_size,
                           Orthogonalizer(configs, lay.device, self.flops),
                           self.plan.matrices[0].out_dtype, lay.device, timer)

    def orthogonalize(self, step: StepInputs, directions) -> list[torch.Tensor]:
        return self.strategy.execute(self.plan, directions, self.context(step.configs, step.timer))

    def normalize(self, step: StepInputs, results: list) -> list[torch.Tensor]:
        updates = self.rule.updates(step.groups, step.states, self.plan.matrices, results,
                                    self.stats_layout)
        scale = self.strategy.update_scale()  # periodic: the lr scale of its full steps
        if scale != 1.0:
            torch._foreach_mul_(updates, scale)
        return updates


class BackwardRun(FlatRun):
    """A `FlatRun` whose momentum and exchanges may have started in backward (`overlap`: the
    hooks, or None when `overlap_with_backward` was not called)."""

    def __init__(self, plan: Plan, *, overlap, **common) -> None:
        super().__init__(plan, **common)
        self.overlap = overlap
        # with hooks, whether their work is usable decides on the host which code runs
        self.reads_verdict = overlap is not None

    def verdict(self, entries):
        if self.overlap is None:  # nothing started: usable on every rank, the plan's 2 floats
            return None, torch.zeros(1, device=self.layout.device)
        return self.overlap.verdict(entries)

    def discard(self) -> None:
        if self.overlap is not None:
            self.overlap.discard()

    def fall_back(self, reason: str | None) -> None:
        self.overlap.fall_back(reason or CHANGED_AFTER_HOOK)

    def _from_backward(self) -> bool:
        return self.overlap is not None and self.overlap.started

    def momentum(self, step: StepInputs) -> list[torch.Tensor] | None:
        """None when the hooks computed it: the pipeline holds the directions."""
        return None if self._from_backward() else step_momentum(step)

    def orthogonalize(self, step: StepInputs, directions) -> list[torch.Tensor]:
        if directions is not None:
            return super().orthogonalize(step, directions)
        new_bufs, results = self.overlap.finish()
        with step.timer.phase("momentum"):  # commit what the hooks computed, now the step counts
            for state, new in zip(step.states, new_bufs):
                state["step"] += 1 if step.ok is None else step.ok
                buf = local_tensor(state["momentum_buffer"])
                buf.copy_(where_ok(step.ok, new, buf))
        return results


def _group_runs(entries) -> list[list[int]]:
    """Positions of entries grouped by param group (one torch._foreach_* call each)."""
    runs: dict[int, list[int]] = {}
    for j, (group, _) in enumerate(entries):
        runs.setdefault(id(group), []).append(j)
    return list(runs.values())


def step_momentum(step: StepInputs) -> list[torch.Tensor]:
    """Each param group's momentum (`step_ops.momentum_directions`: a few _foreach_ ops per
    group; g is -grad with maximize); directions come back in the parameters' dtype, the wire
    dtype of every plan. With `step.ok`, buffers and step counters change only where it holds."""
    entries, grads, states = step.entries, step.grads, step.states
    directions: list[torch.Tensor | None] = [None] * len(entries)
    for run in _group_runs(entries):
        group = entries[run[0]][0]
        gs = [grads[j] for j in run]
        gs = torch._foreach_neg(gs) if group.get("maximize") else gs
        outs = momentum_directions([local_tensor(states[j]["momentum_buffer"]) for j in run],
                                   gs, [states[j]["step"] for j in run],
                                   group["momentum"], group["nesterov"], ok=step.ok,
                                   out_dtype=grads[run[0]].dtype)
        for j, u in zip(run, outs):
            directions[j] = u
    return directions  # type: ignore[return-value]


def step_apply(step: StepInputs, updates: Sequence[torch.Tensor]) -> None:
    """p <- p (1 - lr wd) - lr update, in place (`step_ops.apply_updates`, per param group; only
    where `step.ok` holds, when given); lr and weight_decay as 0-d tensors are never read on the
    host."""
    entries = step.entries
    for run in _group_runs(entries):
        group = entries[run[0]][0]
        apply_updates([local_tensor(entries[j][1]) for j in run], [updates[j] for j in run],
                      group["lr"], group["weight_decay"], ok=step.ok)
