"""Workers for tests/strategies/test_backward_overlap_matches_the_reference.py, run on real gloo
process groups (dist_ortho.testing.processes.spawn).

`train_case` trains the same FSDP2 GPT three ways on every rank, side by side: strategy
`overlapped` with schedule backward (orthogonalization in FSDP2's post-reduce-scatter hooks),
the same strategy with schedule step (the same plan, run after backward), and the single-process
reference (the unwrapped model on the whole global batch, `replicated`). It returns, per step and
per parameter, whether the two FSDP2 runs are bitwise equal (the same plan, buckets and NS batches
on the same gradients must give the same bits), the distance of the overlapped run to the
reference over its derived float32 bound (tests/tolerances.py), and the optimizer's bytes counted
at the collectives beside the plan's.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dist_ortho import OptimizerConfig, build_optimizers, strategies
from dist_ortho.profiling import Profiler, ProfilerConfig
from tests import tolerances
from tests.strategies import dist_cases

# the GPT presets, shrunk so that a world size's whole set of cases runs in seconds; gpt-mini
# with a fused QKV (3d x d) gives shards of unequal rows at P = 3 and 4
PRESETS = {"gpt-tiny": dict(n_layers=2, d_model=48, n_heads=4, seq_len=16),
           "gpt-mini": dict(n_layers=3, d_model=32, n_heads=4, seq_len=16, fused_qkv=True)}
SEQ = 16
GLOBAL_BATCH = 24  # divisible by every world size 1..4 times 2 micro-batches


def _model(mesh, preset: str):
    from torch.distributed.fsdp import fully_shard

    from dist_ortho.models import build_model

    torch.manual_seed(0)
    model = build_model(preset, **PRESETS[preset])
    if mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _micro_batches(step: int, rows: slice, micro: int):
    x, y = dist_cases._batch(step, GLOBAL_BATCH, SEQ)
    x, y = x[rows], y[rows]
    n = x.shape[0] // micro
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(micro)]


def _backward(model, batches, sync_every: bool, fsdp: bool):
    """Accumulate the mean loss's gradient over micro-batches; with FSDP2, reduce gradients on
    every micro-batch (sync_every) or only on the last (FSDP2's set_requires_gradient_sync)."""
    losses = []
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        if fsdp and not sync_every:
            model.set_requires_gradient_sync(last)
        _, loss = model(x, y)
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def _optimizer_bytes(prof: Profiler) -> dict:
    """Bytes per kind of the collectives the optimizer issued (in its backward hooks, phase
    .../overlap, or in step(), phase optimizer/...), from the profiler's per-op records."""
    out: dict = {}
    for c in prof.collectives():
        if "overlap" in c["phase"].split("/") or c["phase"].startswith("optimizer"):
            s, r = out.get(c["kind"], (0.0, 0.0))
            out[c["kind"]] = (s + c["send_bytes"], r + c["recv_bytes"])
    return out


def _scale_grads(model, factor: float) -> None:
    """What gradient clipping does after backward: rescale every gradient in place."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def train_case(rank: int, world_size: int, mesh, preset: str, steps: int, micro: int,
               sync_every: bool, scale_after_backward: float | None = None,
               options: dict | None = None) -> dict:
    """Trains `preset` with `overlapped` schedule backward and schedule step side by side (both
    FSDP2 on `mesh`) and the unwrapped reference on the whole batch; see the module docstring.
    `scale_after_backward`: rescale every gradient after backward in both FSDP2 runs (as clipping
    would), which must make the backward schedule fall back to step time (the reference is then
    the step schedule only: the single-process run is not rescaled)."""
    config = OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    dims = PRESETS[preset]

    reference = _model(None, preset)
    ref_opt = build_optimizers(reference, config, strategy="replicated")
    matrix_ids = {id(p) for g in ref_opt.optimizers[0].param_groups for p in g["params"]}
    named = list(reference.named_parameters())
    tokens = GLOBAL_BATCH * SEQ
    eps_grad, _ = dist_cases.training_errors(dims["n_layers"], dims["d_model"], SEQ, tokens, 256)
    # as in dist_cases.fsdp_train_worker; micro-batches add one more rounding of the gradient's
    # sum (the accumulation), which training_errors' N-term already covers: the same N terms are
    # summed, in another order
    eps_update = [(tolerances.update_error(p.shape, "normuon", "float32")
                   if id(p) in matrix_ids else tolerances.update_error(p.shape, "adamw"))
                  + 2 * eps_grad for _, p in named]
    trajectory = tolerances.Trajectory([p for _, p in named], lr=1.0)

    runs = {}
    for schedule in ("backward", "step"):
        model = _model(mesh, preset)
        opt = build_optimizers(model, config, strategy=strategies.build(
            "overlapped", schedule=schedule, **(options or {})))
        prof = Profiler(ProfilerConfig(memory=False), device=torch.device("cpu"))
        prof.attach(opt)
        runs[schedule] = (model, opt, prof)

    equal, ratios = [], []
    hooks = runs["backward"][1].optimizers[0].overlap
    for step in range(steps):
        _backward(reference, _micro_batches(step, slice(0, GLOBAL_BATCH), 1), True, fsdp=False)
        ref_opt.step()
        ref_opt.zero_grad()
        trajectory.record([p for _, p in named])
        bounds = trajectory.bounds(eps_update)
        params = {}
        for schedule, (model, opt, prof) in runs.items():
            with prof.step(step):
                with prof.phase("forward_backward"):
                    _backward(model, _micro_batches(step, rows, micro), sync_every, True)
                if scale_after_backward is not None:
                    _scale_grads(model, scale_after_backward)
                with prof.phase("optimizer"):
                    opt.step()
            opt.zero_grad()
            params[schedule] = [p.full_tensor().detach() for _, p in model.named_parameters()]
        equal.append([bool(torch.equal(a, b)) for a, b in zip(params["backward"],
                                                               params["step"])])
        ratios.append(tolerances.distance_ratios(params["backward"], [p for _, p in named],
                                                 bounds))
    counted, planned = [], []
    for schedule, (model, opt, prof) in runs.items():
        inner = opt.optimizers[0]
        counted.append(_optimizer_bytes(prof))
        planned.append({k: (s * steps, r * steps)
                        for k, (s, r) in inner.plan().mine.bytes_by_kind().items()})
    inner = runs["backward"][1].optimizers[0]
    plan = inner.plan()
    return dict(equal=equal, ratios=ratios, counted=counted, planned=planned,
                executed_flops=inner.executed_ns_flops, planned_flops=steps * plan.mine.ns_flops,
                restarts=hooks.restarts, fallbacks=hooks.fallbacks,
                redos=[row["value"] for row in runs["backward"][2].rows()
                       if row["metric"] == "overlap_redos"],
                units=[m.unit for m in plan.matrices], buckets=len(plan.buckets),
                unit_order=[[plan.matrices[i].name for i in b] for b in plan.buckets],
                flops_per_rank=[c.ns_flops for c in plan.ranks],
                overlap_phases=sorted({c["phase"] for c in runs["backward"][2].collectives()
                                       if "overlap" in c["phase"].split("/")}))


def manual_grads_case(rank: int, world_size: int, mesh) -> dict:
    """Gradients set by hand on FSDP2 parameters (no backward, so no hook fires): the step runs
    at step time, bitwise equal to schedule step on the same gradients."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for schedule in ("backward", "step"):
        model = _model(mesh, "gpt-tiny")
        opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"),
                               strategy=strategies.build("overlapped", schedule=schedule))
        for step in range(2):
            gen = torch.Generator().manual_seed(10 + step)
            for p in model.parameters():
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), p.device_mesh,
                                           p.placements, src_data_rank=None)
            opt.step()
        out[schedule] = [p.full_tensor() for p in model.parameters()]
        out[schedule + "_hooks"] = opt.optimizers[0].overlap is not None
    return dict(equal=[bool(torch.equal(a, b)) for a, b in zip(out["backward"], out["step"])],
                hooks=out["backward_hooks"])


