"""Tests of the exactness tolerances themselves (tests/tolerances.py).

1. They hold on kernel paths this machine does not have. MKL_ENABLE_INSTRUCTIONS (which .ci/run
   varies) changes nothing measurable on some CPUs (an AVX2-only AMD EPYC gives the same bits under
   SSE4_2, AVX2 and AVX512), so the optimizer is also run with its matmuls and reductions replaced
   by other summation orders: float64 accumulation rounded once (the most accurate kernel there
   is) and a split inner dimension / reversed reductions (another blocking). Against the
   reference on the native path, these reproduce the size of the differences an AVX-512 Xeon
   gives (~2e-6 of the displacement) and must stay within the bound.
2. They catch real bugs. A copy of the reference update with a bug put in (a wrong epsilon, a
   dropped rescale, a stale momentum, shard-local norms, ...) is compared with the reference by
   the very check the exactness tests use, and must fail it. A bound that cannot fail is a defect.
3. They stay meaningful: no bound may grow to a sizeable fraction of the update it guards.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

import dist_ortho.optim.reference as reference
from dist_ortho.core.newton_schulz import matrix_view_shape, newton_schulz
from tests.optimizer.test_newton_schulz_and_reference_update import (EXACT_SHAPES, exactness_bounds,
                                                                     run_optimizer, run_reference)
from tests.tolerances import distance_ratios, report

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
            torch.mm, torch.Tensor.mm}
_REDUCTIONS = {torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean, torch.Tensor.norm,
               torch.norm, torch.linalg.vector_norm}


class KernelPath(TorchFunctionMode):
    """Runs float32/bfloat16 matmuls and float32 reductions in another summation order.

    "f64": computed in float64 and rounded once (bf16: float32 accumulation in another order).
    "split": matmuls as the sum of two half-inner-dimension products; reductions over a reversed
    last dimension."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        assert kind in ("f64", "split")
        self.kind = kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if (func in _MATMULS and isinstance(first, torch.Tensor)
                and first.dtype in (torch.float32, torch.bfloat16)):
            a, b = args[0], args[1]
            if self.kind == "f64":
                return torch.matmul(a.double(), b.double()).to(a.dtype)
            h = max(1, a.shape[-1] // 2)
            acc = torch.float32  # bf16 kernels accumulate in float32, then round once
            return (torch.matmul(a[..., :h].to(acc), b[..., :h, :].to(acc))
                    + torch.matmul(a[..., h:].to(acc), b[..., h:, :].to(acc))).to(a.dtype)
        if func in _REDUCTIONS and isinstance(first, torch.Tensor) and first.dtype == torch.float32:
            if self.kind == "f64":
                return func(first.double(), *args[1:], **kwargs).float()
            return func(first.flip(-1), *args[1:], **kwargs)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def reference_run(rule: str, nesterov: bool, weight_decay: float, ns_dtype: str):
    return run_reference(rule, nesterov, weight_decay, ns_dtype=ns_dtype)


# --- 1. other kernel paths ---------------------------------------------------------------------

def test_kernel_path_emulation_changes_the_arithmetic():
    """Else the next test proves nothing: float32 Newton-Schulz gives other bits, as close as
    another CPU's would be."""
    G = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    native = newton_schulz(G, compute_dtype=torch.float32)
    for kind in ("f64", "split"):
        with KernelPath(kind):
            other = newton_schulz(G, compute_dtype=torch.float32)
        assert not torch.equal(native, other), kind
        assert float((native - other).norm() / native.norm()) < 1e-5, kind


@pytest.mark.parametrize("kind", ["f64", "split"])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rule", ["normuon", "muon"])
@pytest.mark.parametrize("strategy", ["replicated", "balanced"])
def test_bound_holds_on_other_kernel_paths(kind, ns_dtype, rule, strategy):
    ref, trajectory = reference_run(rule, True, 0.05, ns_dtype)
    params = run_optimizer(rule, True, 0.05, strategy, ns_dtype=ns_dtype,
                           mode=lambda: KernelPath(kind))
    ratios = distance_ratios(params, ref, exactness_bounds(trajectory, rule, ns_dtype))
    report(f"emulated kernel paths vs reference, {ns_dtype}", ratios)
    assert max(ratios) <= 1.0, ratios


# --- 2. bugs the bound must catch ----------------------------------------------------------------

def _stale_momentum(grad, momentum_buf, beta1, nesterov):
    """Bug: orthogonalizes with the momentum of the previous step, then updates it."""
    stale = momentum_buf.clone()
    momentum_buf.lerp_(grad, 1 - beta1)
    return torch.lerp(grad, stale, beta1) if nesterov else stale


def _normuon_update_variant(no_frobenius_rescale=False, shard_local_norms=0, no_shape_scale=False,
                            v_not_averaged=False):
    """dist_ortho.optim.reference.normuon_update with one bug put in."""

    def update(grad, momentum_buf, v, hp):
        U = reference.momentum_direction(grad, momentum_buf, hp.momentum, hp.nesterov)
        view = matrix_view_shape(grad.shape)
        O = reference.orthogonalize(U, hp.ns).float().reshape(view)

        def frobenius(X):
            if not shard_local_norms:  # the norm of the whole matrix, as the paper says
                return X.norm(dim=(-2, -1), keepdim=True)
            # dion's variant: each of P row shards rescales by its own norm
            return torch.cat([c.norm(dim=(-2, -1), keepdim=True).expand(*c.shape[:-1], 1)
                              for c in X.chunk(shard_local_norms, dim=-2)], dim=-2)

        f = frobenius(O)
        if v_not_averaged:
            v.copy_(O.square().mean(dim=-1))
        else:
            v.lerp_(O.square().mean(dim=-1), 1 - hp.beta2)
        O = O / (v.sqrt().unsqueeze(-1) + reference.ROW_EPS)
        if not no_frobenius_rescale:
            O = O * (f / (frobenius(O) + reference.NORM_EPS))
        scale = 1.0 if no_shape_scale else reference.shape_scale(grad.shape)
        return (O * scale).reshape(grad.shape)

    return update


MUTATIONS = {
    "row_eps_1e-10_to_1e-6": [("ROW_EPS", 1e-6)],
    "no_frobenius_rescale": [("normuon_update", _normuon_update_variant(no_frobenius_rescale=True))],
    "stale_momentum": [("momentum_direction", _stale_momentum)],
    "shard_local_frobenius_norms_p2": [("normuon_update",
                                        _normuon_update_variant(shard_local_norms=2))],
    "no_shape_scale": [("normuon_update", _normuon_update_variant(no_shape_scale=True))],
    "v_not_averaged": [("normuon_update", _normuon_update_variant(v_not_averaged=True))],
}


def test_unmutated_variant_passes():
    """The variant with no bug put in is the reference: the check must pass it (else the mutation
    test below would catch the copy, not the bug)."""
    ref, trajectory = reference_run("normuon", True, 0.05, "float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "normuon_update", _normuon_update_variant())
        copy, _ = run_reference("normuon", True, 0.05)
    assert max(distance_ratios(copy, ref, exactness_bounds(trajectory, "normuon"))) <= 1.0


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_bound_catches_a_real_bug(mutation):
    ref, trajectory = reference_run("normuon", True, 0.05, "float32")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in MUTATIONS[mutation]:
            mp.setattr(reference, name, value)
        mutated, _ = run_reference("normuon", True, 0.05)
    ratios = distance_ratios(mutated, ref, exactness_bounds(trajectory, "normuon"))
    report(f"mutation {mutation} (must exceed 1)", ratios)
    assert max(ratios) > 1.0, f"{mutation} went unnoticed: {ratios}"


# --- 3. bounds stay meaningful -----------------------------------------------------------------

@pytest.mark.parametrize("rule", ["normuon", "muon"])
def test_bounds_are_a_small_fraction_of_the_update(rule):
    """float32 bounds below 1e-3 of the displacement they guard (they are ~1e-4 to 5e-4): a bug
    that changes the update by 0.1% is caught whatever the kernel path."""
    ref, trajectory = reference_run(rule, True, 0.05, "float32")
    start, _ = run_reference(rule, True, 0.05, steps=0)
    for shape, b, r, s in zip(EXACT_SHAPES, exactness_bounds(trajectory, rule), ref, start):
        assert b <= 1e-3 * float((r - s).norm()), (shape, b, float((r - s).norm()))
