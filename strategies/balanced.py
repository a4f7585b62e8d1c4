"""`balanced`: ownership by cost, one all-to-all each way, no padding.

Owners come from greedy longest-processing-time (LPT) assignment by Newton-Schulz FLOPs across all
shapes, so the slowest rank does close to 1/P of the work. Every rank then sends each owner its row
shards of that owner's matrices in one `all_to_all_single` with exact split sizes (uneven and empty
shards need no padding), owners orthogonalize, and one more `all_to_all_single` returns each rank
its rows. Two collectives per step whatever the number of matrices, and the bytes meet the
owner-based lower bound exactly.

Options: `batch_same_shape` stacks an owner's matrices of one shape into one batched NS call.
`exchange="two_level"` with `ranks_per_node` sends both exchanges node-aware
(`strategies.two_level`: inside the node first, then across nodes in fewer, larger messages);
the same pieces arrive, so the update is the same.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies import two_level
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["BalancedOptions", "Balanced", "orthogonalize_owned"]


@dataclass(frozen=True)
class BalancedOptions:
    """batch_same_shape: run an owner's same-shape matrices as one batched NS call (faster on GPUs;
    costs a stacked copy). exchange: "flat" (one all-to-all each way) or "two_level" (node-aware,
    `strategies.two_level`), which needs ranks_per_node: ranks per node, ranks [n G, (n + 1) G)
    of the strategy's group on node n."""

    batch_same_shape: bool = True
    exchange: str = "flat"
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")
        if self.exchange not in two_level.EXCHANGES:
            raise ValueError(f"balanced option 'exchange' must be one of {two_level.EXCHANGES}, "
                             f"got {self.exchange!r}")
        if self.ranks_per_node is not None and (
                not isinstance(self.ranks_per_node, int) or isinstance(self.ranks_per_node, bool)
                or self.ranks_per_node < 1):
            raise ValueError(f"balanced option 'ranks_per_node' must be an int >= 1 (ranks per "
                             f"node), got {self.ranks_per_node!r}")
        if self.exchange == "two_level" and self.ranks_per_node is None:
            raise ValueError("balanced option exchange='two_level' needs 'ranks_per_node' (the "
                             "ranks per node, e.g. 8)")


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


def owner_plan(matrices, owners, world_size, ranks, ranks_per_node: int | None = None):
    """Predicted bytes of one forward + one return owner exchange (flat, or two-level with
    ranks_per_node); returns per-rank buffer bytes."""
    b_in = dtype_size(matrices[0].dtype)
    b_out = matrices[0].out_itemsize
    if ranks_per_node is None:
        fwd = ox.exchange_bytes(matrices, owners, world_size, b_in, "forward")
        ret = ox.exchange_bytes(matrices, owners, world_size, b_out, "return")
    else:
        src, dst, n = owner_pairs(matrices, owners, world_size)
        stages = {d: two_level.link_traffic(a, b, n, world_size, ranks_per_node)
                  for d, (a, b) in (("forward", (src, dst)), ("return", (dst, src)))}
    held = []
    for r, cost in enumerate(ranks):
        if ranks_per_node is None:
            items = [CommItem("all_to_all", fwd[r][0], fwd[r][1], "forward"),
                     CommItem("all_to_all", ret[r][0], ret[r][1], "return")]
        else:
            items = (two_level.link_items(stages["forward"], r, b_in, "forward")
                     + two_level.link_items(stages["return"], r, b_out, "return"))
        if world_size > 1:
            cost.comm.extend(items)
        owned_numel = sum(m.numel for m, o in zip(matrices, owners) if o == r)
        # send + receive buffers each way, the owned full inputs and their results
        held.append(sum(c.send_bytes + c.recv_bytes for c in items)
                    + owned_numel * (b_in + b_out))
    return held


def owner_pairs(matrices, owners, world_size: int):
    """The forward pieces as arrays (source, owner, elements), source != owner, one entry per
    matrix and source (the return sends the same pieces the other way)."""
    P = world_size
    src, dst, n = [], [], []
    ranks = np.arange(P)
    for m, o in zip(matrices, owners):
        sizes = np.asarray(m.dim0_sizes, dtype=np.int64) * m.row_numel
        keep = (sizes > 0) & (ranks != o)
        src.append(ranks[keep])
        dst.append(np.full(int(keep.sum()), o))
        n.append(sizes[keep])
    if not src:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(src), np.concatenate(dst), np.concatenate(n).astype(float)


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
        for cost, held in zip(ranks, owner_plan(matrices, owners, world_size, ranks,
                                                self._node_size)):
            cost.transient_bytes = max(cost.transient_bytes, held)

    @property
    def _node_size(self) -> int | None:
        return self.options.ranks_per_node if self.options.exchange == "two_level" else None

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        matrices = [plan.matrices[i] for i in indices]
        owners = [plan.owner[i] for i in indices]
        if self._node_size is not None:
            return self._execute_two_level(matrices, owners, inputs, ctx)
        with ctx.phase("comm_wait"):
            pieces = ox.send_forward(matrices, owners, inputs, ctx).wait()
        full = ox.assemble(matrices, owners, ctx.rank, ctx.world_size, pieces)
        results = orthogonalize_owned(matrices, full, ctx, self.options.batch_same_shape)
        with ctx.phase("comm_wait"):
            back = ox.send_back(matrices, owners, results, ctx).wait()
        return ox.split_returns(matrices, owners, ctx.rank, ctx.world_size, back)

    def _execute_two_level(self, matrices, owners, inputs, ctx: ExecContext):
        P, me, G = ctx.world_size, ctx.rank, self._node_size
        owned = [[k for k, o in enumerate(owners) if o == r] for r in range(P)]

        def forward(s: int, d: int) -> int:  # rank s's rows of the matrices d owns
            return sum(matrices[k].shard_numel(s) for k in owned[d])

        with ctx.phase("comm_wait"):
            pieces = two_level.two_level_exchange(
                ox.forward_send(matrices, owners, me, P, inputs), forward, me, P, G, ctx.group)
        full = ox.assemble(matrices, owners, me, P, pieces)
        results = orthogonalize_owned(matrices, full, ctx, self.options.batch_same_shape)
        with ctx.phase("comm_wait"):
            back = two_level.two_level_exchange(
                ox.return_send(matrices, owners, me, P, results, ctx.out_dtype, ctx.device),
                lambda s, d: forward(d, s), me, P, G, ctx.group)
        return ox.split_returns(matrices, owners, me, P, back)
