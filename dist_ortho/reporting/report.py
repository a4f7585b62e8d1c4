"""Plots and a markdown report from a study's results: how the strategies compare, with their noise.

    dist-ortho report results/latest/default_study   # -> report.md + plots/ there

Input: a study directory written by `dist-ortho study` / `dist-ortho sweep` (summary.csv,
timings.csv for an interleaved study, runs/<point>/..., groups/<job>/machine.json) or any folder
of run directories (each with metrics.csv, run.json, environment.json), which is then summarized
with `profiling.summarize_runs`. Output, next to the input: report.md and plots/ (see
`dist_ortho.reporting.plots`).

What the report says, and how (`dist_ortho.reporting.comparison`, `dist_ortho.profiling.stats`):
- every timing is a median with its 95% interval (order statistics over the timed steps of all
  repeats), in the tables and as error bars in the plots;
- strategies are ranked only where the data separate them: "A faster than B" is stated when the
  paired ratio of their interleaved steps has its whole 95% interval below 1 - margin (5%);
  every other pair is "not distinguishable at this noise";
- the machine's load averages during each job, the CPU time other processes took meanwhile, and
  the thread settings are printed beside the figures;
- the bytes each strategy sends on top of FSDP2's own all-gathers and reduce-scatters (a GPT
  model in the study has them), and each point's distance to the lower bound of its optimizer
  step on this machine.

Several models or option sets in one study become side-by-side panels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dist_ortho.core.commands import run_command
from dist_ortho.core.errors import UserError
from dist_ortho.core.io import atomic_write_text, writable_dir
from dist_ortho.core.plan import owner_bound_bytes
from dist_ortho.profiling import read_metrics, summarize_runs
from dist_ortho.profiling.stats import LEVEL, MARGIN, Interval
from dist_ortho.reporting import plots as report_plots
from dist_ortho.reporting import timeline_plots
from dist_ortho.reporting.comparison import BASELINE, Analysis, analyze
from dist_ortho.reporting.hsdp import hsdp_lines

__all__ = ["Results", "load_results", "add_bounds", "write_report", "add_arguments", "main",
           "PLOTS", "BASELINE"]

MiB = report_plots.MiB
PLOTS = report_plots.PLOTS


# --- loading ------------------------------------------------------------------------------------

@dataclass
class Results:
    root: Path  # where report.md and plots/ go
    runs_dir: Path  # the folder holding one directory per run
    summary: object  # pandas DataFrame, one row per run, with `label` and `facet` columns
    facts: dict = field(default_factory=dict)  # run -> run.json content
    env: dict = field(default_factory=dict)  # environment.json of the first run
    failures: list = field(default_factory=list)  # rows of failures.csv
    analysis: Analysis | None = None
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


def study_margin(root: Path) -> float:
    """The claim margin the study was run with (its study.json), else the default."""
    try:
        return float(json.loads((root / "study.json").read_text())["schedule"]["claim_margin"])
    except (OSError, KeyError, TypeError, ValueError):
        return MARGIN


def load_results(path: str | Path, margin: float | None = None) -> Results:
    """Read a study directory (or a folder of runs) into a Results, with its analysis (claims
    with `margin`, default: the study's own, else 5%)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{str(root)!r} is not a directory; pass a study's results directory, "
                        f"e.g. results/latest/default_study")
    margin = study_margin(root) if margin is None else margin
    runs_dir = root / "runs" if (root / "runs").is_dir() else root
    if (root / "summary.csv").is_file():
        summary = pd.read_csv(root / "summary.csv")
    else:
        summary = summarize_runs(runs_dir)
    if summary.empty:
        raise UserError(f"no complete runs under {str(runs_dir)!r} (no summary.csv, and no run "
                        f"directory with a usable metrics.csv)")
    summary = summary.copy()
    summary["label"] = summary["strategy_label"] if "strategy_label" in summary else \
        summary["strategy"]
    if "model_label" not in summary:
        summary["model_label"] = summary["model"]
    if "option_set" not in summary:
        summary["option_set"] = "default"
    option = summary["option_set"].astype(str)
    many_options = summary["option_set"].nunique() > 1
    summary["facet"] = summary["model_label"].astype(str) + ((" / " + option) if many_options
                                                             else "")
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
    add_bounds(results)
    results.analysis = analyze(results.summary, root, runs_dir, margin)
    results.summary = results.analysis.points
    return results


