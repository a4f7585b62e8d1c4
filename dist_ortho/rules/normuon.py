"""NorMuon's update (arXiv:2510.05491): per-row second-moment normalization of the orthogonalized
momentum, rescaled to keep Muon's update norm.

Per matrix, with O this rank's rows of NS(U) in float32 (FSDP2 shards rows, so everything row-wise
is local):
    f = ||O||_F;  v <- lerp(v, mean_cols(O*O), 1 - beta2)
    O = O / (sqrt(v) + ROW_EPS);  O = O * f / (||O||_F + NORM_EPS);  O = O * max(1, m/n) ** 0.5
The two Frobenius norms need the whole matrix: each rank sums the squares of its rows, and one
batched all-reduce of those sums (two float32 slots per sharded matrix, one per stacked matrix of a
3-D parameter) gives every rank the global norms, so the result does not depend on the world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_ortho.core.newton_schulz import matrix_view_shape
from dist_ortho.core.plan import CommItem, all_reduce_bytes
from dist_ortho.core.sharding import Layout, MatrixSpec, local_tensor
from dist_ortho.rules.base import UpdateRule, check_unit_interval, shape_scale
from dist_ortho.rules.registry import register

__all__ = ["NorMuonRule", "ROW_EPS", "NORM_EPS"]

ROW_EPS = 1e-10  # added to sqrt(v) before dividing the rows
NORM_EPS = 1e-10  # added to ||O_hat||_F before restoring the pre-normalization norm


def norm_slots(specs: Sequence[MatrixSpec]) -> tuple[list[int], int]:
    """Offset of each sharded matrix's Frobenius-norm slots in the all-reduced vector (one slot per
    matrix, one per stacked matrix of a 3-D parameter), and the total."""
    offsets, total = [], 0
    for m in specs:
        offsets.append(total)
        if m.sharded:
            total += m.view_shape[0] if len(m.view_shape) == 3 else 1
    return offsets, total


@register
class NorMuonRule(UpdateRule):
    name = "normuon"
    defaults = {"beta2": 0.95}
    float32_state = ("v",)

    def validate(self, group: dict) -> None:
        check_unit_interval("beta2", group["beta2"])

    def init_state(self, p: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        """v: zeros with one float32 entry per matrix row, sharded like `p`'s rows (on a mesh:
        like the rows the rule sees, `layout.state_shape` / `state_placements`)."""
        view = matrix_view_shape(p.shape)
        local_shape = (layout.state_shape if layout.state_shape is not None
                       else (local_tensor(p).shape[0],) + view[1:-1])
        local = torch.zeros(local_shape, dtype=torch.float32, device=local_tensor(p).device)
        if layout.mesh is None:
            return {"v": local}
        shape = torch.Size(view[:-1])
        return {"v": DTensor.from_local(local, layout.mesh,
                                        layout.state_placements or layout.placements,
                                        run_check=False, shape=shape,
                                        stride=torch.empty(shape, device="meta").stride())}

    def state_bytes_per_row(self, spec: MatrixSpec) -> int:
        return math.prod(spec.view_shape[1:-1]) * 4

    def reductions(self, specs, world_size):
        nbytes = 2 * 4 * norm_slots(specs)[1]
        if world_size <= 1 or not nbytes:
            return []
        red = all_reduce_bytes(nbytes, world_size)
        return [CommItem("all_reduce", red, red, "normalize")]

    def updates(self, groups, states, specs, results, layout):
        offsets, total = norm_slots(specs)
        device = layout.device
        shard_sums = torch.zeros(2, total, dtype=torch.float32, device=device)
        normalized, local_norms = [], []
        for group, state, spec, o, offset in zip(groups, states, specs, results, offsets):
            v = local_tensor(state["v"])
            view = (o.shape[0],) + spec.view_shape[1:]
            O = o.float().reshape(view)
            # one read of O for both reductions, no O*O temporary (the step's passes over every
            # element are what this phase costs)
            row_sq = torch.linalg.vector_norm(O, dim=-1).square()
            f2 = row_sq.sum(dim=-1)
            v.lerp_(row_sq / O.shape[-1], 1 - group["beta2"])
            O = O / (v.sqrt().unsqueeze(-1) + ROW_EPS)
            g2 = torch.linalg.vector_norm(O, dim=(-2, -1)).square()
            if spec.sharded:
                # local rows of a 2-D/4-D matrix add to one slot; a 3-D stack's local matrices
                # each own the slot of their global index
                start = offset + (spec.shard_offset(layout.rank) if f2.ndim else 0)
                span = f2.numel() if f2.ndim else 1
                shard_sums[0, start:start + span] += f2.reshape(-1)
                shard_sums[1, start:start + span] += g2.reshape(-1)
                local_norms.append(None)
            else:
                local_norms.append((f2, g2))
            normalized.append(O)
        if layout.world_size > 1 and total:
            dist.all_reduce(shard_sums, group=layout.group)
        updates = []
        for spec, O, offset, norms in zip(specs, normalized, offsets, local_norms):
            if norms is None:
                start = offset + (spec.shard_offset(layout.rank) if O.ndim == 3 else 0)
                span = O.shape[0] if O.ndim == 3 else 1
                f2, g2 = shard_sums[0, start:start + span], shard_sums[1, start:start + span]
            else:
                f2, g2 = norms
            scale = f2.sqrt() / (g2.sqrt() + NORM_EPS)
            scale = scale.reshape(-1, 1, 1) if O.ndim == 3 else scale.reshape(())
            updates.append(O.mul_(scale * shape_scale(spec.shape)))  # O is this step's own
        return updates
