"""The profiler: what each rank moved, held and spent, per step and per phase, as tidy rows.

    prof = Profiler(ProfilerConfig(enabled=True, memory=True, trace_step=None),
                    run_info={"strategy": "balanced", "world_size": P, "model": "gpt-tiny",
                              "config_hash": "ab12cd"}, device=device, group=None)
    prof.attach(optimizer)          # NorMuon/Muon, CombinedOptimizer or any torch optimizer
    for step in range(steps):
        with prof.step(step, warmup=step < warmup_steps):
            with prof.phase("forward_backward"):
                loss = model(x, y)[1]; loss.backward()
            with prof.phase("optimizer"):
                optimizer.step()
            optimizer.zero_grad()
    prof.rows()                     # this rank's rows: list of dicts
    prof.write(out_dir)             # collective: rank 0 writes metrics.csv and collectives.csv

Phases nest, and each is named by its path: "optimizer", "optimizer/orthogonalize",
"optimizer/orthogonalize/ns". `attach` makes the optimizer report its own phases (nonfinite_check,
momentum, orthogonalize, normalize, apply; inside orthogonalize the strategy marks comm_wait and
ns) through this profiler, a `dist_ortho.core.timing.PhaseTimer` (`opt.set_timer(prof)`), so they
appear under whatever phase the caller stepped the optimizer in. The step itself is the phase
"step": its rows hold whole-step values.

Rows are long-format: `rank, step, warmup, phase, metric, value` plus one column per `run_info`
key. Metrics (names ending in `.<kind>` are split by collective or memory kind):

  time_s                    wall seconds in the phase, summed over its entries in the step
                            (inclusive of nested phases); phase "step": the whole step
  calls                     times the phase was entered in the step
  instrumented              (phase "step") 1 when per-op instruments ran this step (comm counter,
                            CPU memory tracker, trace), whose cost inflates its times; see
                            ProfilerConfig.instrument_every
  comm_send_bytes[.kind]    bytes this rank sent to / received from other ranks in collectives
  comm_recv_bytes[.kind]    *issued* in this phase, exclusive of nested phases (so summing over
  comm_calls.kind           phases gives the step total); async collectives count where issued.
  comm_numel.kind           Byte convention: `strategies.base` (counted by `profiling.comm`).
  ns_flops                  Newton-Schulz FLOPs run in this phase (exclusive), from the
                            optimizers' `executed_ns_flops` counters
  mem_peak_bytes[.kind]     highest live bytes while in the phase (inclusive); phase "step": the
                            whole step. `.kind` splits (CPU only, step and top-level phases)
  mem_peak_increase_bytes   that peak minus the live bytes when the phase was entered
  mem_start_bytes, mem_end_bytes   live bytes at the step's start / end (phase "step")
  opt_state_bytes           bytes of the attached optimizers' state tensors (this rank's shards)
  param_bytes               bytes of the attached optimizers' parameters (this rank's shards)
  plan_*                    the strategy's prediction for this rank (phase "step"): plan_ns_flops,
                            plan_send_bytes[.kind], plan_recv_bytes[.kind], plan_transient_bytes,
                            plan_ns_flops_imbalance (max over ranks / mean)
  skipped, overlap_redos    1 when the step was skipped (NaN/Inf) / redone after backward

Comm and CPU memory rows exist on instrumented steps only; the rest on every step.

`collectives()` (and collectives.csv) has one row per collective with op, kind, phase, bytes,
element count, dtype and group size.

Timing and the device: on CPU phases are timed with the host clock and nothing is synchronized;
on CUDA each phase boundary records an event on the current stream (no sync, so async
communication keeps overlapping) and the device is synchronized once at the start and the end of
each step; see `profiling.device`. Memory: see `profiling.device` (CUDA allocator counters) and
`profiling.memory` (CPU live tensor bytes).

Disabled (`enabled=False`), `step` and `phase` return one shared do-nothing context: no dispatch
mode is installed, the optimizers are not touched, nothing is synchronized. Steps are identical
on one rank and on many; only `write` communicates.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ortho.core.io import atomic_path
from dist_ortho.core.sharding import local_tensor
from dist_ortho.optim.optimizer import STEP_COUNTED, OrthogonalizedOptimizer, step_counts
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.profiling.device import DeviceOps, resolve_device
from dist_ortho.profiling.tables import as_dicts, storage_bytes, write_csv, write_parquet

__all__ = ["ProfilerConfig", "Profiler", "ROW_COLUMNS", "COLLECTIVE_COLUMNS", "STEP_PHASE"]

log = logging.getLogger("profiling")

ROW_COLUMNS = ("rank", "step", "warmup", "phase", "metric", "value")
COLLECTIVE_COLUMNS = ("rank", "step", "warmup", "seq", "phase", "op", "kind", "send_bytes",
                      "recv_bytes", "numel", "dtype", "group_size")
STEP_PHASE = "step"
_RESERVED = set(ROW_COLUMNS) | set(COLLECTIVE_COLUMNS)
_NULL = nullcontext()


@dataclass(frozen=True)
class ProfilerConfig:
    """enabled: record anything at all (off: no dispatch modes, no syncs, no rows).
    memory: measure peak bytes (CUDA: allocator counters, free; CPU: a live-tensor tracker that
    costs time on every op). comm: count collectives (a dispatch mode: costs time on every op).
    trace_step: also record a torch.profiler Chrome trace of that step (None: no trace), written
    by `write` as trace_rank<r>_step<s>.json.
    instrument_every: install the per-op instruments (comm counter, CPU memory tracker) on steps
    with step % instrument_every == 0 only. Time, NS FLOPs and the plan are recorded on every step
    at next to no cost, so with instrument_every > 1 the other steps give undistorted timings (row
    `instrumented` says which step was which; `summarize_runs` times the clean ones)."""

    enabled: bool = True
    memory: bool = True
    trace_step: int | None = None
    comm: bool = True
    instrument_every: int = 1

    def __post_init__(self) -> None:
        for name in ("enabled", "memory", "comm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ProfilerConfig.{name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        t = self.trace_step
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ValueError(f"ProfilerConfig.trace_step must be None or an int >= 0, got {t!r}")
        k = self.instrument_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ProfilerConfig.instrument_every must be an int >= 1, got {k!r}")


@dataclass
class _Window:
    """An open phase."""

    path: str
    start: object  # device mark
    mem_start: int = 0
    peak: int = 0
    kinds: dict | None = None
    record_fn: object = None


@dataclass
class _PhaseTotals:
    calls: int = 0
    seconds: float = 0.0
    marks: list = field(default_factory=list)  # (start, end) pairs resolved after the final sync
    peak: int = -1
    increase: int = -1
    kinds: dict | None = None
    depth: int = 1


@dataclass
class _StepState:
    step: int
    warmup: bool
    instrumented: bool = False
    meter: object = None  # the memory meter when it runs this step
    t0: float = 0.0
    counter: CommCounter | None = None
    flops_last: int = 0
    counts0: tuple = (0, 0)  # optimizer.step_counts at the step's start
    mem_start: int = 0
    step_peak: int = 0
    step_kinds: dict | None = None
    stack: list = field(default_factory=list)
    phases: dict = field(default_factory=dict)
    flops: dict = field(default_factory=lambda: defaultdict(int))
    trace: object = None


class _StepContext:
    __slots__ = ("prof", "step", "warmup")

    def __init__(self, prof: "Profiler", step: int, warmup: bool) -> None:
        self.prof, self.step, self.warmup = prof, step, warmup

    def __enter__(self) -> "Profiler":
        self.prof._begin_step(self.step, self.warmup)
        return self.prof

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.prof._end_step(failed=exc_type is not None)
        return False


class _PhaseContext:
    __slots__ = ("prof", "name")

    def __init__(self, prof: "Profiler", name: str) -> None:
        self.prof, self.name = prof, name

    def __enter__(self) -> None:
        self.prof._enter_phase(self.name)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.prof._exit_phase()
        return False


class Profiler:
    """Per-rank, per-step record of communication, memory, time and Newton-Schulz FLOPs."""

    def __init__(self, config: ProfilerConfig | None = None, run_info: Mapping | None = None,
                 device=None, group: "dist.ProcessGroup | None" = None) -> None:
        if config is None:
            config = ProfilerConfig()
        if not isinstance(config, ProfilerConfig):
            raise ValueError(f"config must be a ProfilerConfig, got {type(config).__name__}")
        run_info = dict(run_info or {})
        for key, value in run_info.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"run_info keys must be non-empty strings, got {key!r}")
            if key in _RESERVED:
                raise ValueError(f"run_info key {key!r} collides with a column the profiler "
                                 f"writes ({', '.join(sorted(_RESERVED))})")
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"run_info[{key!r}] must be a str, int, float, bool or None "
                                 f"(it becomes a table column), got {type(value).__name__}")
        self.config = config
        self.run_info = run_info
        self.group = group
        self._device = resolve_device(device) if device is not None else None
        self._ops: DeviceOps | None = None
        self._meter = None
        self._optimizers: list = []  # every attached torch optimizer (for state and parameters)
        self._ortho: list = []  # the ones that report phases and NS FLOPs
        self._plan: list[tuple[str, float]] = []
        # kept as tuples in column order (a long run has many rows); dicts are built on request
        self._rows: list[tuple] = []
        self._collectives: list[tuple] = []
        self._active: _StepState | None = None
        self._traces: list[tuple[int, object]] = []
        self._valid_names: set[str] = set()
        self._warned_unparsed = False

    # -- set-up ----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return (dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized()
                else 1)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def _device_ops(self) -> DeviceOps:
        if self._ops is None:
            self._ops = DeviceOps.for_device(self.device)
        return self._ops

    def attach(self, optimizer) -> "Profiler":
        """Watch an optimizer: its state bytes, and for NorMuon/Muon (directly or inside a
        CombinedOptimizer's `.optimizers`) its phases, executed NS FLOPs and planned costs."""
        leaves = list(optimizer.optimizers) if hasattr(optimizer, "optimizers") else [optimizer]
        for opt in leaves:
            if not hasattr(opt, "param_groups") or not hasattr(opt, "state"):
                raise ValueError(f"attach() takes a torch optimizer or an object with "
                                 f".optimizers, got {type(opt).__name__}")
        if self._active is not None:
            raise ValueError("attach() inside a profiled step; attach before the first step")
        for opt in leaves:
            if any(opt is o for o in self._optimizers):
                continue
            self._optimizers.append(opt)
            if isinstance(opt, OrthogonalizedOptimizer):
                self._ortho.append(opt)
                if self.enabled:
                    opt.set_timer(self)  # the optimizer and its strategy call self.phase(name)
            params = [p for group in opt.param_groups for p in group["params"]]
            if self._device is None and params:
                self._device = local_tensor(params[0]).device
        if self.enabled:
            self._plan = self._plan_rows()
        return self

    def detach(self) -> None:
        """Stop the attached optimizers from reporting phases here."""
        for opt in self._ortho:
            if opt.timer is self:
                opt.set_timer(None)
        self._optimizers, self._ortho, self._plan = [], [], []

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def _plan_rows(self) -> list[tuple[str, float]]:
        """This rank's predicted costs, summed over the orthogonalizing optimizers."""
        if not self._ortho:
            return []
        send: dict[str, float] = defaultdict(float)
        recv: dict[str, float] = defaultdict(float)
        flops = transient = 0
        per_rank: list[int] | None = None
        for opt in self._ortho:
            plan = opt.plan()
            mine = plan.mine
            for kind, (s, r) in mine.bytes_by_kind().items():
                send[kind] += s
                recv[kind] += r
            flops += mine.ns_flops
            # optimizers step one after another, so their buffers are never held together
            transient = max(transient, mine.transient_bytes)
            ranks = [c.ns_flops for c in plan.ranks]
            per_rank = ranks if per_rank is None else [a + b for a, b in zip(per_rank, ranks)]
        mean = sum(per_rank) / len(per_rank) if per_rank else 0
        rows = [("plan_ns_flops", float(flops)), ("plan_send_bytes", sum(send.values())),
                ("plan_recv_bytes", sum(recv.values())), ("plan_transient_bytes", float(transient)),
                ("plan_ns_flops_imbalance", max(per_rank) / mean if mean > 0 else 1.0)]
        for kind in sorted(send):
            rows += [(f"plan_send_bytes.{kind}", send[kind]), (f"plan_recv_bytes.{kind}", recv[kind])]
        return rows

    # -- the step --------------------------------------------------------------------------------
    def step(self, step: int, warmup: bool = False):
        """Context manager around one training step (forward, backward, optimizer step)."""
        if not self.config.enabled:
            return _NULL
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(warmup, bool):
            raise ValueError(f"warmup must be a bool, got {warmup!r}")
        return _StepContext(self, step, warmup)

    def phase(self, name: str):
        """Context manager naming a part of the step; nests into paths like "optimizer/ns".
        Outside a step (or disabled) it does nothing."""
        if self._active is None:
            return _NULL
        if not (isinstance(name, str) and name in self._valid_names):
            if not isinstance(name, str) or not name or "/" in name or name == STEP_PHASE:
                raise ValueError(f"phase name must be a non-empty string without '/' and not "
                                 f"{STEP_PHASE!r}, got {name!r}")
            self._valid_names.add(name)
        return _PhaseContext(self, name)

    def _flops_now(self) -> int:
        return sum(int(o.executed_ns_flops) for o in self._ortho)

    def _params(self) -> list:
        return [p for o in self._optimizers for g in o.param_groups for p in g["params"]]

    def _begin_step(self, step: int, warmup: bool) -> None:
        if self._active is not None:
            raise ValueError(f"prof.step({step}) inside prof.step({self._active.step}): steps "
                             f"cannot nest")
        ops = self._device_ops()
        cfg = self.config
        state = _StepState(step, warmup)
        per_op = step % cfg.instrument_every == 0
        try:
            if cfg.trace_step == step:
                state.trace = self._start_trace()
            ops.synchronize()  # work queued before the step is not this step's time
            if cfg.memory:
                if self._meter is None:
                    self._meter = ops.memory_meter()
                if per_op or not self._meter.per_op_cost:
                    self._meter.start(self._params(), self._optimizers)
                    state.meter = self._meter
                    state.mem_start = state.step_peak = state.meter.current()
            if cfg.comm and per_op:
                counter = CommCounter(STEP_PHASE)
                counter.__enter__()
                state.counter = counter
        except BaseException:  # leave no mode installed and no trace running
            if state.meter is not None:
                state.meter.stop()
            if state.trace is not None:
                state.trace.__exit__(None, None, None)
            raise
        state.instrumented = (state.trace is not None or state.counter is not None
                              or (state.meter is not None and state.meter.per_op_cost))
        state.flops_last = self._flops_now()
        state.counts0 = step_counts(self._ortho)
        self._active = state
        state.t0 = time.perf_counter()

    def _boundary(self, state: _StepState) -> None:
        """Close the segment since the last phase boundary: its NS FLOPs go to the innermost
        phase, its memory peak to every open phase."""
        top = state.stack[-1].path if state.stack else STEP_PHASE
        if self._ortho:
            now = self._flops_now()
            if now != state.flops_last:
                state.flops[top] += now - state.flops_last
                state.flops_last = now
        if state.meter is not None:
            peak, kinds = state.meter.take_peak()
            if peak > state.step_peak:
                state.step_peak, state.step_kinds = peak, kinds
            for w in state.stack:
                if peak > w.peak:
                    w.peak, w.kinds = peak, kinds

    def _enter_phase(self, name: str) -> None:
        state = self._active
        if state is None:  # the step ended between phase() and __enter__
            return
        self._boundary(state)
        path = f"{state.stack[-1].path}/{name}" if state.stack else name
        mem = state.meter.current() if state.meter is not None else 0
        window = _Window(path, self._ops.mark(), mem, mem)
        if state.trace is not None:
            window.record_fn = torch.profiler.record_function(path)
            window.record_fn.__enter__()
        if state.counter is not None:
            state.counter.phase = path
        state.stack.append(window)

    def _exit_phase(self) -> None:
        state = self._active
        if state is None or not state.stack:
            return
        end = self._ops.mark()
        self._boundary(state)
        w = state.stack.pop()
        if w.record_fn is not None:
            w.record_fn.__exit__(None, None, None)
        if state.counter is not None:
            state.counter.phase = state.stack[-1].path if state.stack else STEP_PHASE
        totals = state.phases.get(w.path)
        if totals is None:
            totals = state.phases[w.path] = _PhaseTotals(depth=len(state.stack) + 1)
        totals.calls += 1
        if self._ops.asynchronous:
            totals.marks.append((w.start, end))
        else:
            totals.seconds += self._ops.elapsed_s(w.start, end)
        if state.meter is not None:
            if w.peak > totals.peak:
                totals.peak, totals.kinds = w.peak, w.kinds
            totals.increase = max(totals.increase, w.peak - w.mem_start)

    def _end_step(self, failed: bool) -> None:
        state = self._active
        ops = self._ops
        try:
            while state.stack:  # phases left open by an exception
                self._exit_phase()
            self._boundary(state)
            mem_end = state.meter.current() if state.meter is not None else 0
        finally:
            self._active = None
            if state.counter is not None:
                state.counter.__exit__(None, None, None)
            if state.meter is not None:
                state.meter.stop()
            ops.synchronize()
            seconds = time.perf_counter() - state.t0
            if state.trace is not None:
                state.trace.__exit__(None, None, None)
                if not failed:
                    self._traces.append((state.step, state.trace))
        if failed:
            return
        self._record(state, seconds, mem_end)

    def _start_trace(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        trace = torch.profiler.profile(activities=activities, record_shapes=True)
        trace.__enter__()
        return trace

    # -- rows ------------------------------------------------------------------------------------
    def _record(self, state: _StepState, seconds: float, mem_end: int) -> None:
        base = (self.rank, state.step, state.warmup)
        rows = self._rows

        def add(phase: str, metric: str, value) -> None:
            rows.append(base + (phase, metric, value))

        add(STEP_PHASE, "time_s", seconds)
        add(STEP_PHASE, "instrumented", int(state.instrumented))
        ops = self._ops
        for path, t in state.phases.items():
            secs = t.seconds + sum(ops.elapsed_s(a, b) for a, b in t.marks)
            add(path, "time_s", secs)
            add(path, "calls", t.calls)
        if state.meter is not None:
            add(STEP_PHASE, "mem_start_bytes", state.mem_start)
            add(STEP_PHASE, "mem_end_bytes", mem_end)
            add(STEP_PHASE, "mem_peak_bytes", state.step_peak)
            add(STEP_PHASE, "mem_peak_increase_bytes", state.step_peak - state.mem_start)
            for kind, value in sorted((state.step_kinds or {}).items()):
                add(STEP_PHASE, f"mem_peak_bytes.{kind}", value)
            for path, t in state.phases.items():
                add(path, "mem_peak_bytes", t.peak)
                add(path, "mem_peak_increase_bytes", t.increase)
                if t.depth == 1:
                    for kind, value in sorted((t.kinds or {}).items()):
                        add(path, f"mem_peak_bytes.{kind}", value)
            states = [v for o in self._optimizers for s in o.state.values() for v in s.values()]
            add(STEP_PHASE, "opt_state_bytes", storage_bytes(states))
            add(STEP_PHASE, "param_bytes", storage_bytes(self._params()))
        for path, flops in state.flops.items():
            add(path, "ns_flops", flops)
        if self._ortho:
            for metric, now, then in zip(STEP_COUNTED, step_counts(self._ortho), state.counts0):
                add(STEP_PHASE, metric, now - then)
        for metric, value in self._plan:
            add(STEP_PHASE, metric, value)
        if state.counter is not None:
            self._record_comm(state, base, add)

    def _record_comm(self, state: _StepState, base: tuple, add) -> None:
        counter = state.counter
        if counter.unparsed:
            add(STEP_PHASE, "comm_unparsed", len(counter.unparsed))
            if not self._warned_unparsed:
                log.warning("profiler: %d collective op(s) not understood by CommCounter and not "
                            "counted: %s", len(counter.unparsed), sorted(set(counter.unparsed)))
                self._warned_unparsed = True
        agg: dict[tuple[str, str], list] = {}
        for seq, r in enumerate(counter.records):
            self._collectives.append(base + (seq, r.phase, r.op, r.kind, r.send_bytes,
                                             r.recv_bytes, r.numel, r.dtype, r.group_size))
            a = agg.setdefault((r.phase, r.kind), [0.0, 0.0, 0, 0])
            a[0] += r.send_bytes
            a[1] += r.recv_bytes
            a[2] += 1
            a[3] += r.numel
        totals: dict[str, list[float]] = {}
        for (phase, kind), (send, recv, calls, numel) in agg.items():
            add(phase, f"comm_send_bytes.{kind}", send)
            add(phase, f"comm_recv_bytes.{kind}", recv)
            add(phase, f"comm_calls.{kind}", calls)
            add(phase, f"comm_numel.{kind}", numel)
            t = totals.setdefault(phase, [0.0, 0.0])
            t[0] += send
            t[1] += recv
        for phase, (send, recv) in totals.items():
            add(phase, "comm_send_bytes", send)
            add(phase, "comm_recv_bytes", recv)

    def rows(self) -> list[dict]:
        """This rank's metric rows so far (see the module docstring)."""
        return as_dicts(self._rows, ROW_COLUMNS, self.run_info)

    def collectives(self) -> list[dict]:
        """This rank's collectives so far, one dict each."""
        return as_dicts(self._collectives, COLLECTIVE_COLUMNS, self.run_info)

    # -- output ----------------------------------------------------------------------------------
    def _gather(self, payload) -> list | None:
        """Every rank's payload on group rank 0 (None elsewhere); no counter is active here, so
        this traffic never enters the step's numbers."""
        if not (dist.is_available() and dist.is_initialized()) or self.world_size == 1:
            return [payload]
        me = self.rank
        out = [None] * self.world_size if me == 0 else None
        dist.gather_object(payload, out, group=self.group, group_dst=0)
        return out

    def write(self, out_dir) -> Path | None:
        """COLLECTIVE (every rank calls it): rank 0 writes metrics.csv and collectives.csv (and
        .parquet twins when pyarrow is importable) into out_dir, atomically, and returns the
        metrics.csv path; other ranks return None. Each rank writes its own trace file, if any.
        Disabled: writes nothing and returns None on every rank."""
        if self._active is not None:
            raise ValueError("write() inside a profiled step; call it after the last step")
        if not self.config.enabled:
            return None
        out_dir = Path(out_dir)
        for step, trace in self._traces:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"trace_rank{self.rank}_step{step}.json"
            with atomic_path(path) as tmp:
                trace.export_chrome_trace(str(tmp))
        self._traces = []
        gathered = self._gather((self._rows, self._collectives, self.run_info))
        if gathered is None:
            return None
        rows = [d for r, _, info in gathered for d in as_dicts(r, ROW_COLUMNS, info)]
        colls = [d for _, c, info in gathered for d in as_dicts(c, COLLECTIVE_COLUMNS, info)]
        extra = list(self.run_info)
        for _, _, info in gathered:  # ranks should agree on run_info; keep every key any sent
            extra += [k for k in info if k not in extra]
        out_dir.mkdir(parents=True, exist_ok=True)
        metric_cols = list(ROW_COLUMNS) + extra
        coll_cols = list(COLLECTIVE_COLUMNS) + [k for k in extra if k not in COLLECTIVE_COLUMNS]
        path = write_csv(out_dir / "metrics.csv", metric_cols, rows)
        write_csv(out_dir / "collectives.csv", coll_cols, colls)
        write_parquet(out_dir / "metrics.parquet", metric_cols, rows)
        write_parquet(out_dir / "collectives.parquet", coll_cols, colls)
        return path