def add_bounds(results: Results) -> None:
    """Column `bound_bytes_per_rank`: the owner-based lower bound (`plan.owner_bound_bytes`)."""
    bounds = []
    for row in results.summary.itertuples():
        f = results.facts.get(row.run, {})
        if f.get("matrix_numel") and f.get("matrix_itemsize"):
            bounds.append(owner_bound_bytes(row.world_size, f["matrix_numel"],
                                            f["matrix_itemsize"], f.get("ns_itemsize")))
        else:
            bounds.append(math.nan)
    results.summary["bound_bytes_per_rank"] = bounds


# --- tables -------------------------------------------------------------------------------------

def _fmt(value, spec: str, scale: float = 1.0, missing: str = "–") -> str:
    try:
        if value is None or not math.isfinite(float(value)):
            return missing
    except (TypeError, ValueError):
        return missing
    return format(float(value) * scale, spec)


def _iv(row, col: str, spec: str, scale: float = 1.0) -> str:
    """"median [low, high]" of a column with interval columns."""
    low, high = getattr(row, f"{col}_low", math.nan), getattr(row, f"{col}_high", math.nan)
    # a study without the baseline strategy has no ratio columns: "–"
    return Interval(getattr(row, col, math.nan), low, high, 0, math.nan).format(spec, scale)


def _rows(results: Results):
    s = results.summary.copy()
    s["order"] = s["label"].map({lb: i for i, lb in enumerate(results.labels)})
    return s.sort_values(["facet", "world_size", "order"])


def _table(results: Results, head: list[str], cells) -> list[str]:
    facet_col = len(results.facets) > 1
    head = (["model"] if facet_col else []) + head
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in _rows(results).itertuples():
        lines.append("| " + " | ".join(([row.facet] if facet_col else []) + cells(row)) + " |")
    return lines


def timing_table(results: Results) -> list[str]:
    return _table(results, ["strategy", "P", "step (ms)", "ratio to replicated",
                            "optimizer (ms)", "optimizer share of step", "timed steps"],
                  lambda r: [r.label, str(r.world_size), _iv(r, "step_time_s", ".1f", 1e3),
                             _iv(r, "ratio_to_baseline", ".2f"),
                             _iv(r, "optimizer_time_s", ".1f", 1e3),
                             _fmt(r.optimizer_time_s / r.step_time_s, ".0%"),
                             _fmt(r.step_time_s_n, ".0f")])


def bytes_table(results: Results) -> list[str]:
    def cells(r):
        fsdp = r.fsdp_send_bytes_per_rank
        return [r.label, str(r.world_size), _fmt(r.opt_send_bytes_per_rank, ".2f", 1 / MiB),
                _fmt(r.bound_bytes_per_rank, ".2f", 1 / MiB) if r.world_size > 1 else "0.00",
                _fmt(fsdp, ".2f", 1 / MiB),
                _fmt(r.opt_send_bytes_per_rank / fsdp, "+.0%") if fsdp > 0 else "–",
                _fmt(r.peak_mem_bytes, ".1f", 1 / MiB), _fmt(r.ns_flops_imbalance, ".2f"),
                _fmt(r.unblocked_share, ".2f") if r.world_size > 1 else "–"]

    return _table(results, ["strategy", "P", "optimizer MiB/rank", "lower bound MiB/rank",
                            "FSDP2 MiB/rank", "optimizer bytes on top of FSDP2",
                            "peak MiB/rank", "NS FLOP imbalance", "unblocked share"], cells)


def bound_table(results: Results) -> list[str]:
    return _table(results, ["strategy", "P", "NS bound (ms)", "comm bound (ms)", "bound (ms)",
                            "optimizer (ms)", "distance to bound"],
                  lambda r: [r.label, str(r.world_size), _fmt(r.ns_bound_s, ".1f", 1e3),
                             _fmt(r.comm_bound_s, ".1f", 1e3), _fmt(r.bound_s, ".1f", 1e3),
                             _iv(r, "optimizer_time_s", ".1f", 1e3),
                             _iv(r, "distance", ".2f")])


