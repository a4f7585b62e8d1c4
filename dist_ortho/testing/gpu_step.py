"""GPU checks of the optimizer step's stream discipline and capture readiness (run by
`dist_ortho.testing.gpu_check`, each in its own process; they need a CUDA GPU).

`step_stream_overlap`: a 3-unit FSDP2 model on an NCCL group of one rank (FSDP2 then "reduce-
scatters" with a copy on its reduce-scatter stream), strategy `overlapped` with its work started
from the backward hooks, profiled with torch.profiler. The first unit (last in forward) holds
large matrices, so its Newton-Schulz runs for milliseconds; with the pipeline's lag of one bucket
it is launched from the second unit's hook, before the third unit's reduce-scatter is. On FSDP2's
stream, that reduce-scatter would start after the NS ended; on the optimizer's own stream it must
start before. Also checked: the hooks ran on another thread than the one that called backward()
(the autograd engine's device thread), no kernel of the optimizer ran on FSDP2's reduce-scatter
stream, and the step's result equals the same plan run at step time (schedule step).

`step_cuda_graph`: a nonfinite="mask", capturable step with 0-d tensor lr is captured in a CUDA
graph and replayed on new gradients (copied into the captured gradient tensors), against the same
steps run eagerly; a replay on a NaN gradient leaves the weights as they were.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dist_ortho import strategies
from dist_ortho.optim.optimizer import NorMuon
from dist_ortho.optim.streams import StreamCall
from dist_ortho.core.timing import PhaseTimer

__all__ = ["step_stream_overlap", "step_cuda_graph", "reduce_scatter_before_ns_end"]

BIG, BIG_COUNT, SMALL = 4096, 8, 64


class _Annotations(PhaseTimer):
    """Marks the optimizer's phases in the profiler trace (record_function ranges dist_ortho::*)."""

    def phase(self, name: str):
        return torch.profiler.record_function(f"dist_ortho::{name}")


def _three_unit_model(mesh) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(BIG, SMALL, bias=False), nn.Linear(SMALL, BIG, bias=False),
                          nn.Sequential(*[nn.Linear(BIG, BIG, bias=False)
                                          for _ in range(BIG_COUNT)])).cuda()
    for unit in model:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _device_ops(trace: dict) -> tuple[list[dict], dict[int, dict]]:
    """(user annotations, {correlation: (runtime launch event, device event)}) of a chrome trace."""
    events = trace["traceEvents"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    device = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "correlation" in e.get(
                "args", {}):
            launch = launches.get(e["args"]["correlation"])
            if launch is not None:
                device[e["args"]["correlation"]] = (launch, e)
    annotations = [e for e in events if e.get("cat") == "user_annotation" and e.get("ph") == "X"]
    return annotations, device


def _inside(range_: dict, launch: dict) -> bool:
    return (launch["tid"] == range_["tid"]
            and range_["ts"] <= launch["ts"] <= range_["ts"] + range_.get("dur", 0))


def reduce_scatter_before_ns_end(trace: dict) -> dict:
    """From a trace of one backward: per FSDP2 unit (in backward order) its reduce-scatter device
    ops (those of its FSDP::post_backward_reduce range outside the optimizer's ranges, on the stream
    of the range's last such op) and the NS device ops of each bucket (dist_ortho::ns ranges, in
    time order). Returns the streams and, for every (NS of unit i, reduce-scatter of unit j > i
    launched after that NS), whether the reduce-scatter started before the NS ended."""
    annotations, device = _device_ops(trace)
    reduces = sorted((a for a in annotations if a["name"].startswith("FSDP::post_backward_reduce")),
                     key=lambda a: a["ts"])
    ours = [a for a in annotations if a["name"].startswith("dist_ortho::")]
    ns_ranges = sorted((a for a in ours if a["name"] == "dist_ortho::ns"), key=lambda a: a["ts"])
    ops = sorted(device.values(), key=lambda pair: pair[0]["ts"])
    units = []
    for r in reduces:
        mine = [(launch, dev) for launch, dev in ops if _inside(r, launch)
                and not any(_inside(a, launch) for a in ours)]
        if not mine:
            continue
        stream = mine[-1][1]["args"].get("stream")
        rs = [(launch, dev) for launch, dev in mine if dev["args"].get("stream") == stream]
        units.append({"name": r["name"], "stream": stream,
                      "launch_ts": min(launch["ts"] for launch, _ in rs),
                      "start": min(dev["ts"] for _, dev in rs)})
    ns = []
    for a in ns_ranges:
        mine = [(launch, dev) for launch, dev in ops if _inside(a, launch)]
        if mine:
            ns.append({"launch_ts": min(launch["ts"] for launch, _ in mine),
                       "end": max(dev["ts"] + dev.get("dur", 0) for _, dev in mine),
                       "streams": sorted({dev["args"].get("stream") for _, dev in mine})})
    pairs = [{"ns": i, "reduce_scatter": j, "starts_before_ns_end": u["start"] < n["end"]}
             for i, n in enumerate(ns) for j, u in enumerate(units)
             if j > i and u["launch_ts"] > n["launch_ts"]]
    return {"units": units, "ns": ns, "pairs": pairs,
            "ns_streams": sorted({s for n in ns for s in n["streams"]}),
            "reduce_scatter_streams": sorted({u["stream"] for u in units})}


def _train(model, schedule: str, x: torch.Tensor, steps: int, profile_step: int | None,
           out: Path):
    opt = NorMuon([p for p in model.parameters()], strategy=strategies.build(
        "overlapped", schedule=schedule), lr=0.02)
    opt.overlap_with_backward(model)
    log: list[StreamCall] = []
    if opt.overlap is not None:
        opt.overlap.streams.log = log
    opt.set_timer(_Annotations())
    trace = None
    for step in range(steps):
        profiling = step == profile_step
        prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                   torch.profiler.ProfilerActivity.CUDA])
                if profiling else contextlib.nullcontext())
        with prof:
            model(x).float().square().mean().backward()
            torch.cuda.synchronize()
        if profiling:
            path = out / f"stream_overlap_{schedule}.json"
            prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        opt.step()
        opt.zero_grad()
    return opt, log, trace


