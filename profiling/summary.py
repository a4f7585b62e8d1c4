"""From a folder of profiled runs to one table: a row per run, the numbers a strategy study needs.

    df = summarize_runs("results/study")      # each subfolder with a metrics.csv is a run

Warm-up steps are left out everywhere. A subfolder whose metrics.csv is missing, empty, unreadable
or lacks the profiler's columns (a run that failed or has not finished) is skipped with a logged
warning; files are written atomically, so a half-written file is never read.

Columns (per run; "per rank" values are means over ranks, "per step" over measured steps):

  run, strategy, model, world_size, config_hash   identity (from the run_info columns)
  steps, ranks                                     measured steps, ranks present
  timed_steps        steps the times come from: the measured steps without per-op instruments
                     (see ProfilerConfig.instrument_every) when there are any, else all of them
  step_time_s        median over steps of the slowest rank's step time (a synchronous step ends
                     when its slowest rank does)
  straggler_ratio    median over steps of slowest rank / mean rank step time (1.0: no straggler)
  optimizer_time_s   as step_time_s, for phase "optimizer"
  forward_backward_time_s   as step_time_s, for phase "forward_backward"
  opt_send_bytes_per_rank, opt_recv_bytes_per_rank     collectives issued by the optimizer: phases
                     under "optimizer", or containing one of the optimizer's own phase names
  plan_send_bytes_per_rank, plan_recv_bytes_per_rank   the strategy's prediction of the same
  fsdp_send_bytes_per_rank, fsdp_recv_bytes_per_rank   FSDP2's all-gathers and reduce-scatters:
                     phases under "forward_backward"
  other_send_bytes_per_rank  collectives anywhere else (e.g. gradient clipping)
  peak_mem_bytes     highest step peak over ranks and steps
  opt_peak_mem_bytes, opt_peak_increase_bytes   the same during phase "optimizer", and its rise
                     above the live bytes at the optimizer's start (max over ranks)
  plan_transient_bytes  the strategy's predicted transient bytes (max over ranks)
  opt_state_bytes    persistent optimizer state (max over ranks)
  ns_flops_per_step  NS FLOPs summed over ranks, per step
  ns_flops_imbalance max rank / mean rank NS FLOPs (1.0 is perfect balance); plan_ns_flops_imbalance
                     the plan's
  overlap_redos      measured steps on which `overlapped` redid its backward work after backward
  comm_wait_s, ns_s  median over steps, mean over ranks, of time in the strategies' comm_wait and
                     ns phases
  unblocked_share    1 - comm_wait / (orthogonalize - ns), per rank and step, median over steps,
                     mean over ranks, clipped to [0, 1]: of the orthogonalize phase's time outside
                     Newton-Schulz, the share in which the rank was *not* blocked waiting for a
                     transfer (packing, copies, unpacking, issuing). It is NOT an overlap measure:
                     a fully synchronous strategy (replicated) shows its packing share here, 0.1 or
                     more. (It was called overlap_fraction; true overlap needs each transfer's
                     in-flight time, which the phase timer does not see.)

`step_table(df)` gives every measured step of one run instead of medians: per step, the slowest
rank's step / optimizer / forward_backward time and the slowest rank's Newton-Schulz and
comm-wait time, with the step's warm-up and instrumented flags.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dist_ortho.profiling.profiler import ROW_COLUMNS, STEP_PHASE

__all__ = ["summarize_runs", "read_metrics", "summarize_metrics", "step_table",
           "OPTIMIZER_PHASE_NAMES", "phase_owner"]

log = logging.getLogger("profiling")

METRICS_FILE = "metrics.csv"
# the phases NorMuon/Muon mark themselves (see dist_ortho.optim.optimizer and strategies.base)
OPTIMIZER_PHASE_NAMES = frozenset({"optimizer", "nonfinite_check", "momentum", "orthogonalize",
                                   "normalize", "apply", "comm_wait", "ns"})
_IDENTITY = ("strategy", "model", "world_size", "config_hash")


def phase_owner(phase: str) -> str:
    """"optimizer", "fsdp" (forward_backward) or "other" for a phase path."""
    parts = str(phase).split("/")
    if "overlap" in parts:  # the optimizer's own work inside backward (strategy `overlapped`)
        return "optimizer"
    if parts[0] == "forward_backward":
        return "fsdp"
    if any(p in OPTIMIZER_PHASE_NAMES for p in parts):
        return "optimizer"
    return "other"


def read_metrics(run_dir) -> pd.DataFrame:
    """One run's metrics.csv as a DataFrame; ValueError when it is not a usable profiler table."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"no {METRICS_FILE}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable {METRICS_FILE}: {exc}") from None
    missing = [c for c in ROW_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{METRICS_FILE} lacks columns {missing}")
    if df.empty:
        raise ValueError(f"{METRICS_FILE} has no rows")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["warmup"] = df["warmup"].astype(str).str.lower().isin(("true", "1"))
    return df


def _per_step_rank(df: pd.DataFrame, mask) -> pd.DataFrame:
    """value summed per (step, rank) over the selected rows, as a step x rank table."""
    sel = df.loc[mask]
    if sel.empty:
        return pd.DataFrame()
    return sel.groupby(["step", "rank"])["value"].sum().unstack("rank")


def _slowest_median(table: pd.DataFrame) -> float:
    return float(table.max(axis=1).median()) if not table.empty else float("nan")


def _per_rank_mean(table: pd.DataFrame) -> float:
    """Mean over steps of the mean over ranks (missing entries count as 0: nothing happened)."""
    return float(table.fillna(0).mean(axis=1).mean()) if not table.empty else 0.0


def summarize_metrics(df: pd.DataFrame, run: str = "") -> dict:
    """The summary row of one run's metrics (all ranks)."""
    info = {"run": run}
    for col in _IDENTITY + tuple(c for c in df.columns if c not in ROW_COLUMNS
                                 and c not in _IDENTITY and c != "run"):
        if col in df.columns:
            values = df[col].dropna().unique()
            info[col] = values[0] if len(values) else None
    measured = df[~df["warmup"]]
    if measured.empty:
        raise ValueError("only warm-up steps were recorded")
    m, phase = measured["metric"], measured["phase"]
    owners = phase.map(phase_owner)
    ranks = int(measured["rank"].nunique())
    if info.get("world_size") is None or pd.isna(info.get("world_size")):
        info["world_size"] = ranks
    out = dict(info, steps=int(measured["step"].nunique()), ranks=ranks)

    # Time from the clean steps when the run has some: per-op instruments inflate the others.
    flags = measured.loc[(phase == STEP_PHASE) & (m == "instrumented")]
    dirty = set(flags.loc[flags["value"] > 0, "step"])
    clean_steps = set(measured["step"]) - dirty
    timed = measured[measured["step"].isin(clean_steps)] if clean_steps else measured
    out["timed_steps"] = int(timed["step"].nunique())
    tm, tphase = timed["metric"], timed["phase"]
    step_time = _per_step_rank(timed, (tphase == STEP_PHASE) & (tm == "time_s"))
    out["step_time_s"] = _slowest_median(step_time)
    out["straggler_ratio"] = (float((step_time.max(axis=1) / step_time.mean(axis=1)).median())
                              if not step_time.empty else float("nan"))
    for name in ("optimizer", "forward_backward"):
        out[f"{name}_time_s"] = _slowest_median(
            _per_step_rank(timed, (tphase == name) & (tm == "time_s")))

    for owner, prefix in (("optimizer", "opt"), ("fsdp", "fsdp"), ("other", "other")):
        for direction in ("send", "recv"):
            table = _per_step_rank(measured, (owners == owner)
                                   & (m == f"comm_{direction}_bytes"))
            out[f"{prefix}_{direction}_bytes_per_rank"] = _per_rank_mean(table)
    for direction in ("send", "recv"):
        table = _per_step_rank(measured, (phase == STEP_PHASE) & (m == f"plan_{direction}_bytes"))
        out[f"plan_{direction}_bytes_per_rank"] = (_per_rank_mean(table) if not table.empty
                                                   else float("nan"))

    def max_of(ph, metric):
        sel = measured.loc[(phase == ph) & (m == metric), "value"]
        return float(sel.max()) if not sel.empty else float("nan")

    out["peak_mem_bytes"] = max_of(STEP_PHASE, "mem_peak_bytes")
    out["opt_peak_mem_bytes"] = max_of("optimizer", "mem_peak_bytes")
    out["opt_peak_increase_bytes"] = max_of("optimizer", "mem_peak_increase_bytes")
    out["plan_transient_bytes"] = max_of(STEP_PHASE, "plan_transient_bytes")
    out["opt_state_bytes"] = max_of(STEP_PHASE, "opt_state_bytes")

    flops = _per_step_rank(measured, m == "ns_flops")
    if flops.empty:
        out["ns_flops_per_step"], out["ns_flops_imbalance"] = 0.0, float("nan")
    else:
        per_rank = flops.fillna(0).mean(axis=0)
        per_rank = per_rank.reindex(sorted(measured["rank"].unique()), fill_value=0.0)
        out["ns_flops_per_step"] = float(per_rank.sum())
        mean = per_rank.mean()
        out["ns_flops_imbalance"] = float(per_rank.max() / mean) if mean > 0 else float("nan")
    out["plan_ns_flops_imbalance"] = max_of(STEP_PHASE, "plan_ns_flops_imbalance")
    redos = _per_step_rank(measured, (phase == STEP_PHASE) & (m == "overlap_redos"))
    out["overlap_redos"] = float(redos.max(axis=1).sum()) if not redos.empty else 0.0

    times = timed[(tm == "time_s") & (tphase.map(phase_owner) == "optimizer")]
    last = times["phase"].str.rsplit("/", n=1).str[-1]

    def phase_table(name):
        return _per_step_rank(times, last == name)

    wait, ns, orth = phase_table("comm_wait"), phase_table("ns"), phase_table("orthogonalize")
    out["comm_wait_s"] = float(wait.mean(axis=1).median()) if not wait.empty else float("nan")
    out["ns_s"] = float(ns.mean(axis=1).median()) if not ns.empty else float("nan")
    # the share is about the orthogonalize phase: leave out what `overlapped` ran in backward
    in_orth = times["phase"].str.contains("orthogonalize/")
    wait = _per_step_rank(times, (last == "comm_wait") & in_orth)
    ns = _per_step_rank(times, (last == "ns") & in_orth)
    if orth.empty:
        out["unblocked_share"] = float("nan")
    else:
        w = wait.reindex_like(orth).fillna(0.0) if not wait.empty else orth * 0.0
        n = ns.reindex_like(orth).fillna(0.0) if not ns.empty else orth * 0.0
        outside_ns = orth - n
        frac = (1.0 - w / outside_ns.where(outside_ns > 0)).clip(0.0, 1.0)
        out["unblocked_share"] = float(frac.median(axis=0).mean()) if frac.notna().any().any() \
            else float("nan")
    return out


def step_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per step of one run's metrics (all ranks): step, warmup, instrumented, and the
    slowest rank's seconds in the step (`step_s`), in phases "optimizer" (`optimizer_s`) and
    "forward_backward" (`forward_backward_s`), and in the strategies' `ns` and `comm_wait` phases
    (`ns_s`, `comm_wait_s`: the rank with the most, summed over the optimizer's phases)."""
    t = df[df["metric"] == "time_s"]
    phase = t["phase"].astype(str)
    last = phase.str.rsplit("/", n=1).str[-1]
    opt = phase.map(phase_owner) == "optimizer"
    out = pd.DataFrame(index=pd.Index(sorted(df["step"].unique()), name="step"))
    selections = {"step_s": phase == STEP_PHASE, "optimizer_s": phase == "optimizer",
                  "forward_backward_s": phase == "forward_backward",
                  "ns_s": opt & (last == "ns"), "comm_wait_s": opt & (last == "comm_wait")}
    for name, mask in selections.items():
        table = _per_step_rank(t, mask)
        out[name] = table.max(axis=1) if not table.empty else float("nan")
    warm = df.groupby("step")["warmup"].first()
    flags = df[(df["phase"] == STEP_PHASE) & (df["metric"] == "instrumented")]
    instrumented = flags.groupby("step")["value"].max() > 0
    out["warmup"] = warm.reindex(out.index).fillna(False).astype(bool)
    out["instrumented"] = instrumented.reindex(out.index).fillna(False).astype(bool)
    return out.reset_index()


def summarize_runs(results_dir) -> pd.DataFrame:
    """One row per run found in results_dir's subfolders (see the module docstring)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"results_dir {str(root)!r} is not a directory")
    rows = []
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / METRICS_FILE).is_file():
        candidates.insert(0, root)
    for run_dir in candidates:
        try:
            rows.append(summarize_metrics(read_metrics(run_dir), run_dir.name))
        except ValueError as exc:
            log.warning("skipping run %s: %s", run_dir, exc)
    if not rows:
        return pd.DataFrame(columns=["run", *_IDENTITY])
    df = pd.DataFrame(rows)
    keys = [c for c in ("model", "world_size", "strategy", "run") if c in df.columns]
    return df.sort_values(keys, kind="stable", na_position="last").reset_index(drop=True)
