"""One check per optimizer hyperparameter, shared by the optimizers and the run config.

`OrthogonalizedOptimizer` (its constructor and `add_param_group`), the update rules' `validate` and
`OptimizerConfig.check` (the YAML `optimizer:` section) call these same functions, so a value one
accepts the other accepts too, and the message is the same sentence (the config puts the dotted
key in front). Each raises ValueError naming the hyperparameter:

- `check_lr`: a finite number >= 0. Zero is a legitimate learning rate (a warmup scheduler starts
  there, a frozen ablation stays there) and torch.optim accepts it too.
- `check_weight_decay`: a finite number >= 0.
- `check_beta`: a finite number in [0, 1): momentum, NorMuon's beta2, AdamW's betas (an average
  with weight 1 on the past never moves).
- `check_ns_steps`: an integer >= 1.
- `check_choice`: one of a fixed set of names (ns_form, ns_coefficients, ...), listed in the
  message.

`check_lr` and `check_weight_decay` also take a one-element floating-point tensor (torch.optim's
tensor lr): its value is read here, when a param group is added, and never in `step()`.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

__all__ = ["check_lr", "check_weight_decay", "check_beta", "check_ns_steps", "check_choice"]


def _number(name: str, value, tensor_ok: bool) -> float:
    """`value` as a float for a range check: a Python number (not a bool), or with `tensor_ok` a
    one-element floating-point tensor."""
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a number or a 0-d floating-point tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


def _nonnegative(name: str, value) -> None:
    x = _number(name, value, tensor_ok=True)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_lr(name: str, value) -> None:
    """A learning rate: a finite number >= 0 (or a one-element tensor holding one)."""
    _nonnegative(name, value)


def check_weight_decay(name: str, value) -> None:
    """A decoupled weight decay: a finite number >= 0 (or a one-element tensor holding one)."""
    _nonnegative(name, value)


def check_beta(name: str, value) -> None:
    """An averaging coefficient (momentum, beta2, AdamW's betas): a finite number in [0, 1)."""
    x = _number(name, value, tensor_ok=False)
    if not math.isfinite(x) or not 0 <= x < 1:
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")


def check_ns_steps(name: str, value) -> None:
    """Newton-Schulz iterations: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(name: str, value, choices: Collection) -> None:
    """One of `choices`, listed in the message."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
