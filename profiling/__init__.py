"""Profiling for dist_ortho: what each rank moved, held and spent, per step and phase.

- `Profiler` / `ProfilerConfig` (profiling.profiler): wrap training steps, get tidy rows per rank,
  step, phase and metric; `write` gathers them to rank 0 as metrics.csv.
- `CommCounter` (profiling.comm): bytes of every collective, counted at the dispatcher.
- `summarize_runs` (profiling.summary): a folder of runs -> one pandas row per run.
- `environment` / `write_run_metadata` (profiling.env): what a run ran on, beside its metrics.
- `profiling.device`: the device-specific calls (sync, timing marks, memory counters).
"""

from dist_ortho.profiling.comm import CommCounter, CommRecord, summarize
from dist_ortho.profiling.env import environment, write_run_metadata
from dist_ortho.profiling.profiler import Profiler, ProfilerConfig

_LAZY = {"summarize_runs", "summarize_metrics", "read_metrics"}


def __getattr__(name: str):
    # pandas is imported only when a summary is asked for, not by every process that profiles
    if name in _LAZY:
        from dist_ortho.profiling import summary

        return getattr(summary, name)
    raise AttributeError(f"module 'profiling' has no attribute {name!r}")

__all__ = ["CommCounter", "CommRecord", "summarize", "Profiler", "ProfilerConfig",
           "summarize_runs", "summarize_metrics", "read_metrics", "environment",
           "write_run_metadata"]
