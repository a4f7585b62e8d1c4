"""`dist_ortho.integrations.torchtitan.DistOrthoOptimizers` on its own (one process, plain
tensors): the role split and its names, one non-finite verdict for NorMuon and AdamW, regex
groups naming NorMuon, clear errors for bad config fields, torchtitan's flat state round trip.
Needs the torchtitan extra (`-m torchtitan`)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torchtitan
pytest.importorskip("torchtitan", reason="needs the extra: pip install -e '.[torchtitan]'")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import \
    checkpoint_wrapper  # noqa: E402

from dist_ortho.integrations.torchtitan import optimizers_config  # noqa: E402


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([checkpoint_wrapper(nn.Sequential(
            nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 32, bias=False)

    def forward(self, x):
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(self.norm(h))


def _build(**fields):
    model = Tiny()
    opts = optimizers_config(**{"name": "NorMuon", "strategy": "balanced", "lr": 0.02,
                                "adamw_lr": 1e-2, **fields}).build(model_parts=[model])
    return model, opts


def _backward(model, poison: str | None = None):
    x = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    if poison is not None:
        dict(model.named_parameters())[poison].grad.view(-1)[0] = float("nan")


def test_role_split_records_names_without_wrapper_segments():
    _, opts = _build()
    assert [type(o).__name__ for o in opts.optimizers] == ["NorMuon", "AdamW"]
    a = opts.assignment
    assert a["layers.0.0.weight"] == a["layers.1.2.weight"] == "NorMuon"
    for name in ("tok_embeddings.weight", "lm_head.weight", "norm.weight", "layers.0.0.bias"):
        assert a[name] == "AdamW", name
    assert not [n for n in a if "_checkpoint_wrapped_module" in n]
    assert opts.optimizers[0].param_groups[0]["param_names"][0] == "layers.0.0.weight"


@pytest.mark.parametrize("poison", ["layers.0._checkpoint_wrapped_module.0.weight", "norm.weight"])
def test_a_nonfinite_gradient_anywhere_skips_every_optimizer(poison):
    model, opts = _build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _backward(model, poison)
    opts.step()
    assert opts.skipped_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opts.optimizers[1].state  # AdamW never stepped
    opts.zero_grad()
    _backward(model)
    opts.step()  # a finite step goes through for both
    assert opts.skipped_steps == 1
    assert not torch.equal(model.norm.weight, before["norm.weight"])
    assert not torch.equal(model.layers[0]._checkpoint_wrapped_module[0].weight,
                           before["layers.0._checkpoint_wrapped_module.0.weight"])


def test_muon_is_built_by_name():
    _, opts = _build(name="Muon")
    assert [type(o).__name__ for o in opts.optimizers] == ["Muon", "AdamW"]
    assert set(opts.assignment.values()) == {"Muon", "AdamW"}


def test_regex_groups_may_name_normuon():
    from torchtitan.components.optimizer import ParamGroupConfig

    _, opts = _build(param_groups=[
        ParamGroupConfig(pattern=r"layers\..*\.weight$", optimizer_name="NorMuon",
                         optimizer_kwargs={"lr": 0.02}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})])
    assert [type(o).__name__ for o in opts.optimizers] == ["NorMuon", "AdamW"]
    assert len(opts.optimizers[0].param_groups[0]["params"]) == 4


@pytest.mark.parametrize("field, value", [("name", "Lion"), ("strategy", "nope")])
def test_a_bad_name_or_strategy_is_one_clear_error(field, value):
    with pytest.raises(ValueError, match=f"optimizer.{field} must be one of"):
        optimizers_config(**{field: value})


def test_torchtitan_flat_state_round_trips_bitwise():
    model, opts = _build()
    for _ in range(2):
        _backward(model)
        opts.step()
        opts.zero_grad()
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in opts.state_dict().items()}
    assert "state.layers.0.0.weight.momentum_buffer" in saved
    other_model, other = _build()
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(saved)
    for m, o in ((model, opts), (other_model, other)):
        _backward(m)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters()))


def test_torch_state_dict_api_round_trips_the_inner_optimizers_bitwise():
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    model, opts = _build()
    for _ in range(2):
        _backward(model)
        opts.step()
        opts.zero_grad()
    saved = get_optimizer_state_dict(model, opts.optimizers)
    assert "layers.0.0.weight" in saved["state"]  # keyed by names, wrapper segments dropped
    copy = {"state": {k: {n: v.clone() for n, v in st.items()} for k, st in saved["state"].items()},
            "param_groups": saved["param_groups"]}
    other_model, other = _build()
    other_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(other_model, other.optimizers, copy)
    for m, o in ((model, opts), (other_model, other)):
        _backward(m)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters()))
