"""Convergence study: NorMuon vs Muon vs AdamW on the stdlib byte corpus, over several seeds.

    dist-ortho convergence launch/configs/convergence.yaml             # the study (3 x 3 runs)
    dist-ortho convergence launch/configs/convergence.yaml --sweep     # the learning-rate sweep
    dist-ortho convergence launch/configs/convergence.yaml --analyze   # redo tables and plot only
    python -m dist_ortho.convergence launch/configs/convergence.yaml --set train.steps=200

What one run is. The training itself is `dist_ortho.run` (`build_run`, `train`, `finish`): a GPT
preset wrapped with FSDP2's `fully_shard`, hidden matrices stepped by the named optimizer
(NorMuon, Muon, or AdamW), embeddings, head and norms always by AdamW, any orthogonalization
strategy, any world size. This module adds three callbacks to that loop:
- a learning-rate schedule: every param group's configured lr times a factor that rises linearly
  over the first `lr_warmup_frac` of the steps, stays at 1, and falls linearly to 0 over the last
  `lr_decay_frac` of them (warmup-stable-decay);
- the training loss of every step, averaged over ranks;
- the validation loss every `eval_every` steps (and before the first step and after the last).
  Validation uses `eval_batches` fixed batches of the validation files, drawn with `eval_seed`,
  which does not change with the run's seed or optimizer, so every run is scored on exactly the
  same bytes. The global validation batch is split over ranks like a training batch, so the score
  does not depend on the world size either.
Each run writes `curve.csv` (step, train_loss, val_loss, lr_scale, elapsed_s) and `result.json`
next to what `dist_ortho.run` writes (metrics, config, DONE).

What the study is. The file has two sections: `run`, a normal `dist-ortho run` config (model,
train, strategy, ...) shared by every run, and `convergence` (see `ConvergenceConfig`): the
optimizers with their tuned learning rates, the seeds, the evaluation and schedule settings and
the LR sweep. Runs go to `<out_dir>/runs/<optimizer>-s<seed>/`, several at a time as separate
processes (`processes`; 0 = one per CPU core, or one per GPU group on CUDA), each under torchrun
when `nproc_per_node` > 1. A run whose directory already holds a finished run with the same
settings is not run again (`--force` reruns). Then the analysis writes to `<out_dir>/`:
- `loss_curves.png`: train (windowed mean) and validation loss, mean and min-max band over seeds;
- `final_val_loss.csv` and `summary.md`: final validation loss, mean +- std (ddof=1) over seeds;
- steps to reach AdamW's final validation loss (AdamW's mean over seeds), read off each
  optimizer's seed-mean validation curve by linear interpolation between evaluation points, and
  per seed; "not reached" when the curve never gets there;
- `study.json`: wall time of the study and of every run.

The sweep (`--sweep`) trains each optimizer at each learning rate of `sweep.lrs` for
`sweep.steps` steps with seed `sweep.seed` (same schedule shape, shorter), AdamW first: its best
LR becomes the AdamW LR of the embeddings/head/norms in the NorMuon and Muon sweep runs, so those
differ from the AdamW runs only in the matrix optimizer. The swept key is `optimizer.lr` for
NorMuon and Muon (their matrix LR) and `optimizer.adamw_lr` for AdamW (every parameter). The
table goes to `<out_dir>/lr_sweep.csv`; copy the chosen values into the config by hand.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OPTIMIZERS", "LR_KEY", "SweepConfig", "ConvergenceConfig", "Study", "load_study",
           "lr_scale", "validation_batches", "evaluate", "Curve", "train_with_curve",
           "steps_to_reach", "analyze", "run_grid", "sweep", "add_arguments", "main"]

log = logging.getLogger("dist_ortho.convergence")

OPTIMIZERS = ("normuon", "muon", "adamw")
# The learning rate the sweep varies: the matrix LR for NorMuon/Muon, the only LR for AdamW.
LR_KEY = {"normuon": "lr", "muon": "lr", "adamw": "adamw_lr"}
RUN_SPEC_FILE = "convergence_run.json"
CURVE_FILE = "curve.csv"
RESULT_FILE = "result.json"


# --- config ---------------------------------------------------------------------------------------

def _err(key: str, message: str) -> ValueError:
    from dist_ortho.config import ConfigError

    return ConfigError(key, message)


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _err(key, f"must be a number in [0, 1], got {value!r}")
    return float(value)


def _lr(key: str, value) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise _err(key, f"must be a finite number > 0, got {value!r}")
    return float(value)


def _optimizer_name(key: str, name) -> str:
    if name not in OPTIMIZERS:
        raise _err(key, f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}")
    return name


@dataclass
class SweepConfig:
    """The LR sweep: `lrs` maps an optimizer to the values of its `LR_KEY` to try."""

    steps: int = 300
    seed: int = 0
    lrs: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, key: str = "convergence.sweep") -> SweepConfig:
        data = _mapping(key, data)
        _known(key, data, cls)
        out = cls()
        if "steps" in data:
            out.steps = _int(f"{key}.steps", data["steps"], 1)
        if "seed" in data:
            out.seed = _int(f"{key}.seed", data["seed"], 0)
        lrs = _mapping(f"{key}.lrs", data.get("lrs", {}))
        for name, values in lrs.items():
            _optimizer_name(f"{key}.lrs.{name}", name)
            if not isinstance(values, list) or not values:
                raise _err(f"{key}.lrs.{name}", f"must be a non-empty list of learning rates, "
                                                f"got {values!r}")
            out.lrs[name] = [_lr(f"{key}.lrs.{name}[{i}]", v) for i, v in enumerate(values)]
        return out


@dataclass
class ConvergenceConfig:
    """The `convergence` section. `optimizers` maps each optimizer of the study to the
    `optimizer.*` keys it overrides (its tuned LR); `eval_batch_size` is global (split over
    ranks); `processes` = 0 picks one run per CPU core (or per GPU group on CUDA)."""

    out_dir: str = "results/convergence"
    optimizers: dict[str, dict] = field(default_factory=lambda: {n: {} for n in OPTIMIZERS})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_every: int = 25
    eval_batches: int = 8
    eval_batch_size: int = 16
    eval_seed: int = 1234
    lr_warmup_frac: float = 0.0
    lr_decay_frac: float = 0.3
    train_window: int = 25
    processes: int = 0
    nproc_per_node: int = 1
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @classmethod
    def from_dict(cls, data, key: str = "convergence") -> ConvergenceConfig:
        from dist_ortho.config import OptimizerSection

        data = _mapping(key, data)
        _known(key, data, cls)
        out = cls()
        for name in ("eval_every", "eval_batches", "eval_batch_size", "train_window",
                     "nproc_per_node"):
            if name in data:
                setattr(out, name, _int(f"{key}.{name}", data[name], 1))
        for name in ("eval_seed", "processes"):
            if name in data:
                setattr(out, name, _int(f"{key}.{name}", data[name], 0))
        for name in ("lr_warmup_frac", "lr_decay_frac"):
            if name in data:
                setattr(out, name, _fraction(f"{key}.{name}", data[name]))
        if out.lr_warmup_frac + out.lr_decay_frac > 1:
            raise _err(f"{key}.lr_decay_frac", f"lr_warmup_frac + lr_decay_frac must be <= 1, got "
                                               f"{out.lr_warmup_frac} + {out.lr_decay_frac}")
        if "out_dir" in data:
            if not isinstance(data["out_dir"], str) or not data["out_dir"]:
                raise _err(f"{key}.out_dir", f"must be a non-empty path, got {data['out_dir']!r}")
            out.out_dir = data["out_dir"]
        if "seeds" in data:
            seeds = data["seeds"]
            if not isinstance(seeds, list) or not seeds:
                raise _err(f"{key}.seeds", f"must be a non-empty list of integers, got {seeds!r}")
            out.seeds = [_int(f"{key}.seeds[{i}]", s, 0) for i, s in enumerate(seeds)]
            if len(set(out.seeds)) != len(out.seeds):
                raise _err(f"{key}.seeds", f"must not repeat a seed, got {seeds!r}")
        if "optimizers" in data:
            opts = _mapping(f"{key}.optimizers", data["optimizers"])
            if not opts:
                raise _err(f"{key}.optimizers", "must name at least one optimizer")
            fields_ = [f.name for f in dataclasses.fields(OptimizerSection)]
            out.optimizers = {}
            for name, overrides in opts.items():
                okey = f"{key}.optimizers.{name}"
                _optimizer_name(okey, name)
                overrides = _mapping(okey, overrides)
                for k in overrides:
                    if k == "name" or k not in fields_:
                        raise _err(f"{okey}.{k}", f"not an optimizer key that a run may override "
                                                  f"(known: {', '.join(f for f in fields_ if f != 'name')})")
                out.optimizers[name] = dict(overrides)
        if "sweep" in data:
            out.sweep = SweepConfig.from_dict(data["sweep"], f"{key}.sweep")
        return out


def _mapping(key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _err(key, f"must be a mapping, got {value!r}")
    return dict(value)


def _known(key: str, data: Mapping, cls) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in known:
            raise _err(f"{key}.{name}", f"unknown key (known: {', '.join(known)})")


@dataclass
class Study:
    """A study file: the shared run config (as plain data, so each run can override it) and the
    convergence section."""

    run: dict
    convergence: ConvergenceConfig

    def run_config(self, optimizer: str, seed: int, overrides: Mapping | None = None,
                   name: str | None = None, out_dir: Path | None = None):
        """The checked `dist_ortho.config.Config` of one run."""
        from dist_ortho.config import apply_overrides, config_from_dict

        conv = self.convergence
        sets = {"optimizer.name": optimizer, "train.seed": seed,
                "output.dir": str(out_dir or Path(conv.out_dir) / "runs"),
                "output.name": name or f"{optimizer}-s{seed}"}
        for k, v in conv.optimizers.get(optimizer, {}).items():
            sets[f"optimizer.{k}"] = v
        for k, v in (overrides or {}).items():
            sets[k] = v
        return config_from_dict(apply_overrides(self.run, sets))


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read a study file; `overrides` are `section.key=value` strings, `convergence.*` going to the
    convergence section and everything else to the run config (checked like `dist-ortho run`)."""
    from dist_ortho.config import (apply_overrides, config_from_dict, parse_overrides,
                                   yaml_load)

    path = Path(path)
    if not path.is_file():
        raise _err("", f"study config {str(path)!r} does not exist")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise _err("", f"{path}: a study config must be a mapping with sections run, convergence")
    for name in data:
        if name not in ("run", "convergence"):
            raise _err(str(name), "unknown section of a study config (known: run, convergence)")
    run = _mapping("run", data.get("run"))
    conv = copy.deepcopy(_mapping("convergence", data.get("convergence")))
    run_sets = {}
    for key, value in parse_overrides(list(overrides)).items():
        if key.startswith("convergence."):
            _set_dotted(conv, key.split(".")[1:], value, key)
        else:
            run_sets[key] = value
    run = apply_overrides(run, run_sets)
    config_from_dict(run)  # the shared part must be a valid run config on its own
    return Study(run, ConvergenceConfig.from_dict(conv))


