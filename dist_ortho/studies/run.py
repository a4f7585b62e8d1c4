"""One profiled run: FSDP2 model, NorMuon with a chosen strategy, a fixed number of steps.

    torchrun --nproc_per_node=4 -m dist_ortho run launch/configs/base.yaml -o results/latest/base
    dist-ortho run launch/configs/tiny.yaml -o results/latest/tiny   # one process, no torchrun

What happens, on every rank:
0. Checks. The config is checked again, "auto" choices are resolved, and everything
   `dist_ortho.studies.preflight.check_launch` knows (the strategy's plan for the model's matrices,
   the testing aids against the world size: WORLD_SIZE under torchrun) is checked, all before the
   process group starts; the model, the optimizers and the loader are built before the first
   collective. So a config error is raised identically on every rank and never leaves one rank
   waiting on another; rank 0 prints it as one line, exit 2 (`launch/run.sh` runs `--check` first).
1. Process group. Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) from the environment; without
   it, a one-rank group on an in-memory store, so the code path is the same at every world size.
   Backend and device follow the hardware: CUDA device LOCAL_RANK with nccl, else CPU with gloo and
   one thread per rank (ranks share cores; timings are for comparing strategies, not absolute);
   `dist.backend: gloo` keeps the ranks on the CPU on a GPU machine too (`run_device_type`).
   `dist.timeout_s` is the timeout of the default group, which the FSDP mesh, the optimizers and
   checkpoints all use: a collective that waits longer fails (gloo raises; NCCL's watchdog tears
   the process down, TORCH_NCCL_ASYNC_ERROR_HANDLING=3 when unset, waits stay asynchronous), the
   rank exits non-zero and torchrun stops the others: a rank that dies or hangs ends the job
   within about `dist.timeout_s` (a dead one usually at once).
2. Model. Each block (GPT) or layer (shape-only) and then the root are wrapped with `fully_shard`
   on a 1-D mesh over all ranks (with train.replicate, HSDP's 2-D mesh:
   `dist_ortho.studies.run_mesh`). GPT weights are drawn from the seeded global RNG before sharding;
   shape-only models are built on the meta device and filled per parameter after sharding (their
   values do not depend on the world size).
3. Optimizers: `build_optimizers` (NorMuon/Muon for hidden matrices, AdamW for the rest) with the
   configured strategy deciding where each matrix is orthogonalized.
4. Resume (with `checkpoint.resume`, or `--resume`): the latest complete checkpoint in
   `checkpoint.dir` is loaded (model, optimizers, RNG, data position) and the run continues at
   the next step up to `train.steps`; with none there the run starts at step 0 and says so.
   Shape-only gradients are drawn from (seed, step), so a resumed run continues the same stream.
5. Steps, each under the profiler and with its true index: GPT presets train on their own shard
   of the global batch (forward_backward phase), shape-only presets get reproducible synthetic
   gradients (grads phase); then optional clipping and the optimizer step (optimizer phase). A
   NaN/Inf gradient on any rank skips the whole step on every rank (`optimizer.nonfinite: skip`,
   counted in the profiler's `skipped` rows, run.json and the log) or raises (`raise`). Rank 0
   logs the loss averaged over ranks every `train.log_every` steps. The first `warmup_steps`
   steps of a process (a fresh or a resumed one) are marked warm-up, keeping at least one
   measured step. With `checkpoint.dir`, a checkpoint is saved every `checkpoint.every` steps.
6. Output in `<output.dir>/<output.name>/`: the final checkpoint (with `checkpoint.dir`), then
   metrics.csv (profiler: the steps this process ran), trace.json and gantt.png (every rank's
   timeline, `dist_ortho.studies.run_timeline`, which also emulates a cluster's links on request),
   the resolved config and environment, run.json, and DONE last, each written atomically. At the
   start rank 0 removes DONE and an earlier run's result files there.

Testing aids (`dist_ortho.studies.faults`; never part of the config or its hash) reach the loop only
as `RunState.hooks`; checkpoint glue lives in `dist_ortho.studies.run_checkpoint`. The loop is
`build_run(config)
-> RunState`, `train(state, steps, callbacks)`, `finish(state)`, `close(state)`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import fully_shard

from dist_ortho import models, strategies
from dist_ortho.core.commands import add_grammar, run_command
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.schema import to_dict
from dist_ortho.optim.optimizer import Muon, NorMuon
from dist_ortho.optim.param_groups import build_optimizers
from dist_ortho.profiling import Profiler, ProfilerConfig
from dist_ortho.profiling.env import environment, write_run_metadata
from dist_ortho.studies import run_checkpoint as ckpt_run
from dist_ortho.studies import run_mesh, run_timeline
from dist_ortho.studies.config import (Config, ConfigError, config_from_dict, config_hash,
                                       dump_config, load_config, resolve, run_device_type)
from dist_ortho.studies.data import build_loader
from dist_ortho.studies.faults import FaultConfig, FaultInjector, from_sources
from dist_ortho.studies.jobs import DONE_FILE, read_done, run_as_rank, write_done
from dist_ortho.studies.phase_marker import PhaseMarker, Tee
from dist_ortho.studies.preflight import check_launch, writable_dir

__all__ = ["RunState", "StepOutput", "Callback", "LogProgress", "init_distributed",
           "build_sharded_model", "build_run", "train_step", "train", "finish", "close", "run",
           "add_arguments", "main", "DONE_FILE", "RESULT_FILES", "read_done"]

log = logging.getLogger("dist_ortho.studies.run")
# what an earlier run in the same folder may have left; removed when a run starts
RESULT_FILES = ("metrics.csv", "collectives.csv", "metrics.parquet", "collectives.parquet",
                "run.json", *run_timeline.RESULT_FILES)


# --- process group ------------------------------------------------------------------------------

def _pick_device(config: Config) -> torch.device:
    if run_device_type(config) == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError("dist.backend", f"local rank {local_rank} has no GPU: "
                              f"{torch.cuda.device_count()} visible; start at most one rank per "
                              f"GPU (torchrun --nproc_per_node), or use gloo for CPU ranks")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(config: Config) -> tuple[torch.device, bool]:
    """Start (or reuse) the default process group; returns (device, whether we started it)."""
    device = _pick_device(config)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if dist.is_initialized():
        return device, False
    backend = resolve(config, device.type).dist.backend
    timeout = timedelta(seconds=config.dist.timeout_s)
    if backend == "nccl":
        _nccl_error_handling()
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:  # a plain `dist-ortho run`: one rank, nothing to rendezvous with
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout, **kwargs)
    return device, True


def _nccl_error_handling() -> None:
    """A timed-out NCCL collective is caught by the watchdog thread, not by the waiting Python
    code; mode 3 (torch's default) has the watchdog tear the process down, so the rank exits and
    torchrun stops the job. Set it when unset; warn when it was set to a mode that keeps a timed-out
    process alive (0: ignore, 2: abort the communicator only)."""
    mode = os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if mode.strip() in ("0", "2"):
        log.warning("TORCH_NCCL_ASYNC_ERROR_HANDLING=%s: a collective that exceeds dist.timeout_s "
                    "will not end this process; unset it (or use 1 or 3) so a hung rank ends "
                    "the job", mode)


def _launch_world_size() -> int:
    """The world size this process will join: the live group's, torchrun's WORLD_SIZE, or 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return 1


# --- model --------------------------------------------------------------------------------------

def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name in ("blocks", "layers"):
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no `blocks` or `layers` ModuleList: a run wraps "
                     f"each block with FSDP2's fully_shard, so the model needs one of them")


