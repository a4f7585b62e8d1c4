"""A node-aware exchange: pieces travel inside the node first, then cross nodes in fewer, larger
messages. Used by `balanced` with `exchange="two_level"`.

An owner exchange moves piece (s -> d) from every rank s to every rank d. Flat (one all-to-all),
every rank talks to all P - 1 others, P - G of them across nodes (G ranks per node, ranks
[n G, (n + 1) G) on node n): at P = 1024 a rank's shard of llama-8b leaves in ~1000 messages of
~13 KB, bound by per-message latency, not bandwidth. Two-level, each piece takes at most two hops:

1. inside the node: s sends piece (s -> d) to its relay, the rank of s's node with d's local
   index, hop(s, d) = node(s) G + d mod G (s itself where s's node has no such rank: a last node
   of fewer than G ranks); one message per relay, carrying every piece bound for ranks of that
   local index (the relay keeps its own);
2. across nodes: each relay sends rank d one message with every piece it holds for d.

A rank then sends at most G - 1 messages inside its node and N - 1 across nodes (N nodes)
instead of G - 1 and P - G: inter-node messages fall by about G, each about G times larger;
inter-node bytes are the same (every piece crosses once) and intra-node bytes grow by the first
hop. Messages are point-to-point (`batch_isend_irecv` on the strategy's group, one batch per
stage; zero-size pieces are not sent), so nothing is created and any group works. Sizes come
from the plan (`numel(s, d)`), never from the data, so every rank agrees on every message.

`link_traffic` gives each rank's bytes and messages per stage and link class (intra-node,
inter-node) for the plan, vectorized over all pairs so that it runs at P = 4096; the
executor posts exactly those messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dist_ortho.core.plan import CommItem

__all__ = ["EXCHANGES", "LINKS", "hop", "two_level_exchange", "link_traffic", "link_items",
           "flat_link_traffic"]

EXCHANGES = ("flat", "two_level")
LINKS = ("intra_node", "inter_node")


def hop(s: int, d: int, G: int, P: int) -> int:
    """The relay of piece (s -> d): d's local index on s's node, or s if that node lacks it."""
    r = s // G * G + d % G
    return r if r < P else s


def two_level_exchange(send: Sequence[torch.Tensor], numel: Callable[[int, int], int], rank: int,
                       world_size: int, ranks_per_node: int, group) -> list[torch.Tensor]:
    """The pieces every rank sent me, by source: send[d] is my piece for d (numel(rank, d)
    elements); numel(s, d) the size of any rank's piece (the plan's)."""
    P, G, me = world_size, ranks_per_node, rank
    if P == 1:
        return [send[0].reshape(-1)]
    dtype, device = send[me].dtype, send[me].device
    held: dict[tuple[int, int], torch.Tensor] = {}  # (source, destination) -> piece
    # stage 1, inside the node: my pieces to their relays; relays on my node send me theirs
    out1: dict[int, list[int]] = {}
    for d in range(P):
        r = hop(me, d, G, P)
        if r == me:
            held[(me, d)] = send[d].reshape(-1)
        else:
            out1.setdefault(r, []).append(d)
    mine = [d for d in range(P) if d % G == me % G]  # destinations I relay for
    in1 = {s: [d for d in mine if hop(s, d, G, P) == me]
           for s in range(me // G * G, min(me // G * G + G, P)) if s != me}
    held.update(_stage({r: [send[d].reshape(-1) for d in ds] for r, ds in out1.items()},
                       {s: [(s, d) for d in ds] for s, ds in in1.items()}, numel, dtype,
                       device, group))
    # stage 2, across nodes: what I hold for others; what relays hold for me
    out2: dict[int, list[torch.Tensor]] = {}
    for (s, d), piece in sorted(held.items()):
        if d != me:
            out2.setdefault(d, []).append(piece)
    in2: dict[int, list[tuple[int, int]]] = {}
    for s in range(P):
        r = hop(s, me, G, P)
        if r != me:
            in2.setdefault(r, []).append((s, me))
    held.update(_stage(out2, in2, numel, dtype, device, group))
    return [held[(s, me)] for s in range(P)]


def _stage(out: dict[int, list[torch.Tensor]], into: dict[int, list[tuple[int, int]]], numel,
           dtype, device, group) -> dict[tuple[int, int], torch.Tensor]:
    """One batch of messages: out[peer] concatenated to each peer, and from each peer the pieces
    into[peer] (in that order, numel(s, d) each); returns the received pieces by (s, d)."""
    ops, got = [], {}
    for peer in sorted(set(out) | set(into)):
        pieces = out.get(peer, [])
        buf = torch.cat(pieces) if pieces else None
        if buf is not None and buf.numel():
            ops.append(dist.P2POp(dist.isend, buf, group=group, group_peer=peer))
        keys = into.get(peer, [])
        sizes = [numel(s, d) for s, d in keys]
        recv = torch.empty(sum(sizes), dtype=dtype, device=device)
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=peer))
        got.update(zip(keys, torch.split(recv, sizes)))
    for work in dist.batch_isend_irecv(ops) if ops else ():
        work.wait()
    return got


# -- the plan: bytes and messages per rank, stage and link class ----------------------------------

def _pairs_per_rank(src, dst, n, P: int, G: int) -> dict[str, np.ndarray]:
    """Per rank (send bytes, recv bytes, messages sent, messages received) per link class of
    the messages src -> dst with n elements (one message per distinct pair)."""
    key = src.astype(np.int64) * P + dst
    uniq, inverse = np.unique(key, return_inverse=True)
    total = np.bincount(inverse, weights=n, minlength=len(uniq))
    s, d = uniq // P, uniq % P
    keep = total > 0
    s, d, total = s[keep], d[keep], total[keep]
    out = {}
    for link, mask in (("intra_node", s // G == d // G), ("inter_node", s // G != d // G)):
        out[link] = np.stack([np.bincount(s[mask], weights=total[mask], minlength=P),
                              np.bincount(d[mask], weights=total[mask], minlength=P),
                              np.bincount(s[mask], minlength=P).astype(float),
                              np.bincount(d[mask], minlength=P).astype(float)])
    return out


def link_traffic(src: np.ndarray, dst: np.ndarray, n: np.ndarray, P: int, G: int
                 ) -> list[dict[str, np.ndarray]]:
    """Two-level: per stage, per link class, a (4, P) array of element counts and messages
    (`_pairs_per_rank`) for the pieces src -> dst of n elements (src != dst)."""
    r = src // G * G + dst % G
    r = np.where(r < P, r, src)
    first = r != src
    second = r != dst
    return [_pairs_per_rank(src[first], r[first], n[first], P, G),
            _pairs_per_rank(r[second], dst[second], n[second], P, G)]


def flat_link_traffic(src, dst, n, P: int, G: int) -> list[dict[str, np.ndarray]]:
    """Flat: one stage, every piece straight to its destination."""
    return [_pairs_per_rank(src, dst, n, P, G)]


def link_items(stages: list[dict[str, np.ndarray]], rank: int, itemsize: int,
               phase: str) -> list[CommItem]:
    """Rank's plan items of a two-level exchange: per stage its sends and receives on the stage's
    link (stage 1 inside the node, stage 2 across nodes), always four items so that every
    rank's list aligns call for call."""
    items = []
    for stage, link in zip(stages, LINKS):
        a = stage[link]
        items.append(CommItem("send", float(a[0, rank] * itemsize), 0.0, phase, link=link,
                              messages=int(a[2, rank])))
        items.append(CommItem("recv", 0.0, float(a[1, rank] * itemsize), phase, link=link,
                              messages=int(a[3, rank])))
    return items
