"""Per-rank timelines on one wall clock: which rank did what when, and who waited for whom.

A `Timeline` is a `PhaseTimer` (like the profiler and the phase marker, it is one of the timers a
run tees its phases to), so it sees every phase of a step: forward, backward, FSDP2's work inside
them, the optimizer's phases (nonfinite_check, momentum, orthogonalize, normalize, apply), the
strategy's comm_wait and ns (each Newton-Schulz batch), and `overlap`, the work the `overlapped`
strategy does inside backward. Each phase becomes a span with its start and end on the host's wall
clock (`time.time_ns`), which all ranks of one machine share (across machines it is as good as
their clock sync). On CUDA these are host times, when the CPU issued the work, not kernel times.

Collectives: `profiling.comm.CommCounter` tells its listeners about each collective it records
(the profiler installs a counter on instrumented steps), and so does the interconnect emulator
for the ones no counter sees (every step of an emulated run), with the op's Work; the timeline
records the issue time and takes the end from the Work's future (`add_done_callback`, run by the
backend when the collective completes, so an asynchronous collective's span covers its flight, not
the time someone waited for it; gloo's reduce-scatter has no future and is waited for at issue, see
`interconnect.future_of`). A collective is put in the FSDP2 lane unless it was issued inside
the optimizer (its step or its backward hooks); one issued outside this timeline's phases is not
its run's (an interleaved study holds several runs in one process) and is left out. Functional
collectives (DTensor) have no Work; their span is the issue instant.

`write(out_dir)` (collective: every rank calls it) gathers every rank's spans on rank 0 and writes
`trace.json` in the Chrome trace event format (one process per rank, one thread per lane; load it
in chrome://tracing or ui.perfetto.dev) with the run's labels (e.g. "emulated interconnect")
in its metadata. `dist_ortho.reporting.timeline_plots` draws the per-rank Gantt chart from it.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Work

from dist_ortho.core.io import atomic_write_text
from dist_ortho.profiling import comm
from dist_ortho.profiling.interconnect import future_of

__all__ = ["Span", "Timeline", "LANES", "category", "read_trace", "TRACE_FILE", "step_events",
           "step_marks", "exposed_per_step"]

TRACE_FILE = "trace.json"
# lanes of a rank, top to bottom in the Gantt chart and as thread ids in the trace
LANES = ("main", "fsdp comm", "optimizer comm")
_OPTIMIZER_PHASES = ("optimizer", "overlap")


@dataclass
class Span:
    step: int | None
    name: str  # phase path, or the collective's kind
    cat: str  # see `category`
    lane: str
    start_ns: int
    end_ns: int | None
    args: dict = field(default_factory=dict)


def category(path: str) -> str:
    """What a phase path is, for colours and filters: forward, backward, ns, comm_wait, overlap
    (optimizer work inside backward), optimizer (its other phases) or other."""
    parts = path.split("/")
    last = parts[-1]
    if last in ("ns", "comm_wait"):
        return last
    if "overlap" in parts:
        return "overlap"
    if "optimizer" in parts:
        return "optimizer"
    if last in ("forward", "backward"):
        return last
    return "other"


def _work_of(out):
    """The Work a c10d op returned (boxed as a ScriptObject), or None."""
    for obj in (out[-1] if isinstance(out, (tuple, list)) and out else None, out):
        if isinstance(obj, torch.ScriptObject):
            try:
                return Work.unbox(obj)
            except RuntimeError:
                return None
    return None


class Timeline:
    """Spans of one rank (see the module docstring). `step` labels the spans; a run sets it before
    each step (as it does for the phase marker)."""

    def __init__(self, rank: int, labels: dict | None = None) -> None:
        self.rank = rank
        self.step: int | None = None
        self.labels = dict(labels or {})
        self.spans: list[Span] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        comm.add_listener(self._on_collective)

    def close(self) -> None:
        comm.remove_listener(self._on_collective)

    def for_checkpoint(self, step: int) -> "Timeline":  # noqa: ARG002 (spans carry self.step)
        """A checkpoint save's phases become spans like the loop's (an async save's thread has
        a phase stack of its own)."""
        return self

    def _stack(self) -> list[str]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextmanager
    def phase(self, name: str):
        stack = self._stack()
        stack.append(name)
        path = "/".join(stack)
        span = Span(self.step, path, category(path), "main", time.time_ns(), None)
        try:
            yield
        finally:
            span.end_ns = time.time_ns()
            stack.pop()
            with self._lock:
                self.spans.append(span)

    def _on_collective(self, record, issued_ns: int, out) -> None:
        if not self._stack():  # not in one of this run's phases (another run of the process)
            return
        inside = "/".join(self._stack())
        lane = ("optimizer comm" if any(p in inside.split("/") for p in _OPTIMIZER_PHASES)
                else "fsdp comm")
        span = Span(self.step, record.kind, "collective", lane, issued_ns, None,
                    dict(op=record.op, send_bytes=record.send_bytes,
                         recv_bytes=record.recv_bytes, issued_in=inside))
        work = _work_of(out)
        future = (None if work is None
                  else future_of(work, wait=record.kind not in ("send", "recv")))
        if future is None:  # synchronous, or a point-to-point message with no future: its issue
            span.end_ns = issued_ns
        else:
            def done(_fut, span=span):
                span.end_ns = time.time_ns()
            future.add_done_callback(done)
        with self._lock:
            self.spans.append(span)

    def events(self) -> list[dict]:
        """This rank's spans as Chrome trace events (complete events, microseconds)."""
        out = []
        with self._lock:
            spans = list(self.spans)
        for s in spans:
            end = s.end_ns if s.end_ns is not None else s.start_ns
            out.append(dict(name=s.name.split("/")[-1] if s.cat != "collective" else s.name,
                            cat=s.cat, ph="X", ts=s.start_ns / 1e3,
                            dur=max(end - s.start_ns, 0) / 1e3, pid=self.rank,
                            tid=LANES.index(s.lane),
                            args=dict(s.args, path=s.name, step=s.step,
                                      completed=s.end_ns is not None)))
        return out

    def write(self, out_dir, group=None) -> Path | None:
        """COLLECTIVE: rank 0 writes `out_dir/trace.json` with every rank's events; returns its
        path there, None elsewhere."""
        events = self.events()
        P = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if P > 1:
            gathered = [None] * P if self.rank == 0 else None
            dist.gather_object(events, gathered, group=group, group_dst=0)
        else:
            gathered = [events]
        if self.rank != 0:
            return None
        meta = []
        for r in range(P):
            meta.append(dict(name="process_name", ph="M", pid=r, args=dict(name=f"rank {r}")))
            for t, lane in enumerate(LANES):
                meta.append(dict(name="thread_name", ph="M", pid=r, tid=t, args=dict(name=lane)))
        trace = dict(traceEvents=meta + [e for evs in gathered for e in evs],
                     displayTimeUnit="ms", otherData=dict(clock="host wall clock (time.time_ns)",
                                                          **self.labels))
        path = Path(out_dir) / TRACE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(trace) + "\n")


