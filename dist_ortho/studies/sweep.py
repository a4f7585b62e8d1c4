"""Scaling sweeps: a grid of runs, one torchrun per point, resumable, aggregated into summary.csv.

    dist-ortho sweep launch/configs/study.yaml [--set train.steps=4]... [-o DIR] [--dry-run]
    dist-ortho study                       # the default study, fresh: sweep, then the report
    dist-ortho study -o results/examples   # regenerate the committed example

A study file (`StudyFile`, read by the project's typed loader, `dist_ortho.core.schema`) names a
base run config and the grid axes:

    name: default_study           # results go to <output_dir>/<name>/
    base: base.yaml               # run config, relative to this file
    output_dir: results/latest    # (default) a folder git ignores
    point_timeout_s: 300          # a point running longer is stopped and recorded as a timeout
    set: {train.steps: 8}         # overrides applied to the base for every point
    grid:
      strategies: all             # or [replicated, {name: bucketed_async, label: b1m,
                                  #                  options: {bucket_bytes: 1048576}},
                                  #  {name: balanced, label: balanced-repeat,
                                  #   set: {optimizer.replicas: repeat}}]
      world_sizes: [1, 2, 4]
      models: [transformer-bench]
      option_sets:                # optional: named override sets, crossed with everything else
        - {name: fp32, set: {optimizer.ns_dtype: float32}}

    schedule:                     # how points are timed (default: separate)
      mode: interleaved           # one job per world size (and option set): every strategy of
                                  # every model in one process group, side by side (below)
      repeats: 3                  # timed steps per point: repeats x steps, interleaved
      steps: 5
      warmup_steps: 1             # after one instrumented (bytes, memory) step, not timed
      calibration_repeats: 3      # NS and bandwidth calibration for the distance to the bound
      claim_margin: 0.05          # "A faster than B" needs the paired ratio's 95% interval
                                  # below 1 - margin (`dist_ortho.profiling.stats`)

Models are names or {preset, label, set} entries (`set`: overrides for that model only, e.g.
its depth or batch size).

Two schedules. `interleaved` (the shipped studies): each world size is one job (`python -m
dist_ortho.studies.interleaved` under torchrun) that builds every strategy on the same
model and data and interleaves their steps, so the timings that are compared are taken side by
side; it records every timed step (<study>/timings.csv) and the machine's load and calibration
(<study>/groups/<job>/machine.json). `separate`: one torchrun per point, one after another (what
checkpoints, per-point timeouts and per-point testing aids need); its timings are unpaired, so
the report only compares them by non-overlapping intervals and says so.

Before anything is launched, every point's config is built and checked, and so is everything
`dist_ortho.studies.preflight` can know at the point's world size (the strategy's plan for the
model's matrices, the testing aids), and the output folder is created: a mistake is one line
naming the key and no launch. Each point is then a `dist_ortho.studies.jobs.Job` (`python -m
dist_ortho run <study>/configs/<point>.yaml` under torchrun at P > 1), run by `jobs.run_jobs`:
output in <study>/runs/<point>/, stdout+stderr in <study>/logs/<point>.log, resume (`sweep` skips
points complete with the same config; `--force` reruns them; `study` always starts fresh unless
`--resume`), a timeout, failures recorded in failures.csv (one line each: the first failing rank's
error) while the sweep goes on, SIGINT/SIGTERM stopping the running point's whole process tree.
(Interleaved: the same per job, i.e. per world size.)
Aggregation: `profiling.summarize_runs` over the runs of this grid -> <study>/summary.csv, and
every timed step -> <study>/timings.csv (`dist_ortho.reporting.comparison.build_timings`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from dist_ortho import strategies
from dist_ortho.core.commands import add_grammar, run_command
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.schema import (at_least, build, join, plain_name, positive, read_yaml, to_dict,
                                    unit)
from dist_ortho.profiling import summarize_runs
from dist_ortho.reporting import comparison, report
from dist_ortho.studies.config import (Config, ConfigError, apply_overrides, config_from_dict,
                                       parse_overrides, resolve, run_device_type)
from dist_ortho.studies.faults import from_sources
from dist_ortho.studies.jobs import (REPO_ROOT, Job, JobResult, Progress, clock, is_complete,
                                     run_jobs, write_failures)
from dist_ortho.studies.preflight import check_launch, oversubscription_warning, writable_dir

__all__ = ["StrategyEntry", "ModelEntry", "OptionSet", "Grid", "Schedule", "StudyFile", "Study",
           "load_study", "expand",
           "run_sweep", "aggregate", "add_arguments", "main", "study_add_arguments", "study_main",
           "REPO_ROOT", "DEFAULT_STUDY", "STUDY_OUTPUTS"]

DEFAULT_STUDY = REPO_ROOT / "launch" / "configs" / "default_study.yaml"
# what a study writes under <output_dir>/<name>/ (and what `study` clears to start fresh)
STUDY_OUTPUTS = ("runs", "groups", "configs", "logs", "plots", "summary.csv", "timings.csv",
                 "study.json", "failures.csv", "report.md")


# --- the study file -----------------------------------------------------------------------------

@dataclass
class StrategyEntry:
    name: str
    label: str | None = None  # default: the name
    options: dict = field(default_factory=dict)
    # overrides for this entry's points only, e.g. {optimizer.replicas: repeat}: two entries of
    # one strategy then run side by side in the same interleaved job
    set: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        if self.name not in strategies.available():
            raise ConfigError(f"{key}.name", f"unknown strategy {self.name!r}; available: "
                                             f"{', '.join(strategies.available())}")
        self.label = self.label or self.name
        plain_name(f"{key}.label", self.label)


@dataclass
class ModelEntry:
    preset: str
    label: str | None = None  # default: the preset
    set: dict = field(default_factory=dict)  # overrides for this model's points only

    def check(self, key: str) -> None:
        self.label = self.label or self.preset
        plain_name(f"{key}.label", self.label)


@dataclass
class OptionSet:
    name: str
    set: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        plain_name(f"{key}.name", self.name)


@dataclass
class Grid:
    strategies: Literal["all"] | list[str | StrategyEntry]
    world_sizes: list[int]
    models: list[str | ModelEntry] | None = None  # default: the base config's model
    option_sets: list[OptionSet] = field(default_factory=lambda: [OptionSet("default")])

    def check(self, key: str) -> None:
        raw = strategies.available_exact() if self.strategies == "all" else self.strategies
        entries = []
        for i, item in enumerate(raw):
            entry = item if isinstance(item, StrategyEntry) else StrategyEntry(item)
            entry.check(f"{key}.strategies[{i}]")
            entries.append(entry)
        self.strategies = entries
        if self.models is not None:
            models = []
            for i, item in enumerate(self.models):
                entry = item if isinstance(item, ModelEntry) else ModelEntry(item)
                entry.check(f"{key}.models[{i}]")
                models.append(entry)
            self.models = models
        for name, values in (("strategies", [e.label for e in entries]),
                             ("world_sizes", self.world_sizes),
                             ("models", None if self.models is None
                              else [m.label for m in self.models]),
                             ("option_sets", [o.name for o in self.option_sets])):
            if values is not None:
                _nonempty_unique(f"{key}.{name}", values)
        for i, p in enumerate(self.world_sizes):
            if p < 1:
                raise ConfigError(f"{key}.world_sizes[{i}]", f"must be an integer >= 1, got {p!r}")


@dataclass
class Schedule:
    """How the points are timed (see the module docstring)."""

    mode: Literal["interleaved", "separate"] = "separate"
    repeats: int = 3
    steps: int = 5
    warmup_steps: int = 1
    calibration_repeats: int = 3
    claim_margin: float = 0.05

    def check(self, key: str) -> None:
        for name in ("repeats", "steps", "calibration_repeats"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        unit(f"{key}.claim_margin", self.claim_margin)

    def settings(self) -> dict:
        return {"repeats": self.repeats, "steps": self.steps, "warmup_steps": self.warmup_steps,
                "calibration_repeats": self.calibration_repeats}


@dataclass
class StudyFile:
    name: str
    base: str  # run config, relative to the study file
    grid: Grid
    output_dir: str = "results/latest"
    point_timeout_s: float = 600.0
    set: dict = field(default_factory=dict)
    schedule: Schedule = field(default_factory=Schedule)

    def check(self, key: str) -> None:
        plain_name(join(key, "name"), self.name)
        positive("point_timeout_s", self.point_timeout_s)


def _nonempty_unique(key: str, values: list) -> None:
    if not values:
        raise ConfigError(key, "must be a non-empty list")
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(key, f"lists {v!r} twice")
        seen.add(v)


@dataclass
class Study:
    """A loaded study: its file, the base config path, the overrides for every point."""

    file: StudyFile
    path: Path  # the study file
    base: Path  # the base run config
    output_dir: Path
    overrides: dict  # the file's `set`, then --set
    output_key: str = "output_dir"  # the parameter that named output_dir (for error messages)

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def point_timeout_s(self) -> float:
        return self.file.point_timeout_s

    @property
    def grid(self) -> Grid:
        return self.file.grid


def load_study(path: str | Path, overrides: Sequence[str] | Mapping = (),
               output_dir: str | Path | None = None) -> Study:
    """Read and check a study file; `overrides` (k=v) apply to every point after the file's own."""
    path = Path(path)
    file = build(StudyFile, read_yaml(path, "study"))
    base = path.parent / file.base
    if not base.is_file():
        raise ConfigError("base", f"base config {str(base)!r} does not exist (paths are relative "
                                  f"to the study file)")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    common = {**file.set, **overrides}
    apply_overrides({}, common)  # every key checked against the run config's schema, now
    for i, o in enumerate(file.grid.option_sets):
        try:
            apply_overrides({}, o.set)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} (in grid.option_sets[{i}].set)") from None
    for i, m in enumerate(file.grid.models or []):
        try:
            apply_overrides({}, {**m.set, "model.preset": m.preset})
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.message} (in grid.models[{i}].set)") from None
    study = Study(file, path, base, Path(output_dir if output_dir is not None
                                         else file.output_dir), dict(common),
                  "--out" if output_dir is not None else "output_dir")
    if file.grid.models is None:  # the base's model (after overrides) is the only one
        file.grid.models = [ModelEntry(_base_config(study).model.preset)]
        file.grid.models[0].check("grid.models[0]")
    return study


