"""The plan of one optimizer step: the strategy's plan completed with the optimizer's own
collectives. The optimizer's `plan()` and the cost model both call `plan_step`, so their bytes
agree by construction."""

from __future__ import annotations

from collections.abc import Sequence

from dist_ortho import rules as rule_registry
from dist_ortho.core.plan import CommItem, Plan, all_reduce_bytes
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.rules.base import UpdateRule
from dist_ortho.strategies.base import Strategy

__all__ = ["optimizer_items", "plan_step"]


def optimizer_items(specs: Sequence[MatrixSpec], world_size: int,
                    rule: UpdateRule, flags: int = 1,
                    global_statistics: bool = True) -> list[CommItem]:
    """The collectives the optimizer adds to its strategy's on every rank, in issue order: the
    non-finite check's all-reduce of `flags` floats (2 when the strategy runs in backward: it
    also agrees whether that work is usable), then the update rule's reductions (none when the
    strategy keeps the rule's statistics local, `Strategy.global_statistics`)."""
    if world_size <= 1:
        return []
    flag = all_reduce_bytes(4 * flags, world_size)
    return [CommItem("all_reduce", flag, flag, "nonfinite_check")] + list(
        rule.reductions(specs, world_size if global_statistics else 1))


def plan_step(strategy: Strategy, specs: Sequence[MatrixSpec], world_size: int, rank: int,
              rule: UpdateRule | str) -> Plan:
    """The plan of one optimizer step: the strategy's plan completed with `optimizer_items`. The
    optimizer's `plan()` and the cost model both call this, so their bytes agree by construction."""
    plan = strategy.plan(specs, world_size, rank)
    flags = 2 if strategy.runs_in_backward else 1
    items = optimizer_items(plan.matrices, world_size, rule_registry.get(rule), flags,
                            strategy.global_statistics)
    for cost in plan.ranks:
        cost.comm.extend(items)
    return plan
