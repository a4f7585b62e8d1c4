"""Plots and a markdown report from a sweep's results: how the strategies scale.

    dist-ortho report results/latest/default_study   # -> report.md + plots/ there

Input: a study directory written by `dist-ortho sweep` (summary.csv, runs/<point>/...) or any
folder of run directories (each with metrics.csv, run.json, environment.json), which is then
summarized with `profiling.summarize_runs`. Output, next to the input:

  plots/step_time.png       median step time and optimizer time vs world size, per strategy
  plots/bytes_per_rank.png  bytes each rank sends per step vs world size: the optimizer's (solid)
                            and FSDP2's (dashed), with the lower bound of any owner-based scheme,
                            every matrix gathered once and returned once: 2(P-1)/P^2 * N * b per
                            rank (N matrix elements, b bytes per element each way)
  plots/peak_memory.png     peak live bytes per rank, per strategy and world size
  plots/imbalance.png       Newton-Schulz FLOPs and time on each rank at the largest world size
  plots/phases.png          where a step's time goes: stacked phases per strategy and world size
  report.md                 the plots, a summary table (with the step-time ratio to `replicated`
                            at the same world size) and the environment the runs ran on

Several models or option sets in one study become side-by-side panels. Plots use the Agg backend
(no display needed); axes carry units, and go logarithmic where values span over a decade.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dist_ortho.cli import run_command  # noqa: E402
from dist_ortho.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from dist_ortho.profiling import read_metrics, summarize_runs  # noqa: E402

__all__ = ["Results", "load_results", "add_ratios", "owner_bound_bytes", "plot_step_time",
           "plot_bytes", "plot_memory", "plot_imbalance", "plot_phases", "write_report",
           "add_arguments", "main", "PLOTS"]

MiB = 2.0 ** 20
PLOTS = ("step_time", "bytes_per_rank", "peak_memory", "imbalance", "phases")
BASELINE = "replicated"


# --- loading ------------------------------------------------------------------------------------

@dataclass
class Results:
    root: Path  # where report.md and plots/ go
    runs_dir: Path  # the folder holding one directory per run
    summary: object  # pandas DataFrame, one row per run, with `label` and `facet` columns
    facts: dict = field(default_factory=dict)  # run -> run.json content
    env: dict = field(default_factory=dict)  # environment.json of the first run
    failures: list = field(default_factory=list)  # rows of failures.csv
    _metrics: dict = field(default_factory=dict)

    def metrics(self, run: str):
        """That run's metrics.csv (warm-up steps removed), read once."""
        if run not in self._metrics:
            df = read_metrics(self.runs_dir / run)
            self._metrics[run] = df[~df["warmup"]]
        return self._metrics[run]

    @property
    def facets(self) -> list[str]:
        return list(dict.fromkeys(self.summary["facet"]))

    @property
    def labels(self) -> list[str]:
        """Strategy labels, the baseline first."""
        labels = sorted(set(self.summary["label"]))
        return sorted(labels, key=lambda s: (s != BASELINE, s))