def _base_config(study: Study) -> Config:
    return config_from_dict(apply_overrides(read_yaml(study.base), study.overrides))


# --- points -------------------------------------------------------------------------------------

def _point_name(model: ModelEntry, strategy: StrategyEntry, p: int, opt: OptionSet,
                grid: Grid) -> str:
    name = f"{model.label}--{strategy.label}--p{p}"
    if len(grid.option_sets) > 1 or opt.name != "default":
        name += f"--{opt.name}"
    return name


def _point_config(study: Study, base: dict, model: ModelEntry, strategy: StrategyEntry,
                  opt: OptionSet, p: int, name: str, device_type: str | None, faults) -> Config:
    overrides = {**study.overrides, **opt.set, **model.set, **strategy.set,
                 "model.preset": model.preset,
                 "strategy.name": strategy.name, "strategy.options": strategy.options,
                 "output.dir": str(study.dir / "runs"), "output.name": name}
    try:
        raw = config_from_dict(apply_overrides(base, overrides))
        point_device = device_type or run_device_type(raw)  # gloo keeps CPU tensors on a GPU host
        config = resolve(raw, point_device)
        if not config.profiling.enabled:
            raise ConfigError("profiling.enabled", "is false, but a sweep reads each point's "
                                                   "metrics.csv; set it to true")
        if study.file.schedule.mode == "interleaved" and config.checkpoint.dir is not None:
            raise ConfigError("checkpoint.dir", "is set, but an interleaved study runs every "
                                                "strategy in one process; set schedule.mode: "
                                                "separate to save checkpoints")
        check_launch(config, p, faults, point_device)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (in grid point {name})") from None
    return config


