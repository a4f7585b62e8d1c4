"""One profiled run: FSDP2 model, NorMuon with a chosen strategy, a fixed number of steps.

    torchrun --nproc_per_node=4 -m dist_ortho.run --config launch/configs/base.yaml \\
        --set strategy.name=balanced optimizer.lr=0.01
    python -m dist_ortho.run --config launch/configs/tiny.yaml      # one process, no torchrun
    torchrun ... -m dist_ortho.run --config c.yaml --set checkpoint.dir=ckpt checkpoint.every=100
    torchrun ... -m dist_ortho.run --config c.yaml --set checkpoint.dir=ckpt --resume

What happens, on every rank:
0. Checks. The config is checked again, "auto" choices are resolved, the strategy options are
   built, and the testing aids' ranks are compared with the world size (WORLD_SIZE under
   torchrun), all before the process group starts; the model, the optimizers (whose plans check
   every matrix against the strategy) and the loader are built before the first collective. So a
   config error is raised identically on every rank and never leaves one rank waiting on another.
1. Process group. Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) from the environment; without
   it, a one-rank group on an in-memory store, so the code path is the same at every world size.
   Backend and device follow the hardware: CUDA device LOCAL_RANK with nccl, else CPU with gloo and
   one thread per rank (ranks share cores; timings are for comparing strategies, not absolute).
   `dist.timeout_s` is the timeout of the default group, which the FSDP mesh, the optimizers and
   checkpoints all use: a collective that waits longer fails. Gloo raises on the waiting ranks;
   NCCL's watchdog tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, set when unset;
   TORCH_NCCL_BLOCKING_WAIT is left off, so waits stay asynchronous and overlap is kept). Either
   way the failing rank exits non-zero and torchrun stops the others, so a rank that dies or hangs
   ends the job within about `dist.timeout_s` (a dead rank usually at once: torchrun sees its exit
   and gloo sees the closed connection).
2. Model. Each block (GPT) or layer (shape-only) and then the root are wrapped with `fully_shard`
   on a 1-D mesh over all ranks, so every weight matrix is row-sharded across ranks. GPT weights
   are drawn from the seeded global RNG before sharding; shape-only models are built on the meta
   device and filled per parameter after sharding (their values do not depend on the world size).
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
   metrics.csv (profiler: the steps this process ran), the resolved config and the environment,
   run.json (what the model and plan look like), and DONE last, each written atomically, so a
   sweep knows the run is complete. At the start rank 0 removes DONE and the result files of an
   earlier run in that folder, so a run killed midway leaves nothing that reads as complete.

Testing aids (train.inject_nan_*, train.fault_*; off by default): one rank writes a NaN into its
gradient shard at a given step, or kills itself (SIGKILL), hangs, or is killed as it enters a
checkpoint save, so the behaviour above can be checked end to end through torchrun.

The loop is split into `build_run(config) -> RunState`, `train(state, steps, callbacks)`,
`finish(state)` and `close(state)`, so a convergence study or checkpoint/resume can reuse it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ortho import models
from dist_ortho.config import (Config, ConfigError, config_hash, default_device_type, load_config,
                               resolve)

__all__ = ["RunState", "StepOutput", "Callback", "LogProgress", "init_distributed",
           "build_sharded_model", "build_run", "train_step", "train", "save_checkpoint", "finish",
           "close", "run", "add_arguments", "main", "DONE_FILE", "RESULT_FILES", "read_done"]

log = logging.getLogger("dist_ortho.run")
DONE_FILE = "DONE"
# what an earlier run in the same folder may have left; removed when a run starts
RESULT_FILES = ("metrics.csv", "collectives.csv", "metrics.parquet", "collectives.parquet",
                "run.json")


# --- process group ------------------------------------------------------------------------------

def _pick_device() -> torch.device:
    if default_device_type() == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(config: Config) -> tuple[torch.device, bool]:
    """Start (or reuse) the default process group; returns (device, whether we started it)."""
    device = _pick_device()
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
    else:  # a plain `python -m dist_ortho.run`: one rank, nothing to rendezvous with
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


def _check_world_size(config: Config, world_size: int) -> None:
    """Checks that need the world size; the same on every rank, and done before any collective."""
    train = config.train
    for key, used in (("inject_nan_rank", train.inject_nan_step is not None),
                      ("fault_rank", train.fault_step is not None)):
        rank = getattr(train, key)
        if used and rank >= world_size:
            raise ConfigError(f"train.{key}", f"is {rank}, but this run has {world_size} rank(s) "
                                              f"(0..{world_size - 1})")


# --- model --------------------------------------------------------------------------------------

def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name in ("blocks", "layers"):
        if isinstance(getattr(model, name, None), torch.nn.ModuleList):
            return getattr(model, name)
    raise AssertionError(f"{type(model).__name__} has no `blocks` or `layers` ModuleList to shard")


def build_sharded_model(config: Config, device: torch.device, mesh) -> torch.nn.Module:
    """The configured preset, each block and the root wrapped with FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import fully_shard

    preset = config.model.preset
    shape_only = models.is_shape_only(preset)
    dtype = getattr(torch, config.model.dtype)
    overrides = {}
    if config.model.num_layers is not None:
        overrides["num_layers" if shape_only else "n_layers"] = config.model.num_layers
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
    optimizer: object  # dist_ortho.param_groups.CombinedOptimizer
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
    nan_target: tuple[str, torch.Tensor] | None = None  # testing aid: where a NaN is written

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
    from dist_ortho.optimizer import Muon, NorMuon

    return [o for o in optimizer.optimizers if isinstance(o, (Muon, NorMuon))]


