"""A run's timeline and its interconnect emulation: the glue between `dist_ortho.studies.run` and
`profiling.timeline` / `profiling.interconnect`.

- `timeline(config, rank)`: the rank's `Timeline`, one of the run's phase markers, so it sees the
  loop's phases (forward, backward, optimizer) and the optimizer's; `write(state)` (collective, at
  the end of the run) writes `trace.json` and, on rank 0, `gantt.png` of the last instrumented
  step into the run's folder.
- `start_emulation(state)` (collective when the CPU's NS rate is measured): with
  `profiling.emulate_hardware` set, every collective of this process is delayed as
  `profiling.interconnect` describes. One emulator per process, however many runs it holds (an
  interleaved study builds one run per strategy; stacking one per run would delay each collective
  once per run); the last run to close removes it. Its label ("emulated h100 inter-node (x...)")
  goes into the trace, the Gantt chart, `emulation.json` and the profiler's rows (`interconnect`).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext

from dist_ortho.core.io import atomic_write_text
from dist_ortho.profiling.interconnect import (LinkEmulator, emulated_link, measure_cpu_ns_rate,
                                               world_agrees)
from dist_ortho.profiling.overlap_model import interconnect_comm_model, predict_exposed
from dist_ortho.profiling.timeline import TRACE_FILE, Timeline, read_trace, step_marks
from dist_ortho.profiling.timemodel import ComputeModel
from dist_ortho.reporting.timeline_plots import EMULATION_FILE, plot_gantt
from dist_ortho.strategies.overlapped import Overlapped

__all__ = ["timeline", "interconnect_label", "start_emulation", "write", "GANTT_FILE",
           "EMULATION_FILE", "RESULT_FILES"]

log = logging.getLogger("dist_ortho.studies.run")

GANTT_FILE = "gantt.png"
RESULT_FILES = (TRACE_FILE, GANTT_FILE, EMULATION_FILE)
_ACTIVE: dict = {}  # the process's emulator: {"mode", "link", "users"}
_CPU_RATE: dict = {}  # measured once per process


def interconnect_label(config) -> str:
    """What the run's collectives ran on, as the outputs say it."""
    p = config.profiling
    if p.emulate_hardware is None:
        return "real"
    return f"emulated {p.emulate_hardware} {p.emulate_link.replace('_', '-')}"


def timeline(config, rank: int) -> Timeline:
    return Timeline(rank, {"run": config.output.name, "strategy": config.strategy.name,
                           "interconnect": interconnect_label(config)})


class _Release:
    """A run's hold on the process's emulator (a marker: `close()` is called when the run
    closes)."""

    step = None

    def phase(self, name):  # noqa: ARG002 (a PhaseTimer that records nothing)
        return nullcontext()

    def for_checkpoint(self, step):  # noqa: ARG002 (nothing to record for a save either)
        return self

    def close(self) -> None:
        if not _ACTIVE:
            return
        _ACTIVE["users"] -= 1
        if _ACTIVE["users"] == 0:
            _ACTIVE["mode"].__exit__(None, None, None)
            _ACTIVE.clear()


def start_emulation(state):
    """See the module docstring. Every rank calls it after the run is built; returns `state`."""
    p = state.config.profiling
    state.profiler.run_info["interconnect"] = interconnect_label(state.config)  # in every row
    if p.emulate_hardware is None:
        return state
    rate, call_s = p.emulate_cpu_ns_flops, 0.0
    if rate is None:
        if "rate" not in _CPU_RATE:
            measured, call = measure_cpu_ns_rate()
            _CPU_RATE.update(rate=world_agrees(measured, least=True), call_s=world_agrees(call))
        rate, call_s = _CPU_RATE["rate"], _CPU_RATE["call_s"]
    link = emulated_link(p.emulate_hardware, p.emulate_link, rate)
    if _ACTIVE:
        if _ACTIVE["link"] != link:
            raise ValueError(f"profiling.emulate_*: this process already emulates "
                             f"{_ACTIVE['link'].label}; every run of one process group must "
                             f"emulate the same link (got {link.label})")
        _ACTIVE["users"] += 1
    else:
        mode = LinkEmulator(link)
        mode.__enter__()
        _ACTIVE.update(mode=mode, link=link, users=1)
    for marker in state.markers:
        if isinstance(marker, Timeline):
            marker.labels["interconnect"] = link.label
    state.markers.append(_Release())
    if state.rank == 0:
        state.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state.out_dir / EMULATION_FILE, json.dumps(dict(
            label=link.label, hardware=link.hardware, link=link.link,
            target_latency_s=link.latency_s, target_bytes_per_s=link.bytes_per_s,
            scale=link.scale, target_ns_flops_per_s=link.target_ns_flops_per_s,
            cpu_ns_flops_per_s=link.cpu_ns_flops_per_s, cpu_ns_call_s=call_s,
            predicted_exposed=_predicted(state, link, call_s),
            note="collectives delayed to target link seconds x scale; bytes unchanged"),
            indent=2) + "\n")
        log.info("interconnect: %s", link.label)
    return state


def _predicted(state, link, call_s: float) -> dict | None:
    """The overlap cost model's exposed pipeline seconds for this run (strategy overlapped)."""
    strategy = state.optimizer.optimizers[0].strategy if state.optimizer.optimizers else None
    if not isinstance(strategy, Overlapped):
        return None
    plan = state.optimizer.optimizers[0].plan()
    compute = ComputeModel(ns_flops_per_s=link.cpu_ns_flops_per_s, ns_call_s=call_s)
    prediction = predict_exposed(plan, strategy.options, interconnect_comm_model(link), compute)
    return dict(prediction.to_dict(), schedule=strategy.options.schedule)


def write(state) -> None:
    """COLLECTIVE: trace.json (every rank's spans) and gantt.png into the run's folder."""
    for marker in state.markers:
        if isinstance(marker, Timeline):
            path = marker.write(state.out_dir)
            if path is not None:
                trace = read_trace(path)
                plot_gantt(trace, state.out_dir / GANTT_FILE, title=str(marker.labels["run"]))
                marks = step_marks(trace)
                if marks:
                    log.info("exposed optimizer time (step end - backward end), last traced "
                             "step: %s", {r: round(m.get("exposed_s", float("nan")), 4)
                                          for r, m in sorted(marks.items())})
            return