def build_sharded_model(config: Config, device: torch.device, mesh) -> torch.nn.Module:
    """The configured preset, each block and the root wrapped with FSDP2's `fully_shard`."""
    preset = config.model.preset
    shape_only = models.is_shape_only(preset)
    dtype = getattr(torch, config.model.dtype)
    overrides = models.depth_override(preset, config.model.num_layers)
    if shape_only:  # values are drawn per parameter after sharding: nothing big exists twice
        model = models.build_model(preset, device="meta", dtype=dtype, seed=config.train.seed,
                                   **overrides)
    else:  # every rank draws the same full weights from the same seed, then keeps its rows
        torch.manual_seed(config.train.seed)
        model = models.build_model(preset, device=device, dtype=dtype, **overrides)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if shape_only:
        model.to_empty(device=device)
        model.reset_parameters()
    return model


# --- run state ----------------------------------------------------------------------------------

@dataclass
class StepOutput:
    step: int  # index of the step just taken (0-based)
    loss: torch.Tensor | None  # this rank's loss, detached; None for shape-only models
    seconds: float  # wall time of the step on this rank


Callback = Callable[["RunState", StepOutput], None]


@dataclass
class RunState:
    """Everything a loop needs; `step` counts the steps taken so far."""

    config: Config  # resolved: ns_dtype, backend and output.name are what this run uses
    config_hash: str
    device: torch.device
    rank: int
    world_size: int
    mesh: object
    model: torch.nn.Module
    optimizer: object  # dist_ortho.optim.param_groups.CombinedOptimizer
    loader: object | None  # None for shape-only models
    profiler: object
    out_dir: Path
    owns_process_group: bool = False
    step: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_loss: float | None = None  # rank-averaged loss at the last log step
    first_step: int = 0  # the step this process started at (the checkpoint's, when resumed)
    resumed_from: int | None = None  # the checkpoint step loaded, None for a fresh start
    last_checkpoint_step: int | None = None  # the step of the last checkpoint saved or loaded
    skipped_steps: list[int] = field(default_factory=list)  # steps skipped for NaN/Inf grads
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step done, logged loss)
    # objects with before_step(state, step), after_gradients(state, step) and
    # before_save(state, step), e.g. the testing aids of dist_ortho.studies.faults
    hooks: list = field(default_factory=list)
    faults: FaultConfig | None = None  # the testing aids active in this run (recorded in run.json)
    scheduler: object | None = None  # an LR scheduler stepped after every optimizer step; saved
    saver: object | None = None  # an async_save.AsyncSaver with checkpoint.async_save
    # PhaseTimers that also see the loop's and the checkpoints' phases (`for_checkpoint(step)`):
    # the rank's PhaseMarker (dist_ortho.studies.phase_marker) and the testing aids
    markers: list = field(default_factory=list)
    timer: object | None = None  # Tee(profiler, *markers): the loop's phases

    @property
    def shape_only(self) -> bool:
        return self.loader is None

    def is_warmup(self, step: int) -> bool:
        """Warm-up (left out of timings): the first `train.warmup_steps` steps of this process,
        counted from where it started, but never the last step of the run."""
        cfg = self.config.train
        end = max(cfg.warmup_steps, min(self.first_step + cfg.warmup_steps, cfg.steps - 1))
        return step < end


