"""Compute kernels: what a `Compute` action of a schedule runs on each rank.

Like a transport (`strategies.exchanges`), each kernel is one registered object with the faces the
executor, the counter and the simulator need:
- `shares(plan, compute)`: every rank's `Work`, in one pass over the action's matrices: which
  matrices it computes, the matrices (as `MatrixSpec`s, shaped as they are computed) it runs
  Newton-Schulz on, whether they run batched, any FLOPs not in whole matrices (a split
  Newton-Schulz round's share) and the bytes it holds: the counter sums them, the simulator
  prices them;
- `run(run, compute)`: the executor's code, reading the run's `full` / `shard` / `stacks` and
  writing `result` (or `out`, for a kernel whose result is already this rank's rows).

Registered here: `ns` (each rank's owned whole matrices, one batched call per shape and setting),
`ns_each` (the same, one call per matrix), `ns_own_rows` (every rank computes every matrix and
keeps its own rows), `ns_plain` (plain matrices: the owner's result, every rank's where all
compute), `shape_blocks` (megabatch's stacks, zero matrices included) and `blocks` (each rank's
own block of rows on its own: inexact).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dist_ortho.core.batching import batches, stacked
from dist_ortho.core.plan import EVERY_RANK, Plan
from dist_ortho.core.schedule import Compute
from dist_ortho.core.sharding import MatrixSpec, dtype_size
from dist_ortho.strategies.collectives import ns_batches

__all__ = ["Work", "Kernel", "register_kernel", "kernel", "KERNELS"]

KERNELS: dict[str, "Kernel"] = {}


def register_kernel(k: "Kernel") -> "Kernel":
    assert k.name not in KERNELS or KERNELS[k.name] is k, k.name
    KERNELS[k.name] = k
    return k


def kernel(name: str) -> "Kernel":
    return KERNELS[name]


@dataclass
class Work:
    """One rank's share of a compute action: the plan indices it computes (`indices`), the
    `matrices` it runs through Newton-Schulz (batched per shape when `batched`), `flops` in
    `calls` calls outside whole matrices, and `extra_bytes` held beyond those matrices' whole
    inputs and results (a split matrix's block)."""

    indices: list[int] = field(default_factory=list)
    matrices: list[MatrixSpec] = field(default_factory=list)
    batched: bool = True
    flops: int = 0
    calls: int = 0
    extra_bytes: int = 0

    @property
    def held_bytes(self) -> int:
        """Inputs and results held while it runs."""
        return self.extra_bytes + sum(m.numel * (dtype_size(m.dtype) + m.out_itemsize)
                                      for m in self.matrices)

    @property
    def total_flops(self) -> int:
        return sum(m.flops for m in self.matrices) + self.flops

    @property
    def ns_calls(self) -> int:
        whole = (len(batches((m.shape, m.ns_steps, m.ns_form) for m in self.matrices))
                 if self.batched else len(self.matrices))
        return whole + self.calls


class Kernel:
    """Default: each matrix is computed whole by its owner (by every rank where it is
    EVERY_RANK), batched per shape and setting."""

    name = "kernel"
    batch = True

    def shares(self, plan: Plan, c: Compute) -> list[Work]:
        """Every rank's share of `c` (see the module docstring)."""
        owned: list[list[int]] = [[] for _ in range(plan.world_size)]
        for i in c.matrices:
            for mine in (owned if plan.owner[i] == EVERY_RANK else (owned[plan.owner[i]],)):
                mine.append(i)
        return [Work(ix, [plan.matrices[i] for i in ix], self.batch) for ix in owned]

    def run(self, run, c: Compute) -> None:
        raise NotImplementedError


def _owned(run, c: Compute) -> list[int]:
    """The matrices of `c` this rank computes whole."""
    return [i for i in c.matrices if run.plan.owner[i] in (run.ctx.rank, EVERY_RANK)]


def _take_stack(run, ids: list[int]):
    """The (n, *shape) stack of whole matrices `ids`: one a transport left in `run.stacks`, else
    one stacked from `run.full`; either is dropped from the run."""
    stack = run.stacks.pop(tuple(ids), None)
    return stack if stack is not None else stacked([run.full.pop(i) for i in ids])


def _batched_ns(run, indices: list[int], batch: bool, contiguous: bool = False) -> dict:
    """NS of the full matrices `indices` (from `run.full`, or a stack a transport left whole in
    `run.stacks`): one call per batch of one shape and setting, or per matrix."""
    ctx = run.ctx
    specs = [run.plan.matrices[i] for i in indices]
    groups = ns_batches(specs) if batch else [[j] for j in range(len(indices))]
    results = {}
    for ks in groups:
        ids = [indices[k] for k in ks]
        stack = _take_stack(run, ids)
        with ctx.phase("ns"):
            out = ctx.orthogonalizer.run(ids, stack)
        if contiguous:
            out = out.contiguous()
        results.update(zip(ids, out.unbind(0)))
    return results


class OwnedNS(Kernel):
    """The owned whole matrices, batched per shape and setting (`ns`) or one at a time
    (`ns_each`)."""

    def __init__(self, name: str, batch: bool) -> None:
        self.name, self.batch = name, batch

    def run(self, run, c):
        run.result.update(_batched_ns(run, _owned(run, c), self.batch))


class OwnRows(Kernel):
    """Every rank computes every matrix (owner: every rank) and keeps its own rows, row-major, per
    batch (a copy, so a batch's full results are freed before the next batch's)."""

    name = "ns_own_rows"

    def run(self, run, c):
        ctx, me = run.ctx, run.ctx.rank
        specs = [run.plan.matrices[i] for i in c.matrices]
        for ks in ns_batches(specs):
            ids = [c.matrices[k] for k in ks]
            stack = _take_stack(run, ids)
            with ctx.phase("ns"):
                result = ctx.orthogonalizer.run(ids, stack)
            m = specs[ks[0]]
            start = m.shard_offset(me)
            mine = result[:, start:start + m.dim0_sizes[me]].contiguous()
            run.out.update(zip(ids, mine.unbind(0)))


class PlainNS(Kernel):
    """Plain matrices (every rank holds the whole tensor): the owner (or every rank) computes,
    contiguous (a broadcast sends the storage as it lies); where every rank computes, the result
    is the output."""

    name = "ns_plain"

    def run(self, run, c):
        mine = _owned(run, c)
        for i in mine:
            run.full[i] = run.shard[i]
        results = _batched_ns(run, mine, True, contiguous=True)
        for i, out in results.items():
            if run.plan.owner[i] == EVERY_RANK:
                run.out[i] = out
            else:
                run.result[i] = out


class ShapeBlocksNS(Kernel):
    """megabatch: each rank's (blocks, *shape) stack of one shape group, zero matrices included
    (block b holds matrix b P + rank), in one batched call."""

    name = "shape_blocks"

    def _slots(self, plan, c, rank) -> list[int]:
        P = plan.world_size
        blocks = -(-len(c.matrices) // P)
        return [b * P + rank for b in range(blocks)]

    def shares(self, plan, c):
        first = plan.matrices[c.matrices[0]]
        out = []
        for r in range(plan.world_size):
            slots = self._slots(plan, c, r)
            out.append(Work([c.matrices[j] for j in slots if j < len(c.matrices)],
                            [plan.matrices[c.matrices[j]] if j < len(c.matrices) else first
                             for j in slots]))
        return out

    def run(self, run, c):
        ctx = run.ctx
        full = run.stacks[c.matrices]
        # a padding slot runs with the group's first matrix's settings (same shape and steps)
        idx = [c.matrices[j] if j < len(c.matrices) else c.matrices[0]
               for j in self._slots(run.plan, c, ctx.rank)]
        with ctx.phase("ns"):
            run.stacks[c.matrices] = ctx.orthogonalizer.run(idx, full)


class Blocks(Kernel):
    """Inexact: each rank orthogonalizes the block of rows it holds on its own, one batched call
    per block shape; an empty block stays empty. No exchange."""

    name = "blocks"

    def shares(self, plan, c):
        out = []
        for r in range(plan.world_size):
            specs = []
            for i in c.matrices:
                m = plan.matrices[i]
                if not m.sharded:
                    specs.append(m)
                elif m.dim0_sizes[r]:
                    specs.append(dataclasses.replace(m, shape=m.local_shape(r)))
            out.append(Work(list(c.matrices), specs, False))
        return out

    def run(self, run, c):
        ctx = run.ctx
        inputs = [run.shard[i] for i in c.matrices]
        for i, x in zip(c.matrices, inputs):
            if x.shape[0] == 0:
                run.out[i] = torch.empty(x.shape, dtype=ctx.out_dtype, device=x.device)
        full = [k for k, i in enumerate(c.matrices) if i not in run.out]
        for batch in batches(tuple(inputs[k].shape) for k in full):
            ks = [full[j] for j in batch]
            with ctx.phase("ns"):
                out = ctx.orthogonalizer.run([c.matrices[k] for k in ks],
                                             stacked([inputs[k] for k in ks]))
            for k, o in zip(ks, out.unbind(0)):
                run.out[c.matrices[k]] = o.contiguous()


for _k in (OwnedNS("ns", True), OwnedNS("ns_each", False), OwnRows(), PlainNS(),
           ShapeBlocksNS(), Blocks()):
    register_kernel(_k)
