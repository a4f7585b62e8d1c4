"""Workers for split_ns's member-only rounds on real gloo groups (tests/strategies/test_split_rounds.py).

Every case splits every splittable matrix (`split: "all"`), so the rounds carry the whole
matrix family: wide and tall matrices, row blocks that cut across shard boundaries, shards that
are uneven or empty, groups that overlap (a rank in two splits with different fellows) and
groups kept inside "nodes" of 2 ranks. Each worker returns, per case, the distance to the
single-process reference over its derived bound (dist_cases.run_case) and, for one step, the
bytes counted at each collective and message per (kind, ranks it ran among) beside the plan's.
"""

from __future__ import annotations

import torch

from dist_ortho import NorMuon, strategies
from dist_ortho.core.plan import bytes_by_group
from dist_ortho.profiling.comm import CommCounter
from tests.strategies import dist_cases

# (rows, cols): 3 x 40 leaves an empty shard at P = 4; 40 x 3 and 18 x 7 are tall (row blocks
# across shard boundaries, uneven shards at P = 3, 4); 2 x 9 has fewer A rows than members
SPLIT_SHAPES = [(3, 40), (40, 3), (18, 7), (2, 9), (12, 12), (6, 20)]


def cases() -> list[dict]:
    """split_ns's distributed-suite cases (every splittable matrix split), plus the shapes above
    over groups of up to 3 and up to 4 ranks (overlapping groups), and inside 2-rank nodes."""
    out = dist_cases.exactness_cases(["split_ns"])
    out = [c for c in out if c["strategy"] == "split_ns"]
    for options in ({"split": "all", "max_group": 3}, {"split": "all", "max_group": 4},
                    {"split": "all", "ranks_per_node": 2}):
        out.append(dict(strategy="split_ns", options=options, shapes=SPLIT_SHAPES,
                        ns_dtype="float32", rule="normuon", nesterov=True, weight_decay=0.0))
    return out


def _groups_counted(case: dict, mesh, placements) -> dict:
    """One step of the case: {(kind, ranks): (send, recv)} counted and planned (global ranks)."""
    import torch.distributed as dist

    shapes = case["shapes"]
    params = dist_cases._make_params(shapes, mesh, placements)
    opt = NorMuon([(f"w{i}", p) for i, p in enumerate(params)], ns_dtype=case["ns_dtype"],
                  strategy=strategies.build(case["strategy"], **case["options"]))
    dist_cases._set_grads(params, shapes, 0, mesh, placements)
    with CommCounter() as counter:
        opt.step()
    plan = opt.plan()
    world = tuple(dist.get_process_group_ranks(mesh.get_group()))
    planned = bytes_by_group(plan.mine.comm, tuple(range(len(world))))
    # the plan names ranks of the strategy's group; the counter, global ranks
    planned = {(kind, tuple(world[r] for r in ranks)): v for (kind, ranks), v in planned.items()}
    return dict(counted=bytes_by_group(counter.records, world), planned=planned,
                messages=sum(1 for r in counter.records if r.kind in ("send", "recv")),
                planned_messages=sum(1 for c in plan.mine.comm if c.kind in ("send", "recv")))


def member_rounds_worker(rank: int, world_size: int, all_cases: list[dict]) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    dist_cases.set_threads()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    for case in all_cases:
        res = dist_cases.run_case(case, mesh, [Shard(0)])
        res.update(_groups_counted(case, mesh, [Shard(0)]))
        out.append(res)
    return out
