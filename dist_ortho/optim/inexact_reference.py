"""Single-process references of the inexact schedules, each by its own definition: the test oracle
of strategies `blockwise`, `local_norms` and `periodic` (they are not NorMuon's update, so
`dist_ortho.optim.reference` cannot be theirs).

A schedule is defined on the full matrix and a split of its dim-0 rows into blocks, one per rank
(`sizes`: rows per rank, torch.chunk's split for a 1-D FSDP2 shard):
- blockwise: O = the row blocks of U each orthogonalized on its own, stacked back (4-D: the block's
  (rows, in*kh*kw) view; a 3-D stack's blocks are whole matrices, so it is exact there);
- local_norms: O = NS(U) exact; NorMuon's two Frobenius norms per row block instead of per matrix
  (a 3-D stack's norms are per matrix already, so it is exact there);
- periodic(k): step t (from 1) is the exact update times `full_lr_scale` when t % k == 0, blockwise
  otherwise.
Everything else (momentum, v, the row division, shape scale, decay) is the reference's own code.
"""

from __future__ import annotations

import torch

from dist_ortho.core.newton_schulz import matrix_view_shape
from dist_ortho.core.sharding import chunk_sizes
from dist_ortho.optim.reference import (NORM_EPS, ROW_EPS, ReferenceHParams, momentum_direction,
                                        normuon_normalize, orthogonalize, shape_scale)

__all__ = ["SCHEDULES", "blockwise_orthogonalize", "local_norms_normalize", "inexact_update",
           "inexact_reference_step"]

SCHEDULES = ("blockwise", "local_norms", "periodic")


def blockwise_orthogonalize(U: torch.Tensor, ns, sizes) -> torch.Tensor:
    """NS of each dim-0 block of U (rows per block: `sizes`) on its own, in U's shape."""
    blocks = [orthogonalize(b, ns) for b in torch.split(U, list(sizes)) if b.shape[0]]
    return torch.cat(blocks) if blocks else U.new_empty(U.shape, dtype=ns.torch_dtype(U.device))


def local_norms_normalize(O: torch.Tensor, v: torch.Tensor, hp: ReferenceHParams,
                          sizes) -> torch.Tensor:
    """NorMuon's update with both Frobenius norms taken per dim-0 block (`sizes`) of a 2-D/4-D
    parameter; a 3-D stack's norms are per matrix (the exact rule)."""
    shape = O.shape
    if len(shape) == 3:
        return normuon_normalize(O, v, hp)
    O = O.float().reshape(matrix_view_shape(shape))
    v.lerp_(O.square().mean(dim=-1), 1 - hp.beta2)
    out = []
    for rows, v_rows in zip(torch.split(O, list(sizes)), torch.split(v, list(sizes))):
        f = rows.norm()
        rows = rows / (v_rows.sqrt().unsqueeze(-1) + ROW_EPS)
        out.append(rows * (f / (rows.norm() + NORM_EPS)))
    return (torch.cat(out) * shape_scale(shape)).reshape(shape)


def inexact_update(schedule: str, grad: torch.Tensor, momentum_buf: torch.Tensor,
                   v: torch.Tensor | None, hp: ReferenceHParams, sizes, step: int = 1,
                   k: int = 4, full_lr_scale: float = 1.0) -> torch.Tensor:
    """The update of `schedule` for one full parameter at step `step` (from 1); v None: Muon.
    Updates momentum_buf and v in place."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown inexact schedule {schedule!r}; one of {SCHEDULES}")
    U = momentum_direction(grad, momentum_buf, hp.momentum, hp.nesterov)
    full = schedule == "local_norms" or (schedule == "periodic" and step % k == 0)
    O = orthogonalize(U, hp.ns) if full else blockwise_orthogonalize(U, hp.ns, sizes)
    if v is None:
        update = O.float() * shape_scale(grad.shape)
    elif schedule == "local_norms":
        update = local_norms_normalize(O, v, hp, sizes)
    else:
        update = normuon_normalize(O, v, hp)
    return update * full_lr_scale if schedule == "periodic" and full else update


def inexact_reference_step(schedule: str, params, grads, state: dict, hp: ReferenceHParams,
                           world_size: int, rule: str = "normuon", k: int = 4,
                           full_lr_scale: float = 1.0, sizes=None) -> None:
    """One step of `schedule` over full tensors, like `reference.reference_step`; the blocks are
    torch.chunk's split of dim 0 over `world_size` ranks unless `sizes` gives each parameter's."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            s = state.setdefault(i, {})
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = torch.zeros_like(p)
                s["step"] = 0
                if rule == "normuon":
                    s["v"] = torch.zeros(matrix_view_shape(p.shape)[:-1], dtype=torch.float32,
                                         device=p.device)
            s["step"] += 1
            rows = sizes[i] if sizes is not None else chunk_sizes(p.shape[0], world_size)
            update = inexact_update(schedule, g, s["momentum_buffer"], s.get("v"), hp, rows,
                                    s["step"], k, full_lr_scale)
            p.mul_(1 - hp.lr * hp.weight_decay)
            p.add_(update.to(p.dtype), alpha=-hp.lr)