def expand(study: Study, device_type: str | None = None, faults=None) -> list[Job]:
    """Every job of the study with checked, resolved configs, each point checked at its world
    size by `preflight.check_launch`; a bad point raises ConfigError naming it.
    separate: a job per point, in the order model, option set, world size, strategy (so partial
    results are whole comparisons). interleaved: a job per (option set, world size) holding every
    model's points (`dist_ortho.studies.interleaved`)."""
    faults = from_sources() if faults is None else faults
    base = read_yaml(study.base)
    grid, schedule = study.grid, study.file.schedule
    groups: dict[tuple[str, int], list] = {}
    ordered = []  # model, option set, world size, strategy
    for model in grid.models:
        for opt in grid.option_sets:
            for p in grid.world_sizes:
                for s in grid.strategies:
                    name = _point_name(model, s, p, opt, grid)
                    config = _point_config(study, base, model, s, opt, p, name, device_type,
                                           faults)
                    labels = {"strategy": s.label, "world_size": p, "model": model.label,
                              "option_set": opt.name}
                    groups.setdefault((opt.name, p), []).append((name, config, labels))
                    ordered.append((name, config, labels))
    if schedule.mode == "separate":
        return [Job(name, config, labels["world_size"],
                    ["-m", "dist_ortho", "run", "{config}"], outputs=("metrics.csv",),
                    labels=labels) for name, config, labels in ordered]
    jobs = []
    for opt in grid.option_sets:
        for p in grid.world_sizes:
            points = groups[(opt.name, p)]
            name = f"p{p}" + ("" if len(grid.option_sets) == 1 and opt.name == "default"
                              else f"--{opt.name}")
            config = copy.deepcopy(points[0][1])
            config.output.dir, config.output.name = str(study.dir / "groups"), name
            settings = {"schedule": schedule.settings(),
                        "points": [{"name": n, "model_label": lb["model"],
                                    "strategy_label": lb["strategy"], "config": to_dict(c)}
                                   for n, c, lb in points]}
            jobs.append(Job(name, config, p, ["-m", "dist_ortho.studies.interleaved", "--config", "{config}"],
                            settings=settings, outputs=("schedule.csv", "machine.json"),
                            labels={"world_size": p, "option_set": opt.name},
                            note=_group_note))
    return jobs


