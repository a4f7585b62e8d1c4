"""Interconnect emulation: make each collective on this CPU take as long, relative to this CPU's
compute, as it would take on a target cluster's link relative to the target's GPU compute.

Why. Loopback gloo on one CPU box moves bytes far faster, relative to the CPU's Newton-Schulz
rate, than NVLink or InfiniBand do relative to an H100's: communication never dominates here, so
overlapping it with compute cannot show. This module slows every collective down by the target's
alpha-beta time, scaled to this CPU:

    emulated seconds = target link seconds x scale,   scale = target NS FLOP/s / CPU NS FLOP/s

(the issue's "measured CPU NS rate / target NS rate" with rates as seconds per FLOP). The target
link seconds are `profiling.hardware`'s model for one link, forced: `intra_node` (NVLink) or
`inter_node` (the NIC), the alpha per latency step of `timemodel.latency_steps` plus bytes / the
achievable bandwidth, with the bytes this rank sends or receives, whichever is more (the byte
convention of `profiling.comm`). The bytes themselves do not change; only completion is delayed.

How. `LinkEmulator` is a dispatch mode over the c10d collectives (as `CommCounter`; nothing is
monkeypatched). Each collective runs for real; its Work is replaced by one whose future completes
at `max(link free, real completion) + emulated seconds`: the real completion stands for the
moment every rank has issued it (loopback itself is quick), and `link free` serialises the
collectives of this rank (all its process groups share one NIC, as FSDP2's and the optimizer's
would on a GPU). A background thread completes the futures on time, so asynchronous collectives
stay asynchronous: a rank that waits late waits less, which is what overlap buys. Every output of
a run with emulation says "emulated" (run labels, trace metadata, report). Collectives that no
`CommCounter` records (uninstrumented steps) are told to `comm`'s listeners from here, so a run's
timeline has them on every step.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Work, _create_work_from_future
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ortho.profiling.calibration import fit_ns_rate, measure_ns
from dist_ortho.profiling.comm import (CommRecord, _c10d, _is_dtensor_op, counter_tells,
                                       notify)
from dist_ortho.profiling.hardware import get_preset
from dist_ortho.profiling.timemodel import latency_steps

__all__ = ["LINKS", "EmulatedLink", "LinkEmulator", "emulated_link", "measure_cpu_ns_rate",
           "world_agrees", "future_of"]

LINKS = ("intra_node", "inter_node")


@dataclass(frozen=True)
class EmulatedLink:
    """The target link (seconds on the target) and the scale to this CPU."""

    hardware: str
    link: str
    latency_s: float  # per latency step (ring hop, or per peer of a pairwise collective)
    bytes_per_s: float  # achievable, one direction
    scale: float  # CPU seconds per target second
    target_ns_flops_per_s: float
    cpu_ns_flops_per_s: float

    @property
    def label(self) -> str:
        return f"emulated {self.hardware} {self.link.replace('_', '-')} (x{self.scale:.3g})"

    def target_seconds(self, kind: str, nbytes: float, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        return latency_steps(kind, world_size) * self.latency_s + nbytes / self.bytes_per_s

    def seconds(self, kind: str, nbytes: float, world_size: int) -> float:
        """Emulated wall seconds of one collective on this CPU."""
        return self.scale * self.target_seconds(kind, nbytes, world_size)


def emulated_link(hardware: str, link: str, cpu_ns_flops_per_s: float,
                  target_ns_dtype: str = "bfloat16") -> EmulatedLink:
    """The `link` of hardware preset `hardware`, scaled by its NS rate over `cpu_ns_flops_per_s`.
    ValueError naming the option when one is unknown."""
    if link not in LINKS:
        raise ValueError(f"emulated link must be one of {LINKS}, got {link!r}")
    if not cpu_ns_flops_per_s > 0:
        raise ValueError(f"cpu_ns_flops_per_s must be > 0, got {cpu_ns_flops_per_s!r}")
    hw = get_preset(hardware)
    intra = link == "intra_node"
    bw = (hw.intra_node_bytes_per_s if intra else hw.inter_node_bytes_per_s) * hw.link_efficiency
    lat = hw.intra_node_latency_s if intra else hw.inter_node_latency_s
    target = hw.ns_flops_per_s(target_ns_dtype)
    return EmulatedLink(hardware, link, lat, bw, target / cpu_ns_flops_per_s, target,
                        cpu_ns_flops_per_s)


def measure_cpu_ns_rate(group=None) -> tuple[float, float]:
    """This host's (NS FLOP/s, seconds per NS call) with every rank busy at once (as in a run:
    ranks share the cores), the same on every rank (`calibration.measure_ns`: slowest rank, a
    small matrix for the per-call cost). Collective."""
    shapes = ((64, 64), (256, 256), (384, 384), (256, 768))
    alone, loaded = measure_ns(group, shapes=shapes, repeats=3)
    return fit_ns_rate(loaded or alone)  # not distributed: the alone timings are the run's


class _Completer:
    """One background thread that completes futures at their due times."""

    def __init__(self) -> None:
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = 0
        self._thread = threading.Thread(target=self._loop, name="link-emulator", daemon=True)
        self._thread.start()

    def at(self, due: float, fut: torch.futures.Future, value) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, fut, value))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.perf_counter():
                    wait = (self._heap[0][0] - time.perf_counter()) if self._heap else None
                    self._cv.wait(wait)
                _, _, fut, value = heapq.heappop(self._heap)
            fut.set_result(value)


class LinkEmulator(TorchDispatchMode):
    """Delays every c10d collective issued inside it (see the module docstring). `delays` keeps
    (kind, bytes, emulated seconds) of each, for tests and reports."""

    def __init__(self, link: EmulatedLink) -> None:
        super().__init__()
        self.link = link
        self.delays: list[tuple[str, float, float]] = []
        self._free = 0.0  # perf_counter time at which this rank's link is free
        self._lock = threading.Lock()
        self._completer = _Completer()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_dtensor_op(types):
            return NotImplemented
        issued = time.time_ns()
        out = func(*args, **(kwargs or {}))
        if func.namespace != "c10d":
            return out
        parsed = _c10d(func._schema.name.split("::")[-1], args)
        if parsed is None:
            return out
        kind, send, recv, numel, dtype, P = parsed
        boxed = out[-1] if isinstance(out, tuple) else out
        real = future_of(Work.unbox(boxed), wait=kind not in ("send", "recv"))
        if real is None:  # a point-to-point message without a future: not delayed
            return out
        nbytes = max(send, recv)
        seconds = self.link.seconds(kind, nbytes, P)
        self.delays.append((kind, float(nbytes), seconds))
        delayed = torch.futures.Future()

        def on_real(fut, delayed=delayed, seconds=seconds):
            try:
                value = fut.value()
            except Exception as exc:  # the real collective failed: fail the same way, now
                delayed.set_exception(exc)
                return
            with self._lock:
                start = max(self._free, time.perf_counter())
                self._free = start + seconds
                due = self._free
            self._completer.at(due, delayed, value)

        real.add_done_callback(on_real)
        work = _create_work_from_future(delayed).boxed()
        out = (*out[:-1], work) if isinstance(out, tuple) else work
        if not counter_tells():  # timelines see the collectives of uninstrumented steps too
            notify(CommRecord(func._schema.name.split("::")[-1], kind, "", float(send),
                              float(recv), int(numel), str(dtype).replace("torch.", ""), P),
                   issued, out)
        return out


def future_of(work, wait: bool = True) -> torch.futures.Future | None:
    """The Work's future. gloo's reduce-scatter (a fallback in torch 2.13) has none: with `wait` it
    is waited for here, at issue (FSDP2 issues it synchronously on CPU anyway), and a completed
    future stands in. gloo's send and recv have none either, and waiting for one at issue would
    deadlock `batch_isend_irecv` (the peer's matching message is posted after it): pass
    `wait=False` for them, and get None."""
    try:
        return work.get_future()
    except RuntimeError:
        if not wait:
            return None
        work.wait()
        done = torch.futures.Future()
        done.set_result(None)
        return done


def world_agrees(value: float, group=None, least: bool = False) -> float:
    """The largest (`least`: smallest) `value` over the ranks, so every rank emulates the same
    link. Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if least else dist.ReduceOp.MAX, group=group)
    return float(t.item())
