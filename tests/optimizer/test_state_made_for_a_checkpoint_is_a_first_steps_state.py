"""A checkpoint saved before the first step holds the state each optimizer's own first step creates
(same keys, shapes, dtypes and devices; zeros and step 0), made by the optimizers' own lazy
initialization: `OrthogonalizedOptimizer.init_state` and torch's `Adam._init_group`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_ortho.checkpointing.checkpoint import _ensure_state
from dist_ortho.optim.optimizer import Muon, NorMuon


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))


def _first_step_state(make_opt) -> dict:
    """State after one real step with zero gradients and lr 0."""
    model = _model()
    opt = make_opt(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {n: dict(opt.state[p]) for n, p in model.named_parameters()}


def _checkpoint_state(make_opt) -> dict:
    model = _model()
    opt = make_opt(model)
    _ensure_state(model, opt)
    assert all(p.grad is None for p in model.parameters())  # its zero gradient is gone again
    return {n: dict(opt.state[p]) for n, p in model.named_parameters()}


ADAM = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters()),
    "adamw_amsgrad": lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True),
    "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), fused=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), foreach=False),
}
ORTHOGONALIZED = {
    "normuon": lambda m: NorMuon([m[0].weight, m[1].weight], ns_dtype="float32"),
    "muon": lambda m: Muon([m[0].weight, m[1].weight], ns_dtype="float32"),
    "normuon_mask": lambda m: NorMuon([m[0].weight, m[1].weight], ns_dtype="float32",
                                      nonfinite="mask"),
}


# torch keeps Adam's step in float64 under a float64 default dtype; the orthogonalized optimizers
# are stepped in float32 here (their non-finite check sums in float32)
CASES = ([(k, torch.float32) for k in [*ADAM, *ORTHOGONALIZED]]
         + [(k, torch.float64) for k in ADAM])


@pytest.mark.parametrize("kind,default_dtype", CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_checkpoint_state_is_the_first_steps_state_at_step_zero(kind, default_dtype):
    make_opt = {**ADAM, **ORTHOGONALIZED}[kind]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        stepped, made = _first_step_state(make_opt), _checkpoint_state(make_opt)
    finally:
        torch.set_default_dtype(previous)
    assert made.keys() == stepped.keys()
    assert any(made.values())
    for name in made:
        assert made[name].keys() == stepped[name].keys(), name
        for key, tensor in made[name].items():
            twin = stepped[name][key]
            assert (tensor.shape, tensor.dtype, tensor.device) == \
                (twin.shape, twin.dtype, twin.device), (name, key)
            assert not tensor.any(), (name, key)  # zeros, and step 0
            if key == "step":
                assert float(twin) == 1.0


def test_capturable_adamw_state_counts_its_step_on_the_parameters_device():
    """capturable AdamW cannot step on the CPU; its state is torch's: a float32 step beside p."""
    state = _checkpoint_state(lambda m: torch.optim.AdamW(m.parameters(), capturable=True))
    for entry in state.values():
        assert entry["step"].dtype == torch.float32 and entry["step"].shape == ()
        assert entry["exp_avg"].shape == entry["exp_avg_sq"].shape and not entry["exp_avg"].any()