def _matrix_optimizers(optimizer) -> list:
    return [o for o in optimizer.optimizers if isinstance(o, (Muon, NorMuon))]


def run_facts(state: RunState) -> dict:
    """What the report needs beyond the metrics: matrix sizes, the plan's predictions per rank."""
    facts = {"run": state.out_dir.name, "model": state.config.model.preset,
             "strategy": state.config.strategy.name, "strategy_options": state.config.strategy.options,
             "world_size": state.world_size, "config_hash": state.config_hash,
             "shape_only": state.shape_only, "steps": state.step,
             "warmup_steps": state.config.train.warmup_steps,
             "first_step": state.first_step, "resumed_from": state.resumed_from,
             "skipped_steps": list(state.skipped_steps),
             "losses": [list(x) for x in state.losses],
             "last_checkpoint_step": state.last_checkpoint_step,
             "parameters": models.count_parameters(state.model), "matrix_numel": 0,
             "matrix_count": 0, "matrix_itemsize": None, "ns_itemsize": None,
             "predicted_ns_flops_per_rank": [], "predicted_send_bytes_per_rank": [],
             "predicted_recv_bytes_per_rank": [], "final_loss": state.last_loss,
             "wall_seconds": time.perf_counter() - state.started,
             # other processes competing for the CPU show up here, not in the timings' spread
             "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
             "faults": to_dict(state.faults) if state.faults is not None else None}
    flops = [0] * state.world_size
    send = [0.0] * state.world_size
    recv = [0.0] * state.world_size
    for opt in _matrix_optimizers(state.optimizer):
        params = [p for g in opt.param_groups for p in g["params"]]
        facts["matrix_numel"] += sum(p.numel() for p in params)
        facts["matrix_count"] += len(params)
        facts["matrix_itemsize"] = params[0].element_size()
        plan = opt.plan()
        facts["ns_itemsize"] = plan.matrices[0].out_dtype.itemsize
        for r, cost in enumerate(plan.ranks):
            flops[r] += cost.ns_flops
            send[r] += cost.send_bytes
            recv[r] += cost.recv_bytes
    facts["predicted_ns_flops_per_rank"] = flops
    facts["predicted_send_bytes_per_rank"] = send
    facts["predicted_recv_bytes_per_rank"] = recv
    return facts | run_mesh.axis_facts(state)


