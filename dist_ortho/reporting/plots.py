"""The report's figures, from a study's per-point table (`dist_ortho.reporting.report.Results`).

Every timing is drawn with its 95% interval (error bars); strategies at the same world size are
offset sideways and drawn with their own marker, so points that coincide (several strategies
move exactly the bound's bytes) stay visible. Axes carry units and go logarithmic where values
span over a decade. Agg backend: files only, no display needed.

  step_time.png          median step time, optimizer time and the paired ratio to `replicated`,
                         each with its interval, against world size
  distance_to_bound.png  optimizer step time / its lower bound on this machine, with intervals
  bytes_per_rank.png     bytes each rank sends per step: optimizer (solid), FSDP2 (dashed), bound
  peak_memory.png        peak live bytes per rank
  imbalance.png          NS FLOPs and time per rank at the largest world size
  phases.png             where a step's time goes
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dist_ortho.core.io import atomic_write_bytes  # noqa: E402

__all__ = ["PLOTS", "MiB", "plot_step_time", "plot_distance", "plot_bytes", "plot_memory",
           "plot_imbalance", "plot_phases", "per_rank", "phase_times", "spans_decades"]

# log-scale tick labels are mathtext; where its Computer Modern fonts are missing matplotlib
# falls back to DejaVu Sans (fine) but says so once per glyph set on stderr, in the main command's
# output; only that note is silenced
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

MiB = 2.0 ** 20
PLOTS = ("step_time", "distance_to_bound", "bytes_per_rank", "peak_memory", "imbalance",
         "phases")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


# --- helpers ------------------------------------------------------------------------------------

def _colors(labels: Sequence[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _markers(labels: Sequence[str]) -> dict[str, str]:
    return {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}


def spans_decades(values) -> bool:
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(vals) > 1 and max(vals) / min(vals) > 10


def _world_axis(ax, sizes: Sequence[int]) -> None:
    sizes = sorted(set(int(p) for p in sizes))
    if len(sizes) > 1 and max(sizes) / min(sizes) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(p) for p in sizes])
    ax.minorticks_off() if ax.get_xscale() == "log" else None
    ax.set_xlabel("world size P (ranks)")


def _offsets(labels: Sequence[str], sizes: Sequence[int]) -> tuple[dict[str, float], bool]:
    """A sideways shift per label, as a factor on P (log axis) or an addend (linear axis), so
    strategies at one world size do not hide each other."""
    n = len(labels)
    sizes = sorted(set(int(p) for p in sizes))
    log = len(sizes) > 1 and max(sizes) / min(sizes) >= 4
    step = 0.07 if log else 0.06 * (max(sizes) - min(sizes) or 1)
    return {lb: (2 ** ((k - (n - 1) / 2) * step) if log else (k - (n - 1) / 2) * step)
            for k, lb in enumerate(labels)}, log


def _shift(xs, offset: float, log: bool):
    return [x * offset if log else x + offset for x in xs]


def _grid(n_rows: int, n_cols: int, width: float = 5.2, height: float = 3.8):
    return plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _note_panel(ax, text: str, fontsize: float | None = None) -> None:
    """A panel that says why it has no data, instead of empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=fontsize)
    ax.set_axis_off()


def _errorbars(ax, d, col: str, label: str, color, marker: str, offset: float, log: bool,
               scale: float = 1.0) -> list[float]:
    """Median with its interval as error bars, if the table has the interval columns."""
    y = d[col] * scale
    xs = _shift(list(d["world_size"]), offset, log)
    if f"{col}_low" in d and d[f"{col}_low"].notna().any():
        lo = (d[col] - d[f"{col}_low"]).clip(lower=0) * scale
        hi = (d[f"{col}_high"] - d[col]).clip(lower=0) * scale
        ax.errorbar(xs, y, yerr=[lo, hi], marker=marker, color=color, label=label, capsize=3,
                    markersize=5, linewidth=1.2, alpha=0.9)
        return list(d[f"{col}_low"] * scale) + list(d[f"{col}_high"] * scale)
    ax.plot(xs, y, marker=marker, color=color, label=label, markersize=5)
    return list(y)