def run_facts(state: RunState) -> dict:
    """What the report needs beyond the metrics: matrix sizes and the plan's per-rank predictions."""
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
             "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    flops = [0] * state.world_size
    send = [0.0] * state.world_size
    recv = [0.0] * state.world_size
    for opt in _matrix_optimizers(state.optimizer):
        params = [p for g in opt.param_groups for p in g["params"]]
        facts["matrix_numel"] += sum(p.numel() for p in params)
        facts["matrix_count"] += len(params)
        facts["matrix_itemsize"] = params[0].element_size()
        plan = opt.plan()
        facts["ns_itemsize"] = torch.empty((), dtype=plan.matrices[0].out_dtype).element_size()
        for r, cost in enumerate(plan.ranks):
            flops[r] += cost.ns_flops
            send[r] += cost.send_bytes
            recv[r] += cost.recv_bytes
    facts["predicted_ns_flops_per_rank"] = flops
    facts["predicted_send_bytes_per_rank"] = send
    facts["predicted_recv_bytes_per_rank"] = recv
    return facts


def build_run(config: Config) -> RunState:
    """Process group, sharded model, optimizers, data and profiler for `config`; with
    `checkpoint.resume`, also the latest checkpoint (the run's first collective). Config errors
    (ConfigError) are raised before any collective, on every rank alike."""
    from dist_ortho import strategies

    # checks that need no process group: identical on every rank (same file, same overrides)
    config.check()
    resolve(config, default_device_type())
    strategy = strategies.build(config.strategy.name, **config.strategy.options)
    _check_world_size(config, _launch_world_size())

    device, owns = init_distributed(config)
    try:
        state = _build(config, strategy, device, owns)
        if config.checkpoint.resume:
            _resume(state)
    except ConfigError:
        # raised on every rank alike, with no collective pending: safe to end the group here
        if owns and dist.is_initialized():
            dist.destroy_process_group()
        raise
    return state


