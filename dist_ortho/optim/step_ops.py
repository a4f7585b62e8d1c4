"""The element-wise parts of an optimizer step, as a few `torch._foreach_*` ops per param group.

Each function takes one param group's tensors as lists and issues the same handful of ops
whatever the number of matrices: on a GPU every op is a kernel launch, and issuing one per matrix
is what made a step's host time grow with the model (see `dist_ortho.core.batching` for the
phases that stack tensors instead).

Conventions shared by all of them:
- hyperparameters (`momentum`, `lr`, `weight_decay`) may be Python floats or 0-d tensors on the
  device; a tensor is never read on the host (no `.item()`, no Python `if` on it): it enters the
  ops as a tensor operand;
- `ok`: an optional 0-d bool tensor on the device. When given, a False step changes nothing, the
  state and the weights keep every bit, decided on the device by `torch.where`; a True step is
  bitwise the step without `ok`. The masks select values rather than multiply by 0, so NaN/Inf
  gradients of a skipped step never reach the state.

`momentum_directions` updates the momentum buffers and returns the Newton-Schulz inputs;
`apply_updates` writes `p <- p (1 - lr wd) - lr u`; `nonfinite_count` is the non-finite check's
local reduction (one op for any number of tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["momentum_directions", "apply_updates", "nonfinite_count"]

Hyper = float | torch.Tensor


def _per_tensor(value: Hyper, n: int):
    """A hyperparameter as a `_foreach_*` weight: a Python number as is, a tensor as a list (the
    list overloads take tensors as operands; the scalar overloads would read one on the host)."""
    return [value] * n if isinstance(value, torch.Tensor) else value


def momentum_directions(bufs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        steps: Sequence[torch.Tensor], momentum: Hyper, nesterov: bool,
                        ok: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """One param group's momentum: buf <- lerp(buf, g, 1 - momentum) in place, step += 1; returns
    the directions lerp(g, buf, momentum) (Nesterov) or buf. `bufs` may be of a wider dtype than
    `grads` (momentum_dtype float32 for bf16 parameters): gradients are widened, and directions
    are returned in `out_dtype` (default: the buffers' dtype), one cast per tensor in that case.
    `steps`: the 0-d step counters (on `ok`'s device when `ok` is given)."""
    n = len(bufs)
    if ok is None:
        torch._foreach_add_(list(steps), 1)
    else:
        torch._foreach_add_(list(steps), [ok.to(torch.float32)] * n)
    gs = list(grads)
    if n and gs[0].dtype != bufs[0].dtype:
        gs = [g.to(b.dtype) for g, b in zip(gs, bufs)]
    if ok is not None:  # lerp(b, b, w) is b exactly: a skipped step leaves every buffer as it was
        gs = [torch.where(ok, g, b) for g, b in zip(gs, bufs)]
    torch._foreach_lerp_(list(bufs), gs, _per_tensor(1 - momentum, n))
    out = torch._foreach_lerp(gs, list(bufs), _per_tensor(momentum, n)) if nesterov else list(bufs)
    if out_dtype is not None and n and out[0].dtype != out_dtype:
        out = [d.to(out_dtype) for d in out]
    return out


def apply_updates(params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], lr: Hyper,
                  weight_decay: Hyper, ok: torch.Tensor | None = None) -> None:
    """p <- p (1 - lr wd) - lr u, in place, for one param group's local tensors. `updates` are
    float32 (reshaped to the parameter's shape where they differ); a bf16 parameter takes
    p + (-lr) u computed in float32 and rounded once. With Python-float hyperparameters the decay
    pass is skipped when it multiplies by exactly 1 (weight_decay 0), and the add is one
    `p + (-lr) u`; with a tensor `lr` it is `p + u * (-lr)` (the product rounded first: bits may
    differ from the float path in the last place). With `ok`, a skipped step's updates (NaN where
    the gradients were) are replaced by zeros and the decay becomes 1, so nothing changes."""
    ps = list(params)
    n = len(ps)
    ups = [u if u.shape == p.shape else u.reshape(p.shape) for u, p in zip(updates, ps)]
    if ok is not None:  # whatever path made the updates (rule, mesh step, strategy scaling)
        ups = [torch.where(ok, u, 0.0) for u in ups]
    tensor_hp = isinstance(lr, torch.Tensor) or isinstance(weight_decay, torch.Tensor)
    decay = 1 - lr * weight_decay
    if tensor_hp or ok is not None:
        if ok is not None:
            decay = torch.where(ok, decay, 1.0)
        if tensor_hp or weight_decay != 0:
            torch._foreach_mul_(ps, decay)
    elif decay != 1:
        torch._foreach_mul_(ps, decay)
    if isinstance(lr, torch.Tensor):
        torch._foreach_addcmul_(ps, ups, [-lr] * n)
    else:
        torch._foreach_add_(ps, ups, alpha=-lr)


def nonfinite_count(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Number of `tensors` holding a NaN or Inf, as a one-element float32 tensor on `device`: one
    sum-of-|x| reduction over all of them (`torch._foreach_norm`, ord 1, in float32; float64
    tensors in float64, which torch will not narrow), which is NaN/Inf iff an element is (or the
    sum overflows, which is no healthier), then a count. Nothing is read on the host."""
    if not tensors:
        return torch.zeros(1, device=device)
    wide = [t for t in tensors if t.dtype == torch.float64]
    narrow = [t for t in tensors if t.dtype != torch.float64]
    bad = [~torch.isfinite(torch.stack(torch._foreach_norm(ts, 1, dtype=dtype)).to(device))
           for ts, dtype in ((narrow, torch.float32), (wide, torch.float64)) if ts]
    flags = bad[0] if len(bad) == 1 else torch.cat(bad)
    return flags.sum().to(torch.float32).reshape(1)
