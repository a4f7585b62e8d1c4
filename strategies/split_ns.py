"""`split_ns`: whole matrices on one owner each, the largest split across a few ranks.

Where whole-matrix ownership cannot balance (96 MLP matrices on 64 ranks: some rank owns two),
Newton-Schulz of one matrix is split across a group of ranks (the "distributed" mode of the
field's TP-aware Muon): with X the k x l view (k the short side), each member holds a block of
X's l columns (a block of the parameter's rows if it is tall, of its columns if it is wide) and,
per NS step, (1) computes its partial Gram matrix X_j X_j^T, (2) exchanges it with the other
members and sums all partials in block order (float32, so every member holds bitwise the same
A), (3) computes its rows of A A and B = b A + c A A, (4) exchanges its rows of B, and (5)
updates X_j <- a X_j + B X_j locally. The norm that starts the iteration is likewise a sum of the
members' partial sums of squares. Members run exactly the whole matrix's FLOPs between them.
Who splits what is `split_plan.assign` (by FLOPs against the rounds' bytes and latency, groups
inside one node with `ranks_per_node`; see its docstring).

Communication:
- forward: one `all_to_all_single` over the strategy's group; every rank sends each owner its
  row shard of the owner's whole matrices and each member the piece of its shard inside the
  member's block;
- split rounds: 1 + 2 * steps rounds (norm partials, then per step Gram partials and B rows)
  among the members only, as batched point-to-point messages (`batch_isend_irecv` on the
  strategy's group: nothing to create, any group, any P): per round a member sends each fellow
  member one message carrying every split matrix the two share, and receives one. A round's
  latency is therefore (g - 1) messages for a g-rank split, not an all-to-all over all P ranks;
  the planner weighs each message as `flop_per_peer`. Ranks in no split send nothing and never
  wait for the split groups. (On NCCL a batch of point-to-point ops must not be the first call
  on its group; the forward all-to-all always precedes the rounds.)
- return: one `all_to_all_single`; owners and members send every rank its rows of their
  results.

Exactness: the only rounding that differs from the reference is the order of the two sums, the
Gram matrix's l products (block partial sums, added in block order) and the norm's; both are a
reordering of one dot product, inside the float32 error model of tests/tolerances.py (a sum of
n terms is within ~sqrt(n) u whatever its order), so the reference bound holds unchanged. B's
rows are computed as in the reference (same inner products) and travel losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ortho.core.schedule import Compute, Exchange, Feed, Issue, Schedule, Wait
from dist_ortho.strategies import split_rounds  # noqa: F401  (registers the split kernels)
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import lpt_owners
from dist_ortho.strategies.registry import register
from dist_ortho.strategies.split_plan import SPLIT_POLICIES, assign

__all__ = ["SplitNSOptions", "SplitNS"]


@dataclass(frozen=True)
class SplitNSOptions:
    """max_group: most ranks one matrix is split over. flop_per_byte: what one byte of the split
    rounds costs in NS FLOPs when the planner compares candidates (default 100: roughly this
    CPU's NS rate over gloo's bandwidth; an H100 node over NVLink is ~1400, across
    InfiniBand ~12000). flop_per_peer: what one message of a split round costs its member in NS
    FLOPs, the link's latency per message times the NS rate; a member of a g-rank split sends
    g - 1 per round, 1 + 2 ns_steps rounds (default 0: latency ignored). ranks_per_node: GPUs
    per node (ranks [n G, (n + 1) G) on node n); when set, every split group lies inside one
    node and flop_per_byte / flop_per_peer should be that node's link (None: groups may span
    nodes). flop_per_byte_exchange: what one byte of the forward / return all-to-alls (over all
    ranks) costs in NS FLOPs; the planner keeps a split only if its busiest rank plus its
    busiest forward and return bytes beat LPT's (default 0: those bytes not weighed). `dist-ortho
    project` sets them from the priced machine's link, on which the cost model prices the
    rounds' messages (intra-node with ranks_per_node). split: "auto" (the planner decides) or "all"
    (every splittable matrix evenly over min(max_group, P, ranks_per_node) ranks).
    batch_same_shape: as in `balanced`, for whole matrices."""

    max_group: int = 4
    flop_per_byte: float = 100.0
    split: str = "auto"
    batch_same_shape: bool = True
    flop_per_peer: float = 0.0
    ranks_per_node: int | None = None
    flop_per_byte_exchange: float = 0.0

    def __post_init__(self) -> None:
        if (not isinstance(self.max_group, int) or isinstance(self.max_group, bool)
                or self.max_group < 1):
            raise ValueError(f"split_ns option 'max_group' must be an int >= 1 (1: never split), "
                             f"got {self.max_group!r}")
        _check_weight("flop_per_byte", self.flop_per_byte, "FLOPs one byte of a split round "
                      "costs")
        _check_weight("flop_per_peer", self.flop_per_peer, "one message's latency times the NS "
                      "FLOP rate; 0 ignores latency")
        _check_weight("flop_per_byte_exchange", self.flop_per_byte_exchange, "the forward/return "
                      "all-to-all's seconds per byte times the NS FLOP rate; 0 ignores them")
        if self.ranks_per_node is not None and (
                not isinstance(self.ranks_per_node, int) or isinstance(self.ranks_per_node, bool)
                or self.ranks_per_node < 1):
            raise ValueError(f"split_ns option 'ranks_per_node' must be None (groups may span "
                             f"nodes) or the GPUs per node, an int >= 1, got "
                             f"{self.ranks_per_node!r}")
        if self.split not in SPLIT_POLICIES:
            raise ValueError(f"split_ns option 'split' must be one of {SPLIT_POLICIES}, got "
                             f"{self.split!r}")
        if not isinstance(self.batch_same_shape, bool):
            raise ValueError(f"batch_same_shape must be a bool, got {self.batch_same_shape!r}")


def _check_weight(name: str, value, meaning: str) -> None:
    """One clear line for a planner weight that is not a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")):
        raise ValueError(f"split_ns option {name!r} must be a finite number >= 0 ({meaning}), "
                         f"got {value!r}")


@register
class SplitNS(Strategy):
    name = "split_ns"
    Options = SplitNSOptions

    def __init__(self, options: SplitNSOptions | None = None) -> None:
        super().__init__(options or SplitNSOptions())

    def assign_owners(self, matrices, world_size):
        return lpt_owners(matrices, world_size)

    def _assignment(self, matrices, world_size):
        o = self.options
        return assign(tuple(matrices), world_size, o.max_group, float(o.flop_per_byte), o.split,
                      float(o.flop_per_peer), o.ranks_per_node, float(o.flop_per_byte_exchange))

    def schedule(self, matrices, world_size):
        """Forward; the split matrices' rounds; the whole matrices' NS; return."""
        a = self._assignment(matrices, world_size)
        idx = tuple(m.index for m in matrices)
        split = tuple(m.index for k, m in enumerate(matrices) if a.is_split(k))
        whole = tuple(m.index for k, m in enumerate(matrices) if not a.is_split(k))
        actions = [Feed(0), Issue(0, Exchange("split_pieces", "forward", idx)), Wait(0)]
        if split:
            steps = max(m.ns_steps for k, m in enumerate(matrices) if a.is_split(k))
            tag = 1

            def round_(step: int) -> list:
                nonlocal tag
                tag += 1
                return [Issue(tag - 1, Exchange("split_round", "round", split, step,
                                                self.options.ranks_per_node)), Wait(tag - 1)]

            actions += [Compute("split_norm", split)] + round_(0) + [Compute("split_start", split)]
            for t in range(steps):
                actions += ([Compute("split_gram", split, t)] + round_(1 + 2 * t)
                            + [Compute("split_b", split, t)] + round_(2 + 2 * t)
                            + [Compute("split_update", split, t)])
            actions.append(Compute("split_finish", split))
        else:
            tag = 1
        actions += [Compute("ns" if self.options.batch_same_shape else "ns_each", whole),
                    Issue(tag, Exchange("split_pieces", "return", idx)), Wait(tag)]
        owners = [parts[0].member for parts in a.parts]
        return owners, Schedule(tuple(actions), (idx,),
                                tuple((m.index, a.parts[k]) for k, m in enumerate(matrices)))
