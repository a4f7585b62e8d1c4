"""The run config (`optimizer:` section) and the optimizer's constructor accept and refuse the same
values of every hyperparameter both take, with the same sentence (the config puts its key in
front): both call the one check of `dist_ortho.core.hparams` (or the rule's `validate`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.optim.param_groups import OptimizerConfig
from dist_ortho.studies.config import ConfigError, apply_overrides, config_from_dict

VALUES = {
    "lr": [0.0, 0, 1e-3, 5.0, -1e-3, math.nan, math.inf],
    "weight_decay": [0.0, 0.1, -0.1, math.inf],
    "momentum": [0.0, 0.95, 1.0, -0.1, 1.5, math.nan],
    "beta2": [0.0, 0.95, 1.0, -0.5],
    "ns_steps": [1, 5, 0, -3],
    "ns_coefficients": ["jordan", "polar_express", "newton"],
    "ns_form": ["standard", "gram", "fast"],
}
CASES = [(name, value) for name, values in VALUES.items() for value in values]


def _config_error(name, value) -> str | None:
    try:
        config_from_dict(apply_overrides({}, {f"optimizer.{name}": value}))
    except ConfigError as exc:
        assert exc.key == f"optimizer.{name}"
        return exc.message
    return None


def _optimizer_error(name, value) -> str | None:
    try:
        OrthogonalizedOptimizer([nn.Parameter(torch.ones(4, 3))], rule="normuon", **{name: value})
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_config_and_optimizer_agree(name, value):
    assert _config_error(name, value) == _optimizer_error(name, value)


def test_the_cases_accept_and_refuse():
    """Not vacuous: each hyperparameter has accepted and refused values here."""
    for name, values in VALUES.items():
        verdicts = {_optimizer_error(name, v) is None for v in values}
        assert verdicts == {True, False}, name


def test_a_zero_learning_rate_is_accepted_as_torch_optim_accepts_it():
    """lr = 0: a warmup scheduler's first step, a frozen ablation; torch.optim takes lr >= 0."""
    torch.optim.AdamW([nn.Parameter(torch.ones(2))], lr=0.0)
    assert OptimizerConfig(lr=0.0, adamw_lr=0.0).check() is None
    OrthogonalizedOptimizer([nn.Parameter(torch.ones(4, 3))], lr=torch.tensor(0.0))