def redo_lines(results: Results) -> list[str]:
    """Runs in which `overlapped` redid its backward work after backward (global-norm clipping
    changes the gradients after its hooks ran), with how many of their measured steps."""
    s = results.summary
    if "overlap_redos" not in s:
        return []
    redone = s[s["overlap_redos"].fillna(0) > 0]
    if redone.empty:
        return []
    lines = ["Steps on which `overlapped` redid the orthogonalization it started in backward, "
             "after backward (a gradient changed after its hook, e.g. global-norm clipping; the "
             "update is exact, the overlap is lost): "]
    lines += [f"- {r.label}, P={r.world_size}: {r.overlap_redos:.0f} of {r.steps:.0f} steps"
              for r in redone.itertuples()]
    return lines + [""]


def ranking_lines(results: Results) -> list[str]:
    a = results.analysis
    how = ("paired ratio of interleaved steps" if a.paired else
           "interval arithmetic on separately measured medians (the points ran one after "
           "another, unpaired)")
    levels = sorted({g.level for g in a.groups})
    lines = [f"A claim \"A faster than B\" is made only where the interval of the step-time "
             f"ratio A/B ({how}) lies entirely below {1 - a.margin:.2f} (a margin of "
             f"{a.margin:.0%}); every other pair is not distinguishable at this noise. A group "
             f"of k strategies compares k(k-1)/2 pairs at once, so each pair's interval is at "
             f"the Bonferroni level 1 - 5%/pairs ("
             + ", ".join(f"{lv:.1%}" for lv in levels)
             + " here; the intervals in this section are those), which keeps the chance of any "
             "claim made by noise alone in a group below 5%. In the ordering, `<` separates "
             "neighbours that are claimed apart and `≈` neighbours that are not (a claim between "
             "non-neighbours is listed below it).", ""]
    for g in a.groups:
        lines += [f"**{g.facet}, P = {g.world_size}:** {g.ordering}", ""]
        claimed = [c for c in g.comparisons if c.claim is not None]
        for c in sorted(claimed, key=lambda c: c.claim):
            lines.append(f"- {c.sentence()}")
        if g.ties:
            lines.append("- not distinguishable at this noise: " + "; ".join(
                f"{c.a} vs {c.b} ({c.ratio.format('.2f')})" for c in g.ties))
        lines.append("")
    return lines


def machine_lines(results: Results) -> list[str]:
    """Load and thread settings of every job, and what the calibration measured."""
    a = results.analysis
    env = results.env
    lines = []
    if a.machines:
        lines += ["| job | P | load avg 1/5/15 min at start | highest 1-min load seen | at end | "
                  "other processes (cores, mean) | threads per rank (torch / OMP / MKL) | "
                  "job wall (s) |", "|---|---|---|---|---|---|---|---|"]
        for job, m in a.machines.items():
            samples = [x for x in [m.get("load_start"), *m.get("load_samples", []),
                                   m.get("load_end")] if x]
            t = m.get("threads", {})
            lines.append(
                f"| {job} | {m.get('world_size')} | {'/'.join(map(str, m.get('load_start') or []))} "
                f"| {max((x[0] for x in samples), default=math.nan):.2f} | "
                f"{'/'.join(map(str, m.get('load_end') or []))} | "
                f"{_fmt(m.get('foreign_cores'), '.2f')} | {t.get('torch_threads')} / "
                f"{t.get('OMP_NUM_THREADS')} / {t.get('MKL_NUM_THREADS')} | "
                f"{_fmt(m.get('wall_s'), '.0f')} |")
        lines += ["", "| job | model | NS rate alone (GFLOP/s) | NS rate, every rank busy "
                      "(GFLOP/s per rank) | bandwidth (MB/s, best of all-to-all and all-gather) "
                      "| calibration (s) |", "|---|---|---|---|---|---|"]
        for job, m in a.machines.items():
            for model, info in m.get("models", {}).items():
                c = info.get("calibration", {})
                lines.append(f"| {job} | {model} | {_fmt(c.get('ns_rate_alone_flops'), '.1f', 1e-9)}"
                             f" | {_fmt(c.get('ns_rate_busy_flops'), '.1f', 1e-9)} | "
                             f"{_fmt(c.get('bandwidth_bytes_per_s'), '.0f', 1e-6)} | "
                             f"{_fmt(c.get('seconds'), '.1f')} |")
        lines.append("")
    else:
        loads = [f.get("load_average_1m") for f in results.facts.values()]
        loads = [v for v in loads if isinstance(v, (int, float))]
        if loads:
            lines += [f"1-minute load average at the end of the runs: {min(loads):.1f} to "
                      f"{max(loads):.1f}; torch threads per rank: {env.get('torch_threads')}.", ""]
    cpu_count = env.get("cpu_count")
    s = results.summary
    if env.get("device_type") == "cpu" and cpu_count and s["world_size"].max() > cpu_count:
        lines += [f"> **Note:** this machine has {cpu_count} CPU core(s) and the largest world "
                  f"size is {s['world_size'].max()}: ranks share cores, so absolute times grow "
                  f"with P. Compare strategies at the same world size, not across world sizes.",
                  ""]
    return lines


