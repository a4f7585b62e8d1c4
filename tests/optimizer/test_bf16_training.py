"""Training with bf16: float32 momentum by default, a warning when bf16 weights cannot take the
update, and the recommended setup (FSDP2 MixedPrecisionPolicy: float32 shards, bf16 compute)
whose updates reach the weights. The failure it pins: a 1024x1024 bf16 matrix of std 0.02 under
lr 2e-3 leaves about half its entries unchanged every step (its updates are below half a bf16
rounding step), silently."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from dist_ortho import NorMuon
from dist_ortho.testing import spawn
from tests.optimizer import precision_cases as cases


def _bf16_weight() -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    return torch.nn.Parameter((torch.randn(cases.DIM, cases.DIM, generator=gen) * cases.STD)
                              .to(torch.bfloat16))


def test_bf16_weights_below_their_rounding_warn_once_naming_the_mixed_precision_policy():
    w = _bf16_weight()
    with pytest.warns(RuntimeWarning, match="MixedPrecisionPolicy") as caught:
        opt = NorMuon([w], lr=cases.LR, ns_dtype="float32")
    assert len([c for c in caught if "rounding step" in str(c.message)]) == 1
    # and the warning is true: one step leaves a large share of the entries as they were
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = w.detach().clone()
    opt.step()
    unchanged = (w.detach() == before).float().mean().item()
    assert unchanged > 0.3, unchanged


def test_bf16_weights_with_a_learning_rate_they_can_take_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NorMuon([_bf16_weight()], lr=0.05, ns_dtype="float32")


@pytest.mark.parametrize("world_size", [1, 2])
def test_fsdp2_mixed_precision_bf16_compute_updates_reach_every_float32_weight(world_size):
    for res in spawn(cases.mixed_precision_step, world_size):
        assert res["compute"] == "torch.bfloat16" and res["param"] == "torch.float32", res
        assert not [w for w in res["warnings"] if "rounding step" in w], res["warnings"]
        assert res["changed"] > 0.999, res["changed"]


def test_momentum_of_bf16_parameters_is_float32_and_survives_the_state_dict():
    model = torch.nn.Linear(6, 8, bias=False).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny lr for these weights: not what this test checks
        opt = NorMuon(model.parameters(), ns_dtype="float32")
    model.weight.grad = torch.randn(8, 6).to(torch.bfloat16)
    opt.step()
    buf = opt.state[model.weight]["momentum_buffer"]
    assert buf.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = NorMuon(model.parameters(), ns_dtype="float32")
    again.load_state_dict(opt.state_dict())
    loaded = again.state[model.weight]["momentum_buffer"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, buf)
    flat = get_optimizer_state_dict(model, again,
                                    options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert flat["state.weight.momentum_buffer"].dtype == torch.float32


def test_momentum_dtype_can_be_chosen_and_a_bad_one_is_one_clear_error():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = NorMuon([w], momentum_dtype="bfloat16")
    w.grad = torch.randn(8, 6)
    opt.step()
    assert opt.state[w]["momentum_buffer"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="momentum_dtype"):
        NorMuon([w], momentum_dtype="int8")
