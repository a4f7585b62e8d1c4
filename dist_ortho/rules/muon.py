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
        # one multiply per batch of equal scale and dtype, not one per matrix: a _foreach_mul for
        # float32 results (no stacked copy), a stacked one where results must be widened or masked
        for batch in batches((shape_scale(s.shape), tuple(o.shape), o.dtype)
                             for s, o in zip(specs, results)):
            scale = shape_scale(specs[batch[0]].shape)
            if ok is None and results[batch[0]].dtype == torch.float32:
                outs = torch._foreach_mul([results[i] for i in batch], scale)
            else:
                U = stacked([results[i] for i in batch]).float() * scale
                if ok is not None:  # a skipped step updates nothing
                    U = torch.where(ok, U, 0.0)
                outs = U.unbind(0)
            for i, u in zip(batch, outs):
                updates[i] = u
        return updates
