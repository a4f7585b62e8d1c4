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

from dist_ortho.core.batching import batches, stacked
from dist_ortho.core.hparams import check_beta
from dist_ortho.core.newton_schulz import matrix_view_shape
from dist_ortho.core.plan import CommItem, all_reduce_bytes
from dist_ortho.core.sharding import Layout, MatrixSpec, local_tensor
from dist_ortho.rules.base import UpdateRule, shape_scale
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
        check_beta("beta2", group["beta2"])

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

    def updates(self, groups, states, specs, results, layout, ok=None):
        device = layout.device
        # one batch per (param group, matrix shape, local rows, dtype): every op below runs once
        # per batch on a stacked (n, rows, ...) tensor; each batch's norm slots are consecutive
        groups_of = batches((id(g), s.shape, s.sharded, tuple(o.shape), o.dtype)
                            for g, s, o in zip(groups, specs, results))
        starts, total = [], 0
        for batch in groups_of:
            starts.append(total)
            if specs[batch[0]].sharded:
                total += len(batch) * _slots_per_matrix(specs[batch[0]])
        shard_sums = torch.zeros(2, total, dtype=torch.float32, device=device)
        work = []
        for batch, start in zip(groups_of, starts):
            spec, group = specs[batch[0]], groups[batch[0]]
            O = stacked([results[i] for i in batch]).float()
            O = O.reshape((len(batch), O.shape[1]) + spec.view_shape[1:])
            vs = [local_tensor(states[i]["v"]) for i in batch]
            # one read of O for both reductions, no O*O temporary (the step's passes over every
            # element are what this phase costs)
            row_sq = torch.linalg.vector_norm(O, dim=-1).square()
            f2 = row_sq.sum(dim=-1)
            V = stacked(vs)
            new_v = torch.lerp(V, row_sq / O.shape[-1], 1 - group["beta2"])
            if ok is not None:  # a skipped step leaves v as it was
                new_v = torch.where(ok, new_v, V)
            torch._foreach_copy_(vs, new_v.unbind(0))
            O = O / (new_v.sqrt().unsqueeze(-1) + ROW_EPS)
            g2 = torch.linalg.vector_norm(O, dim=(-2, -1)).square()
            if spec.sharded:
                # a 2-D/4-D matrix's local rows add to its one slot; a 3-D stack's local matrices
                # each own the slot of their global index
                slots = shard_sums[:, start:start + len(batch) * _slots_per_matrix(spec)]
                slots = slots.view(2, len(batch), -1)
                if len(spec.view_shape) == 3:
                    first = spec.shard_offset(layout.rank)
                    slots = slots[:, :, first:first + O.shape[1]]
                slots[0].copy_(f2.reshape(len(batch), -1))
                slots[1].copy_(g2.reshape(len(batch), -1))
                work.append((batch, spec, O, slots))
            else:
                work.append((batch, spec, O, torch.stack([f2, g2])))
        if layout.world_size > 1 and total:
            dist.all_reduce(shard_sums, group=layout.group)
        updates: list[torch.Tensor | None] = [None] * len(results)
        for batch, spec, O, norms in work:
            f2, g2 = norms[0], norms[1]
            scale = f2.sqrt() / (g2.sqrt() + NORM_EPS)
            scale = scale.reshape(O.shape[:-2] + (1, 1))  # per matrix (of a 3-D stack)
            O = O.mul_(scale * shape_scale(spec.shape))  # O is this step's own
            if ok is not None:  # a skipped step updates nothing (NaN * 0 would not be 0)
                O = torch.where(ok, O, 0.0)
            for i, u in zip(batch, O.unbind(0)):
                updates[i] = u
        return updates  # type: ignore[return-value]


def _slots_per_matrix(spec: MatrixSpec) -> int:
    """Frobenius-norm slots of one sharded matrix: one, or one per matrix of a 3-D stack."""
    return spec.view_shape[0] if len(spec.view_shape) == 3 else 1
