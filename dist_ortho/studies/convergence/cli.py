"""`dist-ortho convergence`: run the study (or its LR sweep) as jobs, then the analysis.

    dist-ortho convergence launch/configs/convergence.yaml             # the study (3 x 3 runs)
    dist-ortho convergence launch/configs/convergence.yaml --sweep     # the learning-rate sweep
    dist-ortho convergence launch/configs/convergence.yaml --analyze   # redo tables and plot only
    dist-ortho convergence launch/configs/convergence.yaml --set train.steps=200 -o /tmp/conv

Runs go to `<out_dir>/runs/<optimizer>-s<seed>/` as `dist_ortho.studies.jobs` jobs (config in
`<out_dir>/configs/`, log in `<out_dir>/logs/`), several at a time (`processes`; 0 = one per CPU
core, or one per GPU group on CUDA), each under torchrun when `nproc_per_node` > 1. Everything
that can be checked before launch is (every run's config, `preflight.check_launch` at
`nproc_per_node`, the output folder), and a run complete with the same config and settings is not
run again (`--force` reruns).

The sweep (`--sweep`) trains each optimizer at each learning rate of `sweep.lrs` for
`sweep.steps` steps with seed `sweep.seed` (same schedule shape, shorter), AdamW first: its best
LR becomes the AdamW LR of the embeddings/head/norms in the NorMuon and Muon sweep runs, so those
differ from the AdamW runs only in the matrix optimizer. The swept key is `optimizer.lr` for
NorMuon and Muon (their matrix LR) and `optimizer.adamw_lr` for AdamW (every parameter). The
table goes to `<out_dir>/lr_sweep.csv`; copy the chosen values into the config by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dist_ortho.core.commands import add_grammar, run_command
from dist_ortho.core.io import atomic_write_text
from dist_ortho.studies.config import Config, ConfigError, default_device_type, resolve
from dist_ortho.studies.convergence.analysis import analyze
from dist_ortho.studies.convergence.config import ConvergenceStudy, load_study, lr_key
from dist_ortho.studies.convergence.training import CURVE_FILE, RESULT_FILE, worker
from dist_ortho.studies.faults import from_sources
from dist_ortho.studies.jobs import (Job, Progress, is_complete, run_as_rank, run_jobs,
                                     write_failures)
from dist_ortho.studies.preflight import check_launch, oversubscription_warning, writable_dir

__all__ = ["study_jobs", "sweep", "add_arguments", "main"]

log = logging.getLogger("dist_ortho.studies.convergence")


def _note(job: Job) -> str:
    result = json.loads((job.run_dir / RESULT_FILE).read_text())
    return f"final val loss {result['final_val_loss']:.4f}"


def make_job(study: ConvergenceStudy, config: Config, optimizer: str, seed: int,
             faults=None, device_type: str | None = None, nproc: int | None = None,
             check: bool = False) -> Job:
    """One run as a Job, checked before launch at `nproc` ranks (default `nproc_per_node`);
    `check`: a run of the distributed check (`convergence.distributed`)."""
    conv = study.convergence
    nproc = nproc or conv.nproc_per_node
    device_type = device_type or default_device_type()
    config = resolve(config, device_type)
    try:
        check_launch(config, nproc, faults, device_type)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (in run {config.output.name})") from None
    labels = {"optimizer": optimizer, "seed": seed}
    if check:
        labels.update(check=True, world_size=nproc, strategy=config.strategy.name)
    return Job(str(config.output.name), config, nproc,
               ["-m", "dist_ortho.studies.convergence", "--worker", "{config}"],
               settings=conv.run_settings(), outputs=(CURVE_FILE, RESULT_FILE),
               labels=labels, note=_note)


def study_jobs(study: ConvergenceStudy, faults=None) -> list[Job]:
    """The study's runs, then those of its distributed check (each after its P = 1 run's
    optimizer and seed are queued, so both finish before the analysis compares them)."""
    conv = study.convergence
    faults = from_sources() if faults is None else faults
    jobs = [make_job(study, study.run_config(optimizer, seed), optimizer, seed, faults)
            for optimizer in conv.optimizers for seed in conv.seeds]
    jobs += [make_job(study, config, optimizer, seed, faults,
                      nproc=conv.distributed.nproc_per_node, check=True)
             for optimizer, seed, config in study.check_configs()]
    return jobs


def _slots(study: ConvergenceStudy) -> list[dict]:
    """Environment per concurrent slot: CUDA_VISIBLE_DEVICES groups on GPUs, else CPU slots."""
    conv = study.convergence
    n = conv.nproc_per_node
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if n > gpus:
            raise ConfigError("convergence.nproc_per_node", f"{n} ranks per run but only {gpus} "
                                                            f"GPU(s) here")
        count = conv.processes or max(1, gpus // n)
        groups = [list(range(i * n, (i + 1) * n)) for i in range(max(1, gpus // n))]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, groups[i % len(groups)]))}
                for i in range(count)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = conv.processes or max(1, (cores or 1) // n)
    return [{} for _ in range(count)]


def _prepare(study: ConvergenceStudy, jobs: list[Job], stream) -> list[dict]:
    """Checks before the first launch: the output folder, the slots, the core count."""
    writable_dir(study.out_dir, "convergence.out_dir")
    slots = _slots(study)
    warning = oversubscription_warning(study.convergence.nproc_per_node, default_device_type(),
                                       min(len(slots), len(jobs)))
    if warning:
        print(f"dist-ortho convergence: {warning}", file=stream, flush=True)
    return slots


def run_study_jobs(study: ConvergenceStudy, jobs: list[Job], force: bool, label: str,
                   stream=None) -> list[str]:
    """Run the jobs; returns the names of those that failed (recorded in failures.csv)."""
    stream = stream or sys.stderr
    slots = _prepare(study, jobs, stream)
    results = run_jobs(jobs, study.out_dir, force=force, slots=slots,
                       progress=Progress(label, len(jobs), stream, slots=len(slots)))
    write_failures(study.out_dir / f"failures_{label}.csv", results)
    return [r.job.name for r in results if r.status not in ("ok", "skipped")]


def sweep(study: ConvergenceStudy, force: bool = False) -> tuple[list[dict], list[str]]:
    """Run the LR grid (AdamW first, its best LR then used for the other optimizers' AdamW
    part) and write `<out_dir>/lr_sweep.csv`; returns its rows and the failed runs."""
    conv = study.convergence
    grid = conv.sweep.lrs
    if not grid:
        raise ConfigError("convergence.sweep.lrs", "is empty; list the learning rates to try "
                                                   "per optimizer")
    runs_dir = study.out_dir / "sweep"
    faults = from_sources()
    order = (["adamw"] if "adamw" in grid else []) + [n for n in grid if n != "adamw"]
    rows: list[dict] = []
    adamw_lr = None
    for phase in ([order[:1], order[1:]] if order[0] == "adamw" else [order]):
        jobs = []
        for name in phase:
            for lr in grid[name]:
                sets = {f"optimizer.{lr_key(name)}": lr, "train.steps": conv.sweep.steps}
                if adamw_lr is not None and name != "adamw":
                    sets["optimizer.adamw_lr"] = adamw_lr
                run_name = f"{name}-lr{lr:g}-s{conv.sweep.seed}"
                config = study.run_config(name, conv.sweep.seed, sets, run_name, runs_dir)
                jobs.append(make_job(study, config, name, conv.sweep.seed, faults))
        failed = run_study_jobs(study, jobs, force, "sweep")
        if failed:
            return rows, failed
        for job in jobs:
            name = job.labels["optimizer"]
            result = json.loads((job.run_dir / RESULT_FILE).read_text())
            rows.append({"optimizer": name, "swept_key": f"optimizer.{lr_key(name)}",
                         "lr": job.config.optimizer.lr if name != "adamw" else None,
                         "adamw_lr": job.config.optimizer.adamw_lr, "steps": result["steps"],
                         "seed": job.labels["seed"], "final_val_loss": result["final_val_loss"],
                         "final_train_loss": result["final_train_loss"],
                         "wall_s": round(result["wall_s"], 1)})
        if phase and phase[0] == "adamw":
            adam = [r for r in rows if r["optimizer"] == "adamw"
                    and math.isfinite(r["final_val_loss"])]
            adamw_lr = min(adam, key=lambda r: r["final_val_loss"])["adamw_lr"] if adam else None
    table = pd.DataFrame(rows)
    best = table[table["final_val_loss"].apply(math.isfinite)].groupby("optimizer")[
        "final_val_loss"].idxmin()
    table["best"] = False
    table.loc[best.values, "best"] = True
    atomic_write_text(study.out_dir / "lr_sweep.csv",
                      table.to_csv(index=False, float_format="%.5g"))
    return table.to_dict("records"), []


# --- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grammar(parser, config="study config (e.g. launch/configs/convergence.yaml)",
                overrides="override a key: run keys as in `dist-ortho run` (train.steps=100), "
                          "study keys as convergence.<key> (convergence.seeds=[0])",
                out="output folder (sets convergence.out_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="run the LR sweep of convergence.sweep and write lr_sweep.csv")
    mode.add_argument("--analyze", action="store_true",
                      help="only redo the tables and plot from finished runs")
    parser.add_argument("--force", action="store_true",
                        help="rerun runs that already finished with the same settings")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    """The command (and, with --worker, one run's process), with the CLI's one-line errors and
    exit codes, also when called directly."""
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0"
                        else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    if args.worker is not None:  # a rank of one run: errors go to its log, read by the runner
        return run_as_rank("convergence", lambda: worker(args.worker))
    return run_command("convergence", _main, args)


def _main(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ConfigError("config", "a study config is required, e.g. "
                                    "launch/configs/convergence.yaml")
    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"convergence.out_dir={args.out}")
    study = load_study(args.config, overrides)
    if args.sweep:
        rows, failed = sweep(study, args.force)
        if failed:
            log.error("%d sweep run(s) failed: %s", len(failed), ", ".join(failed))
            return 1
        for r in rows:
            lr = r["adamw_lr"] if r["optimizer"] == "adamw" else r["lr"]
            log.info("sweep %-8s %s=%-8g final val %.4f%s", r["optimizer"], r["swept_key"],
                     lr, r["final_val_loss"], "  <- best" if r["best"] else "")
        return 0
    jobs = study_jobs(study)
    wall = None
    if not args.analyze:
        started = time.perf_counter()
        failed = run_study_jobs(study, jobs, args.force, "runs")
        wall = time.perf_counter() - started
        if failed:
            log.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
            return 1
    else:
        missing = [j.name for j in jobs if not is_complete(j)]
        if missing:
            raise ConfigError("--analyze", f"needs finished runs; missing or stale: "
                                           f"{', '.join(missing)}; run without --analyze first")
        previous = study.out_dir / "study.json"
        if previous.is_file():
            wall = json.loads(previous.read_text()).get("study_wall_s")
    analyze(study, jobs, wall)
    print((study.out_dir / "summary.md").read_text(), end="")
    return 0


def _standalone() -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_ortho.studies.convergence",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args())