# --- the plots ----------------------------------------------------------------------------------

def plot_step_time(results, path: Path) -> Path:
    """Median step time, optimizer time and the paired ratio to the baseline, with intervals."""
    s, colors, marks = results.summary, _colors(results.labels), _markers(results.labels)
    panels = [("step_time_s", "step time", "ms, median [95% interval]", 1e3),
              ("optimizer_time_s", "optimizer step time", "ms, median [95% interval]", 1e3)]
    if "ratio_to_baseline" in s and s["ratio_to_baseline"].notna().any():
        panels.append(("ratio_to_baseline", "step time / replicated's",
                       "paired ratio, median [95% interval]", 1.0))
    fig, axes = _grid(len(panels), len(results.facets))
    for j, facet in enumerate(results.facets):
        sub = s[s["facet"] == facet]
        offsets, log = _offsets(results.labels, sub["world_size"])
        for i, (col, title, unit, scale) in enumerate(panels):
            ax, values = axes[i][j], []
            for label in results.labels:
                d = sub[sub["label"] == label].sort_values("world_size")
                if not d.empty and col in d:
                    values += _errorbars(ax, d, col, label, colors[label], marks[label],
                                         offsets[label], log, scale)
            if col == "ratio_to_baseline":
                ax.axhline(1.0, color="gray", linewidth=1, linestyle=":")
            if spans_decades(values):
                ax.set_yscale("log")
            _world_axis(ax, sub["world_size"])
            ax.set_ylabel(f"{title} ({unit})", fontsize=8)
            ax.set_title(f"{facet}: {title}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_distance(results, path: Path) -> Path:
    """Optimizer step time over its lower bound on this machine (1 = at the bound)."""
    s, colors, marks = results.summary, _colors(results.labels), _markers(results.labels)
    fig, axes = _grid(1, len(results.facets), width=6.0, height=4.2)
    for j, facet in enumerate(results.facets):
        ax = axes[0][j]
        sub = s[(s["facet"] == facet)]
        if "distance" not in sub or sub["distance"].isna().all():
            _note_panel(ax, "no calibration: the bound needs an interleaved study", fontsize=8)
            continue
        offsets, log = _offsets(results.labels, sub["world_size"])
        values = [1.0]
        for label in results.labels:
            d = sub[sub["label"] == label].sort_values("world_size")
            if not d.empty:
                values += _errorbars(ax, d, "distance", label, colors[label], marks[label],
                                     offsets[label], log)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=2, label="the bound")
        if spans_decades(values):
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.1 * max(v for v in values if math.isfinite(v)))
        _world_axis(ax, sub["world_size"])
        ax.set_ylabel("optimizer step / its lower bound (median [95% interval])", fontsize=8)
        ax.set_title(f"{facet}: distance to the bound\n(max(ΣF/P, F_max)/NS rate + "
                     f"owner-bound bytes/bandwidth)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bytes(results, path: Path) -> Path:
    s, colors, marks = results.summary, _colors(results.labels), _markers(results.labels)
    fig, axes = _grid(1, len(results.facets), width=6.0, height=4.2)
    for j, facet in enumerate(results.facets):
        ax = axes[0][j]
        sub = s[(s["facet"] == facet) & (s["world_size"] > 1)]
        if sub.empty:
            _note_panel(ax, "only world size 1: nothing is communicated")
            continue
        offsets, log = _offsets(results.labels, sub["world_size"])
        values = []
        show_fsdp = (sub["fsdp_send_bytes_per_rank"] > 0).any()
        for label in results.labels:
            d = sub[sub["label"] == label].sort_values("world_size")
            if d.empty:
                continue
            xs = _shift(list(d["world_size"]), offsets[label], log)
            ax.plot(xs, d["opt_send_bytes_per_rank"] / MiB, marker=marks[label],
                    color=colors[label], label=f"{label} (optimizer)", alpha=0.85)
            values += list(d["opt_send_bytes_per_rank"] / MiB)
            if show_fsdp:
                ax.plot(xs, d["fsdp_send_bytes_per_rank"] / MiB, marker=marks[label],
                        linestyle="--", color=colors[label], alpha=0.5, fillstyle="none",
                        label=f"{label} (FSDP2)")
                values += list(d["fsdp_send_bytes_per_rank"] / MiB)
        bound = (sub.groupby("world_size")["bound_bytes_per_rank"].first() / MiB).dropna()
        if not bound.empty:
            ax.plot(bound.index, bound.values, color="black", linestyle=":", linewidth=2,
                    marker="_", markersize=14, label="owner-based lower bound\n2(P-1)/P² · N · b")
            values += list(bound.values)
        if spans_decades(values):
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.15 * max(values))
        _world_axis(ax, sub["world_size"])
        ax.set_ylabel("MiB sent per rank per step")
        note = "" if show_fsdp else " (no FSDP2 traffic: shape-only model)"
        ax.set_title(f"{facet}: bytes moved per rank{note}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_memory(results, path: Path) -> Path:
    s = results.summary
    sizes = sorted(s["world_size"].unique())
    cmap = plt.get_cmap("viridis")
    fig, axes = _grid(1, len(results.facets), width=max(5.5, 1.1 * len(results.labels) + 2))
    for j, facet in enumerate(results.facets):
        ax = axes[0][j]
        sub = s[s["facet"] == facet]
        x = np.arange(len(results.labels))
        width = 0.8 / len(sizes)
        values = []
        for k, p in enumerate(sizes):
            ys = []
            for label in results.labels:
                d = sub[(sub["label"] == label) & (sub["world_size"] == p)]
                ys.append(d["peak_mem_bytes"].iloc[0] / MiB if not d.empty else math.nan)
            values += ys
            ax.bar(x + (k - (len(sizes) - 1) / 2) * width, ys, width, label=f"P = {p}",
                   color=cmap(k / max(1, len(sizes) - 1) * 0.85))
        if spans_decades(values):
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(results.labels, rotation=20, ha="right")
        ax.set_ylabel("peak live memory per rank (MiB)")
        ax.set_title(f"{facet}: peak memory (max over ranks, instrumented step)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="world size")
    return _save(fig, path)


def per_rank(results, run: str) -> tuple[list[float], list[float]]:
    """(NS GFLOP per step, NS seconds per step) for each rank of a run, means over its timed
    (uninstrumented) steps when it has any."""
    df = _clean(results.metrics(run))
    ranks = sorted(df["rank"].unique())
    steps = df["step"].nunique()
    last = df["phase"].astype(str).str.rsplit("/", n=1).str[-1]
    flops = df[df["metric"] == "ns_flops"].groupby("rank")["value"].sum() / steps / 1e9
    secs = df[(df["metric"] == "time_s") & (last == "ns")].groupby("rank")["value"].sum() / steps
    return ([float(flops.get(r, 0.0)) for r in ranks], [float(secs.get(r, 0.0)) for r in ranks])


def plot_imbalance(results, path: Path) -> Path:
    s, colors = results.summary, _colors(results.labels)
    fig, axes = _grid(2, len(results.facets), width=7.2)
    for j, facet in enumerate(results.facets):
        sub = s[s["facet"] == facet]
        p = int(sub["world_size"].max())
        rows = sub[sub["world_size"] == p]
        present = [lb for lb in results.labels if (rows["label"] == lb).any()]
        width = 0.8 / max(1, len(present))
        for i, (title, unit, scale) in enumerate((("Newton-Schulz work", "GFLOP per step", 1.0),
                                                  ("Newton-Schulz time", "ms per step", 1e3))):
            ax = axes[i][j]
            for k, label in enumerate(present):
                run = rows[rows["label"] == label]["run"].iloc[0]
                values = [v * scale for v in per_rank(results, run)[i]]
                x = np.arange(len(values)) + (k - (len(present) - 1) / 2) * width
                ax.bar(x, values, width, label=label, color=colors[label])
            ax.set_xticks(np.arange(p))
            ax.set_xlabel("rank")
            ax.set_ylabel(f"{title} ({unit})")
            ax.set_title(f"{facet}: {title} per rank at P = {p}", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


# The stacked phases: (name in the legend, how to get it from a per-phase time table)
PHASES = ("gradients (fwd+bwd or synthetic)", "nonfinite check", "momentum",
          "NS (Newton-Schulz)", "comm wait", "orthogonalize: other (pack, send)", "normalize",
          "apply", "optimizer: other", "step: other")


def _clean(df):
    """The steps that ran without the per-op instruments, when there are any (as
    summarize_runs times them)."""
    flags = df[(df["phase"] == "step") & (df["metric"] == "instrumented")]
    clean = flags.loc[flags["value"] == 0, "step"].unique()
    return df[df["step"].isin(clean)] if len(clean) else df


def phase_times(results, run: str) -> dict[str, float]:
    """Seconds per step of each stacked phase: median over steps of the mean over ranks."""
    df = _clean(results.metrics(run))
    t = df[df["metric"] == "time_s"]
    table = t.groupby(["step", "rank", "phase"])["value"].sum().unstack("phase").fillna(0.0)
    table = table.groupby(level="step").mean()  # mean over ranks, per step

    def col(name: str):
        return table[name] if name in table else 0.0 * table.iloc[:, 0]

    def under(prefix: str, last: str):
        cols = [c for c in table.columns if c.startswith(prefix) and c.rsplit("/", 1)[-1] == last]
        return table[cols].sum(axis=1) if cols else 0.0 * table.iloc[:, 0]

    grads = col("forward_backward") + col("grads")
    opt = col("optimizer")
    orth = col("optimizer/orthogonalize")
    ns, wait = under("optimizer/", "ns"), under("optimizer/", "comm_wait")
    parts = {
        PHASES[0]: grads,
        PHASES[1]: col("optimizer/nonfinite_check"),
        PHASES[2]: col("optimizer/momentum"),
        PHASES[3]: ns,
        PHASES[4]: wait,
        PHASES[5]: (orth - ns - wait).clip(lower=0),
        PHASES[6]: col("optimizer/normalize"),
        PHASES[7]: col("optimizer/apply"),
    }
    known_opt = sum(col(f"optimizer/{n}") for n in ("nonfinite_check", "momentum",
                                                      "orthogonalize", "normalize", "apply"))
    parts[PHASES[8]] = (opt - known_opt).clip(lower=0)
    parts[PHASES[9]] = (col("step") - grads - opt).clip(lower=0)
    return {name: float(v.median()) for name, v in parts.items()}


def plot_phases(results, path: Path) -> Path:
    s = results.summary
    cmap = plt.get_cmap("tab10")
    n_bars = max(len(s[s["facet"] == f]) for f in results.facets)
    fig, axes = _grid(1, len(results.facets), width=max(6.0, 0.55 * n_bars + 3), height=4.8)
    for j, facet in enumerate(results.facets):
        ax = axes[0][j]
        sub = s[s["facet"] == facet].copy()
        sub["order"] = sub["label"].map({lb: i for i, lb in enumerate(results.labels)})
        sub = sub.sort_values(["world_size", "order"])
        x = np.arange(len(sub))
        bottom = np.zeros(len(sub))
        times = [phase_times(results, run) for run in sub["run"]]
        for k, name in enumerate(PHASES):
            ys = np.array([t[name] for t in times]) * 1e3
            if not ys.any():
                continue
            ax.bar(x, ys, 0.75, bottom=bottom, label=name, color=cmap(k % 10))
            bottom += ys
        ax.set_xticks(x)
        ax.set_xticklabels([f"{lb}\nP={p}" for lb, p in zip(sub["label"], sub["world_size"])],
                           rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("time per step (ms, median over steps, mean over ranks)")
        ax.set_title(f"{facet}: where a step's time goes", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
