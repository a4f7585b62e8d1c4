"""The one executor and the one counter of schedules (`dist_ortho.core.schedule`).

`Run` performs a plan's schedule on this rank. Inputs arrive bucket by bucket (`push`): all at
once when the optimizer steps, or unit by unit from FSDP2's backward hooks; the run goes through
the actions in order and pauses at a `Feed` whose bucket has not arrived, so the same code runs at
step time and during backward, and every rank issues the same collectives in the same order
whatever its timing; it also pauses at `Drain`, where the rest belongs to the step, not to the
last hook. `drain()` finishes and returns this rank's rows of every result. Per matrix
the run holds this rank's input rows (`shard`), the whole matrix where it is computed (`full`,
dropped once computed), its Newton-Schulz result there (`result`, dropped once sent) and this
rank's rows of the result (`out`); `stacks` holds whole batches a transport or kernel leaves
stacked, `scratch` what a split kernel keeps between rounds.

`count(plan)` walks the same actions and asks each transport and kernel for its sizes: every
rank's collectives (`CommItem`s in issue order), the matrices it computes, its NS FLOPs and the
transient bytes it holds at its busiest point. That is the plan the profiler compares with what it
counts, so counted == planned checks the schedule itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_ortho.core.plan import Plan, RankCost
from dist_ortho.core.schedule import Compute, Drain, Feed, Issue, Schedule, Wait
from dist_ortho.strategies.exchanges import transport
from dist_ortho.strategies.kernels import kernel

__all__ = ["Run", "count"]


class Run:
    """One execution of `schedule` (the plan's unless given) on this rank; see the module
    docstring. `ctx` is the strategy's `ExecContext`."""

    def __init__(self, plan: Plan, ctx, schedule: Schedule | None = None) -> None:
        self.plan, self.ctx = plan, ctx
        self.schedule = schedule if schedule is not None else plan.schedule
        self.shard: dict[int, torch.Tensor] = {}
        self.full: dict[int, torch.Tensor] = {}
        self.result: dict[int, torch.Tensor] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.stacks: dict[tuple[int, ...], torch.Tensor] = {}
        self.scratch: dict = {}
        self.pushed = 0
        self._draining = False
        self._position = 0
        self._pending: dict[int, tuple] = {}

    def push(self, b: int, inputs: Sequence[torch.Tensor]) -> None:
        """Bucket b's inputs (this rank's rows of its matrices, in `schedule.buckets[b]` order);
        runs every action up to the next bucket's."""
        if b != self.pushed:
            raise RuntimeError(f"bucket {b} pushed out of order (expected {self.pushed}); every "
                               f"rank must issue the buckets' collectives in plan order")
        members = self.schedule.buckets[b]
        assert len(inputs) == len(members), (b, len(inputs), len(members))
        self.shard.update(zip(members, inputs))
        self.pushed += 1
        self._advance()

    def drain(self) -> dict[int, torch.Tensor]:
        """Finish every action; {matrix index: this rank's rows of NS(U)}."""
        if self.pushed != len(self.schedule.buckets):
            raise RuntimeError(f"drain() after {self.pushed} of {len(self.schedule.buckets)} "
                               f"buckets")
        self._draining = True
        self._advance()
        assert self._position == len(self.schedule.actions) and not self._pending
        return self.out

    def abandon(self) -> None:
        """Wait for every exchange issued so far and drop everything (all ranks abandon at the
        same point, so no rank is left waiting for a collective the others skip)."""
        for tag in list(self._pending):
            self._wait(tag)
        self.out, self.full, self.result, self.stacks = {}, {}, {}, {}

    def _advance(self) -> None:
        actions = self.schedule.actions
        while self._position < len(actions):
            action = actions[self._position]
            if isinstance(action, Feed) and action.bucket >= self.pushed:
                return
            if isinstance(action, Drain) and not self._draining:
                return
            self._position += 1
            if isinstance(action, Issue):
                # packing and launching: the enclosing phase's time; only waiting is comm_wait
                handle = transport(action.exchange.transport).start(self, action.exchange)
                self._pending[action.tag] = (action.exchange, handle)
            elif isinstance(action, Wait):
                self._wait(action.tag)
            elif isinstance(action, Compute):
                kernel(action.kernel).run(self, action)

    def _wait(self, tag: int) -> None:
        exchange, handle = self._pending.pop(tag)
        with self.ctx.phase("comm_wait"):
            transport(exchange.transport).finish(self, exchange, handle)
        if exchange.phase == "return":  # sent: the results are no longer needed here
            for i in exchange.matrices:
                self.result.pop(i, None)
            self.stacks.pop(exchange.matrices, None)


def execute(plan: Plan, inputs: Sequence[torch.Tensor], ctx,
            schedule: Schedule | None = None) -> list[torch.Tensor]:
    """Run the schedule with every input present (the optimizer's step): inputs[i] is this
    rank's rows of matrix i (the whole tensor if plain); returns its rows of every result."""
    run = Run(plan, ctx, schedule)
    for b, members in enumerate(run.schedule.buckets):
        run.push(b, [inputs[i] for i in members])
    out = run.drain()
    outputs = [out[i] for i in range(len(inputs))]
    for i, o in enumerate(outputs):
        assert o.shape == inputs[i].shape, (i, o.shape, inputs[i].shape)
    return outputs


def count(plan: Plan) -> list[RankCost]:
    """Every rank's predicted cost of the plan's schedule (see the module docstring).

    Transient bytes: an exchange's buffers are held from its issue until its wait (a forward's
    until every matrix it brought has been computed), and a compute's whole inputs and results
    (or a split matrix's blocks) until every matrix it computed has been sent back."""
    P = plan.world_size
    ranks = [RankCost() for _ in range(P)]
    live = [0] * P
    peak = [0] * P
    held: dict = {}  # key -> per-rank bytes still held
    # key -> the matrices whose compute (a forward's buffers) or return (a compute's) frees it
    awaiting: dict[str, dict] = {"compute": {}, "return": {}}

    exchanges = {a.tag: a.exchange for a in plan.schedule.actions if isinstance(a, Issue)}

    def hold(key, sizes) -> None:
        # a key held again is the same buffers (a split kernel's rounds): the larger of the two
        before = held.get(key, [0] * P)
        held[key] = [max(a, b) for a, b in zip(before, sizes)]
        for r in range(P):
            live[r] += held[key][r] - before[r]
            peak[r] = max(peak[r], live[r])

    def free(key) -> None:
        for r, n in enumerate(held.pop(key, ())):
            live[r] -= n

    def done(event: str, matrices) -> None:
        """`matrices` were computed / sent back: free what waited for nothing else."""
        for key, rest in list(awaiting[event].items()):
            rest.difference_update(matrices)
            if not rest:
                del awaiting[event][key]
                free(key)

    for action in plan.schedule.actions:
        if isinstance(action, Issue):
            ex = action.exchange
            t = transport(ex.transport)
            items = t.items(plan, ex)
            for cost, its in zip(ranks, items):
                cost.comm.extend(its)
            hold(("x", action.tag), t.buffer_bytes(plan, ex, items))
            if ex.phase == "forward":
                awaiting["compute"][("x", action.tag)] = set(ex.matrices)
        elif isinstance(action, Wait):
            ex = exchanges[action.tag]
            if ex.phase != "forward":
                free(("x", action.tag))
            if ex.phase == "return":
                done("return", ex.matrices)
        elif isinstance(action, Compute):
            shares = kernel(action.kernel).shares(plan, action)
            for cost, work in zip(ranks, shares):
                cost.computes.extend(work.indices)
                cost.ns_flops += work.total_flops
                cost.ns_calls += work.ns_calls
            key = ("c", action.matrices)
            hold(key, [work.held_bytes for work in shares])
            if action.matrices:
                awaiting["return"].setdefault(key, set(action.matrices))
            done("compute", action.matrices)
    for r, cost in enumerate(ranks):
        cost.transient_bytes = peak[r]
    return ranks
