"""The strategy interface: who orthogonalizes which matrix, and how its pieces travel.

A strategy declares a schedule (`dist_ortho.core.schedule`) and nothing else runs, counts or
prices it:
- `plan(matrices, world_size, rank)` is pure: from shapes alone it decides every matrix's owner
  (`assign`) and the actions every rank performs (`schedule`), and the counter
  (`strategies.executor.count`) derives from those actions each rank's bytes per collective, its
  Newton-Schulz FLOPs and its transient bytes. No communication, so it runs for P = 1024 on a
  laptop, and the same plan is computed identically on every rank.
- `execute(plan, inputs, ctx)` hands the schedule to the one executor (`strategies.executor.Run`):
  it receives this rank's dim-0 shards of the momentum direction U, one per matrix, and returns
  this rank's dim-0 shards of NS(U), shaped and sharded exactly like the inputs. `start(plan,
  ctx)` gives the run itself, fed bucket by bucket from backward hooks.
- the cost model prices the same actions (`profiling.simulator`).

Parameters that are *not* sharded (plain tensors, whole on every rank of a group, as under DDP)
take a common path here: every rank already holds the whole matrix, so the owner (from the
strategy's own `assign_owners`) orthogonalizes it and broadcasts the result; nothing travels
forward.

Adding a strategy: one file with a `Strategy` subclass (name, Options dataclass, `assign`,
`schedule`) registered with `@register` and imported once in `strategies/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dist_ortho.core.orthogonalizer import Orthogonalizer
from dist_ortho.core.plan import EVERY_RANK, CommItem, Plan, RankCost, all_reduce_bytes
from dist_ortho.core.schedule import Compute, Exchange, Feed, Issue, Schedule, Wait
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer
from dist_ortho.strategies import executor

__all__ = ["CommItem", "RankCost", "Plan", "ExecContext", "Strategy", "EVERY_RANK",
           "all_reduce_bytes"]


@dataclass
class ExecContext:
    """What `execute` needs beyond the plan: where to talk and how to orthogonalize.

    `orthogonalizer.run(indices, stacked)` runs NS on a stack of full tensors of one shape (indices
    say which matrices they are) and returns the stack in the NS dtype; it also counts the FLOPs it
    runs. `timer` is a phase timer (the profiler's, or the null timer); strategies mark "comm_wait"
    and "ns" with `ctx.phase(name)`.
    """

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    orthogonalizer: Orthogonalizer
    out_dtype: torch.dtype
    device: torch.device
    timer: PhaseTimer = field(default=NULL_TIMER)

    def phase(self, name: str):
        return self.timer.phase(name)


class Strategy:
    """Base class: subclasses declare `schedule` (owners of the sharded matrices and the actions)
    and `assign_owners` (their ownership policy, which plain matrices use too); plain matrices'
    actions (whole on every rank) are appended here."""

    name: str = "base"
    # False for the inexact schedules (strategies blockwise, local_norms, periodic): their update
    # is not NorMuon's/Muon's; the exactness tests and default choices skip them by this flag
    exact: bool = True
    # False: the update rule takes its global statistics (NorMuon's Frobenius norms) from this
    # rank's shard alone, with no all-reduce (strategy local_norms)
    global_statistics: bool = True
    # False: refuses 2-D/3-D mesh layouts (a step count or statistics tied to one row group)
    on_mesh: bool = True
    # True: buckets follow the backward pass (MatrixSpec.unit), and the optimizer may feed them
    # from FSDP2's hooks (`runs_in_backward`)
    follows_backward: bool = False

    def __init__(self, options=None) -> None:
        self.options = options

    @property
    def runs_in_backward(self) -> bool:
        """Whether the optimizer should feed this strategy's buckets from backward hooks."""
        return False

    def describe(self) -> str:
        """One line: the name, 'exact' or 'INEXACT', and the options."""
        fields = (dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options)
                  else {})
        opts = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{self.name} ({'exact' if self.exact else 'INEXACT'}){': ' + opts if opts else ''}"

    def update_scale(self) -> float:
        """Factor on this step's update rows after the rule (periodic: the full steps' lr scale)."""
        return 1.0

    # -- what a strategy declares ----------------------------------------------------------------
    def assign_owners(self, matrices: Sequence[MatrixSpec], world_size: int) -> list[int]:
        """Owner of each matrix (EVERY_RANK: all ranks compute it): the ownership policy."""
        raise NotImplementedError

    def schedule(self, matrices: Sequence[MatrixSpec],
                 world_size: int) -> tuple[list[int], Schedule]:
        """(owner of each of the sharded `matrices`, the actions that orthogonalize them);
        actions name matrices by plan index (`MatrixSpec.index`)."""
        raise NotImplementedError

    # -- planning --------------------------------------------------------------------------------
    def plan(self, matrices: Sequence[MatrixSpec], world_size: int, rank: int) -> Plan:
        """Pure: decide and predict. Raises ValueError for inputs this strategy cannot run."""
        matrices = tuple(matrices)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        for m in matrices:
            if m.world_size != world_size:
                raise ValueError(f"matrix {m.name!r} was described for world size {m.world_size}, "
                                 f"not {world_size}")
        # first parameter of each (dtype, wire dtype), in parameter order so that every rank
        # raises the very same message
        first_of: dict[tuple, str] = {}
        for m in matrices:
            first_of.setdefault((m.dtype, m.out_dtype), m.name)
        if len(first_of) > 1:
            names = ", ".join(f"{n!r}: {str(d[0]).replace('torch.', '')}"
                              for d, n in first_of.items())
            raise ValueError(
                f"mixed parameter dtypes in one optimizer ({names}); strategies pack matrices into "
                f"shared communication buffers of one dtype. Cast the parameters to one dtype or "
                f"give each dtype its own optimizer.")
        owner = [EVERY_RANK] * len(matrices)
        sharded = [m for m in matrices if m.sharded]
        plain = [m for m in matrices if not m.sharded]
        actions: list = []
        buckets: list[tuple[int, ...]] = []
        splits: tuple = ()
        if sharded:
            owners, sched = self.schedule(sharded, world_size)
            for m, o in zip(sharded, owners):
                owner[m.index] = o
            actions += sched.actions
            buckets += sched.buckets
            splits = sched.splits
        if plain:
            for m, o in zip(plain, self.assign_owners(plain, world_size)):
                owner[m.index] = o
            actions += self.plain_actions(plain, owner, world_size, len(buckets),
                                          1 + max((a.tag for a in actions
                                                   if isinstance(a, Issue)), default=-1))
            buckets.append(tuple(m.index for m in plain))
        bucket = [0] * len(matrices)
        for b, members in enumerate(buckets):
            for i in members:
                bucket[i] = b
        plan = Plan(self.name, world_size, rank, matrices, tuple(owner), tuple(bucket), [],
                    buckets=tuple(buckets),
                    schedule=Schedule(tuple(actions), tuple(buckets), splits))
        plan.ranks = executor.count(plan)
        return plan

    def plain_actions(self, plain: Sequence[MatrixSpec], owner: Sequence[int], world_size: int,
                      bucket: int, first_tag: int) -> list:
        """Plain matrices: the owners compute (every rank where all compute), then one broadcast
        per matrix with one owner."""
        indices = tuple(m.index for m in plain)
        actions: list = [Feed(bucket), Compute("ns_plain", indices)]
        tag = first_tag
        for i in indices:
            if owner[i] != EVERY_RANK:
                actions += [Issue(tag, Exchange("broadcast", "return", (i,))), Wait(tag)]
                tag += 1
        return actions

    # -- execution -------------------------------------------------------------------------------
    def execute(self, plan: Plan, inputs: Sequence[torch.Tensor],
                ctx: ExecContext) -> list[torch.Tensor]:
        """Run the plan's schedule; inputs[i] is this rank's dim-0 shard of matrix i (the full
        tensor if plain)."""
        assert len(inputs) == len(plan.matrices)
        return executor.execute(plan, inputs, ctx, self.step_schedule(plan))

    def start(self, plan: Plan, ctx: ExecContext) -> executor.Run:
        """A run of the plan's schedule to feed bucket by bucket (`Run.push`, `Run.drain`)."""
        return executor.Run(plan, ctx, self.step_schedule(plan))

    def step_schedule(self, plan: Plan) -> Schedule:
        """The schedule this step runs: the plan's (periodic alternates)."""
        return plan.schedule
