"""The strategy interface: who orthogonalizes which matrix, and how its pieces travel.

A strategy is split in two:
- `plan(matrices, world_size, rank)` is pure: from shapes alone it decides every matrix's owner and
  bucket and predicts, for every rank, the bytes it will send and receive in each collective, the
  Newton-Schulz FLOPs it will run and the transient bytes it will hold. No communication, so it can
  be run for P = 1024 on a laptop, and the same plan is computed identically on every rank.
- `execute(plan, inputs, ctx)` performs the plan: it receives this rank's dim-0 shards of the
  momentum direction U, one per matrix, and returns this rank's dim-0 shards of NS(U), shaped and
  sharded exactly like the inputs.

Byte convention (shared with the counter in `profiling.comm`): bytes are the payload this rank
sends to / receives from *other* ranks; its own slice is not traffic. all-gather of s bytes per rank:
(P-1)s each way; gather/scatter: the root receives/sends the other ranks' pieces; all-to-all: the
off-diagonal splits; broadcast: the root sends (P-1)n, the others receive n; all-reduce of n bytes:
2(P-1)/P n each way (reduce-scatter then all-gather).

Parameters that are *not* sharded (plain tensors replicated on a group, as under DDP) take a common
path here: every rank already holds the whole matrix, so the owner (from the strategy's own
ownership policy) orthogonalizes it and broadcasts the result; nothing travels forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dist_ortho.sharding import MatrixSpec

__all__ = ["CommItem", "RankCost", "Plan", "ExecContext", "Strategy", "EVERY_RANK",
           "all_reduce_bytes"]

EVERY_RANK = -1  # owner value of a matrix that every rank orthogonalizes (replicated strategy)


def all_reduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in an all-reduce of `nbytes` under the convention."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


@dataclass(frozen=True)
class CommItem:
    """One collective call as seen by one rank."""

    kind: str  # all_gather | gather | scatter | all_to_all | broadcast | all_reduce
    send_bytes: float
    recv_bytes: float
    phase: str = "forward"  # forward: pieces travel to the computing rank; return: results travel back


@dataclass
class RankCost:
    """What one rank is predicted to spend."""

    comm: list[CommItem] = field(default_factory=list)
    ns_flops: int = 0
    transient_bytes: int = 0
    computes: list[int] = field(default_factory=list)  # indices of matrices this rank orthogonalizes

    @property
    def send_bytes(self) -> float:
        return sum(c.send_bytes for c in self.comm)

    @property
    def recv_bytes(self) -> float:
        return sum(c.recv_bytes for c in self.comm)

    def bytes_by_kind(self) -> dict[str, tuple[float, float]]:
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for c in self.comm:
            out[c.kind][0] += c.send_bytes
            out[c.kind][1] += c.recv_bytes
        return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass
class Plan:
    """Who does what, and what every rank will pay for it. Identical on every rank but `rank`."""

    strategy: str
    world_size: int
    rank: int
    matrices: tuple[MatrixSpec, ...]
    owner: tuple[int, ...]  # per matrix; EVERY_RANK when all ranks compute it
    bucket: tuple[int, ...]  # per matrix; 0 for strategies without buckets
    ranks: list[RankCost]  # indexed by rank
    details: dict = field(default_factory=dict)  # strategy-specific extras (bucket sizes, ...)

    @property
    def mine(self) -> RankCost:
        return self.ranks[self.rank]

    @property
    def total_ns_flops(self) -> int:
        return sum(r.ns_flops for r in self.ranks)

    @property
    def flops_imbalance(self) -> float:
        """max over ranks / mean over ranks of NS FLOPs (1.0 is perfect balance)."""
        flops = [r.ns_flops for r in self.ranks]
        mean = sum(flops) / len(flops)
        return max(flops) / mean if mean > 0 else 1.0


class _NoPhases:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class ExecContext:
    """What `execute` needs beyond the plan: where to talk and how to orthogonalize.

    `orthogonalize(indices, stacked)` runs NS on a stack of full tensors of one shape (indices say
    which matrices they are) and returns the stack in the NS dtype; it also counts the FLOPs it runs.
    `phases` is an optional timer (the profiler's); strategies mark "comm_wait" and "ns" with it.
    """

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    orthogonalize: Callable[[Sequence[int], torch.Tensor], torch.Tensor]
    out_dtype: torch.dtype
    device: torch.device
    phases: object = field(default_factory=_NoPhases)

    def phase(self, name: str):
        return self.phases.phase(name) if self.phases is not None else nullcontext()


class Strategy:
    """Base class: subclasses implement `_plan_sharded` and `_execute_sharded` for sharded matrices
    and `assign_owners` for their ownership policy; replicated (plain) matrices are handled here."""

    name: str = "base"

    def __init__(self, options=None) -> None:
        self.options = options

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
        details: dict = {}
        sharded = [m for m in matrices if m.sharded]
        plain = [m for m in matrices if not m.sharded]
        if sharded:
            self._plan_sharded(sharded, world_size, owner, bucket, ranks, details)
        if plain:
            self._plan_plain(plain, world_size, owner, ranks)
        for r, cost in enumerate(ranks):
            cost.ns_flops = sum(matrices[i].flops for i in cost.computes)
        return Plan(self.name, world_size, rank, matrices, tuple(owner), tuple(bucket), ranks,
                    details)

    def _plan_sharded(self, matrices: Sequence[MatrixSpec], world_size: int, owner: list[int],
                      bucket: list[int], ranks: list[RankCost], details: dict) -> None:
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
        """Run `plan`; inputs[i] is this rank's dim-0 shard of matrix i (the full tensor if plain)."""
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
        results = []
        for i in indices:
            o = plan.owner[i]
            if o == EVERY_RANK or o == ctx.rank:
                with ctx.phase("ns"):
                    out = ctx.orthogonalize([i], inputs[i].unsqueeze(0))[0]
            else:
                out = torch.empty(inputs[i].shape, dtype=ctx.out_dtype, device=inputs[i].device)
            if o != EVERY_RANK and ctx.world_size > 1:
                with ctx.phase("comm_wait"):
                    dist.broadcast(out, group=ctx.group, group_src=o)
            results.append(out)
        return results
