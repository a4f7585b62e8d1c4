"""Muon's update: the orthogonalized momentum, scaled by max(1, m/n) ** 0.5 (no extra state, no
communication)."""

from __future__ import annotations

from dist_ortho.rules.base import UpdateRule, shape_scale
from dist_ortho.rules.registry import register

__all__ = ["MuonRule"]


@register
class MuonRule(UpdateRule):
    name = "muon"

    def updates(self, groups, states, specs, results, layout):
        return [o.float() * shape_scale(spec.shape) for spec, o in zip(specs, results)]
