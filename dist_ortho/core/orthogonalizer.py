"""The Orthogonalizer: Newton-Schulz on stacks of whole matrices, with per-matrix settings and a
FLOP count. Core module: strategies receive one through `ExecContext` and call `run`.

Each matrix of a plan (by its index) has an `NSConfig` (steps, compute dtype, coefficients, eps).
`run(indices, stacked)` orthogonalizes a stack of same-shape full tensors; matrices whose settings
differ are never run in one batched call (`batch_key` tells a strategy which ones may share a
call, and `run` splits a mixed stack itself). Every call adds the FLOPs it ran to `flops`, a
counter that may be shared between orthogonalizers (the optimizer keeps one across steps; the
profiler reads it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from dist_ortho.core.newton_schulz import NSConfig, matrix_view_shape, newton_schulz, ns_flops

__all__ = ["Orthogonalizer", "FlopCount"]


@dataclass
class FlopCount:
    """A running total of Newton-Schulz FLOPs executed on this rank."""

    total: int = 0


class Orthogonalizer:
    """NS for the matrices of one plan. `configs[i]` is matrix i's setting; `device` resolves
    ns_dtype "auto"."""

    def __init__(self, configs: Sequence[NSConfig], device: torch.device | str | None = None,
                 flops: FlopCount | None = None) -> None:
        self.configs = tuple(configs)
        self.device = device
        self.flops = flops if flops is not None else FlopCount()

    def config(self, index: int) -> NSConfig:
        return self.configs[index]

    def batch_key(self, index: int) -> Hashable:
        """Matrices of one shape with equal keys may be stacked into one `run` call."""
        return self.configs[index]

    def count(self, shape: Sequence[int], n: int, index: int) -> int:
        """FLOPs of orthogonalizing `n` matrices of `shape` with matrix `index`'s settings."""
        config = self.configs[index]
        return n * ns_flops(tuple(shape), config.steps, config.form)

    def run(self, indices: Sequence[int], stacked: torch.Tensor) -> torch.Tensor:
        """NS of a stack of full tensors of one shape (stacked[j] is matrix indices[j]); returns
        the stack in the NS compute dtype."""
        if len(indices) != stacked.shape[0]:
            raise ValueError(f"{len(indices)} indices for a stack of {stacked.shape[0]} tensors")
        first = self.configs[indices[0]]
        if any(self.configs[i] != first for i in indices):
            # never batch different settings: run each run of equal settings on its own. Rows
            # move by Python-int indexing: a list index would copy an index tensor to the
            # device, a host sync on CUDA (see HOST_SYNCS_PER_STEP in dist_ortho.optim.optimizer)
            pieces: list[torch.Tensor | None] = [None] * len(indices)
            for key in dict.fromkeys(self.configs[i] for i in indices):
                rows = [j for j, i in enumerate(indices) if self.configs[i] == key]
                part = self.run([indices[j] for j in rows], torch.stack([stacked[j] for j in rows]))
                for k, j in enumerate(rows):
                    pieces[j] = part[k]
            return torch.stack(pieces)
        shape = tuple(stacked.shape[1:])
        view = matrix_view_shape(shape)
        out = newton_schulz(stacked.reshape((len(indices),) + view), first.steps,
                            first.torch_dtype(self.device), first.coefficients, first.eps,
                            first.form)
        self.flops.total += self.count(shape, len(indices), indices[0])
        return out.reshape(stacked.shape)
