"""Workers for the schedule tests: every registered strategy counted against its schedule, and a
strategy declared in a test file by its schedule alone."""

from __future__ import annotations

import torch

from dist_ortho import strategies
from dist_ortho.core.plan import bytes_by_group
from dist_ortho.core.schedule import pipeline
from dist_ortho import NorMuon
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.ownership import lpt_owners
from tests.meshes import mesh_cases
from tests.strategies import dist_cases, two_level_cases

# options that make each schedule do all it can on tiny shapes: small buckets, every splittable
# matrix split, node-aware exchanges, the full step on every step
OPTIONS = {"bucketed_async": {"bucket_bytes": 1024}, "split_ns": {"split": "all"},
           "periodic": {"k": 1}, "overlapped": {"bucket_bytes": 1024, "schedule": "step"}}
EXTRA = [("balanced", {"exchange": "two_level", "ranks_per_node": 2}),
         ("split_ns", {"split": "all", "ranks_per_node": 2})]


def runs() -> list[tuple[str, dict]]:
    return [(n, OPTIONS.get(n, {})) for n in strategies.available()] + EXTRA


def counted_by_group_worker(rank: int, world_size: int) -> dict:
    """1-D (every rank one Shard(0) group): per strategy, bytes per (kind, ranks) counted at the
    collectives in two steps and the plan's, which the counter derived from the schedule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world_size,))
    whole = tuple(range(world_size))
    out = {}
    for name, options in runs():
        params = dist_cases._make_params(dist_cases.MIXED, mesh, [Shard(0)])
        opt = NorMuon([(f"w{i}", p) for i, p in enumerate(params)], lr=0.02,
                      strategy=strategies.build(name, **options))
        plan = opt.plan()
        # a node-aware exchange's stages are planned per link class (bytes and messages), the
        # rest per (kind, ranks)
        G = options.get("ranks_per_node")
        staged = [c for c in plan.mine.comm if c.link is not None and c.group is None]

        def view(items):
            items = list(items)
            if not staged:
                return bytes_by_group(items, whole)
            p2p = [c for c in items if c.kind in ("send", "recv")]
            rest = [c for c in items if c.kind not in ("send", "recv")]
            return {**bytes_by_group(rest, whole),
                    **two_level_cases.by_link(p2p, G, {r: r for r in whole})}

        counted = []
        for step in range(2):
            dist_cases._set_grads(params, dist_cases.MIXED, step, mesh, [Shard(0)])
            with CommCounter() as counter:
                opt.step()
            counted.append(view(counter.records))
            assert not counter.unparsed, counter.unparsed
        out[(name, str(options))] = dict(counted=counted, planned=view(plan.mine.comm))
    return out


def counted_on_mesh_worker(rank: int, world_size: int) -> dict:
    """A 2 x 2 HSDP mesh with the replicas sharing the work: per strategy that takes meshes,
    bytes per (kind, mesh axis) counted and planned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for name, options in runs():
        if not strategies.build(name, **options).on_mesh:
            continue
        r = mesh_cases.run_placed(dict(strategy=name, options=options),
                                  [(s, mesh, [Replicate(), Shard(0)]) for s in dist_cases.MIXED],
                                  2, "spread")
        out[(name, str(options))] = dict(counted=r["counted"], planned=r["planned"],
                                          mesh_path=r["mesh_path"])
    return out


class MirroredPipeline(Strategy):
    """A strategy declared by its schedule alone: owners are LPT's mirrored (rank P - 1 - o), and
    the matrices travel in two buckets through the shared pipeline with two forwards in flight.
    No byte formula, no time model: the transports and kernels it names carry them."""

    name = "mirrored_pipeline"
    Options = None

    def assign_owners(self, matrices, world_size):
        return [world_size - 1 - o for o in lpt_owners(matrices, world_size)]

    def schedule(self, matrices, world_size):
        idx = [m.index for m in matrices]
        half = (len(idx) + 1) // 2
        return (self.assign_owners(matrices, world_size),
                pipeline([idx[:half], idx[half:]], "owner_rows", "ns", "owner_rows", lag=2,
                         max_in_flight=1))


def declared_strategy_worker(rank: int, world_size: int) -> dict:
    """MirroredPipeline against the reference (NorMuon and Muon, uneven shards), with its bytes
    counted per kind beside the plan's and the FLOPs it ran beside the plan's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for rule in ("normuon", "muon"):
        case = dict(strategy=MirroredPipeline(), options={}, shapes=dist_cases.MIXED,
                    ns_dtype="float32", rule=rule, nesterov=True, weight_decay=0.1)
        out[rule] = dist_cases.run_case(case, mesh, [Shard(0)])
    return out
