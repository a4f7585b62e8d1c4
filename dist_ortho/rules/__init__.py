"""Update rules by name: what turns orthogonalized rows into a parameter's update.

    rules.available()        -> ['muon', 'normuon']
    rules.get("normuon")     -> NorMuonRule()

See `rules.base.UpdateRule` for the interface. Adding a rule: one file whose `UpdateRule` subclass
is decorated with `@register`, and one import line below. Everything that takes a rule by name
asks this registry: the run config's `optimizer.name`, `build_optimizers`, the cost model
(`dist-ortho project --rule`), the convergence study and the torchtitan container (docs/rules.md).
"""

from __future__ import annotations

from dist_ortho.rules.base import UpdateRule, shape_scale
from dist_ortho.rules.registry import available, get, register

# one line per rule: importing its file registers it
from dist_ortho.rules.muon import MuonRule  # noqa: E402
from dist_ortho.rules.normuon import NorMuonRule  # noqa: E402

__all__ = ["UpdateRule", "MuonRule", "NorMuonRule", "available", "get", "register",
           "shape_scale"]
