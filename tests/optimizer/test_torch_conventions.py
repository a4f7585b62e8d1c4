"""torch.optim's conventions on the orthogonalized optimizers (dist_ortho.optim.conventions):
the foreach / fused / capturable / maximize flags, lr and weight_decay as 0-d tensors, and
duplicate parameters."""

from __future__ import annotations

import warnings

import pytest
import torch

from dist_ortho import Muon, NorMuon
from tests.tolerances import update_error


def _params(seed: int = 0, shapes=((8, 6), (6, 10))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _steps(opt, params, steps: int = 2, sign: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = sign * torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def test_torch_flags_are_accepted_without_a_word_where_they_change_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = NorMuon(_params(), foreach=True, fused=False, capturable=False, maximize=False)
        opt.add_param_group({"params": _params(1), "foreach": None, "fused": None})
    assert [g["foreach"] for g in opt.param_groups] == [True, None]


def test_ignored_flags_warn_once_and_say_what_runs_instead():
    with pytest.warns(UserWarning, match="foreach=False is ignored.*_foreach_") as caught:
        opt = Muon(_params(), foreach=False)
        opt.add_param_group({"params": _params(1), "foreach": False})
    assert len([w for w in caught if "foreach" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="fused=True is ignored.*no fused kernel"):
        NorMuon(_params(), fused=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(foreach="yes"), "foreach must be None, True or False"),
    (dict(fused=1), "fused must be None, True or False"),
    (dict(maximize=None), "maximize must be a bool"),
    (dict(capturable=True), "capturable=True needs nonfinite='mask'"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr must be a number or a 0-d"),
    (dict(weight_decay=torch.tensor(-1.0)), "weight_decay must be a finite number >= 0"),
])
def test_bad_flags_raise_one_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NorMuon(_params(), **kwargs)


def test_capturable_with_mask_keeps_step_counters_on_the_parameters_device():
    params = _params()
    opt = NorMuon(params, capturable=True, nonfinite="mask")
    _steps(opt, params, steps=1)
    assert all(opt.state[p]["step"].device == p.device for p in params)


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
def test_maximize_is_the_update_of_the_negated_gradient_bit_for_bit(optimizer):
    a, b = _params(), _params()
    up = _steps(optimizer(a, maximize=True, ns_dtype="float32", weight_decay=0.1), a)
    down = _steps(optimizer(b, ns_dtype="float32", weight_decay=0.1), b, sign=-1.0)
    assert all(torch.equal(x, y) for x, y in zip(up, down))
    c = _params()
    plain = _steps(optimizer(c, ns_dtype="float32", weight_decay=0.1), c)
    assert not any(torch.equal(x, y) for x, y in zip(up, plain))


def test_tensor_lr_and_weight_decay_follow_their_value_within_the_float_bound():
    a, b = _params(), _params()
    lr, wd = torch.tensor(0.02), torch.tensor(0.1)
    opt = NorMuon(a, lr=lr, weight_decay=wd, ns_dtype="float32")
    ref = NorMuon(b, lr=0.02, weight_decay=0.1, ns_dtype="float32")
    got, want = _steps(opt, a, steps=1), _steps(ref, b, steps=1)
    lr.fill_(0.005)  # as a scheduler does, in place: read by the next step, not at construction
    ref.param_groups[0]["lr"] = 0.005
    got, want = _steps(opt, a, steps=1, seed=2), _steps(ref, b, steps=1, seed=2)
    for x, y, p in zip(got, want, b):
        # the same update; -lr * U is rounded once more as a tensor product than as add's alpha
        bound = 4 * 2.0**-24 * y.norm() + 2 * 10 * update_error(p.shape, "normuon") * 0.02
        assert (x - y).norm() <= bound


def test_duplicate_parameters_raise_one_value_error_naming_them():
    p, q = _params()
    with pytest.raises(ValueError, match=r"params\[2\] \(shape \(8, 6\)\) appears more than once"):
        NorMuon([p, q, p])
    with pytest.raises(ValueError, match="'w' appears more than once"):
        NorMuon([("w", p), ("v", q), ("w", p)])
    opt = NorMuon([p])
    with pytest.raises(ValueError, match="also in an earlier parameter group"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1