def _set_dotted(node: dict, parts: list[str], value, key: str) -> None:
    if not parts or not all(parts):
        raise _err(key, "an override key must be convergence.<key>[.<key>...]")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise _err(key, f"{part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


# --- one run: schedule, validation, curve -----------------------------------------------------------

def lr_scale(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """Multiplier of the configured LRs for 0-based step `step` of `total` (warmup-stable-decay)."""
    warmup = round(warmup_frac * total)
    decay = round(decay_frac * total)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay and step >= total - decay:
        return (total - step) / decay
    return 1.0


def validation_batches(data: str, global_batch: int, seq_len: int, count: int, seed: int,
                       rank: int, world_size: int, device=None) -> list:
    """This rank's share of `count` fixed validation batches (global size `global_batch`)."""
    from dist_ortho.data import build_loader

    if global_batch % world_size:
        raise _err("convergence.eval_batch_size", f"{global_batch} is not divisible by the world "
                                                  f"size {world_size}; pick a multiple of it")
    loader = build_loader(data, "val", global_batch // world_size, seq_len, seed=seed, rank=rank,
                          world_size=world_size, device=device)
    return [loader.batch_at(i) for i in range(count)]


def evaluate(model, batches, world_size: int) -> float:
    """Mean loss over the fixed batches and all ranks (equal-size shards: mean of means)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        total = None
        for x, y in batches:
            _, loss = model(x, y)
            total = loss.float() if total is None else total + loss.float()
        total = total.reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / (len(batches) * world_size)


@dataclass
class Curve:
    """Losses of one run; `train[i]` is the loss of step i+1's batch (before its update),
    `val` is [(steps taken, loss)]."""

    train: list[float] = field(default_factory=list)
    lr_scale: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    def rows(self) -> list[dict]:
        val = dict(self.val)
        rows = [{"step": 0, "train_loss": math.nan, "val_loss": val.get(0, math.nan),
                 "lr_scale": math.nan, "elapsed_s": 0.0}]
        for i, loss in enumerate(self.train):
            rows.append({"step": i + 1, "train_loss": loss, "val_loss": val.get(i + 1, math.nan),
                         "lr_scale": self.lr_scale[i], "elapsed_s": self.elapsed[i]})
        return rows


class _CurveRecorder:
    """Callback: rank-mean train loss every step, validation every `eval_every` steps, then the
    LR factor for the next step (callbacks run after each step)."""

    def __init__(self, conv: ConvergenceConfig, total: int, base_lrs: list[float], batches,
                 curve: Curve, started: float) -> None:
        self.conv, self.total, self.base_lrs = conv, total, base_lrs
        self.batches, self.curve, self.started = batches, curve, started

    def set_lr(self, state, step: int) -> float:
        scale = lr_scale(min(step, self.total - 1), self.total, self.conv.lr_warmup_frac,
                         self.conv.lr_decay_frac)
        for group, base in zip(state.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
        return scale

    def __call__(self, state, out) -> None:
        import torch.distributed as dist

        loss = out.loss.float().reshape(1).clone()
        if state.world_size > 1:
            dist.all_reduce(loss)
        self.curve.train.append(loss.item() / state.world_size)
        self.curve.lr_scale.append(state.optimizer.param_groups[0]["lr"] / self.base_lrs[0])
        done = out.step + 1
        if done % self.conv.eval_every == 0 or done == self.total:
            self.curve.val.append((done, evaluate(state.model, self.batches, state.world_size)))
        self.curve.elapsed.append(time.perf_counter() - self.started)
        self.set_lr(state, done)


def train_with_curve(config, conv: ConvergenceConfig, write: bool = True) -> Curve:
    """Train one run of `config` with `dist_ortho.run`, recording its curve; on rank 0 write
    curve.csv and result.json into the run directory (with `write`) before `finish` marks it
    DONE. Reuses the caller's process group if there is one."""
    from dist_ortho import models
    from dist_ortho.run import LogProgress, build_run, close, finish, train
    from dist_ortho.profiling.profiler import atomic_write_text

    if models.is_shape_only(config.model.preset):
        raise _err("run.model.preset", f"{config.model.preset!r} is a shape-only model; a "
                                       f"convergence run needs a GPT preset")
    state = build_run(config)
    cfg = state.config
    started = time.perf_counter()
    batches = validation_batches(cfg.train.data, conv.eval_batch_size, cfg.train.seq_len,
                                 conv.eval_batches, conv.eval_seed, state.rank,
                                 state.world_size, state.device)
    base_lrs = [g["lr"] for g in state.optimizer.param_groups]
    curve = Curve(val=[(0, evaluate(state.model, batches, state.world_size))])
    recorder = _CurveRecorder(conv, cfg.train.steps, base_lrs, batches, curve, started)
    recorder.set_lr(state, 0)
    train(state, callbacks=[recorder, LogProgress(cfg.train.log_every, cfg.train.steps)])
    wall = time.perf_counter() - started
    if write and state.rank == 0:
        _write_curve(state.out_dir, curve)
        result = {"optimizer": cfg.optimizer.name, "seed": cfg.train.seed,
                  "lr": cfg.optimizer.lr, "adamw_lr": cfg.optimizer.adamw_lr,
                  "strategy": cfg.strategy.name, "world_size": state.world_size,
                  "steps": state.step, "final_val_loss": curve.val[-1][1],
                  "final_train_loss": _tail_mean(curve.train, conv.train_window),
                  "wall_s": wall, "config_hash": state.config_hash}
        # atomic: a run killed here must not leave half a result that --analyze would read
        atomic_write_text(state.out_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    if write:
        finish(state)
    # close() drops the run's objects before the process group goes: tearing down in the other
    # order can abort the process at exit. After an error the group is left alone, as run() does.
    close(state)
    return curve


def _tail_mean(values: Sequence[float], window: int) -> float:
    tail = list(values[-window:])
    return sum(tail) / len(tail) if tail else math.nan


def _write_curve(run_dir: Path, curve: Curve) -> None:
    import csv

    rows = curve.rows()
    tmp = run_dir / (CURVE_FILE + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / CURVE_FILE)


def _worker(run_dir: Path) -> int:
    """Entry of one run's process (every rank under torchrun): read the spec, train, write."""
    from dist_ortho.config import config_from_dict

    spec = json.loads((run_dir / RUN_SPEC_FILE).read_text())
    config = config_from_dict(spec["run"])
    conv = ConvergenceConfig.from_dict(spec["convergence"])
    train_with_curve(config, conv)
    return 0


# --- running a grid of runs as processes -----------------------------------------------------------

@dataclass
class _Job:
    name: str
    optimizer: str
    seed: int
    config: object  # dist_ortho.config.Config
    run_dir: Path
    spec: dict
    started: float = 0.0
    proc: subprocess.Popen | None = None
    log_file: object = None


def _spec(config, conv: ConvergenceConfig) -> dict:
    keep = ("eval_every", "eval_batches", "eval_batch_size", "eval_seed", "lr_warmup_frac",
            "lr_decay_frac", "train_window")
    return {"run": config.to_dict(), "convergence": {k: getattr(conv, k) for k in keep}}


def _is_done(job: _Job) -> bool:
    from dist_ortho.run import read_done

    spec_path = job.run_dir / RUN_SPEC_FILE
    if read_done(job.run_dir) is None or not spec_path.is_file():
        return False
    if not (job.run_dir / RESULT_FILE).is_file() or not (job.run_dir / CURVE_FILE).is_file():
        return False
    return _normalized(json.loads(spec_path.read_text())) == _normalized(job.spec)


def _normalized(spec: dict) -> dict | None:
    """The spec read through today's config schema, so a config key added since the run was made
    (taking its default) does not make a finished run stale; None if it no longer loads."""
    from dist_ortho.config import config_from_dict

    try:
        run = config_from_dict(spec["run"]).to_dict()
        conv = ConvergenceConfig.from_dict(spec["convergence"])
    except (KeyError, TypeError, ValueError):
        return None
    return {"run": run, "convergence": {k: getattr(conv, k) for k in spec["convergence"]}}


def _slots(conv: ConvergenceConfig) -> list[dict]:
    """Environment per concurrent slot: CUDA_VISIBLE_DEVICES groups on GPUs, else CPU slots."""
    import torch

    n = conv.nproc_per_node
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if n > gpus:
            raise _err("convergence.nproc_per_node", f"{n} ranks per run but only {gpus} GPU(s)")
        count = conv.processes or max(1, gpus // n)
        groups = [list(range(i * n, (i + 1) * n)) for i in range(max(1, gpus // n))]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, groups[i % len(groups)]))}
                for i in range(count)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = conv.processes or max(1, (cores or 1) // n)
    return [{} for _ in range(count)]


def _command(job: _Job, nproc: int) -> list[str]:
    entry = ["-m", "dist_ortho.convergence", "--worker", str(job.run_dir)]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *entry]


def run_grid(jobs: list[_Job], conv: ConvergenceConfig, force: bool = False) -> list[str]:
    """Run the jobs as processes, `len(_slots(conv))` at a time; returns the failed runs' names."""
    root = str(Path(__file__).resolve().parent.parent)
    base_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                               if p))
    todo = []
    for job in jobs:
        if not force and _is_done(job):
            log.info("%s: already done with the same settings, not rerun", job.name)
        else:
            todo.append(job)
    slots = _slots(conv)
    free = list(range(len(slots)))
    running: dict[int, _Job] = {}
    failed: list[str] = []
    total, finished = len(todo), 0
    log.info("%d run(s) to do, %d at a time", total, len(slots))
    try:
        while todo or running:
            while todo and free:
                job, slot = todo.pop(0), free.pop(0)
                job.run_dir.mkdir(parents=True, exist_ok=True)
                for stale in (CURVE_FILE, RESULT_FILE, "DONE"):
                    (job.run_dir / stale).unlink(missing_ok=True)
                (job.run_dir / RUN_SPEC_FILE).write_text(json.dumps(job.spec, indent=2) + "\n")
                job.log_file = open(job.run_dir / "log.txt", "w")
                job.started = time.perf_counter()
                job.proc = subprocess.Popen(_command(job, conv.nproc_per_node),
                                            env={**base_env, **slots[slot]}, stdout=job.log_file,
                                            stderr=subprocess.STDOUT)
                running[slot] = job
            time.sleep(0.2)
            for slot, job in list(running.items()):
                rc = job.proc.poll()
                if rc is None:
                    continue
                job.log_file.close()
                del running[slot]
                free.append(slot)
                finished += 1
                seconds = time.perf_counter() - job.started
                if rc == 0 and (job.run_dir / RESULT_FILE).is_file():
                    result = json.loads((job.run_dir / RESULT_FILE).read_text())
                    log.info("[%d/%d] %s done in %.0f s: final val loss %.4f", finished, total,
                             job.name, seconds, result["final_val_loss"])
                else:
                    tail = (job.run_dir / "log.txt").read_text().splitlines()[-15:]
                    log.error("[%d/%d] %s FAILED (exit %s) after %.0f s; end of %s:\n%s", finished,
                              total, job.name, rc, seconds, job.run_dir / "log.txt", "\n".join(tail))
                    failed.append(job.name)
    finally:  # interrupted (Ctrl-C, SIGTERM): stop the runs this call started
        for job in running.values():
            if job.proc.poll() is None:
                job.proc.terminate()
                job.proc.wait()
            job.log_file.close()
    return failed


def study_jobs(study: Study) -> list[_Job]:
    conv = study.convergence
    jobs = []
    for optimizer in conv.optimizers:
        for seed in conv.seeds:
            config = study.run_config(optimizer, seed)
            run_dir = (Path(config.output.dir) / config.output.name).resolve()
            jobs.append(_Job(config.output.name, optimizer, seed, config, run_dir,
                             _spec(config, conv)))
    return jobs


# --- analysis ----------------------------------------------------------------------------------------

def steps_to_reach(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First step at which the curve reaches `target` (loss <= target), linearly interpolated
    between the evaluation points around the crossing; None if it never does."""
    previous = None
    for s, loss in zip(steps, losses):
        if not math.isfinite(loss):
            previous = None
            continue
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(s)
            s0, l0 = previous
            return s0 + (l0 - target) / (l0 - loss) * (s - s0)
        previous = (s, loss)
    return None


def _load_runs(jobs: list[_Job]):
    import pandas as pd

    frames, results = [], []
    for job in jobs:
        curve = pd.read_csv(job.run_dir / CURVE_FILE)
        curve["optimizer"], curve["seed"] = job.optimizer, job.seed
        frames.append(curve)
        results.append(json.loads((job.run_dir / RESULT_FILE).read_text()))
    return pd.concat(frames, ignore_index=True), results


def _fmt_steps(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def analyze(study: Study, jobs: list[_Job], wall_s: float | None = None) -> dict:
    """Plot, tables and summary from the finished runs in `jobs`; returns the summary."""
    import pandas as pd

    conv = study.convergence
    out = Path(conv.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves, results = _load_runs(jobs)
    optimizers = list(dict.fromkeys(j.optimizer for j in jobs))
    val = curves.dropna(subset=["val_loss"])
    val_mean = val.groupby(["optimizer", "step"])["val_loss"].mean()
    final = pd.DataFrame(results).groupby("optimizer")
    reference = "adamw" if "adamw" in optimizers else None
    target = float(final["final_val_loss"].mean()[reference]) if reference else None
    ref_steps = None
    if reference:
        ref_curve = val_mean[reference]
        ref_steps = steps_to_reach(list(ref_curve.index), list(ref_curve.values), target)
    rows = []
    for name in optimizers:
        finals = final.get_group(name)["final_val_loss"]
        trains = final.get_group(name)["final_train_loss"]
        row = {"optimizer": name,
               "lr": study.run_config(name, conv.seeds[0]).optimizer.lr if name != "adamw"
               else None,
               "adamw_lr": study.run_config(name, conv.seeds[0]).optimizer.adamw_lr,
               "seeds": len(finals), "final_val_mean": float(finals.mean()),
               "final_val_std": float(finals.std(ddof=1)) if len(finals) > 1 else math.nan,
               "final_val_min": float(finals.min()), "final_val_max": float(finals.max()),
               "final_train_mean": float(trains.mean())}
        if target is not None:
            curve = val_mean[name]
            mean_steps = steps_to_reach(list(curve.index), list(curve.values), target)
            per_seed = []
            for seed, g in val[val["optimizer"] == name].groupby("seed"):
                per_seed.append(steps_to_reach(list(g["step"]), list(g["val_loss"]), target))
            row["steps_to_adamw_final"] = mean_steps
            row["steps_to_adamw_final_per_seed"] = ";".join(_fmt_steps(s) for s in per_seed)
            row["fraction_of_adamw_steps"] = (mean_steps / ref_steps if mean_steps is not None
                                              and ref_steps else None)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "final_val_loss.csv", index=False, float_format="%.5g")
    _plot(study, curves, optimizers, target, out / "loss_curves.png")
    summary = {"target_adamw_final_val_loss": target, "adamw_steps_to_own_final": ref_steps,
               "study_wall_s": wall_s, "runs": results, "table": rows}
    (out / "study.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    (out / "summary.md").write_text(_markdown(study, rows, target, ref_steps, wall_s, results))
    return summary


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value).__name__)


def _markdown(study: Study, rows: list[dict], target, ref_steps, wall_s, results) -> str:
    conv = study.convergence
    run = study.run_config(next(iter(conv.optimizers)), conv.seeds[0])

    def num(value, fmt: str) -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, fmt)

    lines = [f"# Convergence: {', '.join(r['optimizer'] for r in rows)}", "",
             f"Model {run.model.preset}, {run.train.steps} steps, batch {run.train.batch_size} "
             f"x {run.train.seq_len} bytes per rank, strategy {run.strategy.name}, seeds "
             f"{conv.seeds}, LR warmup {conv.lr_warmup_frac:g} / linear decay "
             f"{conv.lr_decay_frac:g} of the steps, validation every {conv.eval_every} steps on "
             f"{conv.eval_batches} fixed batches of {conv.eval_batch_size} x {run.train.seq_len}.",
             "", "| optimizer | matrix lr | adamw lr | final val loss (mean ± std) | min | max | "
             "steps to AdamW's final val loss | per seed | fraction of AdamW's steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {num(r['lr'], 'g')} | {num(r['adamw_lr'], 'g')} | "
                     f"{num(r['final_val_mean'], '.4f')} ± {num(r['final_val_std'], '.4f')} | "
                     f"{num(r['final_val_min'], '.4f')} | {num(r['final_val_max'], '.4f')} | "
                     f"{_fmt_steps(r.get('steps_to_adamw_final'))} | "
                     f"{r.get('steps_to_adamw_final_per_seed', '-')} | "
                     f"{num(r.get('fraction_of_adamw_steps'), '.3f')} |")
    lines.append("")
    lines.append("std is over seeds (ddof=1).")
    if target is not None:
        lines.append(f"Target: AdamW's final validation loss, mean over seeds = {target:.4f}. "
                     f"Steps are where each optimizer's seed-mean validation curve first reaches "
                     f"it, linearly interpolated between evaluation points (per seed: each seed's "
                     f"own curve). AdamW's own mean curve first reaches it at step "
                     f"{_fmt_steps(ref_steps)}, the denominator of the fraction.")
    if wall_s is not None:
        lines.append(f"Study wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min); per run "
                     + ", ".join(f"{r['optimizer']}-s{r['seed']} {r['wall_s']:.0f} s"
                                 for r in results) + " (training and evaluation only).")
    return "\n".join(lines) + "\n"


def _plot(study: Study, curves, optimizers: list[str], target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = study.convergence
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"normuon": "tab:red", "muon": "tab:blue", "adamw": "tab:green"}
    low, top = math.inf, -math.inf
    for name in optimizers:
        c = curves[curves["optimizer"] == name]
        train = c[c["step"] > 0].pivot(index="step", columns="seed", values="train_loss")
        train = train.rolling(conv.train_window, min_periods=1, center=True).mean()
        val = c.dropna(subset=["val_loss"]).pivot(index="step", columns="seed", values="val_loss")
        for ax, frame in ((ax_train, train), (ax_val, val)):
            ax.plot(frame.index, frame.mean(axis=1), color=colors.get(name), label=name)
            ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1),
                            color=colors.get(name), alpha=0.25, linewidth=0)
            low = min(low, float(frame.min(axis=1).min()))
        # The first steps fall from ln(256) = 5.5; show the range from where every optimizer is
        # after a tenth of training down to the best value, so the differences are visible.
        tenth = train.mean(axis=1).loc[max(1, int(0.1 * train.index.max())):]
        top = max(top, float(tenth.iloc[0]) + 0.1)
    for ax in (ax_train, ax_val):
        if math.isfinite(low) and math.isfinite(top) and top > low:
            ax.set_ylim(low - 0.05, top)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if target is not None:
        ax_val.axhline(target, color="gray", linestyle="--", linewidth=1,
                       label="AdamW final (mean)")
    ax_train.set_ylabel(f"train loss (nats/byte, centered {conv.train_window}-step mean)")
    ax_val.set_ylabel("validation loss (nats/byte)")
    ax_train.set_title("training loss: mean and min-max over seeds")
    ax_val.set_title(f"validation loss ({conv.eval_batches} fixed batches)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the LR sweep ------------------------------------------------------------------------------------

def sweep(study: Study, force: bool = False) -> list[dict]:
    """Run the LR grid (AdamW first, its best LR then used for the other optimizers' AdamW
    part) and write `<out_dir>/lr_sweep.csv`; returns its rows."""
    import pandas as pd

    conv = study.convergence
    grid = conv.sweep.lrs
    if not grid:
        raise _err("convergence.sweep.lrs", "is empty; list the learning rates to try per "
                                            "optimizer")
    runs_dir = Path(conv.out_dir) / "sweep"
    order = (["adamw"] if "adamw" in grid else []) + [n for n in grid if n != "adamw"]
    rows: list[dict] = []
    adamw_lr = None
    for phase in ([order[:1], order[1:]] if order[0] == "adamw" else [order]):
        jobs = []
        for name in phase:
            for lr in grid[name]:
                sets = {f"optimizer.{LR_KEY[name]}": lr, "train.steps": conv.sweep.steps}
                if adamw_lr is not None and name != "adamw":
                    sets["optimizer.adamw_lr"] = adamw_lr
                run_name = f"{name}-lr{lr:g}-s{conv.sweep.seed}"
                config = study.run_config(name, conv.sweep.seed, sets, run_name, runs_dir)
                jobs.append(_Job(run_name, name, conv.sweep.seed, config,
                                 (runs_dir / run_name).resolve(), _spec(config, conv)))
        failed = run_grid(jobs, conv, force)
        if failed:
            raise RuntimeError(f"sweep runs failed: {', '.join(failed)}")
        for job in jobs:
            result = json.loads((job.run_dir / RESULT_FILE).read_text())
            rows.append({"optimizer": job.optimizer, "swept_key": f"optimizer.{LR_KEY[job.optimizer]}",
                         "lr": job.config.optimizer.lr if job.optimizer != "adamw" else None,
                         "adamw_lr": job.config.optimizer.adamw_lr, "steps": result["steps"],
                         "seed": job.seed, "final_val_loss": result["final_val_loss"],
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
    out = Path(conv.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "lr_sweep.csv", index=False, float_format="%.5g")
    return table.to_dict("records")


# --- command line ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="study config (e.g. launch/configs/convergence.yaml)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+",
                        action="extend", default=[],
                        help="override keys, value parsed as YAML: run keys as in `dist-ortho "
                             "run` (train.steps=100), study keys as convergence.<key> "
                             "(convergence.seeds=[0])")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="run the LR sweep of convergence.sweep and write lr_sweep.csv")
    mode.add_argument("--analyze", action="store_true",
                      help="only redo the tables and plot from finished runs")
    parser.add_argument("--force", action="store_true",
                        help="rerun runs that already finished with the same settings")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    import signal

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0"
                        else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    # SIGTERM unwinds like Ctrl-C, so run_grid stops the runs it started
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    from dist_ortho.config import ConfigError

    if args.worker is not None:
        return _worker(args.worker)
    if args.config is None:
        print("dist-ortho convergence: a study config is required, e.g. "
              "launch/configs/convergence.yaml", file=sys.stderr)
        return 2
    try:
        study = load_study(args.config, args.overrides)
        if args.sweep:
            rows = sweep(study, args.force)
            for r in rows:
                lr = r["adamw_lr"] if r["optimizer"] == "adamw" else r["lr"]
                log.info("sweep %-8s %s=%-8g final val %.4f%s", r["optimizer"], r["swept_key"],
                         lr, r["final_val_loss"], "  <- best" if r["best"] else "")
            return 0
        jobs = study_jobs(study)
        wall = None
        if not args.analyze:
            started = time.perf_counter()
            failed = run_grid(jobs, study.convergence, args.force)
            wall = time.perf_counter() - started
            if failed:
                log.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
                return 1
        else:
            missing = [j.name for j in jobs if not _is_done(j)]
            if missing:
                raise _err("", f"--analyze needs finished runs; missing or stale: "
                               f"{', '.join(missing)}")
            previous = Path(study.convergence.out_dir) / "study.json"
            if previous.is_file():
                wall = json.loads(previous.read_text()).get("study_wall_s")
        analyze(study, jobs, wall)
        print((Path(study.convergence.out_dir) / "summary.md").read_text(), end="")
        return 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def _standalone() -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_ortho.convergence",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_standalone())