def _build(config: Config, strategy, device: torch.device, owns: bool) -> RunState:
    """The part of `build_run` after the process group starts; it issues no collective (FSDP2's
    `fully_shard` and the optimizers' plans do not communicate), so an error raised here cannot
    leave another rank waiting."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho.data import build_loader
    from dist_ortho.param_groups import build_optimizers
    from dist_ortho.profiling import Profiler, ProfilerConfig

    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = resolve(config, device.type)
    if config.output.name is None:
        config.output.name = f"{config.run_name}-p{world_size}"
    digest = config_hash(config)
    mesh = init_device_mesh(device.type, (world_size,))
    model = build_sharded_model(config, device, mesh)
    nan_target = _nan_target(config, model, world_size)
    optimizer = build_optimizers(model, config.optimizer.to_optimizer_config(), strategy,
                                 nonfinite=config.optimizer.nonfinite)
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
    out_dir = Path(config.output.dir) / config.output.name
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # this run is not complete until it says so: DONE first, then what an earlier run left
        (out_dir / DONE_FILE).unlink(missing_ok=True)
        for name in RESULT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    return RunState(config, digest, device, rank, world_size, mesh, model, optimizer, loader,
                    profiler, out_dir, owns_process_group=owns, nan_target=nan_target)


def _nan_target(config: Config, model: torch.nn.Module,
                world_size: int) -> tuple[str, torch.Tensor] | None:
    """The parameter whose gradient the NaN testing aid writes to, checked on every rank."""
    from dist_ortho.sharding import chunk_sizes

    train = config.train
    if train.inject_nan_step is None:
        return None
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    name = train.inject_nan_param or next(iter(params))
    if name not in params:
        raise ConfigError("train.inject_nan_param",
                          f"{model.__class__.__name__} has no trainable parameter {name!r}; "
                          f"some it has: {', '.join(list(params)[:6])}")
    p = params[name]
    if chunk_sizes(p.shape[0], world_size)[train.inject_nan_rank] == 0:
        raise ConfigError("train.inject_nan_rank", f"rank {train.inject_nan_rank} holds no rows "
                                                   f"of {name!r} (shape {tuple(p.shape)}) at "
                                                   f"{world_size} ranks")
    return name, p


# --- checkpoints --------------------------------------------------------------------------------

def _model_identity(config: Config) -> dict:
    """What a checkpoint must match to be loaded into this run's model."""
    m = config.model
    return {"preset": m.preset, "num_layers": m.num_layers, "dtype": m.dtype}