_ENV_KEYS = ("device_type", "device_name", "backend", "cpu_count", "torch_threads", "torch",
             "python", "cuda", "nccl", "platform", "hostname", "git_commit", "git_dirty")

_CAPTIONS = {
    "step_time": "Median step time, optimizer step time and the paired ratio to `replicated`, "
                 "each with its 95% interval (error bars); strategies are offset sideways.",
    "distance_to_bound": "Optimizer step time over its lower bound on this machine (1 is the "
                         "bound), median with its 95% interval.",
    "bytes_per_rank": "Bytes each rank sends per step: the optimizer's collectives (solid), "
                      "FSDP2's all-gathers and reduce-scatters (dashed, open markers), and the "
                      "lower bound of any owner-based scheme (dotted).",
    "peak_memory": "Peak live memory per rank (max over ranks, instrumented step).",
    "imbalance": "Newton-Schulz FLOPs and time on each rank at the largest world size: "
                 "unequal bars mean some ranks wait for others.",
    "phases": "Where a step's time goes, per strategy and world size (medians over timed "
              "steps).",
}


def _design(results: Results) -> list[str]:
    a = results.analysis
    s = results.summary
    n = ", ".join(map(str, sorted(set(int(v) for v in s["step_time_s_n"].dropna()))))
    if a.paired:
        how = (f"Each world size ran as one job: every strategy built on the same model and data "
               f"in one process group, their steps interleaved (a round is one step of each "
               f"strategy; the order rotates every repeat), {n} timed steps per point after one "
               f"instrumented step (bytes, memory) and the warm-up. Every timed step is in "
               f"`timings.csv`.")
    else:
        how = (f"Each point ran alone, one after another ({n} timed steps per point): its "
               f"timings are not paired with the other strategies', so the comparisons are "
               f"looser, and drift of the machine between points is not removed.")
    return [how, "",
            f"Timings are medians with the order-statistic {LEVEL:.0%} interval for the median "
            f"(`[low, high]`) over the timed steps; a step's time is its slowest rank's. Ratios "
            f"to `replicated` are medians of per-round ratios. Bytes are what each rank sends to "
            f"other ranks per step (mean over ranks); the lower bound is 2(P-1)/P² · N · b with "
            f"N the total number of orthogonalized matrix elements.", ""]


