"""Every Newton-Schulz setting the optimizer takes is a key of the run config's `optimizer:`
section, and a value set there (in YAML or with --set) reaches the optimizer's param groups and
the plan it runs; a bad value is one line naming the key and the choices, exit 2."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_ortho.cli import main as cli_main
from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.optim.param_groups import OptimizerConfig, build_optimizers
from dist_ortho.studies.config import ConfigError, load_config
from dist_ortho.studies.preflight import check_launch

TINY = Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny.yaml"


def test_every_ns_keyword_of_the_optimizer_is_a_config_key():
    ns_keywords = {name for name in inspect.signature(OrthogonalizedOptimizer).parameters
                   if name.startswith("ns_")}
    assert ns_keywords == {"ns_steps", "ns_dtype", "ns_coefficients", "ns_form"}
    assert ns_keywords <= {f.name for f in fields(OptimizerConfig)}


@pytest.mark.parametrize("name", ["normuon", "muon"])
def test_ns_settings_from_set_reach_the_param_groups_and_the_plan(name, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optimizer:\n  ns_dtype: float32\n  ns_form: gram\n")
    config = load_config(yaml_file, [f"optimizer.name={name}", "optimizer.ns_steps=3",
                                     "optimizer.ns_coefficients=polar_express"])
    assert config.optimizer.ns_form == "gram"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Linear(24, 8), nn.Linear(8, 4))
    opt = build_optimizers(model, config.optimizer).optimizers[0]
    group = opt.param_groups[0]
    assert (group["ns_form"], group["ns_steps"], group["ns_coefficients"], group["ns_dtype"]) == \
        ("gram", 3, "polar_express", "float32")
    specs = opt.plan().matrices
    assert specs and all(s.ns_form == "gram" and s.ns_steps == 3 for s in specs)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()  # and the step runs Gram Newton-Schulz on them
    assert all("momentum_buffer" in opt.state[p] for p in group["params"])


def test_a_bad_ns_form_is_one_line_naming_the_key_and_the_choices(capsys):
    assert cli_main(["run", str(TINY), "--check", "--set", "optimizer.ns_form=bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dist-ortho run: error: optimizer.ns_form: ns_form must be one of standard, "
                   "gram, got 'bad'"]


def test_gram_on_an_hsdp_mesh_with_spread_replicas_is_refused_before_launch():
    """The mesh path plans standard Newton-Schulz only; the ranks would refuse it one by one."""
    config = load_config(TINY, ["optimizer.ns_form=gram", "train.replicate=2"])
    with pytest.raises(ConfigError) as info:
        check_launch(config, 4)
    assert info.value.key == "optimizer.ns_form" and "replicas repeat" in str(info.value)
    check_launch(load_config(TINY, ["optimizer.ns_form=gram", "train.replicate=2",
                                    "optimizer.replicas=repeat"]), 4)
    check_launch(load_config(TINY, ["optimizer.ns_form=gram"]), 4)
