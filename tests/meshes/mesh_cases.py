"""Workers for the mesh tests (tests/meshes/test_meshes_match_the_reference.py): HSDP spread/repeat,
tensor parallel and expert parallel on real gloo groups, 4 ranks, one spawn for all of them.

Parameters are built from the same seeded global tensors on every rank and placed with torch's
own `distribute_tensor(src_data_rank=None)` on the placements under test (for TP: the placements
`parallelize_module` + `fully_shard` made), so the comparison with the single-process reference
is exact up to float rounding, bounded as tests/tolerances.py derives it. Nothing new enters the
bound: the mesh path runs the same Newton-Schulz on the same whole matrices (its rows possibly in
another order, which moves rounding exactly as another BLAS blocking does) and all-reduces the
same Frobenius partial sums in another grouping, both inside the model's path-independent
sqrt(n) u terms. Workers return distance / bound ("ratios", <= 1 to pass), bytes counted per
(kind, mesh axis) beside the plan's, and FLOPs run beside the plan's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ortho import Muon, NorMuon, NSConfig, ReferenceHParams, reference_step, strategies
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.strategies.mesh import MeshPlan, bytes_by_axis, counted_by_axis
from tests import tolerances
from tests.strategies import dist_cases

# equal-cost matrices: with spread at 2x2 LPT gives every rank exactly 1/4 of the job's NS
# FLOPs (MIXED has one matrix worth half of the job, so no schedule gets near 1/4 there)
EVEN = [(16, 12)] * 4 + [(12, 16)] * 4
MESHES = {"2x2": (2, 2), "4x1": (4, 1), "1x4": (1, 4)}


def _hparams(case):
    return ReferenceHParams(lr=0.02, momentum=0.95, beta2=0.95,
                            weight_decay=case.get("weight_decay", 0.0),
                            nesterov=case.get("nesterov", True),
                            ns=NSConfig(dtype=case.get("ns_dtype", "float32")))


def _place(full: torch.Tensor, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, mesh, placements, src_data_rank=None)


def run_placed(case: dict, layouts: list, steps: int = 3, replicas: str | None = None) -> dict:
    """Step the optimizer on parameters of `layouts` ((shape, mesh, placements) each) beside the
    reference; return ratios, bytes per (kind, axis) counted and planned, FLOPs."""
    shapes = [s for s, _, _ in layouts]
    params = [torch.nn.Parameter(_place(dist_cases.full_tensor(s, 1000 + i), m, pl))
              for i, (s, m, pl) in enumerate(layouts)]
    cls = NorMuon if case.get("rule", "normuon") == "normuon" else Muon
    kwargs = dict(lr=0.02, momentum=0.95, weight_decay=case.get("weight_decay", 0.0),
                  nesterov=case.get("nesterov", True), ns_dtype=case.get("ns_dtype", "float32"))
    if cls is NorMuon:
        kwargs["beta2"] = 0.95
    if replicas is not None:
        kwargs["replicas"] = replicas
    opt = cls([(f"w{i}", p) for i, p in enumerate(params)],
              strategy=strategies.build(case["strategy"], **case.get("options", {})), **kwargs)
    hp = _hparams(case)
    ref = [dist_cases.full_tensor(s, 1000 + i) for i, s in enumerate(shapes)]
    ref_state: dict = {}
    trajectory = tolerances.Trajectory(ref, hp.lr, hp.weight_decay)
    plan = opt.plan()
    counted, unparsed = [], []
    for step in range(steps):
        grads = [dist_cases.full_tensor(s, 7919 * (step + 1) + i) for i, s in enumerate(shapes)]
        for p, g, (_, m, pl) in zip(params, grads, layouts):
            p.grad = _place(g, m, pl)
        with CommCounter() as counter:
            opt.step()
        counted.append(counted_by_axis(plan, counter.records))
        unparsed += counter.unparsed
        reference_step(ref, grads, ref_state, hp, case.get("rule", "normuon"))
        trajectory.record(ref)
    bounds = trajectory.bounds([tolerances.update_error(s, case.get("rule", "normuon"),
                                                        case.get("ns_dtype", "float32"))
                                for s in shapes])
    ratios = tolerances.distance_ratios([p.full_tensor() for p in params], ref, bounds)
    return dict(ratios=ratios, counted=counted, planned=bytes_by_axis(plan.mine.comm),
                executed_flops=opt.executed_ns_flops, planned_flops=steps * plan.mine.ns_flops,
                all_planned_flops=[c.ns_flops for c in plan.ranks],
                job_flops=sum(s.flops for s in plan.matrices),
                mesh_path=isinstance(plan, MeshPlan), unparsed=unparsed,
                replicas=opt.replicas)


def hsdp_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    """(replicate x shard) meshes 2x2, 4x1, 1x4: every strategy with replicas spread and repeat
    on MIXED (uneven and empty shards, stacks, conv) and on EVEN (the FLOP split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    out = {}
    for label, shape in MESHES.items():
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        pl = [Replicate(), Shard(0)]
        modes = ("spread", "repeat") if label == "2x2" else ("spread",)
        for replicas in modes:
            for name in strategy_names:
                case = dict(strategy=name, options={"bucket_bytes": 1024}
                            if name == "bucketed_async" else {})
                steps = 3 if label == "2x2" else 2
                out[(label, replicas, name, "mixed")] = run_placed(
                    case, [(s, mesh, pl) for s in dist_cases.MIXED], steps, replicas)
                if label == "2x2":
                    out[(label, replicas, name, "even")] = run_placed(
                        case, [(s, mesh, pl) for s in EVEN], 1, replicas)
    # Muon (no reductions) once, on the spread path
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out[("2x2", "spread", "balanced", "muon")] = run_placed(
        dict(strategy="balanced", rule="muon"),
        [(s, mesh, [Replicate(), Shard(0)]) for s in dist_cases.MIXED], 2, "spread")
    return out


def _tp_layouts(mesh):
    """Weights as parallelize_module (ColwiseParallel / RowwiseParallel on "tp") and then
    fully_shard (on "dp") place them, uneven shapes and an empty shard included, plus one weight
    TP leaves alone (on the dp sub-mesh only: every TP rank holds a copy)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    dims = [10, 13, 7, 3, 9, 8]  # Linear(10, 13) col, (13, 7) row, (7, 3) col, (3, 9) row, ...
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False)
                                  for a, b in zip(dims[:-1], dims[1:])])
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel(),
                                           "2": ColwiseParallel(), "3": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    # and a row-parallel weight without FSDP (on the tp sub-mesh: a copy on each dp rank)
    return [(tuple(p.shape), p.device_mesh, tuple(p.placements)) for p in model.parameters()] + \
        [((7, 9), mesh["tp"], (Shard(1),))]


def tp_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    """2x2 (dp, tp): every strategy, replicas spread and repeat, NorMuon and Muon."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    layouts = _tp_layouts(mesh)
    out = {"placements": [str(pl) for _, _, pl in layouts]}
    for name in strategy_names:
        case = dict(strategy=name, options={"bucket_bytes": 600}
                    if name == "bucketed_async" else {})
        for replicas in ("spread", "repeat"):
            out[(name, replicas)] = run_placed(case, layouts, 2, replicas)
    out[("balanced", "muon")] = run_placed(dict(strategy="balanced", rule="muon"), layouts, 2)
    return out


def ep_worker(rank: int, world_size: int, strategy_names: list[str]) -> dict:
    """3-D expert stacks on a 2x2 (ep, dp) mesh, fused layouts as MoE models store them:
    gate_up_proj (E, 2I, H) and down_proj (E, H, I).

    - "local": experts split over ep and dp (Shard(0) on both), whole on their rank: orthogonalized
      where they live, no traffic but the non-finite flag; E = 3 leaves one rank with none.
    - "split": experts over ep, rows over dp (Shard(1)): scheduled like any matrix over dp; plus
      a dense weight on dp only (replicated across ep: spread shares it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
    E, I, H = 4, 6, 5
    local = [((E, 2 * I, H), mesh, [Shard(0), Shard(0)]), ((E, H, I), mesh, [Shard(0), Shard(0)]),
             ((3, 2 * I, H), mesh, [Shard(0), Shard(0)])]
    split = [((E, 2 * I, H), mesh, [Shard(0), Shard(1)]), ((E, H, I), mesh, [Shard(0), Shard(1)]),
             ((3, 7, H), mesh, [Shard(0), Shard(1)]), ((9, 6), mesh["dp"], [Shard(0)])]
    out = {}
    for name in strategy_names:
        case = dict(strategy=name, options={"bucket_bytes": 512}
                    if name == "bucketed_async" else {})
        out[(name, "local")] = run_placed(case, local, 2)
        out[(name, "split")] = run_placed(case, split, 2)
    return out


def bad_mesh_input_worker(rank: int, world_size: int) -> dict:
    """Placements no strategy can schedule exactly: ValueError at construction, every rank, the
    same message, before any collective (the barrier at the end is reached by all)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def param(shape, placements, on=mesh):
        full = dist_cases.full_tensor(shape, 3)
        if any(isinstance(p, Partial) for p in placements):
            return torch.nn.Parameter(DTensor.from_local(full, on, placements, run_check=False))
        return torch.nn.Parameter(_place(full, on, placements))

    attempts = {
        "partial": lambda: NorMuon([("tp.partial", param((8, 8), [Shard(0), Partial()]))]),
        "two_column_axes": lambda: NorMuon([("w.cols", param((8, 8), [Shard(1), Shard(1)]))]),
        "columns_before_rows": lambda: NorMuon([("w.order", param((8, 8), [Shard(1), Shard(0)]))]),
        "conv_columns": lambda: NorMuon([("conv", param((4, 2, 3, 3), [Shard(0), Shard(1)]))]),
        "bad_replicas": lambda: NorMuon([("w", param((8, 8), [Shard(0), Shard(0)]))],
                                        replicas="everywhere"),
    }
    return dist_cases.raised_messages(attempts)


def _step_time(name: str):
    """The strategy to train with on a mesh: `overlapped` runs there with schedule step."""
    return strategies.build(name, schedule="step") if name == "overlapped" else name


def _tp_gpt(mesh):
    """dist_cases' tiny GPT with tensor-parallel MLPs (fc_in column-, fc_out row-parallel on
    "tp"), every block and then the root fully_shard-ed on "dp" (torchtitan's order)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    model = dist_cases._tiny_gpt(0)
    for block in model.blocks:
        parallelize_module(block.mlp, mesh["tp"], {"fc_in": ColwiseParallel(),
                                                   "fc_out": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def tp_train_worker(rank: int, world_size: int, strategy_names: list[str], steps: int = 3) -> dict:
    """A GPT whose MLPs are tensor parallel (fc_in ColwiseParallel, fc_out RowwiseParallel on
    "tp") and whose blocks are fully_shard-ed on "dp", 2x2, trained under each strategy beside the
    single-process model on the whole batch (the bounds of dist_cases.fsdp_train_worker: the TP
    all-reduce of fc_out's partial outputs is one more reordered sum per token, inside its
    per-token term)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho import OptimizerConfig, build_optimizers

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    config = OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3)
    global_batch, seq, n_layers, d_model, vocab = 4, 16, 2, 48, 256
    eps_grad, eps_loss = dist_cases.training_errors(n_layers, d_model, seq, global_batch * seq,
                                                    vocab)
    reference = dist_cases._tiny_gpt(0)
    ref_opt = build_optimizers(reference, config, strategy="replicated")
    orthogonalized = {id(p) for g in ref_opt.optimizers[0].param_groups for p in g["params"]}
    named = list(reference.named_parameters())
    eps_update = {n: (tolerances.update_error(p.shape, "normuon", "float32")
                      if id(p) in orthogonalized else tolerances.update_error(p.shape, "adamw"))
                  + 2 * eps_grad for n, p in named}
    trajectory = tolerances.Trajectory([p for _, p in named], lr=1.0)
    ref_losses, loss_bounds = [], []
    for step in range(steps):
        x, y = dist_cases._batch(step, global_batch, seq)
        _, loss = reference(x, y)
        loss.backward()
        loss_bounds.append(trajectory.loss_bound(
            loss.item(), [float(p.grad.double().norm()) for _, p in named],
            [eps_update[n] for n, _ in named], eps_loss))
        ref_opt.step()
        ref_opt.zero_grad()
        trajectory.record([p for _, p in named])
        ref_losses.append(loss.item())
    bounds = dict(zip([n for n, _ in named], trajectory.bounds([eps_update[n] for n, _ in named])))
    dp = mesh["dp"].get_local_rank()
    per_rank = global_batch // 2
    out = {}
    for name in strategy_names:
        model = _tp_gpt(mesh)
        if name == "overlapped":  # no backward overlap on the mesh path: one clear error
            try:
                build_optimizers(model, config, strategy=name)
            except ValueError as e:
                assert "schedule='step'" in str(e), e
            else:
                raise AssertionError("overlapped (schedule backward) on a TP mesh did not raise")
        opt = build_optimizers(model, config, strategy=_step_time(name))
        on_mesh = isinstance(opt.optimizers[0].plan(), MeshPlan)
        losses = []
        for step in range(steps):
            x, y = dist_cases._batch(step, global_batch, seq)
            rows = slice(dp * per_rank, (dp + 1) * per_rank)
            _, loss = model(x[rows], y[rows])
            loss.backward()
            opt.step()
            opt.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)  # each dp loss is counted once per tp rank
            losses.append(total.item() / world_size)
        ratios = {n: float((p.full_tensor().detach() - dict(named)[n].detach()).norm()) / bounds[n]
                  for n, p in model.named_parameters()}
        out[name] = dict(losses=losses, param_ratios=ratios, on_mesh=on_mesh,
                         loss_ratios=[abs(a - b) / c
                                      for a, b, c in zip(losses, ref_losses, loss_bounds)],
                         placements={n: str(p.placements) for n, p in model.named_parameters()})
    return dict(reference_losses=ref_losses, runs=out)