def read_trace(path) -> dict:
    """A trace.json written by `Timeline.write`."""
    return json.loads(Path(path).read_text())


def _steps(trace: dict) -> list[int]:
    return sorted({e["args"]["step"] for e in trace["traceEvents"]
                   if e.get("ph") == "X" and e["args"].get("step") is not None})


def step_events(trace: dict, step: int | None = None) -> tuple[list[dict], int | None]:
    """(the complete events of `step`, that step). Default: the last step with a completed
    collective (collectives are recorded on instrumented steps only), else the last step."""
    if step is None:
        with_comm = {e["args"]["step"] for e in trace["traceEvents"]
                     if e.get("cat") == "collective" and e["args"].get("completed")}
        steps = sorted(s for s in with_comm if s is not None) or _steps(trace)
        if not steps:
            return [], None
        step = steps[-1]
    return [e for e in trace["traceEvents"]
            if e.get("ph") == "X" and e["args"].get("step") == step], step


def step_marks(trace: dict, step: int | None = None) -> dict[int, dict]:
    """Per rank, in trace microseconds: backward_end (the last `backward` phase's end),
    optimizer_end (the `optimizer` phase's end) and exposed_s = optimizer_end - backward_end in
    seconds: the optimizer time that backward did not hide."""
    events, _ = step_events(trace, step)
    out: dict[int, dict] = {}
    for e in events:
        last = e["args"].get("path", "").split("/")[-1]
        if e["cat"] == "collective" or last not in ("backward", "optimizer"):
            continue
        mark = out.setdefault(e["pid"], {})
        key = f"{last}_end"
        mark[key] = max(mark.get(key, float("-inf")), e["ts"] + e["dur"])
    for mark in out.values():
        if "backward_end" in mark and "optimizer_end" in mark:
            mark["exposed_s"] = (mark["optimizer_end"] - mark["backward_end"]) / 1e6
    return out


def exposed_per_step(trace: dict) -> dict[int, float]:
    """Per step: the exposed optimizer seconds of its slowest rank (`step_marks`), for every
    step in the trace with a backward and an optimizer phase on every rank."""
    out = {}
    for step in _steps(trace):
        marks = step_marks(trace, step)
        values = [m.get("exposed_s") for m in marks.values()]
        if values and all(v is not None for v in values):
            out[step] = max(values)
    return out
