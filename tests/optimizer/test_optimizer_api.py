"""The optimizer's public surface: update rules, NS settings, torch schedulers, repr, the parameter
split by role. Regression tests are named after the bug they pin."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dist_ortho import (CombinedOptimizer, Muon, NorMuon, NSConfig, OptimizerConfig,
                        OrthogonalizedOptimizer, ReferenceHParams, SplitConfig, build_optimizers,
                        reference_step, rules, split_model_params, split_params, strategies)
from dist_ortho.core.newton_schulz import newton_schulz, ns_flops
from dist_ortho.core.orthogonalizer import Orthogonalizer
from dist_ortho.models import build_model
from dist_ortho.optim.optimizer import plan_step
from dist_ortho.profiling import costmodel
from dist_ortho.rules.base import UpdateRule, shape_scale
from dist_ortho.strategies.base import ExecContext
from dist_ortho.testing.processes import spawn
from tests.devices import TEST_DEVICE
from tests.strategies import dist_cases
from tests.tolerances import C, Trajectory, assert_within, ns_error, unit_roundoff, update_error


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator(TEST_DEVICE).manual_seed(seed))


# --- NS settings --------------------------------------------------------------------------------

@pytest.mark.exactness
def test_regression_mixed_ns_coefficients_batched_together_hit_an_assert():
    """Bug: two param groups differing only in ns_coefficients passed construction, were batched
    into one NS call and hit `assert ... "a batch mixes NS settings"` mid-step. Now batches hold
    one NS config and every group matches the reference with its own settings."""
    settings = [("jordan", 5), ("polar_express", 5), ("jordan", 3), ("polar_express", 5)]
    params = [nn.Parameter(randn(8, 6, seed=i)) for i in range(4)]
    groups = [dict(params=[p], ns_coefficients=c, ns_steps=s)
              for p, (c, s) in zip(params, settings)]
    ref = [p.detach().clone() for p in params]
    for name in ("balanced", "bucketed_async", "allgather_scatter"):
        for p, r in zip(params, ref):
            p.data.copy_(r)
        opt = NorMuon([dict(g) for g in groups], ns_dtype="float32", strategy=name)
        expect = [r.clone() for r in ref]
        states = [dict() for _ in params]
        hparams = [ReferenceHParams(ns=NSConfig(steps=s, dtype="float32", coefficients=c))
                   for c, s in settings]
        trajectory = Trajectory(expect, lr=hparams[0].lr, weight_decay=hparams[0].weight_decay)
        for step in range(2):
            grads = [randn(8, 6, seed=100 * step + i) for i in range(4)]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for i, hp in enumerate(hparams):
                reference_step([expect[i]], [grads[i]], states[i], hp)
            trajectory.record(expect)
        # the float32 bound of tests/tolerances.py, each group with its own NS step count
        bounds = trajectory.bounds([update_error((8, 6), "normuon", "float32", s)
                                    for _, s in settings])
        assert_within([p.detach() for p in params], expect, bounds, name,
                      family="optimizer API mixed NS settings")
        # FLOPs are counted per group's own step count
        assert opt.executed_ns_flops == 2 * opt.plan().mine.ns_flops
    # the batching itself (sharded matrices; plain tensors at P = 1 are never batched)
    specs = costmodel.matrix_specs([(8, 6)] * 4, 1)
    configs = [NSConfig(s, "float32", c) for c, s in settings]
    ctx = ExecContext(None, 0, 1, Orthogonalizer(configs), torch.float32, torch.device("cpu"))
    full = {k: randn(8, 6, seed=50 + k) for k in range(4)}
    balanced = strategies.build("balanced")
    got = balanced.execute(balanced.plan(specs, 1, 0), [full[k] for k in range(4)], ctx)
    for k, cfg in enumerate(configs):
        want = newton_schulz(full[k], cfg.steps, torch.float32, cfg.coefficients)
        # a batched matmul against single ones: two kernel paths, twice the derived NS path
        # error normwise (tests/tolerances.py, item 1)
        bound = 2 * C * ns_error((8, 6), torch.float32, cfg.steps)
        assert float((got[k] - want).norm() / want.norm()) <= bound, (k, cfg)
    assert ctx.orthogonalizer.flops.total == sum(ns_flops((8, 6), c.steps) for c in configs)


def test_regression_mixed_ns_settings_at_p2_raise_or_run_never_hang():
    """Bug: at P > 1 only the owner of a mixed batch raised and the other ranks hung in the next
    collective. Now mixed settings run correctly on every strategy, and the one mix that cannot
    share a step (ns_dtype: one buffer dtype) raises at construction on every rank."""
    names = strategies.available_exact()
    results = spawn(dist_cases.mixed_ns_worker, 2, args=(names,), timeout_s=60)
    for rank_result in results:
        for name in names:
            assert max(rank_result[name]) < 1e-4, (name, rank_result[name])
        assert "ns_dtype" in rank_result["mixed_dtype_error"]


def test_regression_ns_dtype_rejected_torch_dtypes():
    """Bug: ns_dtype=torch.float32 raised ValueError; torch users write dtypes that way."""
    assert NSConfig(dtype=torch.float32) == NSConfig(dtype="float32")
    assert NSConfig(dtype=torch.bfloat16).torch_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="ns_dtype"):
        NSConfig(dtype=torch.int32)
    w = nn.Parameter(randn(8, 6))
    for cls in (NorMuon, Muon):
        opt = cls([w], ns_dtype=torch.float32)
        assert opt.param_groups[0]["ns_dtype"] == "float32"
        assert opt.plan().matrices[0].out_dtype == torch.float32
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    opt = build_optimizers(net, OptimizerConfig(ns_dtype=torch.float32))
    assert opt.optimizers[0].param_groups[0]["ns_dtype"] == "float32"


def test_nsconfig_defaults_to_auto_like_the_optimizers():
    assert NSConfig().dtype == "auto"
    assert NSConfig().torch_dtype("cpu") == torch.float32
    assert NorMuon([nn.Parameter(randn(4, 4))]).param_groups[0]["ns_dtype"] == "auto"


# --- update rules -------------------------------------------------------------------------------

def test_rules_registry_and_one_optimizer_class():
    assert rules.available() == ["muon", "normuon"]
    w = nn.Parameter(randn(8, 6))
    assert isinstance(NorMuon([w]), OrthogonalizedOptimizer) and NorMuon([w]).rule.name == "normuon"
    assert Muon([w]).rule.name == "muon"
    opt = OrthogonalizedOptimizer([w], rule="normuon", beta2=0.9)
    assert opt.param_groups[0]["beta2"] == 0.9
    with pytest.raises(ValueError, match="beta2"):
        OrthogonalizedOptimizer([w], rule="muon", beta2=0.9)
    with pytest.raises(ValueError, match="unknown update rule"):
        OrthogonalizedOptimizer([w], rule="adamuon")


@pytest.mark.exactness
def test_a_third_rule_is_one_class():
    """Muon with a different scale, written as a rule: state, reductions and update from it."""

    class ScaledMuon(UpdateRule):
        name = "scaled_muon"
        defaults = {"scale": 0.2}

        def updates(self, groups, states, specs, results, layout):
            return [o.float() * g["scale"] * math.sqrt(max(spec.view_shape[-2:]))
                    for g, spec, o in zip(groups, specs, results)]

    w = nn.Parameter(randn(8, 6))
    v = nn.Parameter(w.detach().clone())
    opt = OrthogonalizedOptimizer([w], rule=ScaledMuon(), ns_dtype="float32", lr=0.1)
    ref = Muon([v], ns_dtype="float32", lr=0.1)
    w.grad, v.grad = randn(8, 6, seed=3), randn(8, 6, seed=3)
    opt.step()
    ref.step()
    # same direction, scaled by 0.2 * sqrt(8) / shape_scale
    k = 0.2 * math.sqrt(8) / shape_scale((8, 6))
    before = randn(8, 6)
    # the same NS on both sides; they differ by the rounding of the scale products (a few u of
    # the update) and of each parameter update (u |W| per side, and k u |v| from scaling v's side)
    u = unit_roundoff(torch.float32)
    w, v = w.detach(), v.detach()
    bound = C * u * (float(w.norm()) + k * float(v.norm()) + 4 * float((w - before).norm()))
    assert float(((w - before) - k * (v - before)).norm()) <= bound


def test_optimizer_and_cost_model_ask_the_same_plan():
    specs = costmodel.matrix_specs([(16, 8), (8, 16), (3, 4, 4)], 4)
    for rule in ("normuon", "muon"):
        a = costmodel.predict_plan(specs, 4, strategies.build("balanced"), rule)
        b = plan_step(strategies.build("balanced"), specs, 4, 0, rule)
        assert [c.comm for c in a.ranks] == [c.comm for c in b.ranks]
        phases = [c.phase for c in a.ranks[0].comm]
        own = ["nonfinite_check", "normalize"] if rule == "normuon" else ["nonfinite_check"]
        assert phases[-len(own):] == own
        assert all(c.axis == "shard" for c in a.ranks[0].comm)


# --- CombinedOptimizer as a torch optimizer -----------------------------------------------------

def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-tiny", seq_len=8, n_layers=1, d_model=32)


def _schedule(opt, warmup=2, total=10):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(model, opt, sched, steps, start):
    for step in range(start, start + steps):
        g = torch.Generator(TEST_DEVICE).manual_seed(step)
        tokens = torch.randint(0, 256, (2, 9), generator=g)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_regression_combined_optimizer_not_driven_by_lr_scheduler():
    """Bug: CombinedOptimizer was no torch.optim.Optimizer, so LambdaLR refused it. Now its
    param_groups are the inner optimizers' own dicts: the scheduler sets their lrs, and optimizer
    + scheduler state round-trip through state_dict to an exact resume."""
    model = _tiny_gpt()
    opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32", lr=0.02, adamw_lr=1e-3))
    assert isinstance(opt, torch.optim.Optimizer)
    assert all(any(g is h for h in opt.param_groups) for o in opt.optimizers
               for g in o.param_groups)
    sched = _schedule(opt)
    matrix_opt, adamw = opt.optimizers
    assert matrix_opt.param_groups[0]["lr"] == pytest.approx(0.01)  # warmup step 0: 1/2
    assert adamw.param_groups[0]["lr"] == pytest.approx(5e-4)
    _train(model, opt, sched, 3, 0)
    assert matrix_opt.param_groups[0]["lr"] == pytest.approx(0.02 * _factor_at(3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    _train(model, opt, sched, 3, 3)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2 = _tiny_gpt(seed=1)  # different weights until loaded
    model2.load_state_dict(saved[0])
    opt2 = build_optimizers(model2, OptimizerConfig(ns_dtype="float32", lr=0.02, adamw_lr=1e-3))
    sched2 = _schedule(opt2)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert sched2.last_epoch == 3 and opt2.optimizers[1].param_groups[0]["lr"] == pytest.approx(
        1e-3 * _factor_at(3))
    _train(model2, opt2, sched2, 3, 3)
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), expected[n]), n
    with pytest.raises(ValueError, match="optimizers"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def _factor_at(step, warmup=2, total=10):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_regression_repr_showed_an_object_address():
    """Bug: repr(opt) was `<...CombinedOptimizer object at 0x...>`."""
    model = _tiny_gpt()
    opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"), strategy="balanced")
    text = repr(opt)
    assert "object at 0x" not in text
    assert "strategy=balanced" in text and "NorMuon(rule=normuon" in text and "AdamW" in text
    n_matrix = len(opt.optimizers[0].param_groups[0]["params"])
    assert f"{n_matrix} params, lr=0.02" in text and "beta2=0.95" in text
    assert "batch_same_shape=True" in text


# --- the parameter split ------------------------------------------------------------------------

class Regressor(nn.Module):
    """A generic network: no embedding, no name the patterns know; its output layer is (1, 64)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.hidden = nn.Linear(64, 64)
        self.out = nn.Linear(64, 1)


