"""Workers for tests/strategies/test_inexact_schedules.py: the inexact schedules (strategies blockwise,
local_norms, periodic) on real gloo process groups, each beside the single-process reference of its
own definition (`dist_ortho.optim.inexact_reference`), at P = 1..4, on 1-D FSDP2 shards (uneven and
empty ones: dist_cases.MIXED), plain replicated tensors and, for blockwise, a 2x2 (dp, tp) mesh.

The float bound is tests/tolerances.py's `update_error` of the whole matrix, and it holds for the
schedules by the same model: blockwise runs Newton-Schulz on a block whose dims are each at most the
matrix's (eps_ns grows with sqrt(l) and sqrt(k), so a block's is smaller); local_norms sums fewer
squares for its Frobenius norms (sqrt(N) shrinks); the rest is the exact rule's code. Block errors
are relative to each block, and their squares add up to at most eps^2 ||U||^2. Workers return
distance / bound per parameter ("ratios", <= 1 to pass), bytes counted beside the plan and FLOPs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ortho import Muon, NorMuon, NSConfig, ReferenceHParams, strategies
from dist_ortho.core.sharding import chunk_sizes
from dist_ortho.optim.inexact_reference import inexact_reference_step
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.strategies.mesh import MeshPlan, bytes_by_axis, counted_by_axis
from tests import tolerances
from tests.strategies import dist_cases

STEPS = 4  # periodic with k = 2: block, full, block, full


def schedule_cases() -> list[dict]:
    cases = []
    for rule in ("normuon", "muon"):
        cases += [dict(strategy="blockwise", options={}, rule=rule),
                  dict(strategy="local_norms", options={}, rule=rule),
                  dict(strategy="periodic", options={"k": 2, "full_lr_scale": 0.5}, rule=rule)]
    cases.append(dict(strategy="periodic", options={"k": 3}, rule="normuon"))
    cases.append(dict(strategy="blockwise", options={}, rule="normuon", ns_dtype="bfloat16",
                      shapes=dist_cases.SMALL_BF16))
    for case in cases:
        case.setdefault("ns_dtype", "float32")
        case.setdefault("shapes", dist_cases.MIXED)
    return cases


def _row_blocks(plan, index: int) -> tuple[int, ...]:
    """Rows per block, in matrix order, of the row layout the mesh path hands the strategy:
    each member of the parameter's row group G holds one contiguous run of rows."""
    lay = plan.layouts[index]
    dom = next(d for d in plan.domains if any(u.param == index for u in d.units))
    runs = []
    for r in dom.instance(plan.global_rank).members:
        t, _ = lay.col_position(r)
        start = lay.extent(0, r)[0] + sum(lay.row_split(r)[:t])
        runs.append((start, lay.rows(r)))
    return tuple(n for _, n in sorted(runs))


def run_schedule(case: dict, layouts: list, world_size: int, steps: int = STEPS,
                 replicas: str | None = None) -> dict:
    """Step the schedule on parameters of `layouts` ((shape, mesh, placements); mesh None: plain
    tensors) beside its own reference; ratios, bytes per step counted and planned, FLOPs."""
    from torch.distributed.tensor import distribute_tensor

    shapes = [s for s, _, _ in layouts]

    def place(full, mesh, pl):
        return full.clone() if mesh is None else distribute_tensor(full, mesh, pl,
                                                                   src_data_rank=None)

    params = [torch.nn.Parameter(place(dist_cases.full_tensor(s, 1000 + i), m, pl))
              for i, (s, m, pl) in enumerate(layouts)]
    cls = NorMuon if case["rule"] == "normuon" else Muon
    kwargs = dict(lr=0.02, momentum=0.95, ns_dtype=case["ns_dtype"])
    if replicas is not None:
        kwargs["replicas"] = replicas
    opt = cls([(f"w{i}", p) for i, p in enumerate(params)],
              strategy=strategies.build(case["strategy"], **case["options"]), **kwargs)
    plan = opt.plan()
    on_mesh = isinstance(plan, MeshPlan)
    if on_mesh:
        sizes = [_row_blocks(plan, i) for i in range(len(shapes))]
    else:
        sizes = [(s[0],) if m is None else chunk_sizes(s[0], world_size)
                 for s, m, _ in layouts]
    hp = ReferenceHParams(lr=0.02, momentum=0.95, beta2=0.95, ns=NSConfig(dtype=case["ns_dtype"]))
    ref = [dist_cases.full_tensor(s, 1000 + i) for i, s in enumerate(shapes)]
    ref_state: dict = {}
    trajectory = tolerances.Trajectory(ref, hp.lr)
    counted, unparsed = [], []
    for step in range(steps):
        grads = [dist_cases.full_tensor(s, 7919 * (step + 1) + i) for i, s in enumerate(shapes)]
        if case["shapes"] is dist_cases.MIXED:  # the near-dead row (dist_cases.DEAD_ROW)
            grads[dist_cases.DEAD_ROW[0]][dist_cases.DEAD_ROW[1]] *= dist_cases.DEAD_ROW[2]
        for p, g, (_, m, pl) in zip(params, grads, layouts):
            p.grad = place(g, m, pl)
        with CommCounter() as counter:
            opt.step()
        counted.append(counted_by_axis(plan, counter.records))
        unparsed += counter.unparsed
        inexact_reference_step(case["strategy"], ref, grads, ref_state, hp, world_size,
                               case["rule"], k=case["options"].get("k", 4),
                               full_lr_scale=case["options"].get("full_lr_scale", 1.0),
                               sizes=sizes)
        trajectory.record(ref)
    bounds = trajectory.bounds([tolerances.update_error(s, case["rule"], case["ns_dtype"])
                                for s in shapes])
    got = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in params]
    return dict(ratios=tolerances.distance_ratios(got, ref, bounds), counted=counted,
                planned=bytes_by_axis(plan.mine.comm), executed_flops=opt.executed_ns_flops,
                plan_flops=plan.mine.ns_flops, full_flops=sum(m.flops for m in plan.matrices),
                unparsed=unparsed, describe=opt.strategy.describe(), mesh_path=on_mesh,
                exact_ratios=_exact_distance(params, got, shapes, hp, case, steps))