def overlap_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """Every case of one world size in one process group: {"kind": "train", **train_case args}
    or {"kind": "manual"}."""
    from torch.distributed.device_mesh import init_device_mesh

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    for case in cases:
        case = dict(case)
        kind = case.pop("kind")
        if kind == "train":
            out.append(train_case(rank, world_size, mesh, **case))
        else:
            out.append(manual_grads_case(rank, world_size, mesh))
    dist.barrier()
    return out


def timeline_worker(rank: int, world_size: int, out_dir: str, cpu_rate: float) -> dict:
    """Two FSDP2 GPT runs of `overlapped` (schedule backward), with and without an emulated
    inter-node link, each with a Timeline teed into the loop's and the optimizer's phases as
    `dist_ortho.studies.run` does; the emulated one writes trace.json to `out_dir`. Returns what the
    test checks: parameters of both (emulation must not change a bit), the emulator's delays in
    issue
    order, the optimizer's counted and planned bytes, and the trace's collective spans."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho.profiling.interconnect import LinkEmulator, emulated_link
    from dist_ortho.profiling.timeline import Timeline
    from dist_ortho.studies.phase_marker import Tee

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    out = {}
    for emulate in (True, False):
        model = _model(mesh, "gpt-tiny")
        opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"),
                               strategy=strategies.build("overlapped"))
        # the comm counter on step 0 only: step 1's collectives reach the timeline from the
        # emulator
        prof = Profiler(ProfilerConfig(memory=False, instrument_every=2),
                        device=torch.device("cpu"))
        prof.attach(opt)
        link = emulated_link("h100", "inter_node", cpu_rate)
        timeline = Timeline(rank, {"interconnect": link.label if emulate else "real"})
        for inner in opt.optimizers[:1]:
            inner.set_timer(Tee(inner.timer, timeline))
        timer = Tee(prof, timeline)
        emulator = LinkEmulator(link)
        with emulator if emulate else contextlib.nullcontext():
            for step in range(2):
                timeline.step = step
                with prof.step(step):
                    with timer.phase("forward_backward"):
                        x, y = _micro_batches(step, rows, 1)[0]
                        with timeline.phase("forward"):
                            _, loss = model(x, y)
                        with timeline.phase("backward"):
                            loss.backward()
                    with timer.phase("optimizer"):
                        opt.step()
                opt.zero_grad()
        timeline.close()
        key = "emulated" if emulate else "real"
        out[key] = [p.full_tensor() for p in model.parameters()]
        if emulate:
            timeline.write(out_dir)
            inner = opt.optimizers[0]
            out.update(delays=emulator.delays, counted=_optimizer_bytes(prof),
                       planned={k: (s, r) for k, (s, r)  # one instrumented step
                                in inner.plan().mine.bytes_by_kind().items()},
                       spans=[(s.lane, s.name, s.start_ns, s.end_ns, s.step)
                              for s in timeline.spans if s.cat == "collective"])
    dist.barrier()
    out["equal"] = [bool(torch.equal(a, b)) for a, b in zip(out.pop("emulated"),
                                                            out.pop("real"))]
    return out

