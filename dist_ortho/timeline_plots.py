"""The per-rank Gantt chart of one step, from a run's trace.json (`profiling.timeline`).

One band per rank, three lanes in it: the rank's thread (forward, backward, the optimizer's
phases; Newton-Schulz batches and waits for transfers drawn over them), FSDP2's collectives and the
optimizer's collectives (issue to completion). Times are milliseconds from the step's first span
on any rank, on the one host clock, so a rank waiting for another shows as a gap or a comm_wait
bar lined up with the other rank's work. Dashed lines: where each rank's backward ended; the
distance from there to the end of its optimizer step is the exposed optimizer time.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dist_ortho.profiling.timeline import (LANES, TRACE_FILE, read_trace, step_events,  # noqa: E402
                                          step_marks)

__all__ = ["plot_gantt", "COLORS", "report_section"]

COLORS = {"forward": "#9ecae1", "backward": "#3182bd", "optimizer": "#fdae6b",
          "overlap": "#e6550d", "ns": "#31a354", "comm_wait": "#d62728", "other": "#cccccc",
          "collective": "#756bb1"}
_LANE_H = 0.8


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


def report_section(runs_dir, runs, plots_dir) -> list[str]:
    """Markdown lines of a report's "Timelines" section: each run's Gantt chart (copied into
    `plots_dir`) and where its trace.json is."""
    lines = ["## Timelines", "",
             "One step per run (the last instrumented one), every rank on the host's wall clock: "
             "the rank's thread, FSDP2's collectives and the optimizer's (issue to completion). "
             "Dashed: the end of backward; what follows it is the exposed optimizer time. Load "
             "`runs/<run>/trace.json` in chrome://tracing or ui.perfetto.dev for every step.", ""]
    found = False
    for run in runs:
        trace_path = Path(runs_dir) / run / TRACE_FILE
        if not trace_path.is_file():
            continue
        found = True
        trace = read_trace(trace_path)
        made = plot_gantt(trace, Path(plots_dir) / f"gantt_{run}.png", title=str(run))
        marks = step_marks(trace)
        exposed = ", ".join(f"rank {r}: {m['exposed_s'] * 1e3:.1f} ms"
                            for r, m in sorted(marks.items()) if "exposed_s" in m)
        link = trace.get("otherData", {}).get("interconnect", "real")
        lines += [f"### {run}", "", f"interconnect: {link}. exposed optimizer time: "
                  f"{exposed or '–'}.", ""]
        if made is not None:
            lines += [f"![gantt {run}](plots/{made.name})", ""]
    if not found:
        lines += ["(no run has a trace.json)", ""]
    return lines