def _gather_object(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _resume(state: RunState) -> None:
    """Load the latest checkpoint of checkpoint.dir into the run and continue after its step;
    with none there, start at step 0 and say so (rank 0 logs a warning)."""
    from dist_ortho import checkpoint

    cfg = state.config
    root = cfg.checkpoint.dir
    seen = _gather_object(checkpoint.latest_step(root), state.world_size)
    if len(set(seen)) > 1:
        raise RuntimeError(f"ranks see different latest checkpoints in {root!r} ({seen} by rank); "
                           f"checkpoint.dir must be one folder every rank sees")
    step = seen[0]
    if step is None:
        if state.rank == 0:
            log.warning("checkpoint.resume: no complete checkpoint in %s; starting from step 0",
                        root)
        return
    path = checkpoint.checkpoint_path(root, step)
    info = checkpoint.checkpoint_info(root, step)
    extra = info.get("extra") or {}
    saved_model, mine = extra.get("model") or {}, _model_identity(cfg)
    for key in mine:
        if key in saved_model and saved_model[key] != mine[key]:
            raise ConfigError(f"model.{key}", f"is {mine[key]!r}, but checkpoint {str(path)!r} "
                                              f"holds a model with {key} {saved_model[key]!r}")
    if "seed" in extra and extra["seed"] != cfg.train.seed:
        raise ConfigError("train.seed", f"is {cfg.train.seed}, but checkpoint {str(path)!r} was "
                                        f"saved by a run with seed {extra['seed']}; the data and "
                                        f"gradient streams would not continue")
    saved_batch = extra.get("global_batch_size")
    if state.loader is not None and saved_batch is not None \
            and saved_batch != cfg.train.batch_size * state.world_size:
        raise ConfigError("train.batch_size",
                          f"{cfg.train.batch_size} x {state.world_size} ranks is a global batch "
                          f"of {cfg.train.batch_size * state.world_size}, but checkpoint "
                          f"{str(path)!r} was saved with {saved_batch}; set train.batch_size so "
                          f"that batch_size x world size = {saved_batch}")
    if step > cfg.train.steps:
        raise ConfigError("train.steps", f"is {cfg.train.steps}, but the latest checkpoint "
                                         f"{str(path)!r} is at step {step}")
    checkpoint.load(root, state.model, state.optimizer, state.loader, step=step)
    state.step = state.first_step = state.resumed_from = state.last_checkpoint_step = step
    state.skipped_steps = [int(s) for s in extra.get("skipped_steps", [])]
    state.losses = [(int(s), float(v)) for s, v in extra.get("losses", [])]
    if state.rank == 0:
        log.info("resumed from %s: step %d of %d (saved at %d rank(s), now %d)", path, step,
                 cfg.train.steps, info.get("world_size"), state.world_size)


def save_checkpoint(state: RunState) -> Path:
    """Save the run at its current step into checkpoint.dir (a collective): model, optimizers,
    RNG, data position, and what a resume checks and carries on (model, seed, global batch,
    skipped steps, logged losses). Returns the checkpoint folder."""
    from dist_ortho import checkpoint

    cfg = state.config
    train = cfg.train
    if (train.fault_mode == "kill_in_save" and train.fault_step is not None
            and state.step == train.fault_step + 1 and state.rank == train.fault_rank):
        _fail(state, "kill", f"the checkpoint save of step {state.step}")
    extra = {"run": state.out_dir.name, "config_hash": state.config_hash,
             "model": _model_identity(cfg), "strategy": cfg.strategy.name, "seed": train.seed,
             "global_batch_size": None if state.loader is None
             else train.batch_size * state.world_size,
             "skipped_steps": list(state.skipped_steps), "losses": [list(x) for x in state.losses]}
    path = checkpoint.save(cfg.checkpoint.dir, state.step, state.model, state.optimizer,
                           state.loader, extra=extra)
    state.last_checkpoint_step = state.step
    if state.rank == 0:
        log.info("saved checkpoint %s", path)
    return path


def _save_due(state: RunState) -> bool:
    ckpt = state.config.checkpoint
    return ckpt.dir is not None and ckpt.every > 0 and state.step % ckpt.every == 0 \
        and state.last_checkpoint_step != state.step


# --- the loop -----------------------------------------------------------------------------------

def train_step(state: RunState) -> StepOutput:
    """One profiled step: gradients (real or synthetic), optional clipping, optimizer step."""
    from dist_ortho.models import synthetic_grads

    cfg, prof, step = state.config, state.profiler, state.step
    start = time.perf_counter()
    loss = None
    with prof.step(step, warmup=state.is_warmup(step)):
        if state.shape_only:
            with prof.phase("grads"):
                synthetic_grads(state.model, step, cfg.train.seed)
        else:
            x, y = state.loader.batch_at(step)
            with prof.phase("forward_backward"):
                _, loss = state.model(x, y)
                loss.backward()
        _testing_aids(state, step)
        if cfg.train.grad_clip is not None:
            with prof.phase("grad_clip"):
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip)
        with prof.phase("optimizer"):
            stepped = _step_optimizers(state)
        state.optimizer.zero_grad(set_to_none=True)
    if not stepped:
        state.skipped_steps.append(step)
    if state.loader is not None:
        state.loader.step = step + 1
    state.step += 1
    return StepOutput(step, None if loss is None else loss.detach(), time.perf_counter() - start)


def _step_optimizers(state: RunState) -> bool:
    """Step every optimizer, or none: False when a NaN/Inf gradient on any rank skipped the step
    (CombinedOptimizer decides with one all-reduce; see dist_ortho.param_groups)."""
    state.optimizer.step()
    return not state.optimizer.last_step_skipped


def _testing_aids(state: RunState, step: int) -> None:
    """train.inject_nan_* and train.fault_* (kill, hang): act when this is their step and rank."""
    from dist_ortho.sharding import local_tensor

    train = state.config.train
    if train.inject_nan_step == step and state.rank == train.inject_nan_rank:
        name, p = state.nan_target
        if p.grad is None:
            raise RuntimeError(f"train.inject_nan_param: {name!r} has no gradient at step {step}")
        with torch.no_grad():
            g = local_tensor(p.grad)
            g[(0,) * g.ndim] = float("nan")
        log.warning("testing aid: rank %d wrote NaN into its gradient shard of %s at step %d",
                    state.rank, name, step)
    if train.fault_step == step and state.rank == train.fault_rank \
            and train.fault_mode in ("kill", "hang"):
        _fail(state, train.fault_mode, f"step {step}")


