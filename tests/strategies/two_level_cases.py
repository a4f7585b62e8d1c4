"""Workers for `balanced`'s node-aware exchange on real gloo groups
(tests/strategies/test_two_level_exchange.py): the distributed suite's shapes (uneven and empty shards, 3-D
and 4-D parameters) with `exchange="two_level"` over nodes of 2 ranks (P = 3: a last node of one
rank) and of 3 (P = 4: nodes of 3 and 1). Each case returns the distance to the single-process
reference over its derived bound (dist_cases.run_case) and, for one step, the bytes and
messages counted per (kind, link class) beside the plan's.
"""

from __future__ import annotations

import torch

from dist_ortho import NorMuon, strategies
from dist_ortho.profiling.comm import CommCounter
from tests.strategies import dist_cases


def cases() -> list[dict]:
    out = []
    for G in (2, 3):
        for shapes, rule in ((dist_cases.MIXED, "normuon"), (dist_cases.FEW, "muon")):
            out.append(dict(strategy="balanced", options={"exchange": "two_level",
                                                          "ranks_per_node": G},
                            shapes=shapes, ns_dtype="float32", rule=rule, nesterov=True,
                            weight_decay=0.0))
    return out


def by_link(items, G: int, position: dict[int, int]) -> dict:
    """{(kind, link): [bytes, messages]} of counted records (global ranks, mapped to the
    strategy's group by `position`) or of plan items (their own link and message count)."""
    out: dict = {}
    for c in items:
        if c.kind not in ("send", "recv"):
            continue
        if hasattr(c, "link"):
            link, messages = c.link, c.messages
        else:
            a, b = (position[r] for r in c.ranks)
            link, messages = ("intra_node" if a // G == b // G else "inter_node"), 1
        acc = out.setdefault((c.kind, link), [0.0, 0])
        acc[0] += c.send_bytes + c.recv_bytes
        acc[1] += messages
    return {k: (v[0], v[1]) for k, v in out.items() if v[0] or v[1]}


def two_level_worker(rank: int, world_size: int, all_cases: list[dict]) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    dist_cases.set_threads()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    position = {r: i for i, r in enumerate(dist.get_process_group_ranks(mesh.get_group()))}
    out = []
    for case in all_cases:
        res = dist_cases.run_case(case, mesh, [Shard(0)])
        G = case["options"]["ranks_per_node"]
        params = dist_cases._make_params(case["shapes"], mesh, [Shard(0)])
        opt = NorMuon([(f"w{i}", p) for i, p in enumerate(params)], ns_dtype=case["ns_dtype"],
                      strategy=strategies.build(case["strategy"], **case["options"]))
        dist_cases._set_grads(params, case["shapes"], 0, mesh, [Shard(0)])
        with CommCounter() as counter:
            opt.step()
        res.update(links_counted=by_link(counter.records, G, position),
                   links_planned=by_link(opt.plan().mine.comm, G, position))
        out.append(res)
    return out