def step_stream_overlap(out: Path) -> dict:
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    try:
        mesh = init_device_mesh("cuda", (1,))
        x = torch.randn(64, BIG, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        main = threading.get_ident()
        results = {}
        for schedule in ("backward", "step"):
            model = _three_unit_model(mesh)
            opt, log, trace = _train(model, schedule, x, steps=3,
                                     profile_step=2 if schedule == "backward" else None, out=out)
            results[schedule] = [p.full_tensor().detach() for p in model.parameters()]
            if schedule == "backward":
                timing = reduce_scatter_before_ns_end(trace)
                enters = [c for c in log if c.what == "enter"]
                hook_threads = sorted({c.thread != main for c in enters})
                sources = sorted({c.source for c in enters})
                fallbacks = opt.overlap.fallbacks
    finally:
        if started:
            dist.destroy_process_group()
    equal = [bool(torch.equal(a, b)) for a, b in zip(results["backward"], results["step"])]
    facts = {"timing": timing, "hooks_on_another_thread": hook_threads, "entered_from": sources,
             "fallbacks": fallbacks, "backward_equals_step_schedule": equal}
    problems = []
    if True not in hook_threads:
        problems.append("no hook ran on another thread than backward()'s caller")
    if not timing["pairs"]:
        problems.append("no reduce-scatter was launched after an earlier unit's NS")
    elif not all(p["starts_before_ns_end"] for p in timing["pairs"]):
        problems.append("a reduce-scatter started only after an earlier unit's NS ended")
    if set(timing["ns_streams"]) & set(timing["reduce_scatter_streams"]):
        problems.append("NS kernels ran on FSDP2's reduce-scatter stream")
    if fallbacks or not all(equal):
        problems.append("the backward schedule fell back or differs from schedule step")
    facts["problems"] = problems
    if problems:
        (out / "stream_overlap.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        raise RuntimeError("stream overlap: " + "; ".join(problems))
    return facts


def step_cuda_graph(out: Path) -> dict:
    shapes = ((256, 128), (128, 384), (256, 128))
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(6)]
    sides = []
    for _ in range(2):
        params = [nn.Parameter(t.clone().cuda()) for t in init]
        opt = NorMuon(params, lr=torch.tensor(0.02, device="cuda"), weight_decay=0.01,
                      nonfinite="mask", capturable=True, ns_dtype="float32")
        sides.append((params, opt))
    (eager, eager_opt), (graphed, graph_opt) = sides
    for p in graphed:
        p.grad = torch.zeros_like(p)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # warm-up steps create the state, off the capture
        for t in range(2):
            for p, g in zip(graphed, grads[t]):
                p.grad.copy_(g)
            graph_opt.step()
    torch.cuda.current_stream().wait_stream(warm)
    for t in range(2):
        for p, g in zip(eager, grads[t]):
            p.grad = g.clone()
        eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    diffs = []
    for t in range(2, 6):
        for p, g in zip(graphed, grads[t]):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager, grads[t]):
            p.grad = g.clone()
        eager_opt.step()
        diffs.append(max(float((a - b).abs().max()) for a, b in zip(graphed, eager)))
    before = [p.detach().clone() for p in graphed]
    graphed[0].grad[0, 0] = float("nan")
    graph.replay()
    nan_kept = all(torch.equal(a, b) for a, b in zip(graphed, before))
    facts = {"max_abs_diff_per_replay": diffs, "nan_replay_keeps_weights": nan_kept,
             "masked_steps": int(graph_opt.masked_steps)}
    problems = ([f"replays differ from eager steps by {max(diffs):.3g}"] if max(diffs) > 1e-5
                else []) + ([] if nan_kept else ["a NaN replay changed the weights"])
    if problems:
        (out / "cuda_graph.json").write_text(json.dumps(facts, indent=2) + "\n")
        raise RuntimeError("cuda graph: " + "; ".join(problems))
    return facts