def _group_note(job: Job) -> str:
    return f"{len(job.settings['points'])} points interleaved"


def points_of(jobs: Sequence[Job]) -> dict[str, dict]:
    """point name -> its labels (strategy, world_size, model, option_set) and its job's name."""
    out = {}
    for j in jobs:
        if "points" in j.settings:
            for pt in j.settings["points"]:
                out[pt["name"]] = {"strategy": pt["strategy_label"], "world_size": j.world_size,
                                   "model": pt["model_label"],
                                   "option_set": j.labels["option_set"], "job": j.name}
        else:
            out[j.name] = {**j.labels, "job": j.name}
    return out


# --- running ------------------------------------------------------------------------------------

def aggregate(study: Study, jobs: Sequence[Job]) -> Path | None:
    """summary.csv from the complete runs of this grid (stale run directories are left out), with
    the grid's own labels (point, strategy label, option set, model label) added; for an
    interleaved study also timings.csv, every timed step of every point."""
    complete_jobs = [j for j in jobs if is_complete(j)]
    points = points_of(complete_jobs)
    path = study.dir / "summary.csv"
    timings = study.dir / "timings.csv"
    if not points:
        path.unlink(missing_ok=True)
        timings.unlink(missing_ok=True)
        return None
    table = summarize_runs(study.dir / "runs")
    if "run" not in table.columns:
        raise RuntimeError(f"summarize_runs gave no 'run' column: {list(table.columns)}")
    table = table[table["run"].isin(list(points))].copy()
    table.insert(0, "point", table["run"])
    table.insert(1, "strategy_label", [points[r]["strategy"] for r in table["run"]])
    table.insert(2, "option_set", [points[r]["option_set"] for r in table["run"]])
    table.insert(3, "model_label", [points[r]["model"] for r in table["run"]])
    table.insert(4, "job", [points[r]["job"] for r in table["run"]])
    order = {name: i for i, name in enumerate(points_of(jobs))}
    table = table.sort_values("point", key=lambda s: s.map(order)).reset_index(drop=True)
    atomic_write_text(path, table.to_csv(index=False))
    atomic_write_text(study.dir / "study.json", json.dumps(
        {"name": study.name, "schedule": to_dict(study.file.schedule),
         "jobs": [j.name for j in jobs]}, indent=2) + "\n")
    groups = [j for j in complete_jobs if "points" in j.settings]
    if groups:
        frame = comparison.build_timings(study.dir, {j.name: j.run_dir for j in groups}, points)
        atomic_write_text(timings, frame.to_csv(index=False))
    else:
        timings.unlink(missing_ok=True)
    return path


@dataclass
class SweepResult:
    study: Study
    results: list[JobResult]
    summary: Path | None
    failures: Path

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def clear_outputs(study: Study) -> None:
    """Remove what an earlier invocation of this study wrote (STUDY_OUTPUTS under its folder)."""
    for name in STUDY_OUTPUTS:
        target = study.dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _unrunnable(job: Job) -> str | None:
    if run_device_type(job.config) == "cuda" and job.world_size > torch.cuda.device_count():
        return f"needs {job.world_size} GPUs, this node has {torch.cuda.device_count()}"
    return None