def suite_worker(rank: int, world_size: int, jobs: list) -> dict:
    """All mesh jobs in one process group (see dist_cases.suite_worker)."""
    return dist_cases.suite_worker(rank, world_size, jobs)


def ep_train_worker(rank: int, world_size: int, strategy_names: list[str], steps: int = 3) -> dict:
    """`TinyMoE` with its expert stacks split over "ep" (Shard(0), whole experts per rank,
    replicated on "dp") and its other weights replicated, trained through DTensor (which computes
    each rank's experts and all-reduces their weighted sum), every strategy, beside the
    single-process model; every rank sees the whole batch. DTensor leaves some gradients
    Partial; they are reduced to the parameters' placements before the step, as FSDP2 does.

    Bounds: dist_cases.fsdp_train_worker's, with d_model = H = 32 (the MoE's contractions have
    inner dimensions H, I = 16 and E = 4, all within the GPT model's d, 4d and seq terms)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from dist_ortho.models.moe import TinyMoE

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
    batch, seq, layers, hidden, vocab = 4, 16, 2, 32, 256
    eps_grad, eps_loss = dist_cases.training_errors(layers, hidden, seq, batch * seq, vocab)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        return TinyMoE(vocab=vocab, hidden=hidden, n_layers=layers)

    def optimizers(model, strategy):
        ortho = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        return (NorMuon(ortho, lr=0.02, ns_dtype="float32", strategy=strategy),
                torch.optim.AdamW(rest, lr=1e-2))

    reference = build()
    named = list(reference.named_parameters())
    orthogonalized = {n for n, p in named if p.ndim >= 2 and "emb" not in n}
    eps_update = {n: (tolerances.update_error(p.shape, "normuon", "float32")
                      if n in orthogonalized else tolerances.update_error(p.shape, "adamw"))
                  + 2 * eps_grad for n, p in named}
    trajectory = tolerances.Trajectory([p for _, p in named], lr=1.0)
    ref_opts = optimizers(reference, "replicated")
    ref_losses, loss_bounds = [], []
    for _ in range(steps):
        _, loss = reference(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        loss_bounds.append(2 * tolerances.C * eps_loss * abs(loss.item()) + sum(
            float(p.grad.double().norm()) * tolerances.param_bound(
                eps_update[n], trajectory.w_norms[i], trajectory.steps[i])
            for i, (n, p) in enumerate(named)))
        for opt in ref_opts:
            opt.step()
            opt.zero_grad()
        trajectory.record([p for _, p in named])
        ref_losses.append(loss.item())
    bounds = dict(zip([n for n, _ in named], trajectory.bounds([eps_update[n] for n, _ in named])))
    R = [Replicate(), Replicate()]
    x, y = (DTensor.from_local(t, mesh, R) for t in (tokens[:, :-1], tokens[:, 1:]))
    out = {}
    for name in strategy_names:
        model = build()
        for module in list(model.modules()):
            for pname, p in list(module.named_parameters(recurse=False)):
                placements = [Shard(0), Replicate()] if p.ndim == 3 else R
                setattr(module, pname, torch.nn.Parameter(
                    distribute_tensor(p.data, mesh, placements, src_data_rank=None)))
        opts = optimizers(model, name)
        losses = []
        for _ in range(steps):
            _, loss = model(x, y)
            loss.backward()
            for p in model.parameters():
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            for opt in opts:
                opt.step()
                opt.zero_grad()
            losses.append(loss.full_tensor().item())
        ratios = {n: float((p.full_tensor().detach() - dict(named)[n].detach()).norm()) / bounds[n]
                  for n, p in model.named_parameters()}
        out[name] = dict(losses=losses, param_ratios=ratios,
                         loss_ratios=[abs(a - b) / c
                                      for a, b, c in zip(losses, ref_losses, loss_bounds)],
                         on_mesh=isinstance(opts[0].plan(), MeshPlan),
                         stacks={n: str(p.placements) for n, p in model.named_parameters()
                                 if p.ndim == 3})
    return dict(reference_losses=ref_losses, runs=out)


def tp_checkpoint_worker(rank: int, world_size: int, root: str) -> dict:
    """dist_ortho.checkpointing.checkpoint on a 2x2 FSDP2 x TP GPT (mesh-path NorMuon state:
    momentum and v in the row layout): saving before any step creates every state (all ranks save
    the same keys); after 2 steps, save, load into a fresh model and optimizer, and one more step on
    both gives bitwise the same weights."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho import OptimizerConfig, build_optimizers
    from dist_ortho.checkpointing import checkpoint

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    config = OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3)
    dp = mesh["dp"].get_local_rank()

    def build():
        model = _tp_gpt(mesh)
        return model, build_optimizers(model, config, strategy="balanced")

    def step(model, opt, s):
        x, y = dist_cases._batch(s, 4, 16)
        _, loss = model(x[dp * 2:dp * 2 + 2], y[dp * 2:dp * 2 + 2])
        loss.backward()
        opt.step()
        opt.zero_grad()

    fresh, fresh_opt = build()
    checkpoint.save(f"{root}/fresh", 0, fresh, fresh_opt)
    model, opt = build()
    for s in range(2):
        step(model, opt, s)
    checkpoint.save(root, 2, model, opt)
    other, other_opt = build()
    loaded = checkpoint.load(root, other, other_opt)
    step(model, opt, 2)
    step(other, other_opt, 2)
    return dict(loaded=loaded, bitwise=all(torch.equal(a.to_local(), b.to_local())
                                           for a, b in zip(model.parameters(),
                                                           other.parameters())))