class Tagger(nn.Module):
    """Embedding and head under names the patterns do not match, head tied to the embedding."""

    def __init__(self, tied: bool):
        super().__init__()
        self.tokens = nn.Embedding(32, 16)
        self.mix = nn.Linear(16, 16, bias=False)
        self.proj = nn.Linear(16, 32, bias=False)
        if tied:
            self.proj.weight = self.tokens.weight


class WithOutputEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.decoder = nn.Linear(8, 8, bias=False)  # the head, though not last nor "head"-named
        self.b = nn.Linear(8, 8, bias=False)

    def get_output_embeddings(self):
        return self.decoder


def test_regression_generic_output_layer_went_to_normuon():
    """Bug: split_params worked by name only, so a generic model's (1, 64) output layer (and
    embeddings or heads under other names) went to NorMuon. Now by role: nn.Embedding modules,
    get_output_embeddings(), or the last projection to the vocabulary / the last nn.Linear."""
    matrices, others = split_model_params(Regressor())
    assert [n for n, _ in matrices] == ["inp.weight", "hidden.weight"]
    assert "out.weight" in [n for n, _ in others]
    assert [n for n, _ in split_params(Regressor().named_parameters())[0]] == [
        "inp.weight", "hidden.weight", "out.weight"]  # the name-only form is unchanged

    for tied in (False, True):
        matrices, others = split_model_params(Tagger(tied))
        assert [n for n, _ in matrices] == ["mix.weight"]
        names = [n for n, _ in others]
        assert names == (["tokens.weight"] if tied else ["tokens.weight", "proj.weight"])

    matrices, _ = split_model_params(WithOutputEmbeddings())
    assert [n for n, _ in matrices] == ["a.weight", "b.weight"]
    # name patterns stay overrides
    matrices, _ = split_model_params(Regressor(), SplitConfig(matrix_patterns=("out.weight",)))
    assert "out.weight" in [n for n, _ in matrices]


def test_build_optimizers_records_which_parameter_went_where():
    opt = build_optimizers(Tagger(tied=False))
    assert opt.assignment == {"tokens.weight": "adamw", "mix.weight": "normuon",
                              "proj.weight": "adamw"}
    text = opt.describe()
    assert "embedding" in text and "output head" in text and "hidden matrix" in text
    gpt = build_optimizers(_tiny_gpt(), OptimizerConfig(name="muon"))
    assert gpt.assignment["blocks.0.attn.q_proj.weight"] == "muon"
    assert gpt.assignment["tok_emb.weight"] == gpt.assignment["lm_head.weight"] == "adamw"


def test_combined_optimizer_by_hand_still_works():
    w, b = nn.Parameter(randn(8, 6)), nn.Parameter(torch.zeros(6))
    opt = CombinedOptimizer([NorMuon([w], ns_dtype="float32"), torch.optim.AdamW([b])])
    w.grad, b.grad = randn(8, 6, seed=1), torch.ones(6)
    opt.step()
    assert opt.state[w]["momentum_buffer"].shape == (8, 6) and "exp_avg" in opt.state[b]
    assert "no parameter assignment" in opt.describe()
