"""An update rule is one class registered with `dist_ortho.rules.register`: the run config, the
optimizer builder and the cost model (`dist-ortho project --rule`) take it by name with no other
code change. The toy rule here is what a new file in dist_ortho/rules/ would hold: Muon scaled by a
hyperparameter of its own, with one float32 entry of state per matrix row."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from dist_ortho import rules
from dist_ortho.cli import main as cli_main
from dist_ortho.core.hparams import check_beta
from dist_ortho.core.sharding import MatrixSpec, local_tensor
from dist_ortho.optim.optimizer import Muon, NorMuon, OrthogonalizedOptimizer
from dist_ortho.optim.param_groups import OptimizerConfig, build_optimizers
from dist_ortho.profiling import costmodel
from dist_ortho.profiling.deviation import DeviationMeter
from dist_ortho.rules import registry
from dist_ortho.rules.base import UpdateRule, shape_scale
from dist_ortho.studies.config import ConfigError, apply_overrides, config_from_dict
from dist_ortho.studies.convergence import load_study

TOY = "scaled_muon_toy"


@pytest.fixture
def toy_rule(monkeypatch):
    """Registers the toy rule for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @rules.register
    class ScaledMuon(UpdateRule):
        name = TOY
        defaults = {"scale": 0.5}

        def validate(self, group):
            check_beta("scale", group["scale"])  # any shared check will do for a toy

        def init_state(self, p, layout):
            return {"steps_seen": torch.zeros(local_tensor(p).shape[0], dtype=torch.float32)}

        def state_bytes_per_row(self, spec: MatrixSpec) -> int:
            return 4

        def updates(self, groups, states, specs, results, layout, ok=None):
            out = []
            for g, s, spec, o in zip(groups, states, specs, results):
                s["steps_seen"] += 1
                out.append(o.float() * shape_scale(spec.shape) * g["scale"])
            return out

    return ScaledMuon


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 12), nn.Linear(12, 8),
                         nn.Linear(8, 16))


def _config(sets: dict) -> OptimizerConfig:
    return config_from_dict(apply_overrides({}, sets)).optimizer


def test_the_run_config_takes_a_registered_rule_and_its_hyperparameters(toy_rule):
    config = _config({"optimizer.name": TOY, "optimizer.rule_hparams": {"scale": 0.25}})
    assert config.name == TOY and config.hyperparameters_of_rule() == {"scale": 0.25}
    assert _config({"optimizer.name": TOY}).hyperparameters_of_rule() == {}  # its default
    with pytest.raises(ConfigError) as info:
        _config({"optimizer.name": TOY, "optimizer.rule_hparams": {"scale": 1.5}})
    assert info.value.key == "optimizer.rule_hparams" and "scale must be" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _config({"optimizer.name": TOY, "optimizer.rule_hparams": {"sclae": 0.1}})
    assert info.value.key == "optimizer.rule_hparams.sclae"
    assert "(its own: scale)" in str(info.value)


def test_an_unregistered_rule_is_refused_naming_the_registered_ones(toy_rule):
    with pytest.raises(ConfigError) as info:
        _config({"optimizer.name": "sign_sgd"})
    assert info.value.key == "optimizer.name" and TOY in str(info.value)


def test_build_optimizers_steps_the_registered_rule(toy_rule):
    """The toy rule with scale 1/4 and lr 0.02 moves every matrix exactly as Muon with lr 0.005
    (a power-of-two scale commutes with rounding), so the rule's update is what the step applied."""
    config = _config({"optimizer.name": TOY, "optimizer.rule_hparams": {"scale": 0.25},
                      "optimizer.ns_dtype": "float32"})
    toy_model, muon_model = _model(), _model()
    toy = build_optimizers(toy_model, config)
    muon = build_optimizers(muon_model, _config({"optimizer.name": "muon", "optimizer.lr": 0.005,
                                                 "optimizer.ns_dtype": "float32"}))
    matrix_opt = toy.optimizers[0]
    assert type(matrix_opt) is OrthogonalizedOptimizer and matrix_opt.rule.name == TOY
    assert matrix_opt.param_groups[0]["scale"] == 0.25
    assert set(toy.assignment.values()) == {TOY, "adamw"}
    for model in (toy_model, muon_model):
        torch.manual_seed(1)
        model(torch.randint(0, 16, (4,))).square().sum().backward()
    toy.step()
    muon.step()
    for (name, a), b in zip(toy_model.named_parameters(), muon_model.parameters()):
        if toy.assignment[name] == TOY:
            assert torch.equal(a, b), name
            assert float(matrix_opt.state[a]["steps_seen"].sum()) == a.shape[0]


def test_the_builtin_rules_keep_their_named_classes():
    """Checkpoints record optimizer class names: NorMuon and Muon stay NorMuon and Muon."""
    assert type(build_optimizers(_model(), OptimizerConfig()).optimizers[0]) is NorMuon
    assert type(build_optimizers(_model(), OptimizerConfig(name="muon")).optimizers[0]) is Muon


def test_the_cost_model_prices_the_registered_rule(toy_rule):
    shapes = [(96, 64), (64, 96), (4, 32, 32)]
    toy = costmodel.predict(shapes, 4, "balanced", rule=TOY)
    muon = costmodel.predict(shapes, 4, "balanced", rule="muon")
    assert toy.rule == TOY and toy.plan.ranks == muon.plan.ranks  # no reductions of its own
    rows = [sum(s.dim0_sizes[r] for s in costmodel.matrix_specs(shapes, 4)) for r in range(4)]
    assert [t.persistent_bytes - m.persistent_bytes for t, m in zip(toy.ranks, muon.ranks)] == \
        [4 * n for n in rows]


def test_dist_ortho_project_takes_the_registered_rule(toy_rule, tmp_path, capsys):
    argv = ["project", "--model", "llama-tiny", "--world-sizes", "4", "--strategies", "balanced",
            "--no-plots", "-o", str(tmp_path)]
    assert cli_main(argv + ["--rule", TOY]) == 0
    with open(tmp_path / "llama-tiny_h100.csv") as f:
        assert [row["rule"] for row in csv.DictReader(f)] == [TOY]
    assert f"# Projection: llama-tiny, {TOY}," in capsys.readouterr().out


def test_a_convergence_study_compares_the_registered_rule(toy_rule, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("run:\n  model: {preset: gpt-tiny}\nconvergence: {}\n")
    study = load_study(path, [f"convergence.optimizers={{{TOY}: {{rule_hparams: {{scale: 0.25}}}}, "
                              f"adamw: {{}}}}", f"convergence.sweep.lrs={{{TOY}: [0.01, 0.02]}}"])
    assert study.run_config(TOY, 0).optimizer.hyperparameters_of_rule() == {"scale": 0.25}
    with pytest.raises(ConfigError) as info:
        load_study(path, ["convergence.optimizers={sign_sgd: {}}"])
    assert info.value.key == "convergence.optimizers.sign_sgd" and TOY in str(info.value)


def test_deviation_refuses_a_rule_without_a_reference_rather_than_using_muons(toy_rule):
    opt = OrthogonalizedOptimizer([nn.Parameter(torch.ones(4, 3))], rule=TOY)
    with pytest.raises(ValueError, match=f"reference of update rule '{TOY}'"):
        DeviationMeter([opt])
