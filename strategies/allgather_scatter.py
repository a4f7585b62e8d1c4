"""`allgather_scatter`: all-gather everything, compute only your own, send results to their rows.

Communication: like `replicated`, each rank packs all its row shards (padded to ceil(rows / P) rows)
into one buffer and a single `all_gather_into_tensor` gives every rank every matrix: one large
collective instead of one per matrix. Each rank orthogonalizes only the matrices assigned to it
(`assignment`: round-robin or LPT), then the owners scatter the results' row shards back, all owners
at once, as one `all_to_all_single` with exact split sizes.

Cost: forward bytes equal `replicated`'s (every rank receives (P-1)/P of everything) and peak memory
holds the gathered model, but compute is split P ways; the return meets the lower bound. It trades
bytes for fewer, larger collectives: good when latency, not bandwidth, dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.sharding import dtype_size
from dist_ortho.strategies import owner_exchange as ox
from dist_ortho.strategies.balanced import orthogonalize_owned
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy, ns_batches
from dist_ortho.strategies.collectives import all_gather_flat, full_batches, pack_batches
from dist_ortho.strategies.ownership import OWNERSHIP_POLICIES, assign
from dist_ortho.strategies.registry import register
from dist_ortho.strategies.replicated import padded_numels

__all__ = ["AllGatherScatterOptions", "AllGatherScatter"]


@dataclass(frozen=True)
class AllGatherScatterOptions:
    """assignment: "round_robin" (matrix i to rank i mod P) or "lpt" (balanced by NS FLOPs)."""

    assignment: str = "round_robin"
    batch_same_shape: bool = True

    def __post_init__(self) -> None:
        if self.assignment not in OWNERSHIP_POLICIES:
            raise ValueError(f"allgather_scatter option 'assignment' must be one of "
                             f"{OWNERSHIP_POLICIES}, got {self.assignment!r}")
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")


@register
class AllGatherScatter(Strategy):
    name = "allgather_scatter"
    Options = AllGatherScatterOptions

    def __init__(self, options: AllGatherScatterOptions | None = None) -> None:
        super().__init__(options or AllGatherScatterOptions())

    def assign_owners(self, matrices, world_size):
        return assign(self.options.assignment, matrices, world_size)

    def _plan_sharded(self, matrices, world_size, owner, bucket, ranks):
        owners = self.assign_owners(matrices, world_size)
        b_in, b_out = dtype_size(matrices[0].dtype), matrices[0].out_itemsize
        slot_bytes = sum(padded_numels(list(matrices))) * b_in
        ret = ox.exchange_bytes(matrices, owners, world_size, b_out, "return")
        for m, o in zip(matrices, owners):
            owner[m.index] = o
            ranks[o].computes.append(m.index)
        for r, cost in enumerate(ranks):
            if world_size > 1:
                wire = (world_size - 1) * slot_bytes
                cost.comm.append(CommItem("all_gather", wire, wire, "forward"))
                cost.comm.append(CommItem("all_to_all", ret[r][0], ret[r][1], "return"))
            owned = sum(m.numel for m, o in zip(matrices, owners) if o == r)
            cost.transient_bytes = max(cost.transient_bytes, (world_size + 1) * slot_bytes
                                       + owned * (b_in + b_out) + ret[r][0] + ret[r][1])

    def _execute_sharded(self, plan: Plan, indices, inputs, ctx: ExecContext):
        matrices = [plan.matrices[i] for i in indices]
        owners = [plan.owner[i] for i in indices]
        P, me = ctx.world_size, ctx.rank
        groups = ns_batches(matrices)  # the buffer is laid out batch by batch: one copy each
        with ctx.phase("comm_wait"):
            gathered = all_gather_flat(pack_batches(matrices, groups, inputs, me, ctx.device),
                                       ctx.group, P)
        wanted = [any(owners[k] == me for k in ks) for ks in groups]
        full = {}
        for ks, batch in zip(groups, full_batches(matrices, groups, gathered, wanted)):
            if batch is not None:
                for k, x in zip(ks, batch.unbind(0)):
                    if owners[k] == me:
                        full[k] = x
        del gathered
        results = orthogonalize_owned(matrices, full, ctx, self.options.batch_same_shape)
        with ctx.phase("comm_wait"):
            back = ox.send_back(matrices, owners, results, ctx).wait()
        return ox.split_returns(matrices, owners, me, P, back)
