"""Scaling sweeps: a grid of runs, one torchrun per point, resumable, aggregated into summary.csv.

    dist-ortho sweep launch/configs/default_study.yaml [--set train.steps=4] [--force] [--dry-run]
    dist-ortho study                       # the default study: sweep, then `dist-ortho report`

A study file names a base run config and the grid axes:

    name: default_study           # results go to <output_dir>/<name>/
    base: base.yaml               # run config, relative to this file
    output_dir: results
    point_timeout_s: 300          # a point running longer is killed and recorded as failed
    set: {train.steps: 8}         # overrides applied to the base for every point
    grid:
      strategies: all             # or [replicated, {name: bucketed_async, label: b1m,
                                  #                  options: {bucket_bytes: 1048576}}]
      world_sizes: [1, 2, 4]
      models: [transformer-bench]
      option_sets:                # optional: named override sets, crossed with everything else
        - {name: fp32, set: {optimizer.ns_dtype: float32}}

Every point's config is built and checked before anything is launched, so a typo fails at once.
Each point then runs as `python -m torch.distributed.run --standalone --nproc_per_node=P -m
dist_ortho.run --config <study>/configs/<point>.yaml` (standalone rendezvous picks a free port),
with its output in <study>/runs/<point>/ and its stdout+stderr in <study>/logs/<point>.log.

- Resume: a point whose run directory holds a DONE marker with the same config hash is skipped,
  so re-running a sweep launches only what is missing, failed or changed (--force reruns all).
- Failures: a point that exits non-zero or exceeds the timeout is recorded in failures.csv (with
  its log path and last error line) and the sweep goes on.
- Progress: one line per point on stderr, with elapsed time and an ETA from the points run so far.
- Aggregation: `profiling.summarize_runs` over the runs of this grid -> <study>/summary.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dist_ortho.config import (Config, ConfigError, apply_overrides, config_from_dict,
                               config_hash, default_device_type, dump_config, parse_overrides,
                               resolve, yaml_load)

__all__ = ["StrategyEntry", "OptionSet", "Study", "Point", "PointResult", "load_study", "expand",
           "run_sweep", "aggregate", "add_arguments", "main", "study_add_arguments", "study_main",
           "REPO_ROOT", "DEFAULT_STUDY"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO_ROOT / "launch" / "configs" / "default_study.yaml"
FAILURE_FIELDS = ["point", "strategy", "world_size", "model", "option_set", "status", "returncode",
                  "seconds", "log", "error"]
_NAME = re.compile(r"[A-Za-z0-9._+=-]+")


# --- the study file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StrategyEntry:
    name: str
    label: str
    options: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class OptionSet:
    name: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Study:
    name: str
    path: Path  # the study file
    base: Path  # the base run config
    output_dir: Path
    point_timeout_s: float
    overrides: dict  # applied to the base for every point
    strategies: list[StrategyEntry]
    world_sizes: list[int]
    models: list[str]
    option_sets: list[OptionSet]

    @property
    def dir(self) -> Path:
        return self.output_dir / self.name


def _check_keys(key: str, data: Mapping, allowed: Sequence[str], required: Sequence[str] = ()):
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"must be a mapping, got {data!r}")
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}" if key else str(k),
                              f"unknown key (known: {', '.join(allowed)})")
    for k in required:
        if k not in data:
            raise ConfigError(f"{key}.{k}" if key else str(k), "is required")


def _label(key: str, value) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(key, f"must be a plain name (letters, digits, '._+=-'), got {value!r}")
    return value


def _list(key: str, value) -> list:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"must be a non-empty list, got {value!r}")
    return value


def load_study(path: str | Path, overrides: Sequence[str] | Mapping = (),
               output_dir: str | Path | None = None) -> Study:
    """Read and check a study file; `overrides` (k=v) apply to every point after the file's own."""
    from dist_ortho import strategies

    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"study file {str(path)!r} does not exist")
    data = yaml_load(path.read_text()) or {}
    _check_keys("", data, ["name", "base", "output_dir", "point_timeout_s", "set", "grid"],
                required=["name", "base", "grid"])
    name = _label("name", data["name"])
    base = path.parent / str(data["base"])
    if not base.is_file():
        raise ConfigError("base", f"base config {str(base)!r} does not exist (paths are relative "
                                  f"to the study file)")
    timeout = data.get("point_timeout_s", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError("point_timeout_s", f"must be a number > 0, got {timeout!r}")
    common = data.get("set") or {}
    _check_keys("set", common, list(common))
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    common = {**common, **overrides}

    grid = data["grid"]
    _check_keys("grid", grid, ["strategies", "world_sizes", "models", "option_sets"],
                required=["strategies", "world_sizes"])
    raw = grid["strategies"]
    if raw == "all":
        raw = strategies.available()
    entries = []
    for i, item in enumerate(_list("grid.strategies", raw)):
        key = f"grid.strategies[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        _check_keys(key, item, ["name", "label", "options"], required=["name"])
        if item["name"] not in strategies.available():
            raise ConfigError(f"{key}.name", f"unknown strategy {item['name']!r}; available: "
                                             f"{', '.join(strategies.available())}")
        options = item.get("options") or {}
        _check_keys(f"{key}.options", options, list(options))
        entries.append(StrategyEntry(item["name"], _label(f"{key}.label",
                                                           item.get("label", item["name"])),
                                     dict(options)))
    _unique("grid.strategies", [e.label for e in entries])
    world_sizes = _list("grid.world_sizes", grid["world_sizes"])
    for i, p in enumerate(world_sizes):
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ConfigError(f"grid.world_sizes[{i}]", f"must be an integer >= 1, got {p!r}")
    _unique("grid.world_sizes", world_sizes)
    models_ = grid.get("models")
    if models_ is not None:
        models_ = [_label(f"grid.models[{i}]", m) for i, m in enumerate(_list("grid.models",
                                                                               models_))]
        _unique("grid.models", models_)
    option_sets = []
    for i, item in enumerate(_list("grid.option_sets", grid.get("option_sets") or
                                   [{"name": "default"}])):
        key = f"grid.option_sets[{i}]"
        _check_keys(key, item, ["name", "set"], required=["name"])
        sets = item.get("set") or {}
        _check_keys(f"{key}.set", sets, list(sets))
        option_sets.append(OptionSet(_label(f"{key}.name", item["name"]), dict(sets)))
    _unique("grid.option_sets", [o.name for o in option_sets])
    out = Path(output_dir if output_dir is not None else data.get("output_dir", "results"))
    if models_ is None:  # the base's model (after overrides) is the only one
        models_ = [_base_config(base, common).model.preset]
    return Study(name, path, base, out, float(timeout), dict(common), entries,
                 sorted(world_sizes), models_, option_sets)


def _unique(key: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(key, f"lists {v!r} twice")
        seen.add(v)


def _base_config(base: Path, overrides: Mapping) -> Config:
    return config_from_dict(apply_overrides(yaml_load(base.read_text()) or {}, overrides))


# --- points -------------------------------------------------------------------------------------

@dataclass
class Point:
    name: str
    strategy: StrategyEntry
    world_size: int
    model: str
    option_set: OptionSet
    config: Config  # resolved for this machine, output set to the point's run directory
    config_hash: str

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir) / self.config.output.name


def expand(study: Study, device_type: str | None = None) -> list[Point]:
    """Every grid point with a checked, resolved config; a bad point raises ConfigError naming it.
    Order: model, option set, world size, strategy (so partial results are whole comparisons)."""
    device_type = device_type or default_device_type()
    base = yaml_load(study.base.read_text()) or {}
    points = []
    for model in study.models:
        for opt in study.option_sets:
            for p in study.world_sizes:
                for s in study.strategies:
                    name = f"{model}--{s.label}--p{p}"
                    if len(study.option_sets) > 1 or opt.name != "default":
                        name += f"--{opt.name}"
                    overrides = {**study.overrides, **opt.overrides, "model.preset": model,
                                 "strategy.name": s.name, "strategy.options": s.options,
                                 "output.dir": str(study.dir / "runs"), "output.name": name}
                    try:
                        config = resolve(config_from_dict(apply_overrides(base, overrides)),
                                         device_type)
                    except ConfigError as exc:
                        raise ConfigError(exc.key, f"{exc} (in grid point {name})") from None
                    points.append(Point(name, s, p, model, opt, config, config_hash(config)))
    return points


def is_complete(point: Point) -> bool:
    from dist_ortho.run import read_done

    done = read_done(point.run_dir)
    return (done is not None and done.get("config_hash") == point.config_hash
            and done.get("world_size") == point.world_size
            and (point.run_dir / "metrics.csv").is_file())


# --- launching ----------------------------------------------------------------------------------

@dataclass
class PointResult:
    point: Point
    status: str  # ok | skipped | failed | timeout | unrunnable
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    error: str = ""


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank; also silences torchrun's note
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_command(point: Point, config_path: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={point.world_size}", "-m", "dist_ortho.run",
            "--config", str(config_path)]


def _last_error(log: Path) -> str:
    """The exception line a worker printed (torchrun prefixes it with [rankN]:), else the last
    exception line of the log, else its last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    pattern = re.compile(r"^(\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b:?.*)")
    found = [m for m in map(pattern.match, (ln.strip() for ln in lines)) if m]
    worker = [m for m in found if m.group(1)]
    best = (worker or found or [None])[-1]
    if best is not None:
        return best.group(2).strip()[:300]
    return next((ln.strip()[:300] for ln in reversed(lines) if ln.strip()), "")


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time) of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every process below `pid` (Linux /proc; empty elsewhere). torchrun
    starts each worker in a session of its own, so signalling torchrun's group misses them."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        stat = _proc_stat(entry)
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _kill_point(proc: subprocess.Popen) -> None:
    """End a point: SIGTERM to torchrun's process group (torchrun then stops its workers), then
    SIGKILL to whatever of that tree still runs 15 s later. A pid is only signalled while its
    start time still matches, so a reused pid is never hit."""
    tree = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for pid, started in tree:
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_point(point: Point, study: Study, timeout_s: float) -> PointResult:
    """Launch one point under torchrun and wait (bounded) for it."""
    if default_device_type() == "cuda":
        import torch

        if point.world_size > torch.cuda.device_count():
            return PointResult(point, "unrunnable", error=f"needs {point.world_size} GPUs, this "
                                                          f"node has {torch.cuda.device_count()}")
    (study.dir / "configs").mkdir(parents=True, exist_ok=True)
    (study.dir / "logs").mkdir(parents=True, exist_ok=True)
    config_path = study.dir / "configs" / f"{point.name}.yaml"
    dump_config(point.config, config_path)
    log_path = study.dir / "logs" / f"{point.name}.log"
    cmd = launch_command(point, config_path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(),
                                cwd=os.getcwd(), start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_point(proc)
            return PointResult(point, "timeout", time.perf_counter() - start, proc.returncode,
                               log_path, f"killed after the {timeout_s:.0f} s point timeout")
        except BaseException:  # Ctrl-C: take the point's processes down with us
            _kill_point(proc)
            raise
    seconds = time.perf_counter() - start
    if returncode != 0:
        return PointResult(point, "failed", seconds, returncode, log_path, _last_error(log_path))
    if not is_complete(point):
        return PointResult(point, "failed", seconds, returncode, log_path,
                           "exited 0 but left no DONE marker with the expected config hash, or "
                           "no metrics.csv (a sweep needs profiling.enabled: true)")
    return PointResult(point, "ok", seconds, returncode, log_path)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One plain line per point on a stream, with elapsed time and an ETA for the rest."""

    def __init__(self, study: str, total: int, stream=None) -> None:
        self.study, self.total, self.stream = study, total, stream or sys.stderr
        self.start = time.perf_counter()
        self.durations: dict[int, list[float]] = {}

    def estimate(self, world_size: int) -> float | None:
        same = self.durations.get(world_size)
        if same:
            return sum(same) / len(same)
        every = [d for ds in self.durations.values() for d in ds]
        return sum(every) / len(every) if every else None

    def begin(self, index: int, point: Point, pending: Sequence[Point],
              skipped: bool = False) -> None:
        """`pending`: the points still to launch, this one included."""
        head = f"[{self.study} {index}/{self.total}] {point.name}"
        if skipped:
            self.print(f"{head} | already complete, skipped")
            return
        guesses = [self.estimate(p.world_size) for p in pending]
        eta = "?" if any(g is None for g in guesses) else _clock(sum(guesses))
        self.print(f"{head} | elapsed {_clock(time.perf_counter() - self.start)} | ETA {eta}")

    def end(self, result: PointResult) -> None:
        if result.status in ("ok", "failed", "timeout"):
            self.durations.setdefault(result.point.world_size, []).append(result.seconds)
        if result.status == "ok":
            self.print(f"    ok in {result.seconds:.1f} s")
        elif result.status == "skipped":
            return
        else:
            self.print(f"    {result.status.upper()} ({result.error}) after "
                        f"{result.seconds:.1f} s; log: {result.log}")

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def write_failures(study: Study, results: Sequence[PointResult]) -> Path:
    """failures.csv: this invocation's failed points (header only when none failed)."""
    path = study.dir / "failures.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FAILURE_FIELDS)
        writer.writeheader()
        for r in results:
            if r.status in ("failed", "timeout", "unrunnable"):
                writer.writerow({"point": r.point.name, "strategy": r.point.strategy.label,
                                 "world_size": r.point.world_size, "model": r.point.model,
                                 "option_set": r.point.option_set.name, "status": r.status,
                                 "returncode": r.returncode, "seconds": f"{r.seconds:.1f}",
                                 "log": r.log or "", "error": r.error})
    os.replace(tmp, path)
    return path


def aggregate(study: Study, points: Sequence[Point]) -> Path | None:
    """summary.csv from the complete runs of this grid (stale run directories are left out), with
    the grid's own labels (point, strategy label, option set) added."""
    from dist_ortho.profiling import summarize_runs

    complete = {p.name: p for p in points if is_complete(p)}
    path = study.dir / "summary.csv"
    if not complete:
        path.unlink(missing_ok=True)
        return None
    table = summarize_runs(study.dir / "runs")
    assert "run" in table.columns, f"summarize_runs gave no 'run' column: {list(table.columns)}"
    table = table[table["run"].isin(list(complete))].copy()
    table.insert(0, "point", table["run"])
    table.insert(1, "strategy_label", [complete[r].strategy.label for r in table["run"]])
    table.insert(2, "option_set", [complete[r].option_set.name for r in table["run"]])
    order = {name: i for i, name in enumerate(p.name for p in points)}
    table = table.sort_values("point", key=lambda s: s.map(order)).reset_index(drop=True)
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


@dataclass
class SweepResult:
    study: Study
    results: list[PointResult]
    summary: Path | None
    failures: Path

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def run_sweep(study: Study, force: bool = False, dry_run: bool = False,
              timeout_s: float | None = None, stream=None) -> SweepResult:
    """Run every incomplete point of `study` (all with `force`), then aggregate."""
    stream = stream or sys.stderr
    points = expand(study)
    todo = [p for p in points if force or not is_complete(p)]
    pending = {p.name for p in todo}
    if dry_run:
        for p in points:
            mark = "run " if p.name in pending else "done"
            print(f"{mark} {p.name}  (P={p.world_size}, hash {p.config_hash})", file=stream)
        return SweepResult(study, [], None, study.dir / "failures.csv")
    study.dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(study.name, len(points), stream)
    results = []
    for i, point in enumerate(points, 1):
        if point.name not in pending:
            result = PointResult(point, "skipped")
            progress.begin(i, point, [], skipped=True)
        else:
            progress.begin(i, point, [p for p in todo if p.name in pending])
            result = run_point(point, study, timeout_s or study.point_timeout_s)
            pending.discard(point.name)
        progress.end(result)
        results.append(result)
    failures = write_failures(study, results)
    summary = aggregate(study, points)
    n_ok = sum(r.status == "ok" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    n_bad = len(results) - n_ok - n_skip
    progress.print(f"[{study.name}] done in {_clock(time.perf_counter() - progress.start)}: "
                    f"{n_ok} ran, {n_skip} already complete, {n_bad} failed"
                    + (f" (see {failures})" if n_bad else "")
                    + (f"; summary: {summary}" if summary else ""))
    return SweepResult(study, results, summary, failures)


# --- command line -------------------------------------------------------------------------------

def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+",
                        action="extend", default=[],
                        help="override run-config keys for every point, e.g. train.steps=4")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="results root (default: the study's output_dir, else results/)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="per-point timeout (default: the study's point_timeout_s)")
    parser.add_argument("--force", action="store_true",
                        help="rerun every point, even those already complete")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", type=Path, help="study YAML (see launch/configs/*study*.yaml)")
    _common_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points and whether each would run; launch nothing")


def main(args: argparse.Namespace) -> int:
    try:
        study = load_study(args.study, args.overrides, args.output_dir)
        result = run_sweep(study, force=args.force, dry_run=args.dry_run, timeout_s=args.timeout)
    except ConfigError as exc:
        print(f"study config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    return 0 if all(r.status in ("ok", "skipped") for r in result.results) else 1


def study_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_STUDY,
                        help=f"study YAML (default: {DEFAULT_STUDY.relative_to(REPO_ROOT)})")
    _common_arguments(parser)


def study_main(args: argparse.Namespace) -> int:
    from dist_ortho import report

    start = time.perf_counter()
    try:
        study = load_study(args.config, args.overrides, args.output_dir)
        result = run_sweep(study, force=args.force, timeout_s=args.timeout)
    except ConfigError as exc:
        print(f"study config error: {exc}", file=sys.stderr)
        return 2
    if result.summary is None:
        print(f"no run of {study.name} completed; see {result.failures}", file=sys.stderr)
        return 1
    path = report.write_report(study.dir)
    print(f"study {study.name} finished in {time.perf_counter() - start:.0f} s "
          f"({result.count('failed') + result.count('timeout')} failed point(s))")
    print(f"report: {path}")
    return 0 if result.count("ok") + result.count("skipped") == len(result.results) else 1
