"""Cost-model calibration: fit this machine's constants from a short measured run.

`calibrate` fits alpha and beta per collective kind and the NS rate by least squares from timings
on the current process group (gloo -> CPU, NCCL -> GPU). An NS timing is the best of a few repeats,
since other jobs on a shared machine only ever add time. A collective's timing is the median of its
repeats: on CPU ranks the backend's own threads copy and send the bytes on cores that everything
else shares too, so a transfer's spread is part of what it costs, and the model is held to the
median of measured steps (`bench/validate_costmodel.py` compares both statistics). Message sizes
reach 8 MiB per peer, so that at P >= 3 the busiest rank's bytes span those of an optimizer step's
exchanges (larger pieces grow superlinearly on a CPU host and would bend the fit). The NS times of
the shapes it measured are kept too and used for those shapes. The fits (`fit_*`) are pure; the
measurements (`measure_*`) are collective. The GPU presets in `profiling.hardware` give
data-sheet constants instead.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from dist_ortho.core.newton_schulz import newton_schulz, ns_flops
from dist_ortho.core.timing import SecondsTimer
from dist_ortho.optim.optimizer import NorMuon
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.profiling.prediction import torch_dtype
from dist_ortho.profiling.timemodel import (CommModel, ComputeModel, CostConstants, latency_steps,
                                            shape_key)
from dist_ortho.strategies.collectives import all_gather_single  # the op the strategies issue

__all__ = ["CALIBRATED_KINDS", "COMM_SIZES", "CommSample", "NSSample", "ElementwiseSample",
           "fit_comm_model", "fit_ns_rate", "fit_elementwise", "measure_collectives", "measure_ns",
           "measure_elementwise", "calibrate", "NS_CALIBRATION_SHAPES"]

CALIBRATED_KINDS = ("all_gather", "all_to_all", "gather", "scatter", "broadcast", "all_reduce")


@dataclass(frozen=True)
class CommSample:
    kind: str
    world_size: int
    nbytes: float  # the busiest rank's bytes, as the time model uses them
    seconds: float  # the statistic of `times` the fit uses (measure_collectives' `statistic`)
    times: tuple = ()  # every repeat's seconds (the slowest rank's)


@dataclass(frozen=True)
class NSSample:
    shape: tuple
    flops: int
    seconds: float
    calls: int = 1


@dataclass(frozen=True)
class ElementwiseSample:
    n_params: int
    numel: int
    seconds: float


def _lstsq_nonneg(columns: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares y ~ sum_j c_j x_j with c_j >= 0: solve, drop negative coefficients, repeat.
    Rows are weighted by 1/y so that small and large timings count alike (relative error)."""
    A = np.array(columns, dtype=float).T
    b = np.array(y, dtype=float)
    w = 1.0 / np.maximum(b, 1e-12)
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(A[:, active] * w[:, None], b * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            return coef.tolist()
        active = [a for a, s in zip(active, sol) if s > 0]
    return coef.tolist()


def fit_comm_model(samples: Sequence[CommSample]) -> CommModel:
    """alpha and beta per kind by least squares on t = alpha * steps(kind, P) + beta * bytes."""
    by_kind: dict[str, list[CommSample]] = defaultdict(list)
    for s in samples:
        by_kind[s.kind].append(s)
    alpha, beta = {}, {}
    for kind, ss in by_kind.items():
        if len({s.nbytes for s in ss}) < 2:
            raise ValueError(f"calibrating {kind!r} needs at least two message sizes")
        steps = [latency_steps(kind, s.world_size) for s in ss]
        a, b = _lstsq_nonneg([steps, [s.nbytes for s in ss]], [s.seconds for s in ss])
        alpha[kind], beta[kind] = a, b
    return CommModel(alpha_s=alpha, beta_s_per_byte=beta)


def fit_ns_rate(samples: Sequence[NSSample]) -> tuple[float, float]:
    """(FLOP/s, seconds per call) from t = calls * c + flops / rate."""
    if len({s.flops for s in samples}) < 2:
        raise ValueError("calibrating the NS rate needs at least two shapes")
    c, inv = _lstsq_nonneg([[s.calls for s in samples], [s.flops for s in samples]],
                           [s.seconds for s in samples])
    if inv <= 0:
        raise ValueError("NS timings do not grow with FLOPs; cannot fit a rate")
    return 1.0 / inv, c


def fit_elementwise(samples: Sequence[ElementwiseSample]) -> tuple[float, float]:
    """(seconds per parameter, seconds per element) from t = a n_params + b numel."""
    if len(samples) < 2:
        raise ValueError("calibrating element-wise work needs at least two parameter sets")
    a, b = _lstsq_nonneg([[s.n_params for s in samples], [s.numel for s in samples]],
                         [s.seconds for s in samples])
    return a, b


def _device_of(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_collective(kind: str, numel: int, group, device: torch.device, P: int, me: int):
    """A call issuing one collective of `kind` with pieces of `numel` float32 elements and
    returning the buffer it received into (None where this rank receives nothing). Each call
    receives into a buffer allocated for it, as an optimizer step does: on a CPU host the first
    writes into fresh pages (page faults, zeroing) are part of what a transfer costs there."""
    x = torch.ones(numel, dtype=torch.float32, device=device)

    def fresh(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=device)

    def into(out, issue):
        issue(out)
        return out

    if kind == "all_gather":
        return lambda: into(fresh(P * numel), lambda o: all_gather_single(o, x, group=group))
    if kind == "all_to_all":
        inp = torch.ones(P * numel, dtype=torch.float32, device=device)
        return lambda: into(fresh(P * numel), lambda o: dist.all_to_all_single(o, inp, group=group))
    if kind == "gather":
        return lambda: into([fresh(numel) for _ in range(P)] if me == 0 else None,
                            lambda o: dist.gather(x, o, group=group, group_dst=0))
    if kind == "scatter":
        pieces = [torch.ones_like(x) for _ in range(P)] if me == 0 else None
        return lambda: into(fresh(numel),
                            lambda o: dist.scatter(o, pieces, group=group, group_src=0))
    if kind == "broadcast":
        # the root sends what it holds; every other rank receives into a new buffer
        return lambda: into(None if me == 0 else fresh(numel),
                            lambda o: dist.broadcast(x if o is None else o, group=group,
                                                     group_src=0))
    if kind == "all_reduce":  # in place, on a tensor the caller has already written
        return lambda: into(x, lambda o: dist.all_reduce(o, group=group))
    raise ValueError(f"cannot calibrate collective kind {kind!r}; use {CALIBRATED_KINDS}")


COMM_SIZES = (2**12, 2**16, 2**19, 2**21, 2**22, 2**23)
STATISTICS = {"min": min, "median": lambda ts: float(np.median(ts))}


def measure_collectives(group=None, sizes_bytes: Sequence[int] = COMM_SIZES,
                        repeats: int = 5, kinds: Sequence[str] = CALIBRATED_KINDS,
                        statistic: str = "min") -> list[CommSample]:
    """Time each collective kind at several piece sizes on every rank of `group` (collective).

    Bytes come from `profiling.comm.CommCounter` (the counter the tests check plans against), taken
    from the busiest rank; a repeat's time is the slowest rank's. A sample's `seconds` is the
    `statistic` of the repeats: "min" (the best: what the link can do, a bound) or "median" (what
    a collective typically costs where the ranks share the host); `times` keeps them all.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: use one of {sorted(STATISTICS)}")
    P, me = dist.get_world_size(group), dist.get_rank(group)
    device = _device_of(group)
    samples = []
    for kind in kinds:
        for size in sizes_bytes:
            op = _run_collective(kind, max(1, size // 4), group, device, P, me)
            with CommCounter() as counter:
                op()  # warm-up, counted
            _sync(device)
            rec = counter.records
            send, recv = sum(r.send_bytes for r in rec), sum(r.recv_bytes for r in rec)
            times = []
            for _ in range(repeats):
                dist.barrier(group=group)
                start = time.perf_counter()
                op()
                _sync(device)
                times.append(time.perf_counter() - start)
            stats = torch.tensor([send, recv] + times, dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            send, recv = stats[0].item(), stats[1].item()
            # a broadcast streams n bytes through a pipeline; every other kind is bound by the
            # busiest rank's larger direction (see the module doc)
            nbytes = recv if kind == "broadcast" else max(send, recv)
            times = tuple(stats[2:].tolist())
            samples.append(CommSample(kind, P, nbytes, STATISTICS[statistic](times), times))
    return samples


def _time_ns(shape, dtype, device, repeats: int) -> float:
    # drawn on the CPU generator (the same values on every device), then moved once
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    newton_schulz(g, 5, dtype)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        newton_schulz(g, 5, dtype)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


NS_CALIBRATION_SHAPES = ((256, 256), (192, 768), (384, 384), (512, 512), (384, 1280))


def measure_ns(group=None, shapes: Sequence[tuple] = NS_CALIBRATION_SHAPES,
               ns_dtype: str | None = None, repeats: int = 5,
               device: torch.device | str | None = None) -> tuple[list[NSSample], list[NSSample]]:
    """NS timings (alone, loaded): rank 0 alone while the others wait, then every rank at once.

    The alone rate is the model's rate; the loaded one tells how many ranks the host runs at full
    speed (CPU ranks share cores; GPUs do not). `device`: where to run (default: the group's
    backend's device, or the CPU outside torch.distributed); a GPU needs no process group."""
    if device is not None:
        device = torch.device(device)
    elif group is not None or dist.is_initialized():
        device = _device_of(group)
    else:
        device = torch.device("cpu")
    dtype = torch_dtype(ns_dtype) if ns_dtype else (torch.float32 if device.type == "cpu"
                                                     else torch.bfloat16)
    alone, loaded = [], []
    distributed = dist.is_initialized()
    me = dist.get_rank(group) if distributed else 0
    for shape in shapes:
        if distributed:
            dist.barrier(group=group)
        if me == 0:
            alone.append(NSSample(tuple(shape), ns_flops(shape, 5),
                                  _time_ns(shape, dtype, device, repeats)))
        if distributed:
            dist.barrier(group=group)
            t = torch.tensor([_time_ns(shape, dtype, device, repeats)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            loaded.append(NSSample(tuple(shape), ns_flops(shape, 5), t.item()))
    return alone, loaded


_LOCAL_PHASES = ("nonfinite_check", "momentum", "normalize", "apply")


_EW_SETS = ([(32, 32)] * 48, [(512, 512)] * 4 + [(1024, 384)] * 2)


def measure_elementwise(group=None, param_sets: Sequence[Sequence[tuple]] = _EW_SETS,
                        ns_dtype: str = "float32", repeats: int = 3,
                        device: torch.device | str = "cpu") -> list[ElementwiseSample]:
    """Time NorMuon's local phases (non-finite check, momentum, normalize, apply; not the
    orthogonalization) on plain tensors on `device` in this process alone. `group` must be a
    group of one (or None outside torch.distributed), so the optimizer sends nothing. On an
    asynchronous device the timer synchronizes at each phase boundary."""
    if dist.is_initialized() and dist.get_world_size(group) != 1:
        raise ValueError("measure_elementwise times one rank alone: pass a group of one rank "
                         "(dist.new_group([rank])); calibrate() does this for you")
    device = torch.device(device)
    samples = []
    for shapes in param_sets:
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        opt = NorMuon(params, ns_dtype=ns_dtype, strategy="balanced", process_group=group)
        per_step = []
        for step in range(repeats + 1):
            for p in params:
                p.grad = torch.randn_like(p)
            timer = SecondsTimer(sync=lambda: _sync(device))
            opt.set_timer(timer)
            opt.step()
            # the optimizer's own top-level phases; the orthogonalization (and the "ns" and
            # "comm_wait" phases the strategy marks inside it) is not element-wise work
            if step > 0:  # the first step allocates the state
                per_step.append(sum(timer.seconds[k] for k in _LOCAL_PHASES))
        local = min(per_step)
        samples.append(ElementwiseSample(len(params), sum(p.numel() for p in params), local))
    return samples


def calibrate(group=None, *, sizes_bytes: Sequence[int] = COMM_SIZES,
              repeats: int = 5, comm_repeats: int = 9, comm_statistic: str = "median",
              ns_shapes: Sequence[tuple] | None = None,
              ns_dtype: str | None = None,
              elementwise_sets: Sequence[Sequence[tuple]] = _EW_SETS) -> CostConstants:
    """Measure and fit this machine's constants on the current process group (call on all ranks).

    `repeats`: NS and element-wise timings (best of); `comm_repeats` and `comm_statistic`: each
    collective's timings and the statistic the fit uses (`measure_collectives`). Returns the same
    CostConstants on every rank (fitted on rank 0 and broadcast)."""
    if not dist.is_initialized():
        raise ValueError("calibrate() needs an initialized process group (all ranks call it)")
    P, me = dist.get_world_size(group), dist.get_rank(group)
    device = _device_of(group)
    backend = str(dist.get_backend(group))
    # the NS rate belongs to one dtype: float32 on CPU (bf16 matmul is ~90x slower there),
    # bf16 on GPUs, unless asked; it is recorded with the constants
    ns_dtype = ns_dtype or ("float32" if device.type == "cpu" else "bfloat16")
    comm_samples = measure_collectives(group, sizes_bytes, comm_repeats,
                                       statistic=comm_statistic)
    ns_kwargs = {} if ns_shapes is None else {"shapes": ns_shapes}
    alone, loaded = measure_ns(group, ns_dtype=ns_dtype, **ns_kwargs)
    # element-wise work on rank 0 alone, in a group of one so the optimizer sends nothing; every
    # rank must take part in creating the groups
    solo = [dist.new_group([r]) for r in range(P)] if P > 1 else [None]
    ew: list[ElementwiseSample] = []
    dist.barrier(group=group)
    if me == 0:
        ew = measure_elementwise(solo[0], elementwise_sets, ns_dtype, device=device)
    dist.barrier(group=group)
    payload = [None]
    if me == 0:
        comm = fit_comm_model(comm_samples)
        rate, call_s = fit_ns_rate(alone)
        per_param, per_elem = fit_elementwise(ew)
        # CPU ranks share the host's cores: as many run at full speed as there are cores for
        # their threads (the loaded NS timings in meta show it; a count is steadier than a ratio
        # of timings on a machine that other jobs share)
        slots = (os.cpu_count() or 1) / torch.get_num_threads() if device.type == "cpu" else None
        compute = ComputeModel(ns_flops_per_s=rate, ns_call_s=call_s,
                               elementwise_s_per_element=per_elem,
                               elementwise_s_per_param=per_param, shared_slots=slots,
                               ns_seconds_by_shape={shape_key(a.shape): a.seconds
                                                    for a in alone},
                               contention=contention_of(alone, loaded, P, slots))
        meta = dict(backend=backend, ns_dtype=ns_dtype, torch=torch.__version__,
                    threads=torch.get_num_threads(), comm_statistic=comm_statistic,
                    cpu_count=os.cpu_count(),
                    comm_samples=[asdict(s) for s in comm_samples],
                    ns_alone=[asdict(s) for s in alone], ns_loaded=[asdict(s) for s in loaded],
                    elementwise=[asdict(s) for s in ew],
                    comm_fit_error=_fit_errors(comm, comm_samples),
                    ns_fit_error=[s.seconds / ComputeModel(rate, call_s).ns_seconds(s.flops, 1)
                                  - 1 for s in alone])
        meta = json.loads(json.dumps(meta))  # plain JSON types, so a saved file loads equal
        payload = [CostConstants(comm=comm, compute=compute,
                                 source=f"calibrated on {backend} ({device.type}), P={P}",
                                 world_size=P, device=device.type, meta=meta).to_dict()]
    if P > 1:
        dist.broadcast_object_list(payload, group=group, group_src=0)
    return CostConstants.from_dict(payload[0])


def contention_of(alone: Sequence[NSSample], loaded: Sequence[NSSample], busy: int,
                  slots: float | None) -> float:
    """How much `busy` co-located ranks slow each other beyond sharing `slots` cores: the median
    over shapes of loaded / (alone x busy / slots), less 1, per extra rank on a core
    (`ComputeModel.contention`); 0 where it cannot be told (one rank, one slot, no host)."""
    if slots is None or busy < 2 or min(busy, slots) <= 1 or not loaded:
        return 0.0
    share = max(1.0, busy / slots)
    ratios = sorted(b.seconds / (a.seconds * share) for a, b in zip(alone, loaded)
                    if a.seconds > 0)
    if not ratios:
        return 0.0
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else (
        ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    return max(0.0, (median - 1.0) / (min(busy, slots) - 1))


def _fit_errors(comm: CommModel, samples: Sequence[CommSample]) -> dict:
    """Worst relative error of the fit per kind (how well alpha-beta describes the backend)."""
    out: dict[str, float] = {}
    for s in samples:
        pred = comm.time(s.kind, s.nbytes, s.world_size)
        err = abs(pred / s.seconds - 1) if s.seconds > 0 else 0.0
        out[s.kind] = max(out.get(s.kind, 0.0), err)
    return out
