"""The exact-or-not study's report: summary.md and three plots from the CSVs the study wrote.

Per world size P, one row per strategy: the step time against the fastest exact candidate (the
paired ratio's median and 95% interval over interleaved rounds, `dist_ortho.profiling.stats`, with
its verdict: "faster" only when the whole interval ends 5% below 1), bytes sent per step (all
ranks together) and the fraction saved against that fastest exact strategy, the deviation of the
update from the exact one (relative Frobenius distance and cosine, median and worst over steps,
matrices and seeds), the final validation-loss gap to the exact run (mean of the per-seed
differences, same seeds and batches, with the 95% Student t interval over seeds: "worse"/"better"
only when the interval excludes 0, else "tie") and the steps the schedule's seed-mean validation
curve takes to reach the exact run's final loss. A second table says how each of these moves with
P: the gap at the largest P minus the gap at the smallest, paired by seed, with its interval.
Every inexact schedule is labelled "(inexact)" in tables and plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dist_ortho.profiling.stats import compare  # noqa: E402
from dist_ortho.studies.convergence.analysis import steps_to_reach  # noqa: E402

__all__ = ["t_interval", "write"]

# two-sided 95% Student t quantiles by degrees of freedom (beyond: the normal's 1.96)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student t interval of the mean (NaN bounds for n < 2)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    df = len(x) - 1
    t = _T975.get(df) or next((v for k, v in sorted(_T975.items()) if k >= df), 1.96)
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def _verdict(low: float, high: float, above: str, below: str) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "tie (too few seeds)"
    return above if low > 0 else below if high < 0 else "tie"


def _shown(label: str, exact: bool) -> str:
    return label if exact else f"{label} (inexact)"


def _fmt(mean, low, high, spec=".4f") -> str:
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(low):
        return format(mean, spec)
    return f"{mean:+{spec[1:]}} [{low:+{spec[1:]}}, {high:+{spec[1:]}}]"


def _gaps(runs: pd.DataFrame, P: int, label: str, exact_label: str) -> dict[int, float]:
    mine = runs[(runs.world_size == P) & (runs.schedule == label)].set_index("seed")
    ref = runs[(runs.world_size == P) & (runs.schedule == exact_label)].set_index("seed")
    return {int(s): float(mine.final_val_loss[s] - ref.final_val_loss[s])
            for s in mine.index if s in ref.index}


def _mean_curve(curves: pd.DataFrame, P: int, label: str) -> pd.Series:
    sub = curves[(curves.world_size == P) & (curves.schedule == label)]
    return sub.groupby("step").val_loss.mean()


def _p_table(P, runs, curves, deviation, times, nbytes, exact_label) -> tuple[list[str], dict]:
    t = times[times.world_size == P]
    b = nbytes[nbytes.world_size == P].set_index("strategy")
    per = {s: dict(zip(g["round"], g.seconds_per_step)) for s, g in t.groupby("strategy")}
    exact_names = [s for s in b.index if bool(b.exact[s])]
    medians = {s: float(np.median(list(per[s].values()))) for s in per}
    fastest = min(exact_names, key=medians.get)
    target = float(_mean_curve(curves, P, exact_label).iloc[-1])
    lines = [f"### P = {P}", "",
             f"Baseline: the fastest exact candidate by median step time, `{fastest}` "
             f"({medians[fastest] * 1e3:.2f} ms per optimizer step, "
             f"{b.send_bytes_per_step[fastest]:,.0f} bytes per step over all ranks). Training "
             f"reference: `{exact_label}`, final validation loss (seed mean) {target:.4f}.", "",
             "| strategy | step time / fastest exact [95%] | verdict | bytes/step (all ranks) | "
             "bytes saved | rel. distance median / worst | cosine median / worst | final "
             "val-loss gap to exact [95% t, seeds] | gap verdict | steps to exact's final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    facts = {}
    for s in list(per):
        exact = bool(b.exact[s])
        cmp = compare(s, fastest, per[s], per[fastest])
        r = cmp.ratio
        verdict = "–" if s == fastest else {"faster": "faster", "slower": "slower",
                                            "tie": "tie"}[cmp.verdict]
        saved = 1 - b.send_bytes_per_step[s] / b.send_bytes_per_step[fastest] \
            if b.send_bytes_per_step[fastest] else math.nan
        dev = deviation[(deviation.world_size == P) & (deviation.schedule == s)]
        rel_txt = cos_txt = "–"
        if len(dev):
            rel_txt = f"{dev.rel_frobenius.median():.3g} / {dev.rel_frobenius.max():.3g}"
            cos_txt = f"{dev.cosine.median():.4f} / {dev.cosine.min():.4f}"
        gap = (math.nan,) * 3
        gap_verdict = reach_txt = "–"
        if s in set(runs[runs.world_size == P].schedule) and s != exact_label:
            gap = t_interval(_gaps(runs, P, s, exact_label).values())
            gap_verdict = _verdict(gap[1], gap[2], "worse", "better")
            curve = _mean_curve(curves, P, s)
            reach = steps_to_reach(list(curve.index), list(curve.values), target)
            reach_txt = "not reached" if reach is None else f"{reach:.0f}"
        lines.append(f"| {_shown(s, exact)} | {r.format('.3f')} | {verdict} | "
                     f"{b.send_bytes_per_step[s]:,.0f} | {saved:+.0%} | {rel_txt} | {cos_txt} | "
                     f"{_fmt(*gap)} | {gap_verdict} | {reach_txt} |")
        facts[s] = {"exact": exact, "ratio": r.median, "ratio_low": r.low, "ratio_high": r.high,
                    "rel_median": float(dev.rel_frobenius.median()) if len(dev) else math.nan,
                    "gap": gap}
    return lines + [""], facts


def _with_p(runs, facts, exact_label) -> list[str]:
    sizes = sorted(facts)
    lo, hi = sizes[0], sizes[-1]
    lines = [f"### How it moves with P ({lo} -> {hi})", "",
             f"| schedule | step time / fastest exact, P = {lo} -> {hi} | rel. distance median, "
             f"P = {lo} -> {hi} | gap to exact, P = {lo} -> {hi} | gap(P={hi}) - gap(P={lo}) "
             f"[95% t, paired by seed] | verdict |", "|---|---|---|---|---|---|"]
    for s, f in facts[lo].items():
        if f["exact"] or s not in facts[hi]:
            continue
        g_lo, g_hi = _gaps(runs, lo, s, exact_label), _gaps(runs, hi, s, exact_label)
        diff = t_interval([g_hi[k] - g_lo[k] for k in g_lo if k in g_hi])
        verdict = _verdict(diff[1], diff[2], "gap grows with P", "gap shrinks with P")
        h = facts[hi][s]
        lines.append(f"| {_shown(s, False)} | {f['ratio']:.3f} -> {h['ratio']:.3f} | "
                     f"{f['rel_median']:.3g} -> {h['rel_median']:.3g} | "
                     f"{f['gap'][0]:+.4f} -> {h['gap'][0]:+.4f} | {_fmt(*diff)} | {verdict} |")
    return lines + [""]


def _plots(out: Path, curves, deviation, facts, exact_label) -> None:
    styles = ["-", "--", ":", "-."]
    sizes = sorted(facts)
    labels = [s for s in facts[sizes[0]] if not facts[sizes[0]][s]["exact"]]
    colors = {s: f"C{i}" for i, s in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, P in enumerate(sizes):
        for s in labels:
            d = deviation[(deviation.world_size == P) & (deviation.schedule == s)]
            if len(d):
                m = d.groupby("step").rel_frobenius.median()
                ax.plot(m.index, m.values, styles[j % 4], color=colors[s],
                        label=f"{_shown(s, False)}, P = {P}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||U - U_exact||_F / ||U_exact||_F\n(median over matrices and seeds)")
    ax.set_title("Deviation of each step's update from the exact one")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "deviation.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, P in enumerate(sizes):
        ref = _mean_curve(curves, P, exact_label)
        for s in labels:
            c = _mean_curve(curves, P, s)
            ax.plot(c.index, (c - ref).values, styles[j % 4], color=colors[s],
                    label=f"{_shown(s, False)}, P = {P}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"val loss - {exact_label}'s (seed means)")
    ax.set_title("Validation-loss gap to the exact run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_gap.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, P in enumerate(sizes):
        for s in labels:
            f = facts[P][s]
            gap = f["gap"]
            ax.errorbar([f["ratio"]], [gap[0]],
                        xerr=[[f["ratio"] - f["ratio_low"]], [f["ratio_high"] - f["ratio"]]],
                        yerr=[[gap[0] - gap[1]], [gap[2] - gap[0]]] if math.isfinite(gap[1])
                        else None, fmt="os^D"[j % 4], color=colors[s],
                        label=f"{_shown(s, False)}, P = {P}")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xlabel("optimizer step time / fastest exact (median, 95%)")
    ax.set_ylabel("final val-loss gap to exact (95% t)")
    ax.set_title("What a shortcut saves and what it costs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)


def write(out: Path, exact_label: str) -> Path:
    """summary.md and deviation.png, val_gap.png, tradeoff.png in `out` from its CSVs."""
    runs, curves = pd.read_csv(out / "runs.csv"), pd.read_csv(out / "curves.csv")
    times, nbytes = pd.read_csv(out / "times.csv"), pd.read_csv(out / "bytes.csv")
    dev_path = out / "deviation.csv"
    deviation = (pd.read_csv(dev_path) if dev_path.exists()
                 else pd.DataFrame(columns=["world_size", "schedule", "step", "rel_frobenius",
                                            "cosine"]))
    facts_file = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() \
        else {}
    lines = ["# Exact or not: inexact schedules beside the exact update", ""]
    if facts_file:
        lines += [f"Command: `{facts_file['command']}`  ", f"Wall time: {facts_file['wall_s']:.0f} s "
                  f"on {facts_file['cpus']} CPU cores (load average before {facts_file['loadavg_before'][0]:.2f}, "
                  f"after {facts_file['loadavg_after'][0]:.2f}), torch {facts_file['torch']}.", ""]
    facts = {}
    for P in sorted(runs.world_size.unique()):
        table, facts[int(P)] = _p_table(int(P), runs, curves, deviation, times, nbytes,
                                        exact_label)
        lines += table
    if len(facts) > 1:
        lines += _with_p(runs, facts, exact_label)
    lines += ["Plots: `deviation.png` (deviation per step), `val_gap.png` (validation-loss gap "
              "per evaluation), `tradeoff.png` (step time ratio against final gap).", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    _plots(out, curves, deviation, facts, exact_label)
    return path
