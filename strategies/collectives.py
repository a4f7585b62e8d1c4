"""Thin helpers over torch.distributed that every strategy shares.

They exist for three reasons: gloo has no uneven list all-gather / all-to-all, so pieces are packed
into one flat buffer and sent with `all_gather_into_tensor` (padded to equal size) or
`all_to_all_single` (exact split sizes); a world of one rank must take the same code path with the
communication skipped; and async collectives need their buffers kept alive until `wait()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from dist_ortho.core.batching import batches, stacked
from dist_ortho.core.sharding import MatrixSpec

__all__ = ["ns_batches", "pack_batches", "full_batches", "all_gather_flat", "all_gather_single",
           "Exchange", "exchange"]

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); we support
# torch >= 2.6, which has only the old one. Same c10d op underneath either way.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ns_batches(matrices: Sequence[MatrixSpec]) -> list[list[int]]:
    """Positions of `matrices` that one batched Newton-Schulz call can take: equal shape, steps
    and form (the orthogonalizer splits a batch further if other settings differ)."""
    return batches((m.shape, m.ns_steps, m.ns_form) for m in matrices)


def pack_batches(matrices: Sequence[MatrixSpec], groups: Sequence[Sequence[int]],
                 inputs: Sequence[torch.Tensor], rank: int, device: torch.device) -> torch.Tensor:
    """This rank's shards in one flat buffer of equal size on every rank: batch g's n shards fill
    n consecutive slots of ceil(rows / P) rows (zero-padded), written with one stacked copy per
    batch, not per matrix."""
    sizes = [len(ks) * matrices[ks[0]].padded_rows * matrices[ks[0]].row_numel for ks in groups]
    flat = torch.zeros(sum(sizes), dtype=inputs[0].dtype, device=device)
    offset = 0
    for ks, size in zip(groups, sizes):
        m = matrices[ks[0]]
        rows = m.dim0_sizes[rank]
        if rows:
            region = flat[offset:offset + size].view(len(ks), m.padded_rows, m.row_numel)
            region[:, :rows].copy_(stacked([inputs[k] for k in ks]).reshape(len(ks), rows, -1))
        offset += size
    return flat


def full_batches(matrices: Sequence[MatrixSpec], groups: Sequence[Sequence[int]],
                 gathered: torch.Tensor, wanted: Sequence[bool] | None = None):
    """(n, *shape) full tensors of each batch from the (P, L) all-gather of `pack_batches`
    buffers (None for a batch not `wanted`): one slice per rank and one cat per batch."""
    out, offset = [], 0
    for g, ks in enumerate(groups):
        m = matrices[ks[0]]
        size = len(ks) * m.padded_rows * m.row_numel
        if wanted is None or wanted[g]:
            region = gathered[:, offset:offset + size].view(gathered.shape[0], len(ks),
                                                            m.padded_rows, m.row_numel)
            parts = [region[r, :, :rows] for r, rows in enumerate(m.dim0_sizes) if rows]
            out.append(torch.cat(parts, dim=1).view((len(ks),) + tuple(m.shape)))
        else:
            out.append(None)
        offset += size
    return out


def all_gather_flat(flat: torch.Tensor, group: dist.ProcessGroup | None, world_size: int,
                    async_op: bool = False):
    """((world_size, len(flat)) with row r = rank r's buffer, the Work to wait for before reading
    it, or None when it is already there: alone, nothing travels; synchronous, it has arrived).
    An asynchronous caller keeps `flat` alive until the wait."""
    if world_size == 1:
        return flat.unsqueeze(0), None
    out = torch.empty(world_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    work = all_gather_single(out, flat, group=group, async_op=async_op)
    return out.view(world_size, flat.numel()), work if async_op else None


class Exchange:
    """An in-flight all-to-all; `wait()` returns the piece received from each source rank."""

    def __init__(self, output: torch.Tensor, recv_numels: Sequence[int], handle, keep_alive) -> None:
        self._output = output
        self._recv_numels = list(recv_numels)
        self._handle = handle
        self._keep_alive = keep_alive
        self._pieces: list[torch.Tensor] | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._pieces is None:
            if self._handle is not None:
                self._handle.wait()
            self._pieces = list(torch.split(self._output, self._recv_numels))
            self._keep_alive = None
        return self._pieces


def exchange(send: Sequence[torch.Tensor], recv_numels: Sequence[int], rank: int,
             group: dist.ProcessGroup | None, world_size: int, async_op: bool = False) -> Exchange:
    """All-to-all of flat pieces: send[d] goes to rank d, recv_numels[s] elements come from rank s.

    The piece a rank would send to itself never enters the collective (it is copied locally), so the
    bytes on the wire are exactly the off-diagonal ones.
    """
    assert len(send) == world_size and len(recv_numels) == world_size
    assert send[rank].numel() == recv_numels[rank]
    dtype, device = send[rank].dtype, send[rank].device
    if world_size == 1:
        return Exchange(send[0].reshape(-1), recv_numels, None, None)
    in_splits = [0 if d == rank else send[d].numel() for d in range(world_size)]
    out_splits = [0 if s == rank else recv_numels[s] for s in range(world_size)]
    inp = torch.cat([send[d].reshape(-1) for d in range(world_size) if d != rank]) \
        if sum(in_splits) else torch.empty(0, dtype=dtype, device=device)
    wire = torch.empty(sum(out_splits), dtype=dtype, device=device)
    handle = dist.all_to_all_single(wire, inp, out_splits, in_splits, group=group,
                                    async_op=async_op)
    if not async_op:
        handle = None
    # Reassemble in source order with our own piece in its slot, after the wire data arrives.
    return _AssembledExchange(wire, out_splits, send[rank].reshape(-1), rank, recv_numels,
                              handle, inp)


class _AssembledExchange(Exchange):
    def __init__(self, wire, out_splits, own, rank, recv_numels, handle, keep_alive) -> None:
        super().__init__(wire, out_splits, handle, keep_alive)
        self._own, self._rank = own, rank

    def wait(self) -> list[torch.Tensor]:
        pieces = super().wait()
        pieces = list(pieces)
        pieces[self._rank] = self._own
        return pieces