def _fail(state: RunState, mode: str, where: str) -> None:
    """A testing aid's failure: SIGKILL to this process (no cleanup, no message from it, as when
    a node or the OOM killer takes it), or sleep forever. Logs the wall clock first, so a test
    can time how long the job takes to end."""
    log.error("testing aid: rank %d will %s at %s (time %.3f)", state.rank,
              "die by SIGKILL" if mode == "kill" else "hang", where, time.time())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)


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
    assert steps >= 0, steps
    for _ in range(steps):
        out = train_step(state)
        for callback in callbacks:
            callback(state, out)
        if _save_due(state):
            save_checkpoint(state)
    return state


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def finish(state: RunState) -> Path:
    """Save the final checkpoint (with checkpoint.dir, unless this step is saved already), write
    metrics (collective), metadata and run.json, then DONE last; returns the run dir."""
    from dist_ortho.profiling.env import environment, write_run_metadata

    if state.config.checkpoint.dir is not None and state.last_checkpoint_step != state.step:
        save_checkpoint(state)
    if state.rank == 0 and state.skipped_steps:
        log.warning("%d step(s) skipped for non-finite gradients: %s", len(state.skipped_steps),
                    state.skipped_steps)
    state.profiler.write(state.out_dir)
    facts = run_facts(state)
    if state.rank == 0:
        env = environment(state.config.dist.backend, state.device, state.world_size)
        write_run_metadata(state.out_dir, state.config.to_dict(), env)
        _atomic_write(state.out_dir / "run.json", json.dumps(facts, indent=2, default=str) + "\n")
    dist.barrier()  # every rank's files (traces) are written before DONE says so
    if state.rank == 0:
        _atomic_write(state.out_dir / DONE_FILE, json.dumps(
            {"config_hash": state.config_hash, "world_size": state.world_size,
             "steps": state.step, "resumed_from": state.resumed_from,
             "skipped_steps": len(state.skipped_steps),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return state.out_dir


def read_done(run_dir: str | Path) -> dict | None:
    """The DONE marker's content, or None when the run is not complete."""
    path = Path(run_dir) / DONE_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def close(state: RunState) -> None:
    """Release the run: detach the profiler, drop the model, optimizer and data, collect garbage,
    then destroy the process group if `build_run` started it. Reference cycles (optimizer <->
    profiler, FSDP hooks) would otherwise survive until interpreter shutdown, and gloo work and
    tensors freed that late can abort the process after it has finished its job."""
    import gc

    owns = state.owns_process_group
    state.profiler.detach()
    state.model = state.optimizer = state.loader = state.profiler = state.nan_target = None
    state.owns_process_group = False
    gc.collect()
    if owns and dist.is_initialized():
        dist.destroy_process_group()


def run(config: Config) -> Path:
    """build_run + train + finish + close. After a failure the process group is left alone (as
    torchtitan does): destroying it while other ranks wait in a collective can hang; the process
    exits with the error and torchrun stops the other ranks."""
    state = build_run(config)
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
        log.error("rank %d of %d stopped at step %d: %s: %s (collectives time out after "
                  "dist.timeout_s=%g s)", state.rank, state.world_size, state.step,
                  type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                  state.config.dist.timeout_s)
        raise
    if state.rank == 0:
        log.info("wrote %s", out)
    close(state)
    return out


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: built-in defaults, model gpt-tiny)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+",
                        action="extend", default=[],
                        help="override config keys, value parsed as YAML: "
                             "--set optimizer.lr=0.01 strategy.name=balanced")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in checkpoint.dir (sets "
                             "checkpoint.resume=true; with none there, start from step 0)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config for this machine and exit")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            from dist_ortho.config import dump_config

            resolved = resolve(config)
            print(dump_config(resolved), end="")
            print(f"# config_hash: {config_hash(resolved)}")
            return 0
    except ConfigError as exc:
        if _is_rank0():
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        run(config)
    except ConfigError as exc:  # raised before any collective, on every rank alike
        if _is_rank0():
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


def _standalone() -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_parse_and_run)()


def _parse_and_run() -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_ortho.run", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_standalone())