def run_sweep(study: Study, force: bool = False, dry_run: bool = False,
              timeout_s: float | None = None, stream=None, fresh: bool = False) -> SweepResult:
    """Run every incomplete point of `study` (all with `force`; with `fresh`, first remove what
    an earlier invocation wrote), then aggregate. Raises ConfigError before launching anything
    when a point or the output folder is wrong, and jobs.Interrupted on SIGINT/SIGTERM."""
    stream = stream or sys.stderr
    jobs = expand(study)
    warning = oversubscription_warning(max(j.world_size for j in jobs),
                                       run_device_type(jobs[0].config))
    if warning:
        print(f"dist-ortho sweep: {warning}", file=stream, flush=True)
    if dry_run:
        for j in jobs:
            mark = "done" if not force and is_complete(j) else "run "
            print(f"{mark} {j.name}  (P={j.world_size}, hash {j.config_hash})", file=stream)
        return SweepResult(study, [], None, study.dir / "failures.csv")
    writable_dir(study.dir, study.output_key)
    if fresh:
        clear_outputs(study)
    progress = Progress(study.name, len(jobs), stream)
    unrunnable = {j.name: JobResult(j, "unrunnable", error=_unrunnable(j))
                  for j in jobs if _unrunnable(j)}
    ran = run_jobs([j for j in jobs if j.name not in unrunnable], study.dir,
                   force=force or fresh, timeout_s=timeout_s or study.point_timeout_s,
                   progress=progress)
    by_name = {r.job.name: r for r in ran} | unrunnable
    results = [by_name[j.name] for j in jobs]
    failures = write_failures(study.dir / "failures.csv", results)
    summary = aggregate(study, jobs)
    n_ok = sum(r.status == "ok" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    n_bad = len(results) - n_ok - n_skip
    progress.print(f"[{study.name}] done in {clock(time.perf_counter() - progress.start)}: "
                   f"{n_ok} ran, {n_skip} already complete, {n_bad} failed"
                   + (f" (see {failures})" if n_bad else "")
                   + (f"; summary: {summary}" if summary else ""))
    return SweepResult(study, results, summary, failures)


# --- command line -------------------------------------------------------------------------------

def _common_arguments(parser: argparse.ArgumentParser, config_default: Path | None) -> None:
    add_grammar(parser, config="study YAML (see launch/configs/*study*.yaml)" + (
        f"; default {config_default.relative_to(REPO_ROOT)}" if config_default else ""),
        overrides="override a run-config key for every point, e.g. --set train.steps=4",
        out="results root (default: the study's output_dir, else results/latest)",
        config_default=config_default, config_required=config_default is None)
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="per-point timeout (default: the study's point_timeout_s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, None)
    parser.add_argument("--force", action="store_true",
                        help="rerun every point, even those already complete")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points and whether each would run; launch nothing")


def main(args: argparse.Namespace) -> int:
    """The command, with the CLI's one-line errors and exit codes (also when called directly)."""
    return run_command("sweep", _sweep_main, args)


def _sweep_main(args: argparse.Namespace) -> int:
    study = load_study(args.config, args.overrides, args.out)
    result = run_sweep(study, force=args.force, dry_run=args.dry_run, timeout_s=args.timeout)
    if args.dry_run:
        return 0
    return 0 if all(r.status in ("ok", "skipped") for r in result.results) else 1


def study_add_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser, DEFAULT_STUDY)
    parser.add_argument("--resume", action="store_true",
                        help="keep the points an earlier invocation completed with the same "
                             "config (default: start fresh, removing the study's old results)")


def study_main(args: argparse.Namespace) -> int:
    """The command, with the CLI's one-line errors and exit codes (also when called directly)."""
    return run_command("study", _study_main, args)


def _study_main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    study = load_study(args.config, args.overrides, args.out)
    result = run_sweep(study, timeout_s=args.timeout, fresh=not args.resume)
    if result.summary is None:
        print(f"dist-ortho study: error: no point of {study.name} completed; see "
              f"{result.failures}", file=sys.stderr)
        return 1
    path = report.write_report(study.dir)
    print(f"study {study.name} finished in {time.perf_counter() - start:.0f} s "
          f"({result.count('failed') + result.count('timeout')} failed point(s))")
    print(f"report: {path}")
    return 0 if result.count("ok") + result.count("skipped") == len(result.results) else 1
