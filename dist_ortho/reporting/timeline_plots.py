"""The per-rank Gantt chart of one step, from a run's trace.json (`profiling.timeline`).

One band per rank, three lanes in it: the rank's thread (forward, backward, the optimizer's
phases; Newton-Schulz batches and waits for transfers drawn over them), FSDP2's collectives and the
optimizer's collectives (issue to completion). Times are milliseconds from the step's first span
on any rank, on the one host clock, so a rank waiting for another shows as a gap or a comm_wait
bar lined up with the other rank's work. Dashed lines: where each rank's backward ended; the
distance from there to the end of its optimizer step is the exposed optimizer time.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dist_ortho.profiling import read_metrics  # noqa: E402
from dist_ortho.profiling.profiler import STEP_PHASE  # noqa: E402
from dist_ortho.profiling.stats import Interval, median_interval  # noqa: E402
from dist_ortho.profiling.timeline import (LANES, TRACE_FILE, exposed_per_step,  # noqa: E402
                                           read_trace, step_events, step_marks)

__all__ = ["plot_gantt", "COLORS", "report_section"]

COLORS = {"forward": "#9ecae1", "backward": "#3182bd", "optimizer": "#fdae6b",
          "overlap": "#e6550d", "ns": "#31a354", "comm_wait": "#d62728", "other": "#cccccc",
          "collective": "#756bb1"}
_LANE_H = 0.8
# strategy labels of the overlap study (launch/configs/overlap_study.yaml) paired in the report
_BACKWARD, _STEP = "overlapped_backward", "overlapped_step"
EMULATION_FILE = "emulation.json"


def plot_gantt(trace: dict, path, step: int | None = None, title: str = "") -> Path | None:
    """Draw `step` of `trace` (default: the last step whose collectives were recorded) to
    `path`; None if the trace has no step."""
    events, step = step_events(trace, step)
    if not events:
        return None
    ranks = sorted({e["pid"] for e in events})
    t0 = min(e["ts"] for e in events)
    rows = len(ranks) * len(LANES)
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.42 * rows))
    # deeper phases on top of the ones that contain them
    for e in sorted(events, key=lambda e: e["args"].get("path", "").count("/")):
        y = ranks.index(e["pid"]) * len(LANES) + e["tid"]
        ax.barh(y, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=_LANE_H,
                color=COLORS.get(e["cat"], COLORS["other"]), edgecolor="black", linewidth=0.2)
    marks = step_marks(trace, step)
    for r in ranks:
        end = marks.get(r, {}).get("backward_end")
        if end is not None:
            y0 = ranks.index(r) * len(LANES)
            ax.plot([(end - t0) / 1e3] * 2, [y0 - 0.5, y0 + len(LANES) - 0.5], "k--", lw=0.8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([f"rank {r} {lane}" for r in ranks for lane in LANES], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step's first span (host wall clock)")
    labels = trace.get("otherData", {})
    note = "; ".join(f"{k}: {v}" for k, v in labels.items() if k != "clock")
    ax.set_title(f"{title + ' — ' if title else ''}step {step}" + (f"\n{note}" if note else ""),
                 fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), fontsize=7, ncol=len(COLORS), loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.9 / max(rows, 1)), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _timed_steps(run_dir: Path) -> set[int] | None:
    """Steps of the run that were timed (not warm-up, not instrumented), from its metrics."""
    try:
        df = read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    rows = df[(df["phase"] == STEP_PHASE) & (df["metric"] == "instrumented") & ~df["warmup"]]
    return {int(s) for s in rows[rows["value"] == 0]["step"]}


def _emulation(run_dir: Path) -> dict:
    path = run_dir / EMULATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def report_section(runs_dir, runs, plots_dir) -> list[str]:
    """Markdown lines of a report's "Timelines" section: per run, the exposed optimizer time over
    its timed steps (median, 95% interval) and one step's Gantt chart (copied into `plots_dir`);
    where runs of strategy `overlapped` with schedule backward and step ran side by side (names
    differing only in those labels), the measured difference beside the cost model's
    (`profiling.overlap_model`, from the run's emulation.json)."""
    lines = ["## Timelines", "",
             "Exposed optimizer time: step end minus backward end, the slowest rank's, per timed "
             "step (median [95% interval]). Charts: one step per run (the last one with its "
             "collectives recorded: instrumented steps, every step when emulated), every rank on the host's wall clock: the rank's thread, FSDP2's collectives "
             "and the optimizer's (issue to completion); dashed: the end of backward. Load "
             "`runs/<run>/trace.json` in chrome://tracing or ui.perfetto.dev for every step.", ""]
    runs_dir = Path(runs_dir)
    exposed: dict[str, Interval] = {}
    rows, charts = [], []
    for run in runs:
        trace_path = runs_dir / run / TRACE_FILE
        if not trace_path.is_file():
            continue
        trace = read_trace(trace_path)
        timed = _timed_steps(runs_dir / run)
        per_step = {s: v for s, v in exposed_per_step(trace).items()
                    if timed is None or s in timed}
        exposed[run] = median_interval(per_step.values())
        link = trace.get("otherData", {}).get("interconnect", "real")
        rows.append(f"| {run} | {link} | {exposed[run].format('.1f', 1e3)} | "
                    f"{exposed[run].n} |")
        made = plot_gantt(trace, Path(plots_dir) / f"gantt_{run}.png", title=str(run))
        if made is not None:
            charts += [f"### {run}", "", f"![gantt {run}](plots/{made.name})", ""]
    if not rows:
        return lines + ["(no run has a trace.json)", ""]
    lines += ["| run | interconnect | exposed optimizer ms | steps |", "|---|---|---|---|"]
    lines += rows + [""]
    pairs = [(run, run.replace(_BACKWARD, _STEP)) for run in exposed
             if _BACKWARD in run and run.replace(_BACKWARD, _STEP) in exposed]
    if pairs:
        lines += ["Backward overlap against the same plan after backward: measured difference "
                  "of the medians (step - backward; 'separate' when the two intervals do not "
                  "overlap) beside the cost model's (`profiling.overlap_model`: bucket pipeline "
                  "left after backward, emulated link, calibrated NS).", "",
                  "| pair | measured ms | intervals | predicted ms | predicted / measured |",
                  "|---|---|---|---|---|"]
        for bwd, step in pairs:
            a, b = exposed[step], exposed[bwd]
            measured = a.median - b.median
            apart = "separate" if a.low > b.high else "overlap"
            pred = (_emulation(runs_dir / bwd).get("predicted_exposed") or {}).get("difference_s")
            ratio = f"{pred / measured:.2f}" if pred is not None and measured > 0 else "–"
            pred_text = f"{pred * 1e3:.1f}" if pred is not None else "–"
            lines.append(f"| {bwd} | {measured * 1e3:.1f} | {apart} | {pred_text} | {ratio} |")
        lines.append("")
    return lines + charts
