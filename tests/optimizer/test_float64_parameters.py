"""Float64 parameters step like any other: the non-finite check reduces them in float64."""

from __future__ import annotations

import pytest
import torch

from dist_ortho import Muon, NorMuon


@pytest.mark.parametrize("cls", [NorMuon, Muon])
@pytest.mark.parametrize("nonfinite", ["skip", "mask"])
def test_regression_float64_parameters_crashed_in_the_nonfinite_check(cls, nonfinite):
    """Bug: the check summed every gradient with `_foreach_norm(dtype=float32)`, which torch
    refuses for float64 inputs (a narrowing), so any float64 model failed on its first step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = cls([w, b], lr=0.02, ns_dtype="float32", nonfinite=nonfinite)
    before = w.detach().clone()
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    assert w.dtype == torch.float64 and torch.isfinite(w).all() and not torch.equal(w, before)
    # a NaN is still caught: the step is skipped (or masked) and the weights stay
    after = w.detach().clone()
    w.grad = torch.full_like(w, float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite") if nonfinite == "skip" else _quiet():
        opt.step()
    assert torch.equal(w, after)


def _quiet():
    import contextlib
    return contextlib.nullcontext()