def write_report(path: str | Path, margin: float | None = None,
                 out: str | Path | None = None) -> Path:
    """Plots and report.md for the study directory `path`, written to `out` (default: `path`);
    returns report.md's path."""
    results = load_results(path, margin)
    out_dir = results.root if out is None else writable_dir(out, "--out")
    plots_dir = out_dir / "plots"
    makers = {"step_time": report_plots.plot_step_time,
              "distance_to_bound": report_plots.plot_distance,
              "bytes_per_rank": report_plots.plot_bytes,
              "peak_memory": report_plots.plot_memory,
              "imbalance": report_plots.plot_imbalance, "phases": report_plots.plot_phases}
    made = {name: makers[name](results, plots_dir / f"{name}.png") for name in PLOTS}

    def figure(name: str) -> list[str]:
        return [_CAPTIONS[name], "", f"![{name}](plots/{made[name].name})", ""]

    s = results.summary
    lines = [f"# Scaling report: {results.root.name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from {len(s)} complete point(s)"
             f" in `{results.runs_dir}`"
             + (f"; {len(results.failures)} job(s) failed (see below)." if results.failures
                else "."), ""]
    lines += _design(results)
    lines += ["## Machine", ""] + machine_lines(results)
    lines += ["## Ranking", ""] + ranking_lines(results)
    lines += ["## Step time", ""] + timing_table(results) + [""]
    lines += ["ratio to replicated: the median of per-round ratios of step time to `replicated`'s "
              "(below 1 is faster). optimizer share of step: median optimizer time / median "
              "step time.", ""] + figure("step_time")
    hsdp = hsdp_lines(results)  # only for studies with <strategy>-spread/-repeat pairs
    lines += ["## HSDP replicas: spread vs repeat", ""] + hsdp + [""] if hsdp else []
    lines += ["## Distance to the bound", ""]
    lines += ["How far each optimizer step is from the fastest this machine could do it: "
              "bound = max(Σ NS FLOPs / P, largest single matrix) / calibrated NS rate + the "
              "owner-based byte bound / measured bandwidth, calibrated at the start of each "
              "job (NS per matrix shape, alone and with every rank busy, since ranks that share "
              "cores slow each other; all-to-all and all-gather at the bound's size; best of "
              "a few). distance = median optimizer time / bound, with its interval.", ""]
    lines += bound_table(results) + [""] + figure("distance_to_bound")
    lines += redo_lines(results)
    lines += ["## Bytes, FSDP2 and memory", ""] + bytes_table(results) + [""]
    lines += ["optimizer bytes on top of FSDP2: the optimizer's bytes per rank as a share of "
              "FSDP2's own all-gathers and reduce-scatters in the same step (a shape-only model "
              "has no FSDP2 traffic: –). NS FLOP imbalance: max over ranks / mean (1.00 is "
              "even). unblocked share: of the orthogonalize time outside Newton-Schulz, the "
              "share not spent waiting on a transfer (packing, copies); not an overlap "
              "measure.", ""] + figure("bytes_per_rank")
    for name in ("peak_memory", "imbalance", "phases"):
        lines += [f"### {name.replace('_', ' ')}", ""] + figure(name)
    lines += timeline_plots.report_section(results.runs_dir, list(s["run"]), plots_dir)
    if results.failures:
        lines += ["## Failed jobs", "", "| job | status | error | log |", "|---|---|---|---|"]
        for f in results.failures:
            error = str(f.get("error", "")).replace("|", "\\|")
            lines.append(f"| {f.get('point')} | {f.get('status')} | {error} | {f.get('log')} |")
        lines.append("")
    env = results.env
    lines += ["## Environment", "", "| key | value |", "|---|---|"]
    for key in _ENV_KEYS:
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    config_hashes = sorted(set(s["config_hash"].astype(str))) if "config_hash" in s else []
    lines += ["", f"Points: {', '.join(f'`{r}`' for r in s['run'])}.",
              f"Each point's resolved config is in `runs/<point>/config.yaml` "
              f"({len(config_hashes)} distinct config hash(es)).", ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines))


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path,
                        help="a study's results directory (e.g. results/latest/default_study) or a "
                             "folder of run directories")
    parser.add_argument("--margin", type=float, default=None,
                        help=f"claim margin: 'A faster than B' needs the ratio's 95%% interval "
                             f"below 1 - margin (default: the study's schedule.claim_margin, "
                             f"else {MARGIN})")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="folder for report.md and plots/ (default: the results directory)")


def main(args: argparse.Namespace) -> int:
    """The command, with the CLI's one-line errors and exit codes (also when called directly)."""
    return run_command("report", lambda a: print(write_report(a.results, a.margin, a.out)) or 0,
                       args)