def build_run(config: Config, faults: FaultConfig | None = None) -> RunState:
    """Process group, sharded model, optimizers, data and profiler for `config`; with
    `checkpoint.resume`, also the latest checkpoint (the run's first collective). `faults`: the
    testing aids (`dist_ortho.studies.faults`), active when they apply to this run's name. Config
    errors (ConfigError) are raised before any collective, on every rank alike."""
    # checks that need no process group: identical on every rank (same file, same overrides)
    config = config_from_dict(config.to_dict())
    check_launch(config, _launch_world_size(), faults, run_device_type(config))
    strategy = strategies.build(config.strategy.name, **config.strategy.options)

    device, owns = init_distributed(config)
    try:
        state = run_timeline.start_emulation(_build(config, strategy, device, owns, faults))
        if config.checkpoint.resume:
            ckpt_run.resume_run(state)
    except ConfigError:
        # raised on every rank alike, with no collective pending: safe to end the group here
        if owns and dist.is_initialized():
            dist.destroy_process_group()
        raise
    return state


def _build(config: Config, strategy, device: torch.device, owns: bool,
           faults: FaultConfig | None) -> RunState:
    """The part of `build_run` after the process group starts; it issues no collective (FSDP2's
    `fully_shard` and the optimizers' plans do not communicate), so an error raised here cannot
    leave another rank waiting."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = resolve(config, device.type)
    if config.output.name is None:
        config.output.name = f"{config.run_name}-p{world_size}"
    digest = config_hash(config)
    mesh = run_mesh.build_mesh(device.type, world_size, config.train.replicate)
    model = build_sharded_model(config, device, mesh)
    active = faults if faults is not None and faults.applies_to(config.output.name) else None
    hooks = [FaultInjector(active, model, rank, world_size)] if active is not None else []
    out_dir = Path(config.output.dir) / config.output.name
    optimizer = build_optimizers(model, config.optimizer, strategy)
    loader = None
    if not models.is_shape_only(config.model.preset):
        loader = build_loader(config.train.data, "train", config.train.batch_size,
                              config.train.seq_len, seed=config.train.seed, rank=rank,
                              world_size=world_size, vocab_size=model.config.vocab_size,
                              device=device)
    prof_cfg = config.profiling
    profiler = Profiler(ProfilerConfig(enabled=prof_cfg.enabled, memory=prof_cfg.memory,
                                       trace_step=prof_cfg.trace_step,
                                       instrument_every=prof_cfg.instrument_every),
                        run_info={"strategy": config.strategy.name, "world_size": world_size,
                                  "model": config.model.preset, "config_hash": digest,
                                  "run": config.output.name},
                        device=device, group=None)
    profiler.attach(optimizer)
    # where this rank is, readable after it died (jobs.first_error), and the testing aids: they
    # see every phase the profiler sees, and the checkpoints' phases
    markers = [PhaseMarker(out_dir, rank), run_timeline.timeline(config, rank), *hooks]
    for opt in _matrix_optimizers(optimizer):
        opt.set_timer(Tee(opt.timer, *markers))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # this run is not complete until it says so: DONE first, then what an earlier run left
        (out_dir / DONE_FILE).unlink(missing_ok=True)
        for name in RESULT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    return RunState(config, digest, device, rank, world_size, mesh, model, optimizer, loader,
                    profiler, out_dir, owns_process_group=owns, hooks=hooks, faults=active,
                    saver=ckpt_run.make_saver(config), markers=markers,
                    timer=Tee(profiler, *markers))


# --- the loop -----------------------------------------------------------------------------------

def train_step(state: RunState, warmup: bool | None = None) -> StepOutput:
    """One profiled step: gradients (real or synthetic), hooks, optional clipping, optimizer step.
    `warmup` marks the step as warm-up for the profiler (default: `state.is_warmup`)."""
    cfg, prof, step = state.config, state.profiler, state.step
    timer = state.timer if state.timer is not None else prof
    marks = Tee(*state.markers)  # unprofiled sub-phases: forward, backward
    for marker in state.markers:
        if hasattr(marker, "before_step"):
            marker.before_step(state, step)
        else:
            marker.step = step
    start = time.perf_counter()
    loss = None
    with prof.step(step, warmup=state.is_warmup(step) if warmup is None else warmup):
        if state.shape_only:
            with timer.phase("grads"):
                models.synthetic_grads(state.model, step, cfg.train.seed)
        else:
            x, y = state.loader.batch_at(step)
            with timer.phase("forward_backward"):
                with marks.phase("forward"):
                    _, loss = state.model(x, y)
                with marks.phase("backward"):
                    loss.backward()
        for hook in state.hooks:
            hook.after_gradients(state, step)
        if cfg.train.grad_clip is not None:
            with timer.phase("grad_clip"):
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip)
        with timer.phase("optimizer"):
            # every optimizer or none: a NaN/Inf gradient on any rank skips the step (one
            # all-reduce decides; see dist_ortho.optim.param_groups.CombinedOptimizer)
            state.optimizer.step()
            stepped = not state.optimizer.last_step_skipped
            if state.scheduler is not None:
                state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    if not stepped:
        state.skipped_steps.append(step)
    if state.loader is not None:
        state.loader.step = step + 1
    state.step += 1
    return StepOutput(step, None if loss is None else loss.detach(), time.perf_counter() - start)


class LogProgress:
    """Rank 0 logs the step, the loss averaged over ranks (one all-reduce, outside the profiled
    step) and the step time, every `every` steps and at the last step."""

    def __init__(self, every: int, total: int) -> None:
        self.every, self.total = every, total

    def __call__(self, state: RunState, out: StepOutput) -> None:
        done = out.step + 1
        if done % self.every and done != self.total:
            return
        text = f"step {done}/{self.total} | {out.seconds:.3f} s/step"
        if out.loss is not None:
            loss = out.loss.float().reshape(1).clone()
            if state.world_size > 1:
                dist.all_reduce(loss)
            state.last_loss = loss.item() / state.world_size
            state.losses.append((done, state.last_loss))
            if not math.isfinite(state.last_loss):
                log.warning("loss is %s at step %d", state.last_loss, done)
            text = f"step {done}/{self.total} | loss {state.last_loss:.4f} | {out.seconds:.3f} s/step"
        if state.rank == 0:
            log.info(text)


def train(state: RunState, steps: int | None = None,
          callbacks: Sequence[Callback] = ()) -> RunState:
    """Take `steps` steps (default: up to train.steps), calling each callback after each step on
    every rank (a callback may issue collectives), then saving a checkpoint when one is due
    (checkpoint.dir set and the step count a multiple of checkpoint.every)."""
    steps = state.config.train.steps - state.step if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train(): steps is the number of steps to take, an integer >= 0, got "
                         f"{steps!r} (the run is at step {state.step} of train.steps="
                         f"{state.config.train.steps})")
    for _ in range(steps):
        out = train_step(state)
        for callback in callbacks:
            callback(state, out)
        if state.saver is not None:
            state.saver.check()  # a background save that failed stops the run here
        if ckpt_run.save_due(state):
            ckpt_run.save_run(state)
    return state


def finish(state: RunState) -> Path:
    """Save the final checkpoint (with checkpoint.dir, unless this step is saved already), write
    metrics (collective), metadata and run.json, then DONE last; returns the run dir."""
    if state.config.checkpoint.dir is not None and state.last_checkpoint_step != state.step:
        ckpt_run.save_run(state)
    if state.saver is not None:
        state.saver.wait()  # the final checkpoint is complete before DONE says so
    if state.rank == 0 and state.skipped_steps:
        log.warning("%d step(s) skipped for non-finite gradients: %s", len(state.skipped_steps),
                    state.skipped_steps)
    state.profiler.write(state.out_dir)
    run_timeline.write(state)  # trace.json, gantt.png
    facts = run_facts(state)
    if state.rank == 0:
        env = environment(state.config.dist.backend, state.device, state.world_size)
        write_run_metadata(state.out_dir, state.config.to_dict(), env)
        atomic_write_text(state.out_dir / "run.json",
                          json.dumps(facts, indent=2, default=str) + "\n")
    dist.barrier()  # every rank's files (traces) are written before DONE says so
    if state.rank == 0:
        write_done(state.out_dir, {"config_hash": state.config_hash,
                                   "world_size": state.world_size, "steps": state.step,
                                   "resumed_from": state.resumed_from,
                                   "skipped_steps": len(state.skipped_steps),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return state.out_dir


def close(state: RunState) -> None:
    """Release the run: detach the profiler, drop the model, optimizer and data, collect garbage,
    then destroy the process group if `build_run` started it. Reference cycles (optimizer <->
    profiler, FSDP hooks) would otherwise survive until interpreter shutdown, and gloo work and
    tensors freed that late can abort the process after it has finished its job."""
    owns = state.owns_process_group
    if state.saver is not None:
        state.saver.close()
    state.profiler.detach()
    for opt in _matrix_optimizers(state.optimizer):
        opt.set_timer(None)
    for hook in [*state.hooks, *state.markers]:
        getattr(hook, "close", lambda: None)()
    state.model = state.optimizer = state.loader = state.profiler = state.scheduler = None
    state.hooks, state.markers, state.saver, state.timer = [], [], None, None
    state.owns_process_group = False
    gc.collect()
    if owns and dist.is_initialized():
        dist.destroy_process_group()


def run(config: Config, faults: FaultConfig | None = None) -> Path:
    """build_run + train + finish + close. After a failure the process group is left alone (as
    torchtitan does): destroying it while other ranks wait in a collective can hang; the process
    exits with the error and torchrun stops the other ranks."""
    state = build_run(config, faults)
    if state.rank == 0:
        log.info("run %s: %s on %d rank(s) of %s, strategy %s, ns_dtype %s, config %s%s",
                 state.config.output.name, state.config.model.preset, state.world_size,
                 state.device.type, state.config.strategy.name,
                 state.config.optimizer.ns_dtype, state.config_hash,
                 f", from step {state.step}" if state.step else "")
    try:
        train(state, callbacks=[LogProgress(state.config.train.log_every,
                                            state.config.train.steps)])
        out = finish(state)
    except Exception as exc:
        # every rank says where it stopped; a collective error usually means another rank died
        # or hung, and torchrun's summary names the rank that failed first
        log.error("rank %d of %d stopped at step %d%s: %s: %s (collectives time out after "
                  "dist.timeout_s=%g s)", state.rank, state.world_size, state.step,
                  _where(state), type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "", state.config.dist.timeout_s)
        raise
    if state.rank == 0:
        log.info("wrote %s", out)
    close(state)
    return out


def _where(state: RunState) -> str:
    """ in <phase path>: where the main thread was when it failed (from its PhaseMarker)."""
    for marker in state.markers:
        if isinstance(marker, PhaseMarker):
            place = marker.where()
            return f" in {place}" if place else ""
    return ""


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grammar(parser, config="YAML config (default: built-in defaults, model gpt-tiny)",
                overrides="override a config key, e.g. --set optimizer.lr=0.01",
                out="output folder (sets output.dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in checkpoint.dir (sets "
                             "checkpoint.resume=true; with none there, start from step 0)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config for this machine and exit")
    parser.add_argument("--check", action="store_true",
                        help="check the config and the launch at the world size torchrun will "
                             "start (WORLD_SIZE, default 1), then exit: what launch/run.sh does "
                             "before it starts torchrun")
    parser.add_argument("--fault", metavar="KEY=VALUE", action="append", default=[],
                        help="testing aid (see dist_ortho.studies.faults), repeatable, e.g. "
                             "--fault fail_step=3 --fault fail_rank=1 --fault fail_mode=kill")


def main(args: argparse.Namespace) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    overrides = list(args.overrides)
    if getattr(args, "out", None) is not None:
        overrides.append(f"output.dir={args.out}")
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")
    # under torchrun, `record` writes a failing rank's traceback where torchrun's report finds it
    entry = record(run_as_rank) if "TORCHELASTIC_ERROR_FILE" in os.environ else run_as_rank
    return entry("run", lambda: _main(args, overrides))


def _main(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    faults = from_sources(getattr(args, "fault", []))
    if args.print_config:
        resolved = resolve(config, run_device_type(config))
        print(dump_config(resolved), end="")
        print(f"# config_hash: {config_hash(resolved)}")
        return 0
    check_launch(config, _launch_world_size(), faults)  # before anything is created
    writable_dir(config.output.dir, "output.dir")
    if config.checkpoint.dir is not None:
        writable_dir(config.checkpoint.dir, "checkpoint.dir")
        ckpt_run.precheck_resume(config, _launch_world_size())
    if getattr(args, "check", False):
        return 0
    run(config, faults)
    return 0


if __name__ == "__main__":  # `python -m dist_ortho.studies.run`: the same as `dist-ortho run`
    _parser = argparse.ArgumentParser(prog="python -m dist_ortho.studies.run",
                                      description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(run_command("run", main, _parser.parse_args(), sigterm=False))
