"""split_ns's planner prices what a split costs its members (pure planning, no process group):
the rounds' latency as well as their bytes, split groups inside one node when the node size is
known, never a split its own pricing calls slower than whole-matrix LPT, and the cost model
pricing the split rounds exactly as the planner did. Exactness of node-local splits on real
process groups: the split_ns ranks_per_node case in tests/strategies/dist_cases.py."""

from __future__ import annotations

import pytest
import torch

from dist_ortho import strategies
from dist_ortho.models import matrix_shapes
from dist_ortho.profiling import costmodel as cm
from dist_ortho.profiling.hardware import HARDWARE_PRESETS
from dist_ortho.reporting.families import split_ns_options
from dist_ortho.core.schedule import Issue
from dist_ortho.strategies import split_plan
from dist_ortho.strategies.exchanges import transport


def _specs(model: str, P: int):
    return cm.matrix_specs(matrix_shapes(model), P, torch.float32, torch.bfloat16)


def _split(plan) -> list[list[int]]:
    """Member ranks of every matrix that more than one rank computes."""
    groups = [[r for r, c in enumerate(plan.ranks) if m.index in c.computes]
              for m in plan.matrices]
    return [g for g in groups if len(g) > 1]


def _priced(plan, flop_per_byte: float, flop_per_peer: float) -> list[float]:
    """Each rank's cost recomputed from the plan alone: NS FLOPs, plus for a member of a split its
    split-round bytes and the latency of each (round, fellow member) it exchanges with. Its
    messages are the plan's sends and receives, per (round, fellow) a send, a receive or a send
    then a receive."""
    out = []
    for cost in plan.ranks:
        msgs = [c for c in cost.comm if c.kind in ("send", "recv")]
        pairs, last = 0, None
        for c in msgs:
            if not (last is not None and last.kind == "send" and c.kind == "recv"
                    and c.group == last.group):
                pairs += 1
            last = c
        sent = sum(c.send_bytes for c in msgs)
        out.append(cost.ns_flops + flop_per_byte * sent + flop_per_peer * pairs)
    return out


def test_latency_that_outweighs_the_gain_keeps_every_matrix_whole():
    """llama-1b at P = 64: the byte-only planner splits; once a member's rounds cost more than
    the most a split can save (LPT's busiest rank over the even split), it keeps LPT exactly."""
    P = 64
    specs = _specs("llama-1b", P)
    lpt = strategies.build("balanced").plan(specs, P, 0)
    assert _split(strategies.build("split_ns").plan(specs, P, 0))
    steps = specs[0].ns_steps
    gain = max(c.ns_flops for c in lpt.ranks) - lpt.total_ns_flops / P
    dear = strategies.build("split_ns", flop_per_peer=gain / (1 + 2 * steps)).plan(specs, P, 0)
    assert not _split(dear)
    assert [c.computes for c in dear.ranks] == [c.computes for c in lpt.ranks]
    assert all(len(c.comm) == len(lpt.ranks[0].comm) for c in dear.ranks)  # no split rounds


@pytest.mark.parametrize("model, P, node", [("llama-8b", 64, 8), ("llama-1b", 64, 4),
                                            ("llama-1b", 48, 8), ("llama-1b", 72, 3),
                                            ("llama-1b", 52, 8)])
