"""torchtitan's container takes every update rule of `dist_ortho.rules` by its name, with its own
hyperparameters (`rule_hparams`), and every Newton-Schulz setting (`ns_form` included). Needs the
torchtitan extra (`-m torchtitan`)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torchtitan
pytest.importorskip("torchtitan", reason="needs the extra: pip install -e '.[torchtitan]'")

from dist_ortho.optim.optimizer import OrthogonalizedOptimizer  # noqa: E402
from tests.optimizer.test_a_rule_is_one_registered_file import TOY, toy_rule  # noqa: E402,F401
from tests.torchtitan.test_torchtitan_container import _build  # noqa: E402


def test_a_registered_rule_is_built_by_its_name(toy_rule):  # noqa: F811
    _, opts = _build(name=TOY, rule_hparams={"scale": 0.25}, ns_form="gram", ns_steps=3)
    matrix_opt = opts.optimizers[0]
    assert type(matrix_opt) is OrthogonalizedOptimizer and matrix_opt.rule.name == TOY
    group = matrix_opt.param_groups[0]
    assert (group["scale"], group["ns_form"], group["ns_steps"]) == (0.25, "gram", 3)
    assert all(s.ns_form == "gram" for s in matrix_opt.plan().matrices)
    assert set(opts.assignment.values()) == {TOY, "AdamW"}


def test_normuon_keeps_its_beta2_and_its_class():
    _, opts = _build(name="NorMuon", beta2=0.9)
    assert type(opts.optimizers[0]).__name__ == "NorMuon"
    assert opts.optimizers[0].param_groups[0]["beta2"] == 0.9


def test_an_unknown_name_lists_the_registered_rules(toy_rule):  # noqa: F811
    from dist_ortho.integrations.torchtitan import optimizers_config

    with pytest.raises(ValueError, match=f"optimizer.name must be one of .*{TOY}"):
        optimizers_config(name="Lion")
