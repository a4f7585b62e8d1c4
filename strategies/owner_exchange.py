"""The owner-based all-to-all that `balanced`, `bucketed_async` and `allgather_scatter` share.

Forward: every rank sends, to each owner, its row shards of the matrices that owner orthogonalizes,
concatenated in matrix order, in one `all_to_all_single` with exact (uneven, possibly zero) split
sizes: no padding, no copy to self. The owner cuts each source's piece back into shards and stacks
them in rank order, which rebuilds every full matrix it owns.
Return: the owner cuts each result into row shards and sends shard r to rank r, again in one
`all_to_all_single`; each rank cuts what it receives back into its shards, matrix by matrix.

Together the two exchanges move every matrix to its owner once and back once, which is the lower
bound for any owner-based scheme: 2 (P-1)/P N elements summed over ranks for evenly split matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.strategies.collectives import Exchange, exchange

__all__ = ["forward_send", "forward_recv_numels", "assemble", "return_send",
           "return_recv_numels", "split_returns", "exchange_bytes", "send_forward", "send_back",
           "owner_pairs"]


def _owned(matrices: Sequence[MatrixSpec], owners: Sequence[int], rank: int) -> list[int]:
    return [k for k, o in enumerate(owners) if o == rank]


def forward_send(matrices, owners, rank: int, world_size: int,
                 inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """send[d] = my shards of the matrices rank d owns, flattened and concatenated in order."""
    send = []
    for d in range(world_size):
        mine = [inputs[k].reshape(-1) for k in _owned(matrices, owners, d)]
        send.append(torch.cat(mine) if mine else inputs[0].new_empty(0) if inputs
                    else torch.empty(0))
    return send


def forward_recv_numels(matrices, owners, rank: int, world_size: int) -> list[int]:
    mine = _owned(matrices, owners, rank)
    return [sum(matrices[k].shard_numel(s) for k in mine) for s in range(world_size)]


def assemble(matrices, owners, rank: int, world_size: int,
             pieces: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Full tensors of the matrices I own, keyed by position in `matrices`."""
    mine = _owned(matrices, owners, rank)
    per_source = [torch.split(pieces[s], [matrices[k].shard_numel(s) for k in mine])
                  for s in range(world_size)]
    full = {}
    for j, k in enumerate(mine):
        m = matrices[k]
        full[k] = torch.cat([per_source[s][j].view(m.local_shape(s)) for s in range(world_size)])
    return full


def return_send(matrices, owners, rank: int, world_size: int,
                results: dict[int, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> list[torch.Tensor]:
    """send[d] = rows of rank d cut from each result I own, concatenated in matrix order."""
    mine = _owned(matrices, owners, rank)
    rows = {k: torch.split(results[k], list(matrices[k].dim0_sizes)) for k in mine}
    send = []
    for d in range(world_size):
        parts = [rows[k][d].reshape(-1) for k in mine]
        send.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device))
    return send


def return_recv_numels(matrices, owners, rank: int, world_size: int) -> list[int]:
    return [sum(matrices[k].shard_numel(rank) for k in _owned(matrices, owners, s))
            for s in range(world_size)]


def split_returns(matrices, owners, rank: int, world_size: int,
                  pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """My shard of every matrix's result, in matrix order."""
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for s in range(world_size):
        theirs = _owned(matrices, owners, s)
        chunks = torch.split(pieces[s], [matrices[k].shard_numel(rank) for k in theirs])
        for k, chunk in zip(theirs, chunks):
            out[k] = chunk.view(matrices[k].local_shape(rank))
    return out  # type: ignore[return-value]


def exchange_bytes(matrices, owners, world_size: int, itemsize: int,
                   direction: str) -> list[tuple[int, int]]:
    """(send, recv) bytes per rank of one owner exchange, excluding each rank's copy to itself;
    vectorized over ranks (the cost model asks it at P = 4096)."""
    others = np.zeros(world_size, dtype=np.int64)  # each rank's rows bound for other owners
    gathered = np.zeros(world_size, dtype=np.int64)  # each owner's rows from the other ranks
    for m, o in zip(matrices, owners):
        sizes = np.asarray(m.dim0_sizes, dtype=np.int64) * m.row_numel
        others += sizes
        others[o] -= sizes[o]
        gathered[o] += sizes.sum() - sizes[o]
    send, recv = (others, gathered) if direction == "forward" else (gathered, others)
    return [(int(s) * itemsize, int(r) * itemsize) for s, r in zip(send, recv)]


def send_forward(matrices, owners, inputs: Sequence[torch.Tensor], ctx,
                 async_op: bool = False) -> Exchange:
    """Start the forward exchange; `.wait()` gives the pieces `assemble` expects."""
    P, me = ctx.world_size, ctx.rank
    return exchange(forward_send(matrices, owners, me, P, inputs),
                    forward_recv_numels(matrices, owners, me, P), me, ctx.group, P, async_op)


def send_back(matrices, owners, results: dict[int, torch.Tensor], ctx,
              async_op: bool = False) -> Exchange:
    """Start the return exchange; `split_returns` cuts what `.wait()` gives into my shards."""
    P, me = ctx.world_size, ctx.rank
    return exchange(return_send(matrices, owners, me, P, results, ctx.out_dtype, ctx.device),
                    return_recv_numels(matrices, owners, me, P), me, ctx.group, P, async_op)


def owner_pairs(matrices, owners, world_size: int):
    """The forward pieces as arrays (source, owner, elements), source != owner, one entry per
    matrix and source (the return sends the same pieces the other way)."""
    P = world_size
    src, dst, n = [], [], []
    ranks = np.arange(P)
    for m, o in zip(matrices, owners):
        sizes = np.asarray(m.dim0_sizes, dtype=np.int64) * m.row_numel
        keep = (sizes > 0) & (ranks != o)
        src.append(ranks[keep])
        dst.append(np.full(int(keep.sum()), o))
        n.append(sizes[keep])
    if not src:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(src), np.concatenate(dst), np.concatenate(n).astype(float)
