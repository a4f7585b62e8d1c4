"""What a study's timings say: medians with 95% intervals, paired comparisons, claims, bounds.

    analysis = analyze("results/latest/default_study")   # after `dist-ortho study`
    analysis.points          # a row per point: intervals of step / optimizer time, ratio to the
                             # baseline, distance to the bound
    analysis.groups          # per (facet, world size): the comparisons, claims and the ordering

Input: a study directory. An interleaved study (`schedule.mode: interleaved`, see
`dist_ortho.studies.interleaved`) has timings.csv (every step of every point, with its repeat and
round) and, per job, groups/<job>/machine.json (the machine's load and calibration); a separate one
only its runs' metrics.csv, from which the timed steps are read the same way
(`profiling.summary.step_table`).

Statistics (`dist_ortho.profiling.stats`): each point's median step time and optimizer time with
the order-statistic 95% interval over its timed steps (every repeat's); strategies of one job are
compared by their paired ratio per round (a round: one step of each strategy, one after the
other), and a claim "A faster than B" is made only when that ratio's interval ends below
1 - margin; otherwise the pair is "not distinguishable at this noise". A group of k strategies
makes m = k(k-1)/2 comparisons at once, so each uses the Bonferroni level 1 - 5%/m (99.5% for
5 strategies; `stats.family_level`): the chance that the group states any claim the noise alone
produced stays below 5% (at 95% per pair, a study of 6 groups x 10 pairs made a few such claims
per run, which a rerun did not repeat). Points that ran separately
(no rounds) are compared by interval arithmetic on their two intervals, which is looser.

Distance to the bound: the median optimizer time (and its interval) over the bound of the step
that the job calibrated on the same machine (`dist_ortho.studies.interleaved.step_bound`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dist_ortho.profiling.stats import (LEVEL, MARGIN, NAN_INTERVAL, Comparison, Interval,
                                        claim_holds, compare, compare_unpaired, family_level,
                                        median_interval, ordering, ratio_interval)
from dist_ortho.profiling.summary import read_metrics, step_table

__all__ = ["TIMINGS_FILE", "BASELINE", "TIMED", "build_timings", "load_timings", "Group",
           "Analysis", "analyze", "claims_of", "machine_of", "failed_claims"]

TIMINGS_FILE = "timings.csv"
BASELINE = "replicated"
TIMED = ("step_s", "optimizer_s", "forward_backward_s")  # the intervals each point gets
COMPARED = "step_s"  # what strategies are ranked by: the whole step, as training pays it


def build_timings(study_dir: str | Path, group_dirs: Mapping[str, Path],
                  points: Mapping[str, dict]) -> pd.DataFrame:
    """Every step of every point of the given interleaved jobs (name -> run dir), with its place
    in the schedule (schedule.csv) and the slowest rank's times (`step_table`)."""
    frames = []
    for job, run_dir in group_dirs.items():
        schedule = pd.read_csv(Path(run_dir) / "schedule.csv")
        for point, rows in schedule.groupby("point", sort=False):
            steps = step_table(read_metrics(Path(study_dir) / "runs" / point))
            merged = rows.drop(columns=["model", "strategy"]).merge(steps, on="step",
                                                                     how="left")
            labels = points[point]
            merged.insert(1, "job", job)
            merged.insert(2, "model", labels["model"])
            merged.insert(3, "option_set", labels["option_set"])
            merged.insert(4, "world_size", int(labels["world_size"]))
            merged.insert(5, "strategy", labels["strategy"])
            frames.append(merged)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _separate_timings(summary: pd.DataFrame, runs_dir: Path) -> pd.DataFrame:
    """Timed steps of points that ran one by one: the measured, uninstrumented steps."""
    frames = []
    for row in summary.itertuples():
        steps = step_table(read_metrics(runs_dir / row.run))
        clean = steps[~steps["warmup"]]
        if (~clean["instrumented"]).any():
            clean = clean[~clean["instrumented"]]
        clean = clean.assign(point=row.run, job=row.run, model=row.model_label,
                             option_set=row.option_set, world_size=int(row.world_size),
                             strategy=row.label, kind="timed", repeat=0,
                             index=range(len(clean)), position=0)
        frames.append(clean)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_timings(root: Path, runs_dir: Path, summary: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """(timed steps, whether they are paired in rounds) of a study directory."""
    path = root / TIMINGS_FILE
    if path.is_file():
        t = pd.read_csv(path)
        return t[t["kind"] == "timed"].copy(), True
    return _separate_timings(summary, runs_dir), False


def machine_of(root: Path, job: str) -> dict:
    path = root / "groups" / job / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Group:
    """One comparison group: the points of one facet (model, option set) at one world size."""

    facet: str
    world_size: int
    paired: bool
    medians: dict  # label -> median step time
    comparisons: list[Comparison]
    level: float = LEVEL  # each comparison's interval level (Bonferroni over the group's pairs)

    @property
    def ordering(self) -> str:
        return ordering(self.medians, self.comparisons)

    @property
    def claims(self) -> list[tuple[str, str]]:
        return [c.claim for c in self.comparisons if c.claim is not None]

    @property
    def ties(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.claim is None]


@dataclass
class Analysis:
    points: pd.DataFrame  # the summary rows plus intervals, ratios and distances
    groups: list[Group]
    paired: bool
    margin: float
    timings: pd.DataFrame
    machines: dict = field(default_factory=dict)  # job -> machine.json

    def group(self, facet: str, world_size: int) -> Group | None:
        return next((g for g in self.groups if g.facet == facet
                     and g.world_size == world_size), None)

    def rounds(self, facet: str, world_size: int) -> dict[str, dict]:
        """label -> {(repeat, index): step seconds} of one group's timed steps."""
        return _rounds(self.timings, facet, world_size)


def _rounds(timings: pd.DataFrame, facet: str, world_size: int, column: str = COMPARED
            ) -> dict[str, dict]:
    sel = timings[(timings["facet"] == facet) & (timings["world_size"] == world_size)]
    return {label: {(int(r.repeat), int(r.index)): float(getattr(r, column))
                    for r in g.itertuples()}
            for label, g in sel.groupby("strategy", sort=False)}


def _cols(prefix: str, iv: Interval) -> dict:
    return {f"{prefix}": iv.median, f"{prefix}_low": iv.low, f"{prefix}_high": iv.high,
            f"{prefix}_n": iv.n, f"{prefix}_coverage": iv.coverage}


def analyze(summary: pd.DataFrame, root: Path, runs_dir: Path,
            margin: float = MARGIN) -> Analysis:
    """Intervals, comparisons and distances for a study's summary (with `label` and `facet`
    columns, as `report.load_results` makes it)."""
    timings, paired = load_timings(root, runs_dir, summary)
    facet_of = dict(zip(summary["run"], summary["facet"]))
    label_of = dict(zip(summary["run"], summary["label"]))
    if not timings.empty:
        timings = timings[timings["point"].isin(list(facet_of))].copy()
        timings["facet"] = timings["point"].map(facet_of)
        timings["strategy"] = timings["point"].map(label_of)
    machines = {}
    if paired and "job" in summary:
        machines = {job: machine_of(root, job) for job in summary["job"].dropna().unique()}
    rows = []
    intervals: dict[str, dict[str, Interval]] = {}
    for row in summary.itertuples():
        steps = timings[timings["point"] == row.run] if not timings.empty else timings
        ivs = {c: median_interval(steps[c]) if c in steps else NAN_INTERVAL for c in TIMED}
        intervals[row.run] = ivs
        out = {"run": row.run}
        for c, iv in ivs.items():
            out.update(_cols(c.removesuffix("_s") + "_time_s", iv))
        rows.append(out)
    extra = pd.DataFrame(rows)
    points = summary.drop(columns=[c for c in extra.columns if c != "run" and c in summary])
    points = points.merge(extra, on="run", how="left")
    groups = []
    ratio_cols: dict[str, Interval] = {}
    for (facet, p), sel in points.groupby(["facet", "world_size"], sort=False):
        labels = list(sel["label"])
        by_label = dict(zip(sel["label"], sel["run"]))
        medians = {lb: intervals[by_label[lb]][COMPARED].median for lb in labels}
        comps = []
        level = family_level(len(labels) * (len(labels) - 1) // 2)
        if paired:
            rounds = _rounds(timings, facet, p)
            for i, a in enumerate(labels):
                for b in labels[i + 1:]:
                    comps.append(compare(a, b, rounds.get(a, {}), rounds.get(b, {}), margin,
                                         level))
            if BASELINE in rounds:
                for lb in labels:
                    ratio_cols[by_label[lb]] = ratio_interval(rounds.get(lb, {}),
                                                              rounds[BASELINE])
        else:
            wide = {lb: median_interval(timings[timings["point"] == by_label[lb]][COMPARED]
                                        if not timings.empty else [], level) for lb in labels}
            for i, a in enumerate(labels):
                for b in labels[i + 1:]:
                    comps.append(compare_unpaired(a, b, wide[a], wide[b], margin, level))
            if BASELINE in by_label:
                base = intervals[by_label[BASELINE]][COMPARED]
                for lb in labels:
                    mine = intervals[by_label[lb]][COMPARED]
                    ratio_cols[by_label[lb]] = (Interval(1.0, 1.0, 1.0, mine.n, 1.0)
                                                if lb == BASELINE else
                                                compare_unpaired(lb, BASELINE, mine, base,
                                                                 margin).ratio)
        groups.append(Group(facet, int(p), paired, medians, comps, level))
    ratio_rows = [{"run": run, **_cols("ratio_to_baseline", iv)} for run, iv in ratio_cols.items()]
    if ratio_rows:
        points = points.merge(pd.DataFrame(ratio_rows), on="run", how="left")
    else:  # no baseline point anywhere (e.g. an HSDP study): the columns exist, empty
        points = points.assign(**_cols("ratio_to_baseline", NAN_INTERVAL))
    _add_distances(points, machines)
    return Analysis(points, groups, paired, margin, timings, machines)


def _add_distances(points: pd.DataFrame, machines: dict) -> None:
    """Columns bound_s, ns_bound_s, comm_bound_s (the job's calibration for the point's model)
    and distance (median optimizer time / bound), distance_low/high (its interval)."""
    cols = {k: [] for k in ("ns_bound_s", "comm_bound_s", "bound_s", "distance", "distance_low",
                            "distance_high")}
    for row in points.itertuples():
        cal = {}
        job = getattr(row, "job", None)
        model = getattr(row, "model_label", None)
        if isinstance(job, str) and job in machines:
            cal = machines[job].get("models", {}).get(model, {}).get("calibration", {})
        bound = cal.get("bound_s")
        for k in ("ns_bound_s", "comm_bound_s", "bound_s"):
            cols[k].append(cal.get(k, math.nan))
        ok = bound is not None and bound > 0
        cols["distance"].append(row.optimizer_time_s / bound if ok else math.nan)
        cols["distance_low"].append(row.optimizer_time_s_low / bound if ok else math.nan)
        cols["distance_high"].append(row.optimizer_time_s_high / bound if ok else math.nan)
    for k, v in cols.items():
        points[k] = v


def claims_of(analysis: Analysis) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(facet, world size) -> the claims (faster, slower) the report states."""
    return {(g.facet, g.world_size): g.claims for g in analysis.groups}


def failed_claims(claims: Mapping[tuple[str, int], list[tuple[str, str]]],
                  other: Analysis) -> list[str]:
    """The claims ((facet, world size) -> [(faster, slower)], e.g. `claims_of` of one run of a
    study) that do not hold in `other`, a rerun of it (`stats.claim_holds`: there the paired
    ratio faster/slower must have its whole interval below 1), one line each; [] if all hold."""
    bad = []
    for (facet, p), pairs in claims.items():
        rounds = other.rounds(facet, p)
        for fast, slow in pairs:
            if not claim_holds((fast, slow), rounds):
                r = ratio_interval(rounds.get(fast, {}), rounds.get(slow, {}))
                bad.append(f"{facet}, P = {p}: {fast} faster than {slow} does not hold in the "
                           f"rerun (ratio {r.format('.2f')})")
    return bad
