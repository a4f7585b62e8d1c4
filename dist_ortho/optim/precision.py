"""Training with 16-bit parameters: momentum kept in float32, and a warning when updates round away.

Two things go wrong when the optimizer's parameters are bfloat16:
- the momentum buffer, a running average of gradients, loses most of its bits when it is stored
  like the parameter; so by default (`momentum_dtype=None`) it is float32 for 16-bit parameters
  (the step widens each gradient once and casts the direction back to the parameter's dtype for
  Newton-Schulz, whose plans move the parameter's dtype);
- the update itself cannot land. An orthogonalized update has entries of RMS about
  lr * max(1, m/n) ** 0.5 / sqrt(max(m, n)), while a bf16 weight only changes when the step is at
  least half its rounding step, |w| * 2 ** -8. With std-0.02 weights of a 1024 x 1024 matrix and
  lr 2e-3 that is 6e-5 against 7.8e-5: about half the entries do not move at all, every step.
  No optimizer state can fix that: the weights themselves must be float32. FSDP2 does exactly
  that with `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`:
  float32 sharded parameters (what the optimizer updates), bf16 for forward and backward. So the
  optimizer warns once, at construction, when a 16-bit parameter's expected update is below half
  its rounding step, and names that policy.
"""

from __future__ import annotations

import math
import warnings

import torch

from dist_ortho.core.newton_schulz import matrix_view_shape
from dist_ortho.core.sharding import local_tensor

__all__ = ["check_momentum_dtype", "momentum_dtype_for", "update_rms", "warn_if_updates_round_away",
           "SIXTEEN_BIT"]

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
_NAMES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def check_momentum_dtype(value) -> torch.dtype | None:
    """None, a floating torch.dtype or its name; ValueError otherwise."""
    if value is None:
        return None
    dtype = _NAMES.get(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"momentum_dtype must be None or one of {sorted(_NAMES)} (or the "
                         f"matching torch.dtype), got {value!r}")
    return dtype


def momentum_dtype_for(param_dtype: torch.dtype, momentum_dtype: torch.dtype | None) -> torch.dtype:
    """The momentum buffer's dtype: as asked, else float32 for 16-bit parameters, else theirs."""
    if momentum_dtype is not None:
        return momentum_dtype
    return torch.float32 if param_dtype in SIXTEEN_BIT else param_dtype


def update_rms(shape, lr: float) -> float:
    """Expected RMS of an update entry: lr * max(1, m/n) ** 0.5 / sqrt(max(m, n)) (the entries of
    an m x n matrix with unit singular values have RMS 1 / sqrt(max(m, n)))."""
    view = matrix_view_shape(tuple(shape))
    m, n = view[-2], view[-1]
    return lr * max(1.0, m / n) ** 0.5 / math.sqrt(max(m, n))


def warn_if_updates_round_away(entries, names: dict, rule) -> None:
    """One RuntimeWarning when a 16-bit parameter's expected update (`update_rms`) is below half
    the rounding step at its weights' RMS (read once here, from this rank's shard; skipped for
    tensor learning rates, meta tensors and empty shards)."""
    for group, p in entries:
        lr = group["lr"]
        local = local_tensor(p)
        if (p.dtype not in SIXTEEN_BIT or isinstance(lr, torch.Tensor) or local.is_meta
                or local.numel() == 0):
            continue
        w_rms = local.detach().float().square().mean().sqrt().item()
        half_step = w_rms * torch.finfo(p.dtype).eps / 2
        u_rms = update_rms(p.shape, lr)
        if u_rms < half_step:
            warnings.warn(
                f"{rule.name}: {str(p.dtype).replace('torch.', '')} parameter "
                f"{names[id(p)]!r} (weights RMS {w_rms:.3g}) takes updates of RMS about "
                f"{u_rms:.3g} at lr {lr:g}, below half its rounding step ({half_step:.3g}): most "
                f"entries will not change. Keep float32 parameters and compute in bf16 with "
                f"FSDP2's MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                f"reduce_dtype=torch.float32), or raise lr.", RuntimeWarning, stacklevel=3)
            return
