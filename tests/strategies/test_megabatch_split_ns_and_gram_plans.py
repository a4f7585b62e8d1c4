"""The field's strategy families, planned from shapes alone: `megabatch`'s padding is in
its plan, `split_ns` balances NS where whole-matrix ownership cannot, and the Gram Newton-Schulz
option's FLOPs and numerics. Exactness on real process groups is in
tests/strategies/test_every_strategy_matches_the_reference.py (every registered strategy is
parametrized there)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import NorMuon, strategies
from dist_ortho.core.newton_schulz import matrix_view_shape, newton_schulz, ns_flops
from dist_ortho.models import matrix_shapes
from dist_ortho.profiling import costmodel as cm
from dist_ortho.strategies.megabatch import padding_flops
from tests import tolerances


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


@pytest.mark.parametrize("model", ["llama-1b", "llama-8b"])
def test_split_ns_balances_llama_at_64_where_whole_matrices_cannot(model):
    """At P = 64 whole-matrix LPT cannot go below 1.06-1.08 (some rank owns two MLP matrices,
    or one MLP matrix is above the mean); split_ns, with its default byte weight, splits the
    largest matrices over ranks that would idle and reaches <= 1.02 without adding FLOPs."""
    P = 64
    specs = cm.matrix_specs(matrix_shapes(model), P, torch.float32, torch.bfloat16)
    whole = strategies.build("balanced").plan(specs, P, 0)
    split = strategies.build("split_ns").plan(specs, P, 0)
    assert 1.05 <= whole.flops_imbalance <= 1.09, whole.flops_imbalance
    assert split.flops_imbalance <= 1.02, split.flops_imbalance
    # the members of a split run exactly the whole matrix's FLOPs: the mean did not move
    assert split.total_ns_flops == whole.total_ns_flops
    bound = cm.whole_matrix_makespan_bound([m.flops for m in specs], P)
    assert max(c.ns_flops for c in split.ranks) < bound <= max(c.ns_flops for c in whole.ranks)
    split_indices = [i for i in range(len(specs))
                     if sum(i in c.computes for c in split.ranks) > 1]
    assert split_indices and all("mlp" in specs[i].name for i in split_indices)


def test_split_ns_keeps_matrices_whole_when_bytes_cost_more_than_the_imbalance():
    P = 64
    specs = cm.matrix_specs(matrix_shapes("llama-1b"), P, torch.float32, torch.bfloat16)
    dear = strategies.build("split_ns", flop_per_byte=1e6).plan(specs, P, 0)
    whole = strategies.build("balanced").plan(specs, P, 0)
    assert [c.ns_flops for c in dear.ranks] == [c.ns_flops for c in whole.ranks]
    assert all(len(c.comm) == len(whole.ranks[0].comm) for c in dear.ranks)  # no split rounds


def test_split_ns_round_bytes_are_the_gram_and_b_rows_to_each_fellow_member():
    # one (64, 256) matrix split evenly over 4 ranks: k = 64; per step each member sends each of
    # its 3 fellows one message with its float32 Gram partial (64 x 64), then one with its 16
    # rows of B (float32 here); the norm round sends one float32 partial sum
    P = 4
    specs = cm.matrix_specs([(64, 256)], P)
    plan = strategies.build("split_ns", split="all").plan(specs, P, 0)
    sends = [c for c in plan.ranks[0].comm if c.kind == "send"]
    assert len(sends) == 3 * (1 + 2 * 5)
    assert [c.group for c in sends[:3]] == [(0, 1), (0, 2), (0, 3)]
    per_round = [sends[3 * t:3 * t + 3] for t in range(11)]
    assert all(c.send_bytes == 4 for c in per_round[0])
    assert all(c.send_bytes == 64 * 64 * 4 for r in per_round[1::2] for c in r)
    assert all(c.send_bytes == 16 * 64 * 4 for r in per_round[2::2] for c in r)
    recvs = [c for c in plan.ranks[0].comm if c.kind == "recv"]
    assert sum(c.recv_bytes for c in recvs) == sum(c.send_bytes for c in sends)
    assert plan.total_ns_flops == specs[0].flops
    assert [c.ns_flops for c in plan.ranks] == [specs[0].flops // 4] * 4


@pytest.mark.parametrize("options, word", [
    (dict(max_group=0), "max_group"), (dict(flop_per_byte=-1.0), "flop_per_byte"),
    (dict(split="some"), "split"), (dict(batch_same_shape="yes"), "batch_same_shape")])
def test_split_ns_bad_options_name_themselves(options, word):
    with pytest.raises(ValueError, match=word):
        strategies.build("split_ns", **options)


GRAM_SHAPES = [(64, 224), (224, 64), (96, 96), (3, 32, 80), (48, 5, 2, 3)]


@pytest.mark.parametrize("steps", [1, 5])
def test_gram_ns_flops_equal_flop_counter(steps):
    for shape, coefficients in zip(GRAM_SHAPES, ["jordan", "polar_express"] * 3):
        G = torch.randn(matrix_view_shape(shape), generator=torch.Generator().manual_seed(3))
        with FlopCounterMode(display=False) as counter:
            newton_schulz(G, steps, torch.float32, coefficients, form="gram")
        assert counter.get_total_flops() == ns_flops(shape, steps, "gram"), shape
    # fewer FLOPs than the standard form when l > 1.5 k, more for square matrices
    assert ns_flops((64, 224), 5, "gram") <= 0.6 * ns_flops((64, 224), 5)  # l = 3.5 k
    assert ns_flops((96, 96), 5, "gram") > ns_flops((96, 96), 5)


@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_gram_ns_differs_from_standard_within_its_derived_bound(coefficients):
    """Measured ||gram - standard||_F / ||standard||_F against tolerances.gram_ns_error (C times
    it, as every exactness bound): Gaussian matrices and gradient-like ones whose singular values
    decay over four decades. The second kind is where the Gram form is worse: A holds sigma^2,
    so singular values below ~sqrt(u) are rounded away (term (b) of the bound)."""
    ratios = []
    for j, shape in enumerate(GRAM_SHAPES):
        g = torch.Generator().manual_seed(10 + j)
        view = matrix_view_shape(shape)
        inputs = [torch.randn(view, generator=g)]
        U, _, V = torch.linalg.svd(torch.randn(view, generator=g), full_matrices=False)
        decay = torch.logspace(0, -4, U.shape[-1])
        inputs.append((U * decay) @ V)
        for G in inputs:
            std = newton_schulz(G, 5, torch.float32, coefficients)
            gram = newton_schulz(G, 5, torch.float32, coefficients, form="gram")
            diff = float((gram - std).double().norm() / std.double().norm())
            sigma = torch.linalg.svdvals(G).reshape(-1, min(view[-2:]))  # NS normalizes each
            bound = tolerances.C * max(tolerances.gram_ns_error(shape, 5, s, coefficients)
                                       for s in sigma)
            ratios.append(diff / bound)
            assert diff > 0  # a different computation, not the same one
    tolerances.report(f"gram NS vs standard NS, float32, {coefficients}", ratios)
    assert max(ratios) <= 1.0, ratios


def test_gram_form_runs_in_the_optimizer_and_the_cost_model():
    shapes = [(64, 224), (32, 32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(shapes)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = NorMuon(params, ns_form="gram", ns_dtype="float32", strategy="balanced")
    opt.step()
    expected = sum(ns_flops(s, 5, "gram") for s in shapes)
    assert opt.executed_ns_flops == opt.plan().mine.ns_flops == expected
    assert cm.predict(shapes, 2, "balanced", ns_form="gram").plan.total_ns_flops == expected
    # llama-8b MLP matrices are 3.5 times as long as wide: the projected NS time drops
    c = cm.CostConstants(cm.CommModel({k: 0.0 for k in cm.KINDS}, {k: 0.0 for k in cm.KINDS}),
                         cm.ComputeModel(1e12), "test")
    llama = matrix_shapes("llama-8b")
    std = cm.predict(llama, 64, "balanced", constants=c).time.ns_s
    gram = cm.predict(llama, 64, "balanced", constants=c, ns_form="gram").time.ns_s
    assert gram < 0.8 * std
    with pytest.raises(ValueError, match="ns_form"):
        NorMuon(params, ns_form="fast")
    with pytest.raises(ValueError, match="ns_form"):
        cm.matrix_specs(shapes, 2, ns_form="fast")
