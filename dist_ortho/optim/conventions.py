"""torch.optim's conventions as the orthogonalized optimizers take them.

Trainers pass torch's optimizer flags to whatever optimizer they build (torchtitan puts `foreach`
and `fused` in every parameter group). Each is accepted, per parameter group, with this meaning:

- `foreach` (None, True or False): the element-wise passes (momentum, apply) always run as
  `torch._foreach_*` ops over a parameter group, which run the same per-tensor kernels as a loop,
  so the numbers do not depend on it; `foreach=False` is accepted and ignored, with one warning.
- `fused` (None, True or False): there is no fused kernel of this step; `fused=True` is accepted
  and ignored, with one warning (the step runs the foreach ops above).
- `capturable` (bool): the step is safe to capture in a CUDA graph: step counters live on the
  parameters' device and nothing is read on the host. This needs `nonfinite="mask"` (the
  other policies read the verdict on the host), and a ValueError says so.
- `maximize` (bool): ascend instead of descend: the momentum takes -grad (the update of f with
  maximize=True is the update of -f, bit for bit).

A parameter may appear once in an optimizer: a repeat, in one group or across groups, is one
ValueError naming it (torch only warns within a group).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["TORCH_FLAGS", "check_torch_flags", "check_no_duplicates"]

TORCH_FLAGS = {"foreach": None, "fused": None, "capturable": False, "maximize": False}


def check_torch_flags(group: dict, nonfinite: str, who: str, warned: set[str]) -> None:
    """Validate the torch.optim flags of a parameter group; warn once per optimizer (`warned`)
    about what is ignored."""
    for name in ("foreach", "fused"):
        value = group.get(name)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be None, True or False, got {value!r}")
    for name in ("capturable", "maximize"):
        if not isinstance(group.get(name, False), bool):
            raise ValueError(f"{name} must be a bool, got {group.get(name)!r}")
    if group.get("capturable") and nonfinite != "mask":
        raise ValueError(f"capturable=True needs nonfinite='mask': with nonfinite="
                         f"{nonfinite!r} the step reads its non-finite verdict on the host, "
                         f"which a CUDA graph cannot capture")
    ignored = {"foreach": group.get("foreach") is False, "fused": group.get("fused") is True}
    for name, is_ignored in ignored.items():
        if is_ignored and name not in warned:
            warned.add(name)
            warnings.warn(f"{who}: {name}={group[name]} is ignored: the step always runs its "
                          f"element-wise passes as torch._foreach_* ops over each parameter "
                          f"group (no fused kernel; the same numbers as a per-tensor loop)",
                          UserWarning, stacklevel=4)


def _items(params) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(params, torch.Tensor):
        params = [params]
    return [(p[0], p[1]) if isinstance(p, tuple) else (None, p) for p in params]


def check_no_duplicates(param_group: dict, existing: list[dict]) -> None:
    """ValueError naming the first parameter that appears twice in `param_group["params"]` or
    also in one of the `existing` groups (before torch's own handling, which only warns)."""
    items = _items(param_group["params"])
    seen = {id(p): "an earlier parameter group" for g in existing for p in g["params"]}
    for j, (name, p) in enumerate(items):
        label = repr(name) if name else f"params[{j}] (shape {tuple(p.shape)})"
        if id(p) in seen:
            raise ValueError(f"parameter {label} appears more than once (also in {seen[id(p)]}); "
                             f"give each parameter to the optimizer once")
        seen[id(p)] = "this parameter group"
