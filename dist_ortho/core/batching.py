"""Batches of equal keys: how the step turns per-matrix work into per-shape work. Core module.

On a GPU every op is a kernel launch, and for the small matrices of a transformer the host time to
issue them is most of a step. So the optimizer's element-wise phases and the strategies' Newton-
Schulz run once per batch of matrices that can share one stacked tensor (equal shape, dtype, owner
and settings) rather than once per matrix. `batches` is the one grouping rule they all use: first
appearance order, so every rank forms the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch

__all__ = ["batches", "stacked"]


def batches(keys: Iterable[Hashable]) -> list[list[int]]:
    """Positions grouped by equal key, groups in order of their first position."""
    out: dict[Hashable, list[int]] = {}
    for j, key in enumerate(keys):
        out.setdefault(key, []).append(j)
    return list(out.values())


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One (n, *shape) tensor of n equal-shape tensors: a view for one, one stack op for more."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
