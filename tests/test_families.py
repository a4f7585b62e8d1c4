"""The field's strategy families (issue 16), planned from shapes alone: `megabatch`'s padding is in
its plan, `split_ns` balances NS where whole-matrix ownership cannot, and the Gram Newton-Schulz
option's FLOPs and numerics. Exactness on real process groups is in test_strategies_dist.py (every
registered strategy is parametrized there)."""

from __future__ import annotations

import pytest

from dist_ortho import strategies
from dist_ortho.profiling import costmodel as cm
from dist_ortho.strategies.megabatch import padding_flops


def test_megabatch_pads_each_shape_group_to_a_multiple_of_p():
    # five (64, 32) matrices and one (16, 48) on four ranks: 3 + 3 zero matrices of padding
    shapes = [(64, 32)] * 5 + [(16, 48)]
    P = 4
    specs = cm.matrix_specs(shapes, P)
    plan = strategies.build("megabatch").plan(specs, P, 0)
    assert list(plan.owner) == [0, 1, 2, 3, 0, 0]  # round-robin within each group
    f_big, f_small = specs[0].flops, specs[5].flops
    assert padding_flops(specs, P) == [0, f_big + f_small, f_big + f_small, f_big + f_small]
    assert [c.ns_flops for c in plan.ranks] == [2 * f_big + f_small] + [2 * f_big + f_small] * 3
    # bytes: every (source, owner) pair moves blocks * ceil(rows / P) rows each way, per group
    fwd = [c for c in plan.ranks[0].comm if c.phase == "forward"]
    assert [c.send_bytes for c in fwd] == [(P - 1) * 2 * 16 * 32 * 4, (P - 1) * 1 * 4 * 48 * 4]
    balanced = strategies.build("balanced").plan(specs, P, 0)
    sent = sum(c.send_bytes for r in plan.ranks for c in r.comm)
    sent_balanced = sum(c.send_bytes for r in balanced.ranks for c in r.comm)
    assert sent == pytest.approx(sent_balanced * (8 * 64 * 32 + 4 * 16 * 48)
                                 / (5 * 64 * 32 + 16 * 48))


def test_megabatch_costs_padding_in_the_cost_model():
    """One matrix on two ranks sharing one core: megabatch's zero matrix runs beside the real
    one and takes half the core, so its NS phase takes twice as long as balanced's."""
    shapes = [(256, 256)]
    zero = {k: 0.0 for k in cm.KINDS}
    c = cm.CostConstants(cm.CommModel(zero, zero), cm.ComputeModel(1e9, shared_slots=1), "test")
    mb = cm.predict(shapes, 2, "megabatch", constants=c).time.ns_s
    bal = cm.predict(shapes, 2, "balanced", constants=c).time.ns_s
    assert mb == pytest.approx(2 * bal)
    assert cm.predict(shapes, 2, "megabatch").plan.total_ns_flops == 2 * cm.matrix_specs(
        shapes, 2)[0].flops