def load_results(path: str | Path) -> Results:
    """Read a study directory (or a folder of runs) into a Results."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a directory; pass a study's results directory, "
                         f"e.g. results/latest/default_study")
    runs_dir = root / "runs" if (root / "runs").is_dir() else root
    if (root / "summary.csv").is_file():
        summary = pd.read_csv(root / "summary.csv")
    else:
        summary = summarize_runs(runs_dir)
    if summary.empty:
        raise ValueError(f"no complete runs under {str(runs_dir)!r} (no summary.csv, and no run "
                         f"directory with a usable metrics.csv)")
    summary = summary.copy()
    summary["label"] = summary["strategy_label"] if "strategy_label" in summary else \
        summary["strategy"]
    option = summary["option_set"].astype(str) if "option_set" in summary else ""
    many_options = "option_set" in summary and summary["option_set"].nunique() > 1
    summary["facet"] = summary["model"].astype(str) + ((" / " + option) if many_options else "")
    summary["world_size"] = summary["world_size"].astype(int)
    facts = {}
    for run in summary["run"]:
        path_ = runs_dir / run / "run.json"
        if path_.is_file():
            facts[run] = json.loads(path_.read_text())
    env = {}
    for run in summary["run"]:
        path_ = runs_dir / run / "environment.json"
        if path_.is_file():
            env = json.loads(path_.read_text())
            break
    failures = []
    if (root / "failures.csv").is_file():
        failures = pd.read_csv(root / "failures.csv").fillna("").to_dict("records")
    results = Results(root, runs_dir, summary, facts, env, failures)
    add_ratios(results)
    return results


def owner_bound_bytes(world_size: int, matrix_numel: int, itemsize_in: int,
                      itemsize_out: int | None = None) -> float:
    """Bytes each rank sends per step, at least, in any scheme where each matrix is assembled
    once on an owner and its result returned once: (P-1)/P^2 * N * (b_in + b_out), which is
    2(P-1)/P^2 * N * b when both directions use b bytes per element."""
    itemsize_out = itemsize_in if itemsize_out is None else itemsize_out
    p = world_size
    return (p - 1) / p ** 2 * matrix_numel * (itemsize_in + itemsize_out)


def add_ratios(results: Results) -> None:
    """Columns `ratio_to_replicated` (step time / the baseline's at the same facet and world
    size) and `bound_bytes_per_rank` (the owner-based lower bound)."""
    s = results.summary
    base = s[s["label"] == BASELINE].set_index(["facet", "world_size"])["step_time_s"]
    s["ratio_to_replicated"] = [
        row.step_time_s / base.get((row.facet, row.world_size), math.nan)
        for row in s.itertuples()]
    bounds = []
    for row in s.itertuples():
        f = results.facts.get(row.run, {})
        if f.get("matrix_numel") and f.get("matrix_itemsize"):
            bounds.append(owner_bound_bytes(row.world_size, f["matrix_numel"],
                                            f["matrix_itemsize"], f.get("ns_itemsize")))
        else:
            bounds.append(math.nan)
    s["bound_bytes_per_rank"] = bounds


# --- plotting helpers ---------------------------------------------------------------------------

def _colors(labels: Sequence[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _spans_decades(values) -> bool:
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


def _grid(n_rows: int, n_cols: int, width: float = 5.2, height: float = 3.8):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows),
                             squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


# --- the plots ----------------------------------------------------------------------------------

def plot_step_time(results: Results, path: Path) -> Path:
    s, colors = results.summary, _colors(results.labels)
    fig, axes = _grid(2, len(results.facets))
    for j, facet in enumerate(results.facets):
        sub = s[s["facet"] == facet]
        for i, (col, title) in enumerate((("step_time_s", "step time"),
                                          ("optimizer_time_s", "optimizer step time"))):
            ax = axes[i][j]
            for label in results.labels:
                d = sub[sub["label"] == label].sort_values("world_size")
                if not d.empty:
                    ax.plot(d["world_size"], d[col] * 1e3, marker="o", label=label,
                            color=colors[label])
            if _spans_decades(sub[col] * 1e3):
                ax.set_yscale("log")
            _world_axis(ax, sub["world_size"])
            ax.set_ylabel(f"{title} (ms, median, slowest rank)")
            ax.set_title(f"{facet}: {title}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bytes(results: Results, path: Path) -> Path:
    s, colors = results.summary, _colors(results.labels)
    fig, axes = _grid(1, len(results.facets), width=6.0, height=4.2)
    for j, facet in enumerate(results.facets):
        ax = axes[0][j]
        sub = s[(s["facet"] == facet) & (s["world_size"] > 1)]
        if sub.empty:
            ax.text(0.5, 0.5, "only world size 1: nothing is communicated", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        values = []
        show_fsdp = (sub["fsdp_send_bytes_per_rank"] > 0).any()
        for label in results.labels:
            d = sub[sub["label"] == label].sort_values("world_size")
            if d.empty:
                continue
            ax.plot(d["world_size"], d["opt_send_bytes_per_rank"] / MiB, marker="o",
                    color=colors[label], label=f"{label} (optimizer)")
            values += list(d["opt_send_bytes_per_rank"] / MiB)
            if show_fsdp:
                ax.plot(d["world_size"], d["fsdp_send_bytes_per_rank"] / MiB, marker="s",
                        linestyle="--", color=colors[label], alpha=0.7, label=f"{label} (FSDP2)")
                values += list(d["fsdp_send_bytes_per_rank"] / MiB)
        bound = (sub.groupby("world_size")["bound_bytes_per_rank"].first() / MiB).dropna()
        if not bound.empty:
            ax.plot(bound.index, bound.values, color="black", linestyle=":", linewidth=2,
                    marker="_", markersize=14, label="owner-based lower bound\n2(P-1)/P² · N · b")
            values += list(bound.values)
        if _spans_decades(values):
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.15 * max(values))
        _world_axis(ax, sub["world_size"])
        ax.set_ylabel("MiB sent per rank per step")
        note = "" if show_fsdp else " (no FSDP2 traffic: shape-only model)"
        ax.set_title(f"{facet}: bytes moved per rank{note}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_memory(results: Results, path: Path) -> Path:
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
        if _spans_decades(values):
            ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels(results.labels, rotation=20, ha="right")
        ax.set_ylabel("peak live memory per rank (MiB)")
        ax.set_title(f"{facet}: peak memory (max over ranks and steps)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="world size")
    return _save(fig, path)


def _per_rank(results: Results, run: str) -> tuple[list[float], list[float]]:
    """(NS GFLOP per step, NS seconds per step) for each rank of a run, means over steps."""
    df = results.metrics(run)
    ranks = sorted(df["rank"].unique())
    steps = df["step"].nunique()
    last = df["phase"].astype(str).str.rsplit("/", n=1).str[-1]
    flops = df[df["metric"] == "ns_flops"].groupby("rank")["value"].sum() / steps / 1e9
    secs = df[(df["metric"] == "time_s") & (last == "ns")].groupby("rank")["value"].sum() / steps
    return ([float(flops.get(r, 0.0)) for r in ranks], [float(secs.get(r, 0.0)) for r in ranks])


def plot_imbalance(results: Results, path: Path) -> Path:
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
                values = [v * scale for v in _per_rank(results, run)[i]]
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
_PHASES = ("gradients (fwd+bwd or synthetic)", "nonfinite check", "momentum",
           "NS (Newton-Schulz)", "comm wait", "orthogonalize: other (pack, send)", "normalize",
           "apply", "optimizer: other", "step: other")


def _phase_times(results: Results, run: str) -> dict[str, float]:
    """Seconds per step of each stacked phase: median over steps of the mean over ranks."""
    df = results.metrics(run)
    # steps that ran the per-op instruments are slower; time the clean ones when there are any,
    # as summarize_runs does
    flags = df[(df["phase"] == "step") & (df["metric"] == "instrumented")]
    clean = flags.loc[flags["value"] == 0, "step"].unique()
    if len(clean):
        df = df[df["step"].isin(clean)]
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
        _PHASES[0]: grads,
        _PHASES[1]: col("optimizer/nonfinite_check"),
        _PHASES[2]: col("optimizer/momentum"),
        _PHASES[3]: ns,
        _PHASES[4]: wait,
        _PHASES[5]: (orth - ns - wait).clip(lower=0),
        _PHASES[6]: col("optimizer/normalize"),
        _PHASES[7]: col("optimizer/apply"),
    }
    known_opt = sum(col(f"optimizer/{n}") for n in ("nonfinite_check", "momentum",
                                                      "orthogonalize", "normalize", "apply"))
    parts[_PHASES[8]] = (opt - known_opt).clip(lower=0)
    parts[_PHASES[9]] = (col("step") - grads - opt).clip(lower=0)
    return {name: float(v.median()) for name, v in parts.items()}


def plot_phases(results: Results, path: Path) -> Path:
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
        times = [_phase_times(results, run) for run in sub["run"]]
        for k, name in enumerate(_PHASES):
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


# --- the report ---------------------------------------------------------------------------------

def _fmt(value, spec: str, scale: float = 1.0, missing: str = "–") -> str:
    try:
        if value is None or not math.isfinite(float(value)):
            return missing
    except (TypeError, ValueError):
        return missing
    return format(float(value) * scale, spec)


def summary_table(results: Results) -> list[str]:
    s = results.summary.copy()
    s["order"] = s["label"].map({lb: i for i, lb in enumerate(results.labels)})
    s = s.sort_values(["facet", "world_size", "order"])
    facet_col = len(results.facets) > 1
    head = (["model"] if facet_col else []) + [
        "strategy", "P", "step (ms)", "ratio to replicated", "optimizer (ms)",
        "optimizer MiB/rank", "lower bound MiB/rank", "FSDP2 MiB/rank", "peak MiB/rank",
        "NS FLOP imbalance", "unblocked share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in s.itertuples():
        cells = ([row.facet] if facet_col else []) + [
            row.label, str(row.world_size), _fmt(row.step_time_s, ".1f", 1e3),
            _fmt(row.ratio_to_replicated, ".2f"), _fmt(row.optimizer_time_s, ".1f", 1e3),
            _fmt(row.opt_send_bytes_per_rank, ".2f", 1 / MiB),
            _fmt(row.bound_bytes_per_rank, ".2f", 1 / MiB) if row.world_size > 1 else "0.00",
            _fmt(row.fsdp_send_bytes_per_rank, ".2f", 1 / MiB),
            _fmt(row.peak_mem_bytes, ".1f", 1 / MiB), _fmt(row.ns_flops_imbalance, ".2f"),
            _fmt(row.overlap_fraction, ".2f") if row.world_size > 1 else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_ENV_KEYS = ("device_type", "device_name", "backend", "cpu_count", "torch_threads", "torch",
             "python", "cuda", "nccl", "platform", "hostname", "git_commit", "git_dirty")

_CAPTIONS = {
    "step_time": "Median step time and optimizer step time (slowest rank) against world size.",
    "bytes_per_rank": "Bytes each rank sends per step: the optimizer's collectives (solid), "
                      "FSDP2's all-gathers and reduce-scatters (dashed), and the lower bound of "
                      "any owner-based scheme (dotted).",
    "peak_memory": "Peak live memory per rank (max over ranks and measured steps).",
    "imbalance": "Newton-Schulz FLOPs and time on each rank at the largest world size: "
                 "unequal bars mean some ranks wait for others.",
    "phases": "Where a step's time goes, per strategy and world size.",
}


def _timed_steps(s) -> str:
    """How many steps the timings come from: the measured (post-warm-up) steps that ran without
    the per-op instruments (`timed_steps`), which are fewer than the measured ones (`steps`)
    when profiling.instrument_every > 1."""
    def values(col: str) -> str:
        return ", ".join(map(str, sorted(set(int(v) for v in s[col])))) if col in s else "?"

    if "timed_steps" not in s:
        return f"{values('steps')} measured step(s) after warm-up"
    if "steps" in s and (s["timed_steps"] == s["steps"]).all():
        return f"{values('timed_steps')} measured step(s) after warm-up"
    return (f"{values('timed_steps')} timed step(s) per run: the measured steps after warm-up "
            f"({values('steps')}) that ran without the per-op instruments (bytes and memory come "
            f"from the instrumented ones)")


def write_report(path: str | Path) -> Path:
    """Plots and report.md for the study directory `path`; returns report.md's path."""
    results = load_results(path)
    plots_dir = results.root / "plots"
    makers = {"step_time": plot_step_time, "bytes_per_rank": plot_bytes,
              "peak_memory": plot_memory, "imbalance": plot_imbalance, "phases": plot_phases}
    made = {name: makers[name](results, plots_dir / f"{name}.png") for name in PLOTS}

    s = results.summary
    env = results.env
    title = results.root.name
    lines = [f"# Scaling report: {title}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from {len(s)} complete run(s)"
             f" in `{results.runs_dir}`"
             + (f"; {len(results.failures)} point(s) failed (see below)." if results.failures
                else "."), ""]
    lines += [f"Timings are medians over {_timed_steps(s)}; a step's time is its slowest "
              f"rank's. Bytes are what each rank "
              f"sends to other ranks per step (mean over ranks); the lower bound is "
              f"2(P-1)/P² · N · b with N the total number of orthogonalized matrix elements.", ""]
    cpu_count = env.get("cpu_count")
    if env.get("device_type") == "cpu" and cpu_count and s["world_size"].max() > cpu_count:
        lines += [f"> **Note:** this machine has {cpu_count} CPU core(s) and the largest world size "
                  f"is {s['world_size'].max()}: ranks share cores, so absolute times grow with P. "
                  f"Compare strategies at the same world size (the ratio column), not across "
                  f"world sizes.", ""]
    loads = [f.get("load_average_1m") for f in results.facts.values()]
    loads = [v for v in loads if isinstance(v, (int, float))]
    if cpu_count and loads and max(loads) > cpu_count:
        lines += [f"> **Note:** the 1-minute load average at the end of the runs reached "
                  f"{max(loads):.1f} on {cpu_count} core(s) (median {sorted(loads)[len(loads) // 2]:.1f}):"
                  f" other processes competed for the CPU, so timings carry extra noise.", ""]
    lines += ["## Summary", ""] + summary_table(results) + [""]
    lines += ["ratio to replicated: step time divided by the `replicated` strategy's at the same "
              "world size (below 1 is faster). NS FLOP imbalance: max over ranks / mean of the "
              "Newton-Schulz FLOPs (1.00 is even). unblocked share: of the orthogonalize time "
              "outside Newton-Schulz, the share the rank spent not waiting on a transfer "
              "(packing, copies, unpacking). It is not an overlap measure: a fully synchronous "
              "strategy shows its packing share here.", ""]
    lines += ["## Plots", ""]
    for name in PLOTS:
        lines += [f"### {name.replace('_', ' ')}", "", _CAPTIONS[name], "",
                  f"![{name}](plots/{made[name].name})", ""]
    if results.failures:
        lines += ["## Failed points", "", "| point | status | error | log |", "|---|---|---|---|"]
        for f in results.failures:
            error = str(f.get("error", "")).replace("|", "\\|")
            lines.append(f"| {f.get('point')} | {f.get('status')} | {error} | {f.get('log')} |")
        lines.append("")
    lines += ["## Environment", "", "| key | value |", "|---|---|"]
    for key in _ENV_KEYS:
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    config_hashes = sorted(set(s["config_hash"].astype(str))) if "config_hash" in s else []
    lines += ["", f"Runs: {', '.join(f'`{r}`' for r in s['run'])}.",
              f"Each run's resolved config is in `runs/<run>/config.yaml` "
              f"({len(config_hashes)} distinct config hash(es)).", ""]
    return atomic_write_text(results.root / "report.md", "\n".join(lines))


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path,
                        help="a study's results directory (e.g. results/latest/default_study) or a "
                             "folder of run directories")


def main(args: argparse.Namespace) -> int:
    """The command, with the CLI's one-line errors and exit codes (also when called directly)."""
    return run_command("report", lambda a: print(write_report(a.results)) or 0, args)