def test_split_groups_stay_inside_one_node(model, P, node):
    """Every split group on one node (P = 52: a last node of 4 ranks; at 48 and 72 the planner
    without nodes puts some groups across nodes). (Node pairs cannot help llama-1b at 64: 48
    MLP matrices of 1.08x the mean on 32 nodes put two on some node.)"""
    specs = _specs(model, P)
    for split in ("auto", "all"):
        plan = strategies.build("split_ns", ranks_per_node=node, split=split,
                                max_group=8).plan(specs, P, 0)
        groups = _split(plan)
        assert groups, split
        assert all(len({r // node for r in g}) == 1 for g in groups), (split, groups)
        assert all(len(g) <= node for g in groups)
    # auto: node-local splits still balance the NS (the P = 64 acceptance, inside nodes)
    if P == 64:
        auto = strategies.build("split_ns", ranks_per_node=node).plan(specs, P, 0)
        assert auto.flops_imbalance <= 1.02, auto.flops_imbalance


def _objective(plan, options) -> float:
    """The planner's objective recomputed from the plan: the busiest rank's cost, plus the
    exchange weight times the busiest rank's bytes of the forward and of the return all-to-all
    (each the larger of its send and receive bytes, as the cost model times a call)."""
    o = strategies.build("split_ns", **options).options
    ends = [[c for c in cost.comm if c.kind == "all_to_all"] for cost in plan.ranks]
    ends = [(a2a[0], a2a[-1]) for a2a in ends]
    fwd = max(max(f.send_bytes, f.recv_bytes) for f, _ in ends)
    ret = max(max(r.send_bytes, r.recv_bytes) for _, r in ends)
    return (max(_priced(plan, o.flop_per_byte, o.flop_per_peer))
            + o.flop_per_byte_exchange * (fwd + ret))


@pytest.mark.parametrize("model, P", [("llama-1b", 80), ("llama-8b", 64)])
def test_planned_busiest_rank_never_costs_more_than_lpt(model, P):
    """Over byte weights, latencies, exchange weights and node sizes (and the h100 preset's
    own): the planner's per-rank cost is the plan's NS FLOPs plus its priced round bytes and
    latency, and when it splits, its objective (busiest rank + weighed forward / return bytes)
    is below LPT's; when it does not, it is LPT. (llama-1b at 80: the byte-blind split piles
    15% more forward bytes on its busiest rank than LPT, so the exchange weight matters.)"""
    specs = _specs(model, P)
    lpt = strategies.build("balanced").plan(specs, P, 0)
    h100 = split_ns_options(HARDWARE_PRESETS["h100"], P, "bfloat16")
    grid = [dict(flop_per_byte=b, flop_per_peer=lat, ranks_per_node=n, flop_per_byte_exchange=x)
            for b in (0.0, 1400.0) for lat in (0.0, 3e9) for n in (None, 8)
            for x in (0.0, 1e5)]
    splits = 0
    for options in grid + [h100]:
        strategy = strategies.build("split_ns", **options)
        plan = strategy.plan(specs, P, 0)
        a = strategy._assignment([m for m in plan.matrices if m.sharded], P)
        o = strategy.options
        assert list(a.cost) == pytest.approx(_priced(plan, o.flop_per_byte, o.flop_per_peer),
                                             rel=1e-12), options
        if _split(plan):
            splits += 1
            assert _objective(plan, options) < _objective(lpt, options), options
            assert max(a.cost) < max(c.ns_flops for c in lpt.ranks), options
        else:
            assert [c.computes for c in plan.ranks] == [c.computes for c in lpt.ranks], options
    assert 0 < splits < len(grid) + 1  # the grid covers both outcomes


def test_cost_model_prices_split_rounds_on_the_link_the_planner_weighs():
    """The planner weighs a split round's bytes and messages with flop_per_byte / flop_per_peer;
    the cost model prices the same messages on the intra-node link (the groups lie inside a node)
    with the rates those weights stand for, and the forward / return at the exchange weight's
    bandwidth. With latency-free collectives and no per-call or element-wise cost, the predicted
    step is the planner's objective at the NS rate, plus only what the planner leaves out: members
    of a round wait for each other (lockstep), which a per-rank sum cannot see (2.5% here)."""
    P, rate = 64, 1e12
    options = dict(flop_per_byte=100.0, flop_per_peer=1e9, ranks_per_node=8,
                   flop_per_byte_exchange=1e3)
    zero = {k: 0.0 for k in cm.KINDS}
    beta = {k: options["flop_per_byte_exchange"] / rate for k in cm.KINDS}
    comm = cm.CommModel(zero, beta, link_alpha_s={"intra_node": options["flop_per_peer"] / rate},
                        link_beta_s_per_byte={"intra_node": options["flop_per_byte"] / rate})
    constants = cm.CostConstants(comm, cm.ComputeModel(rate), "test")
    shapes = matrix_shapes("llama-1b")
    pred = cm.predict(shapes, P, "split_ns", options, constants=constants,
                      param_dtype="float32", ns_dtype="bfloat16")
    assert _split(pred.plan)
    planned = _objective(pred.plan, options) / rate
    optimizer = sum(t for k, t in pred.time.comm_by_kind_s.items() if k == "all_reduce")
    step = pred.time.total_s - optimizer
    assert planned * (1 - 1e-12) <= step <= 1.05 * planned
    whole = cm.predict(shapes, P, "balanced", constants=constants, param_dtype="float32",
                       ns_dtype="bfloat16")
    assert pred.time.total_s < whole.time.total_s  # what the planner chose is what it predicts


def test_projection_weights_come_from_the_preset():
    """h100 at P = 1024: NVLink bytes (rate / (450 GB/s * 0.8)), groups of at most one node, and
    a message's latency on NVLink (1 us per peer): the rounds run among the members, so P does
    not enter."""
    hw = HARDWARE_PRESETS["h100"]
    rate = hw.ns_flops_per_s("bfloat16")
    o = split_ns_options(hw, 1024, "bfloat16")
    assert o["ranks_per_node"] == o["max_group"] == 8
    assert o["flop_per_byte"] == pytest.approx(rate / (450e9 * 0.8), rel=1e-3)
    assert o["flop_per_peer"] == pytest.approx(rate * 1e-6, rel=1e-3)
    assert split_ns_options(hw, 64, "bfloat16")["flop_per_peer"] == o["flop_per_peer"]


@pytest.mark.parametrize("options, word", [
    (dict(flop_per_peer=-1.0), "flop_per_peer"), (dict(flop_per_peer=float("inf")),
                                                  "flop_per_peer"),
    (dict(flop_per_peer=True), "flop_per_peer"), (dict(ranks_per_node=0), "ranks_per_node"),
    (dict(ranks_per_node=8.0), "ranks_per_node"), (dict(ranks_per_node=True), "ranks_per_node")])
def test_bad_split_options_name_themselves(options, word):
    with pytest.raises(ValueError, match=word):
        strategies.build("split_ns", **options)


def test_planning_at_4096_ranks_counts_each_rank_piece_as_the_executor_does():
    """Regression: split_ns planned its forward/return bytes with a per-rank Python loop whose
    shard offsets were re-summed for every rank, O(P^2) per matrix (minutes at P = 4096). The
    vector `piece_numels` must equal `piece_numel`, which execute uses, for every rank: uneven
    and empty shards, row blocks and column blocks, ranks before, inside and after a block."""
    specs = cm.matrix_specs([(10, 7), (3, 5), (9, 4, 2), (16, 16)], 6, torch.float32,
                            torch.float32)
    for m in specs:
        assert len(m.dim0_starts) == 7 and m.dim0_starts[-1] == m.shape[0]
        for axis, lo, hi in [(0, 0, m.shape[0]), (0, 2, 5), (0, 4, 4), (1, 1, 3)]:
            part = split_plan.Part(member=1, axis=axis, lo=lo, hi=hi)
            want = [split_plan.piece_numel(m, part, r) for r in range(6)]
            assert split_plan.piece_numels(m, part).tolist() == want, (m.shape, part)


def test_regression_a_split_matrix_blocks_are_in_its_members_transient_bytes():
    """Bug: the split stages before the last carry no FLOPs, so the counter held each split
    matrix at zero bytes from its first stage on and never counted the members' blocks. A
    member's peak is its block (input and result) plus its busiest round's buffers: the forward
    buffers are freed once the block is computed on, the return comes after the rounds."""
    P = 4
    specs = cm.matrix_specs([(64, 256)], P)
    plan = strategies.build("split_ns", split="all").plan(specs, P, 0)
    m, parts = specs[0], dict(plan.schedule.splits)[0]
    assert len(parts) == P
    rounds = [a.exchange for a in plan.schedule.actions
              if isinstance(a, Issue) and a.exchange.transport == "split_round"]
    for p in parts:  # a wide matrix splits its columns: each block is all rows of some columns
        block = (p.hi - p.lo) * m.shape[0] * (m.dtype.itemsize + m.out_itemsize)
        busiest = max(sum(c.send_bytes + c.recv_bytes for c in transport(ex.transport).items(
            plan, ex)[p.member]) for ex in rounds)
        assert plan.ranks[p.member].transient_bytes == block + busiest, (p, block, busiest)
