"""Single-process foundation: Newton-Schulz, the reference update, the optimizers and their
errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_ortho import (CombinedOptimizer, Muon, NorMuon, NSConfig, OptimizerConfig,
                        ReferenceHParams, SplitConfig, build_optimizers, ns_flops, reference_step,
                        split_params)
from dist_ortho.core.newton_schulz import (POLAR_EXPRESS_COEFFICIENTS, matrix_view_shape,
                                           newton_schulz)
from dist_ortho.optim.reference import normuon_update
from tests.devices import TEST_DEVICE
from tests.tolerances import (C, Trajectory, assert_within, ns_error, ns_scale_sensitivity, report,
                              unit_roundoff, update_error)

U32 = unit_roundoff(torch.float32)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator(TEST_DEVICE).manual_seed(seed))


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


def assert_ns_close(a: torch.Tensor, b: torch.Tensor, shape, input_change: float = 0.0) -> None:
    """Two float32 NS results of the same input by different kernel paths (a transposed operand, a
    batched matmul) differ by at most twice the derived path error, normwise (tests/tolerances.py,
    item 1); an input whose scale differs by a relative `input_change` moves the output by at most
    ns_scale_sensitivity() times that on top."""
    bound = 2 * C * ns_error(shape, torch.float32) + ns_scale_sensitivity() * input_change
    err = float((a - b).norm() / b.norm())
    report("foundation NS pairs", [err / bound])
    assert err <= bound, (err, bound)


@pytest.mark.exactness
def test_ns_tall_is_transpose_of_wide():
    G = randn(40, 24, seed=4)
    tall = newton_schulz(G, compute_dtype=torch.float32)
    wide = newton_schulz(G.T.contiguous(), compute_dtype=torch.float32)
    assert_ns_close(tall, wide.T, (40, 24))


@pytest.mark.exactness
def test_ns_batched_equals_one_by_one():
    G = randn(3, 12, 20, seed=5)
    batched = newton_schulz(G, compute_dtype=torch.float32)
    for i in range(3):
        assert_ns_close(batched[i], newton_schulz(G[i], compute_dtype=torch.float32), (12, 20))


@pytest.mark.exactness
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_ns_is_scale_invariant_while_norm_dominates_eps(scale):
    # normalization happens in float32 before the bf16 cast, so the input's scale is irrelevant
    # (until ||G|| approaches eps = 1e-7, where the paper's eps takes over by design): G / (||G||
    # + eps) changes scale by eps / ||G|| (6e-6 at scale 1e-3), the rest is rounding
    G = randn(16, 16, seed=6)
    assert_ns_close(newton_schulz(G * scale, compute_dtype=torch.float32),
                    newton_schulz(G, compute_dtype=torch.float32), (16, 16),
                    input_change=1e-7 / float((G * scale).norm()))


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

def paper_transcription(G, M, v):
    """The official normuon.py step for a 2-D matrix, written out without our helpers; returns
    (update, M, v) and leaves its arguments alone."""
    M_ref, v_ref = M.clone(), v.clone()
    M_ref.lerp_(G, 1 - 0.95)
    U = G.lerp(M_ref, 0.95)
    O = newton_schulz(U, 5, torch.float32).float()
    vnorm = O.norm(dim=(-2, -1), keepdim=True)
    v_ref.lerp_(torch.mean(O * O, dim=-1), 1 - 0.95)
    O = O * (1 / (v_ref.sqrt() + 1e-10)).unsqueeze(-1)
    O = O * (vnorm / (O.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    O = O * max(1, G.shape[0] / G.shape[1]) ** 0.5
    return O, M_ref, v_ref


def assert_same_state(M, M_ref, v, v_ref):
    """Momentum and second moment after one step: the same elementwise ops on the same bits on
    both sides (lerp; v's row mean of the same NS output), so they may differ by a few roundings
    of u each: rtol C * 4u, no atol (v may be small). Two statements: each must run."""
    torch.testing.assert_close(M, M_ref, rtol=C * 4 * U32, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=C * 4 * U32, atol=0)


@pytest.mark.exactness
def test_reference_normuon_matches_the_paper_formula_written_out():
    """Transcribes the official normuon.py step by step for a 2-D matrix, without our helpers."""
    G, M, v = randn(12, 8, seed=9), randn(12, 8, seed=10), torch.rand(12, generator=torch.Generator(TEST_DEVICE).manual_seed(11))
    hp = ReferenceHParams(ns=NSConfig(dtype="float32"))
    O, M_ref, v_ref = paper_transcription(G, M, v)
    ours = normuon_update(G, M, v, hp)
    # same NS call and the same norms on both sides; they differ only by 1/x-then-multiply vs
    # divide and the order of the final products: a few roundings per element
    torch.testing.assert_close(ours, O, rtol=C * 4 * U32, atol=0)
    assert_same_state(M, M_ref, v, v_ref)


@pytest.mark.exactness
def test_regression_v_is_compared_not_skipped():
    """Bug: the test above ended in `assert_close(M, M_ref) and assert_close(v, v_ref)`;
    assert_close returns None, so `and` skipped the check of v. A wrong v (here the v of a
    missing or doubled lerp, or one rounding-scale bigger than allowed) must fail, with M right."""
    G, M, v = randn(12, 8, seed=9), randn(12, 8, seed=10), torch.rand(12, generator=torch.Generator(TEST_DEVICE).manual_seed(11))
    _, M_ref, v_ref = paper_transcription(G, M, v)
    normuon_update(G, M, v, ReferenceHParams(ns=NSConfig(dtype="float32")))
    assert_same_state(M, M_ref, v, v_ref)  # the right state passes
    O = newton_schulz(G.lerp(M_ref, 0.95), 5, torch.float32)
    for wrong_v in (v_ref.clone().lerp_(torch.mean(O * O, dim=-1), 1 - 0.95),  # lerped twice
                    torch.rand(12, generator=torch.Generator(TEST_DEVICE).manual_seed(11)),  # never lerped
                    v_ref * (1 + C * 16 * U32)):  # 4x the allowed rounding
        with pytest.raises(AssertionError):
            assert_same_state(M, M_ref, wrong_v, v_ref)
    with pytest.raises(AssertionError):  # and M is still checked on its own
        assert_same_state(M * (1 + 1e-3), M_ref, v, v_ref)


@pytest.mark.exactness
def test_reference_update_keeps_muon_norm_before_shape_scale():
    G = randn(16, 16, seed=12)
    hp = ReferenceHParams(ns=NSConfig(dtype="float32"))
    upd = normuon_update(G, torch.zeros(16, 16), torch.zeros(16), hp)
    O = newton_schulz(G.lerp(torch.zeros(16, 16).lerp(G, 0.05), 0.95), 5, torch.float32)
    # same NS call; the update's norm is f * ||O_hat|| / ||O_hat||: two Frobenius norms of 256
    # squares and a few roundings (tests/tolerances.py, item 2)
    rel = C * (2 * 16 + 10) * U32
    assert upd.norm() == pytest.approx(O.norm().item(), rel=rel)


# --- optimizers vs reference --------------------------------------------------------------------

SHAPES = [(12, 8), (8, 12), (4, 6, 5), (6, 3, 3, 3)]
# the exactness runs add a matrix with a near-dead neuron: its gradient row is 1e-6 of the
# others, so its second moment v is ~1e-11 (sqrt(v) ~ 5e-6) and ROW_EPS (1e-10) matters to ~3e-5
# of that row; an epsilon bug (1e-10 -> 1e-6) moves it by ~20% instead of hiding in rounding (on
# ordinary rows it changes the update by ~2e-6, less than float32 Newton-Schulz's own rounding)
EXACT_SHAPES = SHAPES + [(16, 32)]
DEAD_ROW = (4, 5, 1e-6)  # parameter index, row, scale


def exact_grads(step: int) -> list[torch.Tensor]:
    grads = [randn(*s, seed=100 * step + i) for i, s in enumerate(EXACT_SHAPES)]
    index, row, scale = DEAD_ROW
    grads[index][row] *= scale
    return grads


def run_reference(rule: str, nesterov: bool, weight_decay: float, steps: int = 4,
                  ns_dtype: str = "float32", dtype=torch.float32):
    """The reference run of the exactness tests: its parameters and the sizes of its trajectory."""
    ref = [randn(*s, seed=20 + i).to(dtype) for i, s in enumerate(EXACT_SHAPES)]
    hp = ReferenceHParams(weight_decay=weight_decay, nesterov=nesterov, ns=NSConfig(dtype=ns_dtype))
    trajectory = Trajectory(ref, hp.lr, weight_decay)
    state: dict = {}
    for step in range(steps):
        reference_step(ref, [g.to(dtype) for g in exact_grads(step)], state, hp, rule)
        trajectory.record(ref)
    return ref, trajectory


def run_optimizer(rule: str, nesterov: bool, weight_decay: float, strategy: str,
                  steps: int = 4, ns_dtype: str = "float32", mode=None):
    """The same run through the optimizer (`mode`: a context each step runs in)."""
    from contextlib import nullcontext

    params = [torch.nn.Parameter(randn(*s, seed=20 + i)) for i, s in enumerate(EXACT_SHAPES)]
    cls = NorMuon if rule == "normuon" else Muon
    opt = cls(params, lr=0.02, weight_decay=weight_decay, nesterov=nesterov, ns_dtype=ns_dtype,
              strategy=strategy)
    for step in range(steps):
        for p, g in zip(params, exact_grads(step)):
            p.grad = g
        with mode() if mode is not None else nullcontext():
            opt.step()
    return params


def exactness_bounds(trajectory: Trajectory, rule: str, ns_dtype: str = "float32"):
    return trajectory.bounds([update_error(s, rule, ns_dtype) for s in EXACT_SHAPES])


@pytest.mark.exactness
@pytest.mark.parametrize("rule", ["normuon", "muon"])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.1), (True, 0.05)])
@pytest.mark.parametrize("strategy", ["replicated", "round_robin", "allgather_scatter",
                                      "bucketed_async", "balanced"])
def test_optimizer_equals_reference_over_steps(rule, nesterov, weight_decay, strategy):
    """||p - r||_F within the float32 bound of tests/tolerances.py, which the rounding of any
    kernel path respects (the old `<= 1e-6 of the displacement` was u-times-||W|| on one CPU)."""
    ref, trajectory = run_reference(rule, nesterov, weight_decay)
    params = run_optimizer(rule, nesterov, weight_decay, strategy)
    assert_within(params, ref, exactness_bounds(trajectory, rule), (rule, strategy),
                  family=f"foundation optimizer vs reference ({rule})")


@pytest.mark.exactness
@pytest.mark.parametrize("rule", ["normuon", "muon"])
def test_float32_reference_is_within_the_bound_of_a_float64_run(rule):
    """The bound is not a difference between two float32 runs that may share their rounding: the
    float32 reference is within it of the same run with float64 weights and Newton-Schulz (whose
    own error is ~1e-13; the reference normalizes in float32 in both)."""
    ref32, trajectory = run_reference(rule, True, 0.05)
    ref64, _ = run_reference(rule, True, 0.05, ns_dtype="float64", dtype=torch.float64)
    assert_within(ref32, ref64, exactness_bounds(trajectory, rule), rule,
                  family=f"foundation float32 vs float64 reference ({rule})")


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


@pytest.mark.slow
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
    writing NaN into its weights and advancing its step count: all or none."""
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
