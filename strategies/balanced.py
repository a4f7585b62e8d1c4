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

from dataclasses import dataclass

from dist_ortho.core.schedule import synchronous
from dist_ortho.strategies import two_level
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register

__all__ = ["BalancedOptions", "Balanced"]


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

    @property
    def node_size(self) -> int | None:
        """The node size the exchanges assume (None: flat)."""
        return self.ranks_per_node if self.exchange == "two_level" else None

    @property
    def kernel(self) -> str:
        return "ns" if self.batch_same_shape else "ns_each"


@register
class Balanced(Strategy):
    name = "balanced"
    Options = BalancedOptions

    def __init__(self, options: BalancedOptions | None = None) -> None:
        super().__init__(options or BalancedOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def schedule(self, matrices, world_size):
        o = self.options
        return (self.assign_owners(matrices, world_size),
                synchronous([m.index for m in matrices], "owner_rows", o.kernel, "owner_rows",
                            ranks_per_node=o.node_size))
