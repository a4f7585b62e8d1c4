"""One profiled run: FSDP2 model, NorMuon with a chosen strategy, a fixed number of steps.

    torchrun --nproc_per_node=4 -m dist_ortho.run --config launch/configs/base.yaml \\
        --set strategy.name=balanced optimizer.lr=0.01
    python -m dist_ortho.run --config launch/configs/tiny.yaml      # one process, no torchrun

What happens, on every rank:
1. Process group. Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) from the environment; without
   it, a one-rank group on an in-memory store, so the code path is the same at every world size.
   Backend and device follow the hardware: CUDA device LOCAL_RANK with nccl, else CPU with gloo and
   one thread per rank (ranks share cores; timings are for comparing strategies, not absolute).
2. Model. Each block (GPT) or layer (shape-only) and then the root are wrapped with `fully_shard`
   on a 1-D mesh over all ranks, so every weight matrix is row-sharded across ranks. GPT weights
   are drawn from the seeded global RNG before sharding; shape-only models are built on the meta
   device and filled per parameter after sharding (their values do not depend on the world size).
3. Optimizers: `build_optimizers` (NorMuon/Muon for hidden matrices, AdamW for the rest) with the
   configured strategy deciding where each matrix is orthogonalized.
4. Steps, each under the profiler: GPT presets train on their own shard of the global batch
   (forward_backward phase), shape-only presets get reproducible synthetic gradients (grads
   phase); then optional clipping and the optimizer step (optimizer phase). Rank 0 logs the loss
   averaged over ranks every `train.log_every` steps.
5. Output in `<output.dir>/<output.name>/`: metrics.csv (profiler), the resolved config and the
   environment, run.json (what the model and plan look like), and DONE last, written atomically
   by rank 0, so a sweep knows the run is complete.

The loop is split into `build_run(config) -> RunState`, `train(state, steps, callbacks)`,
`finish(state)` and `close(state)`, so a convergence study or checkpoint/resume can reuse it.
"""

from __future__ import annotations

import argparse
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

from dist_ortho import models
from dist_ortho.config import (Config, ConfigError, config_hash, default_device_type, load_config,
                               resolve)

__all__ = ["RunState", "StepOutput", "Callback", "LogProgress", "init_distributed",
           "build_sharded_model", "build_run", "train_step", "train", "finish", "close", "run",
           "add_arguments", "main", "DONE_FILE", "read_done"]

log = logging.getLogger("dist_ortho.run")
DONE_FILE = "DONE"


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
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    else:  # a plain `python -m dist_ortho.run`: one rank, nothing to rendezvous with
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout, **kwargs)
    return device, True


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

    @property
    def shape_only(self) -> bool:
        return self.loader is None


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
    """Process group, sharded model, optimizers, data and profiler for `config`."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho.data import build_loader
    from dist_ortho.param_groups import build_optimizers
    import strategies
    from profiling import Profiler, ProfilerConfig

    device, owns = init_distributed(config)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = resolve(config, device.type)
    if config.output.name is None:
        config.output.name = f"{config.run_name}-p{world_size}"
    digest = config_hash(config)
    mesh = init_device_mesh(device.type, (world_size,))
    model = build_sharded_model(config, device, mesh)
    strategy = strategies.build(config.strategy.name, **config.strategy.options)
    optimizer = build_optimizers(model, config.optimizer.to_optimizer_config(), strategy)
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
        (out_dir / DONE_FILE).unlink(missing_ok=True)  # this run is not complete until it says so
    return RunState(config, digest, device, rank, world_size, mesh, model, optimizer, loader,
                    profiler, out_dir, owns_process_group=owns)


# --- the loop -----------------------------------------------------------------------------------

def train_step(state: RunState) -> StepOutput:
    """One profiled step: gradients (real or synthetic), optional clipping, optimizer step."""
    from dist_ortho.models import synthetic_grads

    cfg, prof, step = state.config, state.profiler, state.step
    start = time.perf_counter()
    loss = None
    with prof.step(step, warmup=step < cfg.train.warmup_steps):
        if state.shape_only:
            with prof.phase("grads"):
                synthetic_grads(state.model, step, cfg.train.seed)
        else:
            x, y = state.loader.batch_at(step)
            with prof.phase("forward_backward"):
                _, loss = state.model(x, y)
                loss.backward()
        if cfg.train.grad_clip is not None:
            with prof.phase("grad_clip"):
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip)
        with prof.phase("optimizer"):
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
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
            if not math.isfinite(state.last_loss):
                log.warning("loss is %s at step %d", state.last_loss, done)
            text = f"step {done}/{self.total} | loss {state.last_loss:.4f} | {out.seconds:.3f} s/step"
        if state.rank == 0:
            log.info(text)


def train(state: RunState, steps: int | None = None,
          callbacks: Sequence[Callback] = ()) -> RunState:
    """Take `steps` steps (default: up to train.steps), calling each callback after each step on
    every rank (a callback may issue collectives)."""
    steps = state.config.train.steps - state.step if steps is None else steps
    assert steps >= 0, steps
    for _ in range(steps):
        out = train_step(state)
        for callback in callbacks:
            callback(state, out)
    return state


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def finish(state: RunState) -> Path:
    """Write metrics (collective), metadata and run.json, then DONE last; returns the run dir."""
    from profiling.env import environment, write_run_metadata

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
             "steps": state.step, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
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
    state.model = state.optimizer = state.loader = state.profiler = None
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
        log.info("run %s: %s on %d rank(s) of %s, strategy %s, ns_dtype %s, config %s",
                 state.config.output.name, state.config.model.preset, state.world_size,
                 state.device.type, state.config.strategy.name,
                 state.config.optimizer.ns_dtype, state.config_hash)
    train(state, callbacks=[LogProgress(state.config.train.log_every, state.config.train.steps)])
    out = finish(state)
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
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config for this machine and exit")


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    try:
        config = load_config(args.config, args.overrides)
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
    run(config)
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