def _exact_distance(params, got, shapes, hp, case, steps) -> list[float]:
    """Distance of the schedule's weights to the exact reference's, in the same units: shows the
    schedule is not the exact update (the test asserts it is far outside the bound)."""
    from dist_ortho import reference_step

    ref = [dist_cases.full_tensor(s, 1000 + i) for i, s in enumerate(shapes)]
    state: dict = {}
    trajectory = tolerances.Trajectory(ref, hp.lr)
    for step in range(steps):
        grads = [dist_cases.full_tensor(s, 7919 * (step + 1) + i) for i, s in enumerate(shapes)]
        if case["shapes"] is dist_cases.MIXED:
            grads[dist_cases.DEAD_ROW[0]][dist_cases.DEAD_ROW[1]] *= dist_cases.DEAD_ROW[2]
        reference_step(ref, grads, state, hp, case["rule"])
        trajectory.record(ref)
    bounds = trajectory.bounds([tolerances.update_error(s, case["rule"], case["ns_dtype"])
                                for s in shapes])
    return tolerances.distance_ratios(got, ref, bounds)


def fsdp_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    return [run_schedule(c, [(s, mesh, [Shard(0)]) for s in c["shapes"]], world_size)
            for c in cases]


def plain_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Plain replicated tensors: every rank holds the whole matrix, one block."""
    dist_cases.set_threads()
    return [run_schedule(c, [(s, None, None) for s in c["shapes"]], world_size) for c in cases]


def tp_worker(rank: int, world_size: int) -> dict:
    """blockwise on a 2x2 (dp, tp) mesh: ColwiseParallel / RowwiseParallel weights fully_shard-ed
    on dp (tests/mesh_cases._tp_layouts), replicas spread and repeat, NorMuon and Muon."""
    from torch.distributed.device_mesh import init_device_mesh

    from tests.meshes import mesh_cases

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    layouts = mesh_cases._tp_layouts(mesh)
    out = {}
    for rule in ("normuon", "muon"):
        for replicas in ("spread", "repeat"):
            case = dict(strategy="blockwise", options={}, rule=rule, ns_dtype="float32",
                        shapes=None)
            out[(rule, replicas)] = run_schedule(case, layouts, world_size, 3, replicas)
    return out


def refusal_worker(rank: int, world_size: int) -> dict:
    """Where a schedule cannot apply: one ValueError line, on every rank, before any collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    w = dist_cases.full_tensor((8, 6), 3)

    def tp_param():
        return torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0), Shard(1)],
                                                    src_data_rank=None))

    attempts = {
        "periodic_on_mesh": lambda: NorMuon([("tp.weight", tp_param())], strategy="periodic"),
        "local_norms_on_mesh": lambda: NorMuon([("tp.weight", tp_param())],
                                               strategy="local_norms"),
        "periodic_k0": lambda: strategies.build("periodic", k=0),
        "periodic_scale": lambda: strategies.build("periodic", full_lr_scale=-1.0),
    }
    messages = dist_cases.raised_messages(attempts)
    return messages


def deviation_worker(rank: int, world_size: int) -> dict:
    """The deviation meter around real steps on FSDP2 shards of MIXED: per strategy, the rows of
    two measured steps; for blockwise, the distance its own reference predicts for step 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_ortho.optim.inexact_reference import inexact_update
    from dist_ortho.optim.reference import normuon_update
    from dist_ortho.profiling.deviation import DeviationMeter, deviation

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    shapes = dist_cases.MIXED
    out = {}
    for name in ("balanced", "blockwise", "local_norms"):
        params = [torch.nn.Parameter(distribute_tensor(dist_cases.full_tensor(s, 1000 + i), mesh,
                                                       [Shard(0)], src_data_rank=None))
                  for i, s in enumerate(shapes)]
        opt = NorMuon([(f"w{i}", p) for i, p in enumerate(params)], strategy=name,
                      ns_dtype="float32")
        meter = DeviationMeter([opt], rank)
        for step in range(2):
            for i, (p, s) in enumerate(zip(params, shapes)):
                p.grad = distribute_tensor(dist_cases.full_tensor(s, 7919 * (step + 1) + i), mesh,
                                           [Shard(0)], src_data_rank=None)
            meter.before_step(step)
            opt.step()
            meter.after_step()
        out[name] = meter.rows
    hp = ReferenceHParams(ns=NSConfig(dtype="float32"))
    predicted = {}
    for i, s in enumerate(shapes):
        g = dist_cases.full_tensor(s, 7919 + i)
        v_shape = tuple(s[:-1]) if len(s) < 4 else (s[0],)
        exact = normuon_update(g, torch.zeros(s), torch.zeros(v_shape), hp)
        block = inexact_update("blockwise", g, torch.zeros(s), torch.zeros(v_shape), hp,
                               chunk_sizes(s[0], world_size))
        predicted[f"w{i}"] = deviation(block, exact)
    out["predicted_blockwise"] = predicted
    return out
