"""One convergence run: the `dist_ortho.studies.run` loop plus a schedule, a loss curve and
validation.

The training itself is `dist_ortho.studies.run` (`build_run`, `train`, `finish`): a GPT preset
wrapped with FSDP2's `fully_shard`, hidden matrices stepped by the named optimizer (NorMuon, Muon,
or AdamW), embeddings, head and norms always by AdamW, any orthogonalization strategy, any world
size. This module adds three callbacks to that loop:
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
next to what `dist_ortho.studies.run` writes (metrics, config, DONE).

`worker(config_path)` is one run's process (every rank under torchrun): the job runner launches
`python -m dist_ortho.studies.convergence --worker <config.yaml>`, and the convergence settings come
from the run directory's job.json (`dist_ortho.studies.jobs`).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ortho import models
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.schema import build
from dist_ortho.studies.config import ConfigError, load_config
from dist_ortho.studies.convergence.config import ConvergenceConfig
from dist_ortho.studies.data import build_loader
from dist_ortho.studies.faults import from_sources
from dist_ortho.studies.jobs import JOB_FILE
from dist_ortho.studies.run import LogProgress, build_run, close, finish, train

__all__ = ["lr_scale", "validation_batches", "evaluate", "Curve", "train_with_curve", "worker",
           "CURVE_FILE", "RESULT_FILE"]

CURVE_FILE = "curve.csv"
RESULT_FILE = "result.json"


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
    if global_batch % world_size:
        raise ConfigError("convergence.eval_batch_size",
                          f"{global_batch} is not divisible by the world size {world_size}; "
                          f"pick a multiple of it")
    loader = build_loader(data, "val", global_batch // world_size, seq_len, seed=seed, rank=rank,
                          world_size=world_size, device=device)
    return [loader.batch_at(i) for i in range(count)]


def evaluate(model, batches, world_size: int) -> float:
    """Mean loss over the fixed batches and all ranks (equal-size shards: mean of means)."""
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


def train_with_curve(config, conv: ConvergenceConfig, write: bool = True,
                     faults=None) -> Curve:
    """Train one run of `config` with `dist_ortho.studies.run`, recording its curve; on rank 0 write
    curve.csv and result.json into the run directory (with `write`) before `finish` marks it
    DONE. Reuses the caller's process group if there is one."""
    if models.is_shape_only(config.model.preset):
        raise ConfigError("run.model.preset", f"{config.model.preset!r} is a shape-only model; "
                                              f"a convergence run needs a GPT preset")
    state = build_run(config, faults)
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
    rows = curve.rows()
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / CURVE_FILE, buffer.getvalue())


def worker(config_path: str | Path) -> int:
    """One run's process (every rank under torchrun): the run config from `config_path`, the
    convergence settings from the run directory's job.json; train, write, finish."""
    config = load_config(config_path)
    run_dir = Path(config.output.dir) / str(config.output.name)
    settings = json.loads((run_dir / JOB_FILE).read_text())["settings"]
    conv = build(ConvergenceConfig, settings, "convergence")
    train_with_curve(config, conv, faults=from_sources())
    return 0
