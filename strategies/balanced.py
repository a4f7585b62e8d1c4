"""`balanced`: ownership by cost, one all-to-all each way, no padding.

Owners come from greedy longest-processing-time (LPT) assignment by Newton-Schulz FLOPs across all
shapes, so the slowest rank does close to 1/P of the work. Every rank then sends each owner its row
shards of that owner's matrices in one `all_to_all_single` with exact split sizes (uneven and empty
shards need no padding), owners orthogonalize, and one more `all_to_all_single` returns each rank
its rows. Two collectives per step whatever the number of matrices, and the bytes meet the
owner-based lower bound exactly.

Options: `batch_same_shape` stacks an owner's matrices of one shape into one batched NS call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["BalancedOptions", "Balanced", "orthogonalize_owned"]


@dataclass(frozen=True)
class BalancedOptions:
    """batch_same_shape: run an owner's same-shape matrices as one batched NS call (faster on GPUs;
    costs a stacked copy)."""

    batch_same_shape: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")


def orthogonalize_owned(matrices, full: dict[int, torch.Tensor], ctx: ExecContext,
                        batch_same_shape: bool) -> dict[int, torch.Tensor]:
    """NS of every owned full matrix, batching same-shape ones with the same NS settings into one
    call when asked."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k in full:
        key = ((tuple(full[k].shape), ctx.orthogonalizer.batch_key(matrices[k].index))
               if batch_same_shape else (k,))
        groups[key].append(k)
    results = {}
    for ks in groups.values():
        # one matrix: a view, not a stacked copy
        stack = (full[ks[0]].unsqueeze(0) if len(ks) == 1
                 else torch.stack([full[k] for k in ks]))
        with ctx.phase("ns"):
            out = ctx.orthogonalizer.run([matrices[k].index for k in ks], stack)
        for j, k in enumerate(ks):
            results[k] = out[j]
    return results


def owner_plan(matrices, owners, world_size, ranks):
    """Predicted bytes of one forward + one return owner exchange; returns per-rank buffer bytes."""
    b_in = dtype_size(matrices[0].dtype)
    b_out = matrices[0].out_itemsize
    fwd = ox.exchange_bytes(matrices, owners, world_size, b_in, "forward")
    ret = ox.exchange_bytes(matrices, owners, world_size, b_out, "return")
    held = []
    for r, cost in enumerate(ranks):
        if world_size > 1:
            cost.comm.append(CommItem("all_to_all", fwd[r][0], fwd[r][1], "forward"))
            cost.comm.append(CommItem("all_to_all", ret[r][0], ret[r][1], "return"))
        owned_numel = sum(m.numel for m, o in zip(matrices, owners) if o == r)
        # send + receive buffers each way, the owned full inputs and their results
        held.append(fwd[r][0] + fwd[r][1] + ret[r][0] + ret[r][1]
                    + owned_numel * (b_in + b_out))
    return held


@register
class Balanced(Strategy):
    name = "balanced"
    Options = BalancedOptions

    def __init__(self, options: BalancedOptions | None = None) -> None:
        super().__init__(options or BalancedOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        owners = self.assign_owners(matrices, world_size)
        for m, o in zip(matrices, owners):
            owner[m.index] = o
            ranks[o].computes.append(m.index)
        for cost, held in zip(ranks, owner_plan(matrices, owners, world_size, ranks)):
            cost.transient_bytes = max(cost.transient_bytes, held)

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        matrices = [plan.matrices[i] for i in indices]
        owners = [plan.owner[i] for i in indices]
        with ctx.phase("comm_wait"):
            pieces = ox.send_forward(matrices, owners, inputs, ctx).wait()
        full = ox.assemble(matrices, owners, ctx.rank, ctx.world_size, pieces)
        results = orthogonalize_owned(matrices, full, ctx, self.options.batch_same_shape)
        with ctx.phase("comm_wait"):
            back = ox.send_back(matrices, owners, results, ctx).wait()
        return ox.split_returns(matrices, owners, ctx.rank, ctx.world_size, back)
