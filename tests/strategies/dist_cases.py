"""Workers run on real gloo process groups by the distributed tests (see
dist_ortho.testing.processes.spawn).

Each worker runs many cases in one process group and returns plain data; the tests assert on it.
Inputs are built from the same seeded global tensors on every rank and sharded locally with
`distribute_tensor(src_data_rank=None)`, so the comparison with the single-process reference is
exact up to floating-point rounding, bounded as derived in tests/tolerances.py: workers return
each parameter's distance to the reference divided by its bound ("ratios", <= 1 to pass).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from dist_ortho import Muon, NorMuon, NSConfig, ReferenceHParams, reference_step
from dist_ortho.profiling.comm import CommCounter
from tests import tolerances

MIXED = [(16, 16), (24, 8), (8, 24), (1, 16), (5, 12), (10, 8), (3, 6, 4), (6, 2, 3, 3)]
SINGLE = [(10, 6)]
FEW = [(7, 5), (9, 9)]
SMALL_BF16 = [(12, 8), (8, 12), (5, 5)]
# a near-dead neuron in MIXED: row 1 of (8, 24) gets 1e-6 of the gradient, so its v is ~1e-11
# and ROW_EPS matters to that row (an epsilon bug moves it by ~20%; see tests/optimizer)
DEAD_ROW = (2, 1, 1e-6)  # index in MIXED, row, scale


def full_tensor(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def exactness_cases(strategies: list[str]) -> list[dict]:
    cases = []
    for s in strategies:
        opts = {"bucket_bytes": 1024} if s == "bucketed_async" else {}
        # split_ns splits every matrix it can here: the planner would keep most of these whole
        base = {"split": "all"} if s == "split_ns" else {}
        opts = opts or base
        cases += [
            dict(strategy=s, options=opts, shapes=MIXED, ns_dtype="float32", rule="normuon"),
            dict(strategy=s, options=opts, shapes=MIXED, ns_dtype="float32", rule="normuon",
                 nesterov=False, weight_decay=0.1),
            dict(strategy=s, options=base, shapes=SINGLE, ns_dtype="float32", rule="normuon"),
            dict(strategy=s, options=base, shapes=FEW, ns_dtype="float32", rule="normuon"),
            dict(strategy=s, options=opts, shapes=MIXED, ns_dtype="float32", rule="muon"),
            dict(strategy=s, options=base, shapes=SMALL_BF16, ns_dtype="bfloat16", rule="normuon"),
        ]
    cases.append(dict(strategy="bucketed_async", options={}, shapes=MIXED, ns_dtype="float32",
                      rule="normuon"))
    cases.append(dict(strategy="allgather_scatter", options={"assignment": "lpt"}, shapes=MIXED,
                      ns_dtype="float32", rule="normuon"))
    if "split_ns" in strategies:  # split groups inside "nodes" of 2 ranks (P = 3: one of 1 rank)
        cases.append(dict(strategy="split_ns", options={"split": "all", "ranks_per_node": 2},
                          shapes=MIXED, ns_dtype="float32", rule="normuon"))
    for case in cases:
        case.setdefault("nesterov", True)
        case.setdefault("weight_decay", 0.0)
    return cases


def _make_params(shapes, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    params = []
    for i, shape in enumerate(shapes):
        full = full_tensor(shape, 1000 + i)
        if mesh is None:
            params.append(torch.nn.Parameter(full))
        else:
            params.append(torch.nn.Parameter(distribute_tensor(full, mesh, placements,
                                                               src_data_rank=None)))
    return params


def _set_grads(params, shapes, step: int, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    grads = []
    for i, (p, shape) in enumerate(zip(params, shapes)):
        g = full_tensor(shape, 7919 * (step + 1) + i)
        if shapes == MIXED and i == DEAD_ROW[0]:  # == : cases arrive pickled on the ranks
            g[DEAD_ROW[1]] *= DEAD_ROW[2]
        grads.append(g)
        p.grad = g.clone() if mesh is None else distribute_tensor(g, mesh, placements,
                                                                  src_data_rank=None)
    return grads


def _gather(p) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()


def run_case(case: dict, mesh, placements, steps: int = 3) -> dict:
    """Step a strategy and the reference side by side; return distance / bound per parameter
    ("ratios"), bytes and FLOPs."""
    shapes = case["shapes"]
    params = _make_params(shapes, mesh, placements)
    names = [f"w{i}" for i in range(len(shapes))]
    cls = NorMuon if case["rule"] == "normuon" else Muon
    kwargs = dict(lr=0.02, momentum=0.95, weight_decay=case["weight_decay"],
                  nesterov=case["nesterov"], ns_dtype=case["ns_dtype"])
    if case["rule"] == "normuon":
        kwargs["beta2"] = 0.95
    from dist_ortho import strategies

    strategy = case["strategy"]  # a registered name, or a Strategy declared by a test
    if isinstance(strategy, str):
        strategy = strategies.build(strategy, **case["options"])
    opt = cls(list(zip(names, params)), strategy=strategy, **kwargs)
    ref = [full_tensor(s, 1000 + i) for i, s in enumerate(shapes)]
    ref_state: dict = {}
    hp = ReferenceHParams(lr=0.02, momentum=0.95, beta2=0.95, weight_decay=case["weight_decay"],
                          nesterov=case["nesterov"], ns=NSConfig(dtype=case["ns_dtype"]))
    trajectory = tolerances.Trajectory(ref, hp.lr, hp.weight_decay)
    counted, planned, unparsed = [], [], []
    plan = opt.plan()
    for step in range(steps):
        grads = _set_grads(params, shapes, step, mesh, placements)
        with CommCounter() as counter:
            opt.step()
        counted.append(counter.totals())
        unparsed.extend(counter.unparsed)
        planned.append(plan.mine.bytes_by_kind())
        reference_step(ref, grads, ref_state, hp, case["rule"])
        trajectory.record(ref)
    split = case["strategy"] == "split_ns"
    bounds = trajectory.bounds([tolerances.update_error(s, case["rule"], case["ns_dtype"],
                                                        split=split) for s in shapes])
    ratios = tolerances.distance_ratios([_gather(p) for p in params], ref, bounds)
    return dict(ratios=ratios, counted=counted, planned=planned,
                executed_flops=opt.executed_ns_flops, planned_flops=steps * plan.mine.ns_flops,
                all_planned_flops=[steps * c.ns_flops for c in plan.ranks],
                owners=list(plan.owner), unparsed=unparsed)


def set_threads() -> None:
    """Threads per rank: 1 (dist_ortho.testing.processes's default) unless $DIST_ORTHO_TEST_THREADS
    says
    otherwise; .ci/run repeats the exactness tests with 1 and 2."""
    threads = os.environ.get("DIST_ORTHO_TEST_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def suite_worker(rank: int, world_size: int, jobs: list[tuple[str, Callable, tuple]]) -> dict:
    """Several workers in one process group, so a world size costs one spawn: `jobs` holds
    (key, a worker function of a case module, its extra args); returns {key: its result}. The
    workers travel to the ranks by reference (their module and name), like any pickled function."""
    set_threads()
    return {key: worker(rank, world_size, *args) for key, worker, args in jobs}


def exactness_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world_size,))
    return [run_case(case, mesh, [Shard(0)]) for case in cases]


def hsdp_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """2-D mesh (replicate x shard): scheduling happens across the shard axis only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    return [run_case(case, mesh, [Replicate(), Shard(0)]) for case in cases]


def plain_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Plain replicated tensors on the world group (DDP-style): owners compute and broadcast."""
    return [run_case(case, None, None) for case in cases]


def bad_input_worker(rank: int, world_size: int) -> dict:
    """Every bad input must raise ValueError at construction on every rank, before collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from dist_ortho import strategies

    mesh = init_device_mesh("cpu", (world_size,))

    def param(shape, placement=Shard(0), dtype=torch.float32):
        t = full_tensor(shape, 3).to(dtype)
        return torch.nn.Parameter(distribute_tensor(t, mesh, [placement], src_data_rank=None))

    attempts = {
        # a sum still to be reduced (Shard(1), tensor parallel, is scheduled: tests/meshes)
        "partial": lambda: NorMuon([("tp.weight", DTensor.from_local(
            full_tensor((8, 8), 3), mesh, [Partial()], run_check=False))]),
        "vector": lambda: NorMuon([("norm.weight", param((8,)))]),
        "bucket_too_small": lambda: NorMuon(
            [("big", param((64, 64))), ("small", param((4, 4)))],
            strategy=strategies.build("bucketed_async", bucket_bytes=1000)),
        "unknown_strategy": lambda: NorMuon([("w", param((8, 8)))], strategy="ring_of_fire"),
        "bad_option": lambda: strategies.build("bucketed_async", max_in_flight=0),
        "unknown_option": lambda: strategies.build("balanced", bucket_bytes=10),
        "mixed_dtypes": lambda: NorMuon([("a", param((8, 8))),
                                         ("b", param((8, 8), dtype=torch.float64))]),
        "nan_lr": lambda: NorMuon([("w", param((8, 8)))], lr=float("nan")),
        "beta_one": lambda: NorMuon([("w", param((8, 8)))], beta2=1.0),
    }
    return raised_messages(attempts)


def raised_messages(attempts: dict) -> dict:
    """{key: the ValueError's message, or None} for each attempt, then a barrier that every rank
    reaches only if no attempt started a collective that could hang."""
    messages = {}
    for key, attempt in attempts.items():
        try:
            attempt()
            messages[key] = None
        except ValueError as exc:
            messages[key] = str(exc)
    dist.barrier()
    return messages


def nonfinite_worker(rank: int, world_size: int) -> dict:
    """NaN on one rank's gradient shard: every rank skips the step and keeps its weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    w = torch.nn.Parameter(distribute_tensor(full_tensor((8, 6), 5), mesh, [Shard(0)],
                                             src_data_rank=None))
    opt = NorMuon([w], strategy="balanced", ns_dtype="float32")
    before = w.to_local().clone()
    g = full_tensor((8, 6), 6)
    g[7, 0] = float("nan")  # lives on the last rank's shard only
    w.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    unchanged = bool(torch.equal(before, w.to_local()))
    state_untouched = "momentum_buffer" not in opt.state[w]
    # a finite step afterwards still works and matches on every rank
    w.grad = distribute_tensor(full_tensor((8, 6), 7), mesh, [Shard(0)], src_data_rank=None)
    opt.step()
    return dict(unchanged=unchanged, state_untouched=state_untouched,
                skipped=opt.skipped_steps, warned=any("non-finite" in str(c.message)
                                                      for c in caught),
                finite_after=bool(torch.isfinite(w.to_local()).all()))


def _tiny_gpt(seed: int):
    from dist_ortho.models import build_model

    torch.manual_seed(seed)
    return build_model("gpt-tiny", n_layers=2, d_model=48, n_heads=4, seq_len=16)


def _batch(step: int, global_batch: int, seq: int):
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, 256, (global_batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def training_errors(n_layers: int, d_model: int, seq: int, tokens: int, vocab: int):
    """Relative float32 errors that differ between the FSDP2 run and the single-process one,
    before the constant C (tests/tolerances.py's model, applied to a training step):

    - forward and backward of a token: per layer matmuls of inner dimensions d, 4d (MLP) and seq
      (attention), forward and backward: 2 n_layers (sqrt(d) + sqrt(4d) + sqrt(seq)) u;
    - a weight gradient sums the contributions of the batch's N tokens, split into per-rank sums
      that FSDP2 reduce-scatters: sqrt(N) u of the sum of |terms|, which is ~sqrt(N) times the
      gradient itself (token contributions have incoherent signs): N u;
    - the loss: a mean of N token losses, each a log-sum-exp over the vocabulary.
    Returns (eps_grad, eps_loss)."""
    u = tolerances.unit_roundoff(torch.float32)
    per_token = 2 * n_layers * (math.sqrt(d_model) + math.sqrt(4 * d_model) + math.sqrt(seq))
    return (tokens + per_token) * u, (math.sqrt(tokens) + math.sqrt(vocab) + per_token) * u


def fsdp_train_worker(rank: int, world_size: int, strategy_names: list[str],
                      steps: int = 4) -> dict:
    """Train a fully_shard-wrapped GPT under each strategy; every rank also trains the unwrapped
    single-process model on the whole global batch, which is the reference.

    Bounds (tests/tolerances.py, item 3, with the gradient error of training_errors added to each
    update's): a parameter of the FSDP2 run is within param_bound of the reference's, the update's
    input error entering NorMuon's Newton-Schulz (its in-band gain, ~1-2) or AdamW's m / sqrt(v)
    (linearly, and by half through v) at most twice; the loss of step t differs by the forward's
    rounding plus, to first order, sum over parameters of ||grad|| x that parameter's bound."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_ortho import OptimizerConfig, build_optimizers

    config = OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3)
    global_batch, seq, n_layers, d_model, vocab = 6, 16, 2, 48, 256
    per_rank = global_batch // world_size
    eps_grad, eps_loss = training_errors(n_layers, d_model, seq, global_batch * seq, vocab)

    reference = _tiny_gpt(0)
    ref_opt = build_optimizers(reference, config, strategy="replicated")
    orthogonalized = {id(p) for g in ref_opt.optimizers[0].param_groups for p in g["params"]}
    named = list(reference.named_parameters())
    eps_update = {n: (tolerances.update_error(p.shape, "normuon", "float32")
                      if id(p) in orthogonalized else tolerances.update_error(p.shape, "adamw"))
                  + 2 * eps_grad for n, p in named}
    trajectory = tolerances.Trajectory([p for _, p in named], lr=1.0)  # records ||W_t - W_t-1||
    ref_losses, loss_bounds, ref_grads0 = [], [], None
    for step in range(steps):
        x, y = _batch(step, global_batch, seq)
        _, loss = reference(x, y)
        loss.backward()
        if step == 0:
            ref_grads0 = {n: p.grad.detach().clone() for n, p in named}
        # weights entering this step's loss are within the bound of the steps taken so far
        loss_bounds.append(trajectory.loss_bound(
            loss.item(), [float(p.grad.double().norm()) for _, p in named],
            [eps_update[n] for n, _ in named], eps_loss))
        ref_opt.step()
        ref_opt.zero_grad()
        trajectory.record([p for _, p in named])
        ref_losses.append(loss.item())
    ref_params = {n: p.detach() for n, p in named}
    bounds = dict(zip([n for n, _ in named], trajectory.bounds([eps_update[n] for n, _ in named])))

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name in strategy_names:
        model = _tiny_gpt(0)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_optimizers(model, config, strategy=name)
        losses, grad_ratios = [], {}
        for step in range(steps):
            x, y = _batch(step, global_batch, seq)
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            _, loss = model(x[rows], y[rows])
            loss.backward()
            if step == 0:  # same weights on both sides: only the gradient's own rounding differs
                for n, p in model.named_parameters():
                    want = ref_grads0[n]
                    got = p.grad.full_tensor()
                    grad_ratios[n] = float((got - want).norm()) / (
                        2 * tolerances.C * eps_grad * float(want.norm()))
            opt.step()
            opt.zero_grad()
            # the global loss is the mean of the equal-size rank losses
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / world_size)
        param_ratios = {n: float((p.full_tensor().detach() - ref_params[n]).norm()) / bounds[n]
                        for n, p in model.named_parameters()}
        loss_ratios = [abs(a - b) / bound for a, b, bound in zip(losses, ref_losses, loss_bounds)]
        out[name] = dict(losses=losses, loss_ratios=loss_ratios, param_ratios=param_ratios,
                         grad_ratios=grad_ratios)
    return dict(reference_losses=ref_losses, runs=out)


def mixed_ns_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    """Two param groups of the same shapes that differ only in NS settings (coefficients, steps):
    every strategy must batch only equal settings and match the reference with each group's own
    NSConfig; settings that cannot share one step (ns_dtype) fail at construction on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from dist_ortho import strategies

    mesh = init_device_mesh("cpu", (world_size,))
    # matrix k goes to rank k % 2 under every ownership policy here, so each owner gets a
    # jordan and a polar_express matrix of one shape and step count: the batch that used to mix
    shapes = [(8, 6)] * 6
    settings = [dict(ns_coefficients="jordan"), dict(ns_coefficients="jordan"),
                dict(ns_coefficients="polar_express"), dict(ns_coefficients="polar_express"),
                dict(ns_coefficients="jordan", ns_steps=3),
                dict(ns_coefficients="polar_express", ns_steps=3)]
    out = {}
    for name in strategy_names:
        params = _make_params(shapes, mesh, [Shard(0)])
        groups = [dict(params=[p], param_names=[f"w{i}"], **s)
                  for i, (p, s) in enumerate(zip(params, settings))]
        opt = NorMuon(groups, ns_dtype="float32", strategy=strategies.build(name))
        ref = [full_tensor(s, 1000 + i) for i, s in enumerate(shapes)]
        start = [r.clone() for r in ref]
        ref_states = [dict() for _ in shapes]
        for step in range(2):
            grads = _set_grads(params, shapes, step, mesh, [Shard(0)])
            opt.step()
            for i, s in enumerate(settings):
                hp = ReferenceHParams(ns=NSConfig(steps=s.get("ns_steps", 5), dtype="float32",
                                                  coefficients=s["ns_coefficients"]))
                reference_step([ref[i]], [grads[i]], ref_states[i], hp, "normuon")
        out[name] = [float((_gather(p).detach() - r).norm() / (r - s0).norm())
                     for p, r, s0 in zip(params, ref, start)]
    params = _make_params(shapes[:2], mesh, [Shard(0)])
    try:
        NorMuon([dict(params=[params[0]], ns_dtype="float32"),
                 dict(params=[params[1]], ns_dtype="bfloat16")], strategy="balanced")
        out["mixed_dtype_error"] = None
    except ValueError as exc:
        out["mixed_dtype_error"] = str(exc)
    dist.barrier()  # every rank gets here: nothing above left a collective pending
    return out
