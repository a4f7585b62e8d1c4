"""Exact or not: the inexact schedules (blockwise, local_norms, periodic) beside an exact strategy,
at several world sizes, on the same global batch and seeds; what they save and what they cost.

    dist-ortho exact-or-not launch/configs/exact_or_not.yaml

One process group per world size P (gloo on CPU, P processes started here), and in it, in turn:
1. training: for every seed, the exact strategy and each schedule train the run config's GPT from
   the same initialization on the same global batches (the per-rank batch is the global one divided
   by P, `dist_ortho.studies.run`), with the convergence study's LR schedule and validation
   (`dist_ortho.studies.convergence.training`); with `deviation: true`, every `deviation_every`
   steps a `dist_ortho.profiling.deviation.DeviationMeter` records each matrix's distance and cosine
   between the schedule's update and the exact one from the same state;
2. timing: the exact candidates and the schedules step one NorMuon each (lr 0, so the weights stay
   put) on the same gradients, interleaved: each round times `cycle` steps of each, in an order
   rotated every round (paired ratios, `dist_ortho.profiling.stats`); a round's time is the
   slowest rank's;
3. bytes: each one's collectives over `cycle` steps, counted where they happen
   (`dist_ortho.profiling.comm.CommCounter`), summed over ranks, per step.
Rank 0 writes runs.csv, curves.csv, deviation.csv, times.csv and bytes.csv into `out_dir`; the
report (`dist_ortho.reporting.exact_or_not`) turns them into summary.md and plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_ortho import strategies
from dist_ortho.core.commands import add_grammar, run_command
from dist_ortho.core.schema import ConfigError
from dist_ortho.core.schema import apply_overrides as apply_schema_overrides
from dist_ortho.core.schema import at_least, build, parse_overrides, read_yaml, to_dict
from dist_ortho.optim.optimizer import NorMuon
from dist_ortho.profiling.comm import CommCounter
from dist_ortho.profiling.deviation import DeviationMeter
from dist_ortho.studies.config import Config, apply_overrides, config_from_dict
from dist_ortho.studies.convergence import exact_or_not_report as report
from dist_ortho.studies.convergence.config import ConvergenceConfig
from dist_ortho.studies.convergence.training import (Curve, _CurveRecorder, evaluate,
                                                     validation_batches)
from dist_ortho.studies.run import _matrix_optimizers, build_run, close, train

__all__ = ["Schedule", "ExactOrNotConfig", "ExactOrNotStudy", "load", "run_study", "main"]


@dataclass
class Schedule:
    """A strategy and its options; `label` names it in tables (default: the name)."""

    name: str
    options: dict = field(default_factory=dict)
    label: str | None = None

    def check(self, key: str) -> None:
        try:
            strategies.build(self.name, **self.options)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        self.label = self.label or self.name


@dataclass
class ExactOrNotConfig:
    """The study section: `exact` is the reference run of the training comparison; `schedules`
    the inexact ones; `exact_candidates` the exact strategies timed (the fastest is the baseline);
    `train` has the convergence study's settings (validation, LR schedule)."""

    out_dir: str = "results/latest/exact_or_not"
    world_sizes: list[int] = field(default_factory=lambda: [2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    global_batch: int = 16
    exact: Schedule = field(default_factory=lambda: Schedule("balanced"))
    schedules: list[Schedule] = field(default_factory=list)
    exact_candidates: list[str] = field(default_factory=lambda: ["balanced", "replicated"])
    deviation: bool = False
    deviation_every: int = 5
    timing_rounds: int = 20
    cycle: int = 4
    train: ConvergenceConfig = field(default_factory=ConvergenceConfig)

    def check(self, key: str) -> None:
        for name in ("global_batch", "deviation_every", "timing_rounds", "cycle"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        if not self.seeds or not self.world_sizes or not self.schedules:
            raise ConfigError(key, "seeds, world_sizes and schedules must be non-empty")
        for i, p in enumerate(self.world_sizes):
            at_least(f"{key}.world_sizes[{i}]", p, 1)
            if self.global_batch % p or self.train.eval_batch_size % p:
                raise ConfigError(f"{key}.world_sizes[{i}]", f"{p} must divide global_batch "
                                  f"({self.global_batch}) and train.eval_batch_size "
                                  f"({self.train.eval_batch_size}): the global batch is split")
        if not strategies.build(self.exact.name).exact:
            raise ConfigError(f"{key}.exact.name", f"{self.exact.name!r} is an inexact schedule; "
                              f"the reference run needs an exact strategy")
        for i, name in enumerate(self.exact_candidates):
            if name not in strategies.available_exact():
                raise ConfigError(f"{key}.exact_candidates[{i}]", f"{name!r} is not an exact "
                                  f"strategy; one of {strategies.available_exact()}")


@dataclass
class ExactOrNotStudy:
    run: Config = field(default_factory=Config)
    study: ExactOrNotConfig = field(default_factory=ExactOrNotConfig)


def load(path: str | Path, overrides: list[str] = ()) -> ExactOrNotStudy:
    """Read the study file; `overrides` are key=value, `study.*` for the study section and
    anything else for the run config, each checked against its schema."""
    data = read_yaml(path, "exact-or-not study")
    sets = parse_overrides(list(overrides))
    data = apply_schema_overrides(data, {k: v for k, v in sets.items() if k.startswith("study.")},
                                  ExactOrNotStudy)
    data["run"] = apply_overrides(data.get("run"),
                                  {k: v for k, v in sets.items() if not k.startswith("study.")})
    return build(ExactOrNotStudy, data)


# -- one rank ------------------------------------------------------------------------------------

class _DeviationHook:
    """A run hook (`RunState.hooks`): the meter's exact update once the gradients exist."""

    def __init__(self, meter: DeviationMeter) -> None:
        self.meter = meter

    def after_gradients(self, state, step: int) -> None:
        self.meter.before_step(step)

    def __call__(self, state, out) -> None:  # a train() callback: after the step
        self.meter.after_step(state.optimizer.last_step_skipped)


def _run_config(study: ExactOrNotStudy, sched: Schedule, seed: int, world: int, tmp: str) -> Config:
    sets = {"strategy.name": sched.name, "strategy.options": dict(sched.options),
            "train.seed": seed, "train.batch_size": study.study.global_batch // world,
            "train.warmup_steps": 0, "output.dir": tmp,
            "output.name": f"{sched.label}-s{seed}-p{world}", "profiling.enabled": False}
    return config_from_dict(apply_overrides(to_dict(study.run), sets))


def _train_one(study: ExactOrNotStudy, sched: Schedule, seed: int, world: int, tmp: str):
    conv = study.study.train
    state = build_run(_run_config(study, sched, seed, world, tmp))
    cfg = state.config
    started = time.perf_counter()
    batches = validation_batches(cfg.train.data, conv.eval_batch_size, cfg.train.seq_len,
                                 conv.eval_batches, conv.eval_seed, state.rank, world,
                                 state.device)
    base_lrs = [g["lr"] for g in state.optimizer.param_groups]
    curve = Curve(val=[(0, evaluate(state.model, batches, world))])
    recorder = _CurveRecorder(conv, cfg.train.steps, base_lrs, batches, curve, started)
    recorder.set_lr(state, 0)
    callbacks = [recorder]
    meter = None
    if study.study.deviation:
        meter = DeviationMeter(_matrix_optimizers(state.optimizer), state.rank,
                               study.study.deviation_every)
        hook = _DeviationHook(meter)
        state.hooks.append(hook)
        callbacks.insert(0, hook)
    train(state, callbacks=callbacks)
    wall = time.perf_counter() - started
    close(state)
    return curve, (meter.rows if meter is not None else []), wall


def _timing(study: ExactOrNotStudy, world: int, tmp: str) -> tuple[list[dict], list[dict]]:
    """Interleaved, rotated rounds of `cycle` steps per strategy on fixed gradients; bytes."""
    s = study.study
    state = build_run(_run_config(study, s.exact, s.seeds[0], world, tmp))
    x, y = state.loader.batch_at(0)
    _, loss = state.model(x, y)
    loss.backward()
    matrix_opt = _matrix_optimizers(state.optimizer)[0]
    named = [(matrix_opt._names[id(p)], p) for g in matrix_opt.param_groups for p in g["params"]]
    entries = [(n, n, {}) for n in s.exact_candidates]
    entries += [(sch.label, sch.name, sch.options) for sch in s.schedules]
    opts = {label: NorMuon(named, lr=0.0, strategy=strategies.build(name, **options),
                           ns_dtype=state.config.optimizer.ns_dtype)
            for label, name, options in entries}
    for opt in opts.values():  # warm up every code path once (periodic: a whole cycle)
        for _ in range(s.cycle):
            opt.step()
    labels = list(opts)
    times: list[dict] = []
    for r in range(s.timing_rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(s.cycle):
                opts[label].step()
            seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's round
            times.append({"world_size": world, "strategy": label, "round": r,
                          "seconds_per_step": float(seconds) / s.cycle})
    bytes_rows = []
    for label in labels:
        with CommCounter() as counter:
            for _ in range(s.cycle):
                opts[label].step()
        sent = torch.tensor([sum(v[0] for v in counter.totals().values())], dtype=torch.float64)
        dist.all_reduce(sent)
        bytes_rows.append({"world_size": world, "strategy": label,
                           "exact": opts[label].strategy.exact,
                           "send_bytes_per_step": float(sent) / s.cycle})
    close(state)
    return times, bytes_rows


def _rank_main(rank: int, world: int, study: ExactOrNotStudy, store_path: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    runs, curves, deviation = [], [], []
    s = study.study
    for seed in s.seeds:
        for sched in [s.exact] + s.schedules:
            curve, rows, wall = _train_one(study, sched, seed, world, tmp)
            base = {"world_size": world, "schedule": sched.label, "seed": seed}
            runs.append({**base, "final_val_loss": curve.val[-1][1], "wall_s": wall})
            curves += [{**base, "step": st, "val_loss": v} for st, v in curve.val]
            deviation += [{**base, **row} for row in rows]
    times, bytes_rows = _timing(study, world, tmp)
    if rank == 0:
        out = Path(s.out_dir)
        for name, rows in (("runs", runs), ("curves", curves), ("deviation", deviation),
                           ("times", times), ("bytes", bytes_rows)):
            _append_csv(out / f"{name}.csv", rows)
    dist.barrier()
    dist.destroy_process_group()


def _append_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_study(study: ExactOrNotStudy, command: str) -> dict:
    """Every world size in turn; writes and returns study.json (command, wall time, load)."""
    out = Path(study.study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("runs", "curves", "deviation", "times", "bytes"):
        (out / f"{name}.csv").unlink(missing_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    for world in study.study.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank_main, args=(world, study, os.path.join(tmp, "store"), tmp),
                               nprocs=world, join=True, start_method="spawn")
    facts = {"command": command, "wall_s": round(time.perf_counter() - started, 1),
             "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
             "cpus": os.cpu_count(), "torch": torch.__version__,
             "config": to_dict(study)}
    (out / "study.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    return facts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grammar(parser, config="study YAML (launch/configs/exact_or_not.yaml)", config_required=True,
                overrides="study.<key>=... for the study, anything else for the run config",
                out="output folder (default: the study's study.out_dir)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite summary.md and the plots from the CSVs in the output folder")


def main(args: argparse.Namespace) -> int:
    return run_command("exact-or-not", _main, args)


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"study.out_dir={args.out}"] if args.out else [])
    study = load(args.config, overrides)  # ConfigError: one line, exit 2
    if not args.report_only:
        run_study(study, "dist-ortho exact-or-not " + " ".join(sys.argv[2:]))
    report.write(Path(study.study.out_dir), study.study.exact.label)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="dist-ortho exact-or-not", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
