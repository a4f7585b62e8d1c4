"""The strategy interface: who orthogonalizes which matrix, and how its pieces travel.

A strategy is split in two:
- `plan(matrices, world_size, rank)` is pure: from shapes alone it decides every matrix's owner and
  bucket and predicts, for every rank, the bytes it will send and receive in each collective, the
  Newton-Schulz FLOPs it will run and the transient bytes it will hold. No communication, so it can
  be run for P = 1024 on a laptop, and the same plan is computed identically on every rank.
- `execute(plan, inputs, ctx)` performs the plan: it receives this rank's dim-0 shards of the
  momentum direction U, one per matrix, and returns this rank's dim-0 shards of NS(U), shaped and
  sharded exactly like the inputs.

Plan types and the byte convention live in the core module `dist_ortho.core.plan` (re-exported
here).

Parameters that are *not* sharded (plain tensors replicated on a group, as under DDP) take a common
path here: every rank already holds the whole matrix, so the owner (from the strategy's own
ownership policy) orthogonalizes it and broadcasts the result; nothing travels forward.

A strategy also has a timing model for the cost model (`sharded_time`): by default its collectives
are synchronous (forward, then the slowest rank's NS, then return); a strategy that overlaps them
overrides it (see `bucketed_async`). Adding a strategy: one file with a `Strategy` subclass (name,
Options dataclass, `assign_owners`, `_plan_sharded`, `_execute_sharded`) and one line in the
registry (`strategies/__init__.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dist_ortho.core.batching import batches, stacked
from dist_ortho.core.orthogonalizer import Orthogonalizer
from dist_ortho.core.plan import (EVERY_RANK, CommItem, ComputeTimes, Plan, RankCost, TimedCall,
                                  all_reduce_bytes)
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer

__all__ = ["CommItem", "RankCost", "Plan", "ExecContext", "Strategy", "EVERY_RANK",
           "all_reduce_bytes", "ns_batches"]


def ns_batches(matrices: Sequence[MatrixSpec]) -> list[list[int]]:
    """Positions of `matrices` that one batched Newton-Schulz call can take: equal shape, steps
    and form (the orthogonalizer splits a batch further if other settings differ)."""
    return batches((m.shape, m.ns_steps, m.ns_form) for m in matrices)


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
    """Base class: subclasses implement `_plan_sharded` and `_execute_sharded` for sharded matrices
    and `assign_owners` for their ownership policy; replicated (plain) matrices are handled here."""

    name: str = "base"
    # False for the inexact schedules (strategies blockwise, local_norms, periodic): their update
    # is not NorMuon's/Muon's; the exactness tests and default choices skip them by this flag
    exact: bool = True
    # False: the update rule takes its global statistics (NorMuon's Frobenius norms) from this
    # rank's shard alone, with no all-reduce (strategy local_norms)
    global_statistics: bool = True
    # False: refuses 2-D/3-D mesh layouts (a step count or statistics tied to one row group)
    on_mesh: bool = True

    def __init__(self, options=None) -> None:
        self.options = options

    def describe(self) -> str:
        """One line: the name, 'exact' or 'INEXACT', and the options."""
        fields = (dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options)
                  else {})
        opts = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{self.name} ({'exact' if self.exact else 'INEXACT'}){': ' + opts if opts else ''}"

    def update_scale(self) -> float:
        """Factor on this step's update rows after the rule (periodic: the full steps' lr scale)."""
        return 1.0

    # -- ownership -------------------------------------------------------------------------------
    def assign_owners(self, matrices: Sequence[MatrixSpec], world_size: int) -> list[int]:
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
        bucket = [0] * len(matrices)
        ranks = [RankCost() for _ in range(world_size)]
        buckets = None
        sharded = [m for m in matrices if m.sharded]
        plain = [m for m in matrices if not m.sharded]
        if sharded:
            buckets = self._plan_sharded(sharded, world_size, owner, bucket, ranks)
        if plain:
            self._plan_plain(plain, world_size, owner, ranks)
        for r, cost in enumerate(ranks):
            cost.ns_flops = sum(matrices[i].flops for i in cost.computes)
        return Plan(self.name, world_size, rank, matrices, tuple(owner), tuple(bucket), ranks,
                    buckets=buckets)

    def _plan_sharded(self, matrices: Sequence[MatrixSpec], world_size: int, owner: list[int],
                      bucket: list[int], ranks: list[RankCost]
                      ) -> tuple[tuple[int, ...], ...] | None:
        """Fill owner, bucket and ranks for the sharded matrices; return the buckets (matrix
        indices per bucket, in execution order) if the strategy buckets, else None."""
        raise NotImplementedError

    def _plan_plain(self, matrices: Sequence[MatrixSpec], world_size: int, owner: list[int],
                    ranks: list[RankCost]) -> None:
        owners = self.assign_owners(matrices, world_size)
        for m, o in zip(matrices, owners):
            owner[m.index] = o
            if o == EVERY_RANK:
                for cost in ranks:
                    cost.computes.append(m.index)
                continue
            ranks[o].computes.append(m.index)
            if world_size > 1:
                nbytes = m.numel * m.out_itemsize
                for r, cost in enumerate(ranks):
                    sent = (world_size - 1) * nbytes if r == o else 0
                    cost.comm.append(CommItem("broadcast", sent, 0 if r == o else nbytes, "return"))
                ranks[o].transient_bytes = max(ranks[o].transient_bytes, nbytes)

    # -- execution -------------------------------------------------------------------------------
    def execute(self, plan: Plan, inputs: Sequence[torch.Tensor],
                ctx: ExecContext) -> list[torch.Tensor]:
        """Run `plan`; inputs[i] is this rank's dim-0 shard of matrix i (the full tensor if
        plain)."""
        assert len(inputs) == len(plan.matrices)
        outputs: list[torch.Tensor | None] = [None] * len(inputs)
        sharded = [m.index for m in plan.matrices if m.sharded]
        plain = [m.index for m in plan.matrices if not m.sharded]
        if sharded:
            results = self._execute_sharded(plan, sharded, [inputs[i] for i in sharded], ctx)
            for i, out in zip(sharded, results):
                outputs[i] = out
        if plain:
            for i, out in zip(plain, self._execute_plain(plan, plain, inputs, ctx)):
                outputs[i] = out
        for i, out in enumerate(outputs):
            assert out is not None and out.shape == inputs[i].shape, (i, out, inputs[i].shape)
        return outputs  # type: ignore[return-value]

    def _execute_sharded(self, plan: Plan, indices: list[int], inputs: list[torch.Tensor],
                         ctx: ExecContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def _execute_plain(self, plan: Plan, indices: list[int], inputs: Sequence[torch.Tensor],
                       ctx: ExecContext) -> list[torch.Tensor]:
        mine = [i for i in indices if plan.owner[i] in (EVERY_RANK, ctx.rank)]
        computed: dict[int, torch.Tensor] = {}
        # one NS call per batch of one shape; contiguous: a collective sends the storage as it
        # lies, and NS hands a tall matrix back as the transpose of its wide working copy
        for batch in ns_batches([plan.matrices[i] for i in mine]):
            ks = [mine[j] for j in batch]
            with ctx.phase("ns"):
                out = ctx.orthogonalizer.run(ks, stacked([inputs[i] for i in ks])).contiguous()
            computed.update(zip(ks, out.unbind(0)))
        results = []
        for i in indices:
            o = plan.owner[i]
            out = computed.get(i)
            if out is None:
                out = torch.empty(inputs[i].shape, dtype=ctx.out_dtype, device=inputs[i].device)
            if o != EVERY_RANK and ctx.world_size > 1:
                with ctx.phase("comm_wait"):
                    dist.broadcast(out, group=ctx.group, group_src=o)
            results.append(out)
        return results

    # -- timing model (used by the cost model) ---------------------------------------------------
    @property
    def batches_same_shape(self) -> bool:
        """Whether an owner's same-shape matrices run as one batched NS call."""
        return bool(getattr(self.options, "batch_same_shape", False))

    def sharded_time(self, plan: Plan, calls: Sequence[TimedCall],
                     compute: ComputeTimes) -> tuple[float, float]:
        """(seconds of the orthogonalize phase for the sharded matrices, NS seconds of the slowest
        rank), given the durations of this plan's forward/return collectives in issue order.
        Default: synchronous collectives, so forward + the slowest rank's NS + return."""
        P = plan.world_size
        works = [compute.ns_matrices_seconds(
            [plan.matrices[i] for i in plan.ranks[r].computes if plan.matrices[i].sharded],
            self.batches_same_shape) for r in range(P)]
        ns_s = max(compute.concurrent(works), default=0.0)
        return sum(c.seconds for c in calls) + ns_s, ns_s

    def member_comm_seconds(self, plan: Plan, compute: ComputeTimes) -> float:
        """Seconds of the busiest rank's messages among a few members of the group (plan items
        with a `group`), which are no call over the whole group; part of the step's comm term.
        Default: none."""
        return 0.0
