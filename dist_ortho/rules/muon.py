"""Muon's update: the orthogonalized momentum, scaled by max(1, m/n) ** 0.5 (no extra state, no
communication)."""

from __future__ import annotations

import torch

from dist_ortho.core.batching import batches, stacked
from dist_ortho.rules.base import UpdateRule, shape_scale
from dist_ortho.rules.registry import register

__all__ = ["MuonRule"]


@register
class MuonRule(UpdateRule):
    name = "muon"

    def updates(self, groups, states, specs, results, layout, ok=None):
        updates: list = [None] * len(results)
        # one multiply per batch of equal scale, local shape and dtype (not one per matrix)
        for batch in batches((shape_scale(s.shape), tuple(o.shape), o.dtype)
                             for s, o in zip(specs, results)):
            U = stacked([results[i] for i in batch]).float() * shape_scale(specs[batch[0]].shape)
            if ok is not None:  # a skipped step updates nothing
                U = torch.where(ok, U, 0.0)
            for i, u in zip(batch, U.unbind(0)):
                updates[i] = u
        return updates
