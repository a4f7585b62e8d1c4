"""Single-process foundation: Newton-Schulz, the reference update, the optimizers and their errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import (CombinedOptimizer, Muon, NorMuon, NSConfig, OptimizerConfig,
                        ReferenceHParams, SplitConfig, build_optimizers, newton_schulz, ns_flops,
                        reference_step, split_params)
from dist_ortho.newton_schulz import POLAR_EXPRESS_COEFFICIENTS, matrix_view_shape
from dist_ortho.reference import normuon_update


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- Newton-Schulz ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (1, 40), (40, 1), (4, 16, 24)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express"])
def test_ns_singular_values_in_quintic_band(shape, coefficients):
    X = newton_schulz(randn(*shape, seed=1), 5, torch.float32, coefficients)
    assert X.shape == shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())


def test_ns_bfloat16_default_and_close_to_float32():
    G = randn(48, 32, seed=2)
    X16 = newton_schulz(G)
    assert X16.dtype == torch.bfloat16
    X32 = newton_schulz(G, compute_dtype=torch.float32)
    # bf16 keeps 8 mantissa bits (~4e-3 per rounding); five iterations of a degree-5 polynomial
    # compound it to a few percent (3.4% measured on this input)
    assert (X16.float() - X32).norm() / X32.norm() < 6e-2


def test_ns_is_deterministic_and_pure():
    G = randn(20, 30, seed=3)
    before = G.clone()
    a = newton_schulz(G, compute_dtype=torch.float32)
    b = newton_schulz(G, compute_dtype=torch.float32)
    assert torch.equal(a, b) and torch.equal(G, before)


def test_ns_tall_is_transpose_of_wide():
    G = randn(40, 24, seed=4)
    tall = newton_schulz(G, compute_dtype=torch.float32)
    wide = newton_schulz(G.T.contiguous(), compute_dtype=torch.float32)
    torch.testing.assert_close(tall, wide.T, rtol=1e-5, atol=1e-6)


def test_ns_batched_equals_one_by_one():
    G = randn(3, 12, 20, seed=5)
    batched = newton_schulz(G, compute_dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(G[i], compute_dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_ns_is_scale_invariant_while_norm_dominates_eps(scale):
    # normalization happens in float32 before the bf16 cast, so the input's scale is irrelevant
    # (until ||G|| approaches eps = 1e-7, where the paper's eps takes over by design)
    G = randn(16, 16, seed=6)
    torch.testing.assert_close(newton_schulz(G * scale, compute_dtype=torch.float32),
                               newton_schulz(G, compute_dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_ns_zero_input_stays_zero():
    X = newton_schulz(torch.zeros(8, 5), compute_dtype=torch.float32)
    assert torch.equal(X, torch.zeros(8, 5))


def test_polar_express_table_and_steps_beyond_it():
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 5
    assert POLAR_EXPRESS_COEFFICIENTS[0][0] == pytest.approx(8.156554524902461)
    X = newton_schulz(randn(32, 16, seed=7), 7, torch.float32, "polar_express")
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.5


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (2, 16, 8), (8, 2, 3, 3)])
def test_ns_flops_formula_matches_flop_counter(shape):
    view = matrix_view_shape(shape)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(randn(*view, seed=8), 5, torch.float32)
    assert counter.get_total_flops() == ns_flops(shape, 5)


def test_nsconfig_rejects_bad_values():
    with pytest.raises(ValueError, match="ns_steps"):
        NSConfig(steps=0)
    with pytest.raises(ValueError, match="ns_dtype"):
        NSConfig(dtype="float8")
    with pytest.raises(ValueError, match="ns_coefficients"):
        NSConfig(coefficients="magic")
    assert NSConfig(dtype="auto").torch_dtype("cpu") == torch.float32
    assert NSConfig(dtype="auto").torch_dtype("cuda") == torch.bfloat16


# --- reference update ---------------------------------------------------------------------------

def test_reference_normuon_matches_the_paper_formula_written_out():
    """Transcribes the official normuon.py step by step for a 2-D matrix, without our helpers."""
    G, M, v = randn(12, 8, seed=9), randn(12, 8, seed=10), torch.rand(12, generator=torch.Generator().manual_seed(11))
    hp = ReferenceHParams(ns=NSConfig(dtype="float32"))
    M_ref, v_ref = M.clone(), v.clone()
    M_ref.lerp_(G, 1 - 0.95)
    U = G.lerp(M_ref, 0.95)
    O = newton_schulz(U, 5, torch.float32).float()
    vnorm = O.norm(dim=(-2, -1), keepdim=True)
    v_ref.lerp_(torch.mean(O * O, dim=-1), 1 - 0.95)
    O = O * (1 / (v_ref.sqrt() + 1e-10)).unsqueeze(-1)
    O = O * (vnorm / (O.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    O = O * max(1, 12 / 8) ** 0.5
    ours = normuon_update(G, M, v, hp)
    torch.testing.assert_close(ours, O, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(M, M_ref) and torch.testing.assert_close(v, v_ref)


def test_reference_update_keeps_muon_norm_before_shape_scale():
    G = randn(16, 16, seed=12)
    hp = ReferenceHParams(ns=NSConfig(dtype="float32"))
    upd = normuon_update(G, torch.zeros(16, 16), torch.zeros(16), hp)
    O = newton_schulz(G.lerp(torch.zeros(16, 16).lerp(G, 0.05), 0.95), 5, torch.float32)
    assert upd.norm() == pytest.approx(O.norm().item(), rel=1e-5)


# --- optimizers vs reference --------------------------------------------------------------------

SHAPES = [(12, 8), (8, 12), (4, 6, 5), (6, 3, 3, 3)]


@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.1), (True, 0.05)])
@pytest.mark.parametrize("strategy", ["replicated", "round_robin", "allgather_scatter",
                                      "bucketed_async", "balanced"])
def test_optimizer_equals_reference_over_steps(algorithm, nesterov, weight_decay, strategy):
    params = [torch.nn.Parameter(randn(*s, seed=20 + i)) for i, s in enumerate(SHAPES)]
    ref = [p.detach().clone() for p in params]
    start = [r.clone() for r in ref]
    cls = NorMuon if algorithm == "normuon" else Muon
    opt = cls(params, lr=0.02, weight_decay=weight_decay, nesterov=nesterov, ns_dtype="float32",
              strategy=strategy)
    hp = ReferenceHParams(weight_decay=weight_decay, nesterov=nesterov, ns=NSConfig(dtype="float32"))
    state: dict = {}
    for step in range(4):
        grads = [randn(*s, seed=100 * step + i) for i, s in enumerate(SHAPES)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        reference_step(ref, grads, state, hp, algorithm)
    for p, r, s in zip(params, ref, start):
        err = (p.detach() - r).norm() / (r - s).norm()
        assert err <= 1e-6, err


def test_state_dict_round_trip_continues_identically():
    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(randn(*s, seed=30 + i)) for i, s in enumerate(SHAPES)]
        return ps, NorMuon(ps, ns_dtype="float32", strategy="balanced")

    params, opt = make()
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = randn(*p.shape, seed=200 + 10 * step + i)
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"momentum_buffer", "v", "step"}

    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params2, saved_params):
            p.copy_(q)
    opt2.load_state_dict(saved)
    for step in range(2, 4):
        for ps in (params, params2):
            for i, p in enumerate(ps):
                p.grad = randn(*p.shape, seed=200 + 10 * step + i)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert all(s["v"].dtype == torch.float32 for s in opt2.state.values())


def test_regression_bf16_params_keep_exact_float32_row_state_after_load():
    """Bug: torch cast v to the bf16 parameter dtype on load and .float() could not undo it."""
    p = torch.nn.Parameter(randn(8, 8, seed=40).bfloat16())
    opt = NorMuon([p], ns_dtype="float32")
    p.grad = randn(8, 8, seed=41).bfloat16()
    opt.step()
    saved_v = opt.state[p]["v"].clone()
    assert not torch.equal(saved_v, saved_v.bfloat16().float())  # the bug would be visible
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.state[p]["v"].dtype == torch.float32 and torch.equal(opt.state[p]["v"], saved_v)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=float("nan")), "lr"),
    (dict(lr=-1.0), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(beta2=1.5), "beta2"),
    (dict(beta2=float("inf")), "beta2"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(ns_dtype="fp8"), "ns_dtype"),
    (dict(strategy="nope"), "unknown strategy 'nope'"),
    (dict(strategy=42), "strategy must be"),
    (dict(nonfinite="ignore"), "nonfinite"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NorMuon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


@pytest.mark.parametrize("shape", [(), (7,)])
def test_vector_and_scalar_params_rejected_with_name_and_fix(shape):
    with pytest.raises(ValueError, match=r"'bias'.*AdamW"):
        NorMuon([("bias", torch.nn.Parameter(torch.randn(shape)))])


def test_five_dim_param_rejected():
    with pytest.raises(ValueError, match="2-D, 3-D"):
        Muon([torch.nn.Parameter(torch.randn(2, 2, 2, 2, 2))])


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_never_reaches_weights(policy):
    p = torch.nn.Parameter(randn(6, 4, seed=50))
    opt = NorMuon([p], nonfinite=policy, ns_dtype="float32")
    before = p.detach().clone()
    g = randn(6, 4, seed=51)
    g[2, 3] = float("inf")
    p.grad = g
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match="step skipped"):
            opt.step()
        assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_params_without_grad_are_skipped_like_torch():
    a, b = torch.nn.Parameter(randn(4, 4, seed=52)), torch.nn.Parameter(randn(4, 4, seed=53))
    opt = NorMuon([a, b], ns_dtype="float32")
    b_before = b.detach().clone()
    a.grad = randn(4, 4, seed=54)
    opt.step()
    assert torch.equal(b, b_before) and not torch.equal(a.detach(), randn(4, 4, seed=52))


# --- parameter split and combined optimizer -----------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(16, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)


def test_split_params_default_and_override():
    net = TinyNet()
    matrices, others = split_params(net.named_parameters())
    assert [n for n, _ in matrices] == ["fc.weight", "conv.weight"]
    assert {n for n, _ in others} == {"tok_emb.weight", "fc.bias", "conv.bias", "norm.weight",
                                      "norm.bias", "lm_head.weight"}
    matrices, _ = split_params(net.named_parameters(), SplitConfig(matrix_patterns=("lm_head.*",)))
    assert "lm_head.weight" in [n for n, _ in matrices]
    with pytest.raises(ValueError, match="fc.bias"):
        split_params(net.named_parameters(), SplitConfig(matrix_patterns=("fc.bias",)))


def test_build_optimizers_steps_all_params_and_round_trips():
    net = TinyNet()
    opt = build_optimizers(net)
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt.optimizers[0], NorMuon)
    assert isinstance(opt.optimizers[1], torch.optim.AdamW)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in net.named_parameters())
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_regression_mixed_dtype_error_identical_across_hash_seeds():
    """Bug: the message listed dtypes from a set, so ranks (different PYTHONHASHSEED) raised
    different texts. Errors must be identical on every rank."""
    import subprocess
    import sys

    code = ("import torch; from dist_ortho import NorMuon\n"
            "try:\n"
            "    NorMuon([('a', torch.nn.Parameter(torch.randn(4, 4))),"
            " ('b', torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))),"
            " ('c', torch.nn.Parameter(torch.randn(4, 4).bfloat16()))])\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    outputs = set()
    for seed in ("1", "2", "3", "4"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   env=env, check=True).stdout)
    assert len(outputs) == 1 and "mixed parameter dtypes" in outputs.pop()


@pytest.mark.parametrize("matrix_optimizer", ["normuon", "adamw"])
def test_regression_nan_in_adamw_grad_skips_the_whole_combined_step(matrix_optimizer):
    """Bug: NorMuon skipped a non-finite step but AdamW (embeddings, head, norms) still stepped,
    writing NaN into its weights and advancing its step count. All or none now."""
    net = TinyNet()
    opt = build_optimizers(net, OptimizerConfig(name=matrix_optimizer, ns_dtype="float32"))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net.tok_emb.weight.grad[0, 0] = float("nan")  # an AdamW parameter only
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())
    assert all(not o.state for o in opt.optimizers)
    net.tok_emb.weight.grad[0, 0] = 1.0
    opt.step()
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() and not torch.equal(before[n], p)
               for n, p in net.named_parameters())
