"""Sharded training checkpoints that resume exactly, at the same or a different world size.

    path = checkpoint.save("ckpt", step, model, optimizer, loader=train_loader, extra={"lr": lr})
    step = checkpoint.load("ckpt", model, optimizer, loader=train_loader)  # the latest by default

What one checkpoint holds, in `<checkpoint_dir>/step_<k:08d>/`:
- the model and the optimizer state, written by torch.distributed.checkpoint (DCP). Every rank
  writes only its own shards; DCP records each shard's place in the global tensor, so a checkpoint
  written at world size P loads at any other world size, or in a single process without a process
  group (into plain tensors). NorMuon's row second moment `v` is a DTensor placed Shard(0) like its
  parameter, so it reshards like the parameter does.
- `rank_<r:05d>.pt`: rank r's RNG states (torch CPU, and the current CUDA device's when CUDA is in
  use) and its data-loader position.
- `meta.json`: the step, the world size, the optimizers' classes and the caller's `extra` (JSON).

How the optimizer state is laid out: each optimizer of a `CombinedOptimizer` (or the one plain
optimizer) is stored under its own key `optimizers.<i>`, its state keyed by parameter name (FQN),
through DCP's `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`. Tensor state
(`momentum_buffer`, `v`, AdamW's moments) are DTensors placed like the parameters; the scalar `step`
tensors are plain tensors, equal on every rank, stored once. DCP's helper would create missing
state by running one optimizer step with zero gradients and lr 0; that changes step counters
(AdamW's bias correction, NorMuon's `step`), so instead this module first gives every parameter
of a NorMuon, Muon, Adam or AdamW optimizer the exact state a fresh optimizer would create at its
first step (zeros, step 0). Saving before the first step therefore works, and every rank holds the
same keys, which DCP requires. Other optimizer classes must have state for every parameter before
`save` (take one step first) or a ValueError says so. NorMuon's own load_state_dict keeps its float32 `v`
exact for bfloat16 parameters (torch's would round it to the parameter dtype).

Why a killed save never looks complete: all ranks write into `.step_<k:08d>.partial/`; after
everyone has finished (a collective that also spreads any rank's error), rank 0 writes
`meta.json`, renames the folder to `step_<k:08d>/` and replaces the `latest` pointer file through a
temporary file and `os.replace`. A folder named `step_*` is therefore always complete; partial
folders are removed by the next save of the same step. `checkpoint_dir` must be one folder that
every rank sees (a shared file system), as DCP's file writer requires anyway.

Changing the world size: the model and the optimizer reshard; the loader position is taken from
rank 0's file (dist_ortho.data's loaders keep a global position that is the same on every rank,
and they check that the global batch size and the seed match). The RNG streams of a different
number of ranks cannot be continued, so each rank then seeds its RNGs from (step, rank) and rank 0
logs a warning. At the same world size, every rank gets back exactly its own RNG states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from dist_ortho.config import Config, ConfigError
from dist_ortho.io import atomic_write_bytes
from dist_ortho.optimizer import Muon, NorMuon
from dist_ortho.param_groups import CombinedOptimizer
from dist_ortho.seeds import derive_seed

__all__ = ["save", "load", "latest_step", "checkpoint_info", "checkpoint_path", "FORMAT_VERSION",
           "save_run", "resume_run", "save_due", "model_identity"]

log = logging.getLogger("dist_ortho")

FORMAT_VERSION = 1
LATEST_FILE = "latest"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class Loader(Protocol):
    """What `loader` needs (dist_ortho.data's loaders have it): its position as a small dict of
    plain values, and a way to go back there."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


OptimizerArg = Union[torch.optim.Optimizer, CombinedOptimizer, Sequence[torch.optim.Optimizer],
                     None]


# -- paths -----------------------------------------------------------------------------------------
def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """The folder that holds the checkpoint of `step` (it may not exist)."""
    return Path(checkpoint_dir) / _step_name(_check_step(step))


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _complete_steps(checkpoint_dir: Path) -> list[int]:
    steps = []
    for entry in checkpoint_dir.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The step the `latest` pointer names, or, if the pointer is missing or names a folder that
    no longer exists, the largest complete `step_*` folder; None if there is none."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        m = _STEP_RE.match(pointer.read_text().strip())
        if m and (root / m.group(0)).is_dir():
            return int(m.group(1))
    steps = _complete_steps(root)
    return steps[-1] if steps else None


def _resolve(checkpoint_dir: str | os.PathLike, step: int | None) -> tuple[Path, int]:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist")
    if step is None:
        step = latest_step(root)
        if step is None:
            raise ValueError(f"checkpoint directory {str(root)!r} holds no complete checkpoint "
                             f"(no step_XXXXXXXX folder)")
    path = checkpoint_path(root, step)
    if not path.is_dir():
        raise ValueError(f"no checkpoint for step {step} in {str(root)!r} (missing "
                         f"{str(path)!r}); complete steps: {_complete_steps(root)}")
    return path, step


def checkpoint_info(checkpoint_dir: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata of one checkpoint (the latest by default): step, world_size, optimizers,
    has_loader, extra (what `save` was given), format."""
    path, _ = _resolve(checkpoint_dir, step)
    return json.loads((path / META_FILE).read_text())


# -- distributed helpers ---------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dist() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: BaseException | None, what: str) -> None:
    """A barrier that also raises on every rank if any rank failed (instead of leaving the others
    waiting at the next collective until the timeout)."""
    _, world = _dist()
    messages: list[str | None] = [None] * world
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if world > 1:
        dist.all_gather_object(messages, mine)
    else:
        messages = [mine]
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        if error is not None:
            raise RuntimeError(f"checkpoint {what} failed on rank(s) "
                               f"{[r for r, _ in failed]}: {failed[0][1]}") from error
        raise RuntimeError(f"checkpoint {what} failed on rank(s) {[r for r, _ in failed]}: "
                           f"{failed[0][1]}")


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- optimizers ------------------------------------------------------------------------------------
def _optimizer_list(optimizer: OptimizerArg) -> list[torch.optim.Optimizer]:
    """A CombinedOptimizer's optimizers, a sequence of optimizers, one optimizer, or none."""
    if optimizer is None:
        return []
    # a CombinedOptimizer is a torch optimizer too, but its state lives in its optimizers
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizers"):
        return [optimizer]
    inner = getattr(optimizer, "optimizers", optimizer)
    if isinstance(inner, Sequence) and all(isinstance(o, torch.optim.Optimizer) for o in inner):
        return list(inner)
    raise ValueError(f"optimizer must be a torch.optim.Optimizer, a CombinedOptimizer or a list of "
                     f"optimizers, got {type(optimizer).__name__}")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


@torch.no_grad()
def _ensure_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Give every trainable parameter of `opt` the state a fresh optimizer would create at its
    first step, so that all ranks save and load the same keys (and nothing steps)."""
    names = _param_names(model)
    for group in opt.param_groups:
        for p in group["params"]:
            if not p.requires_grad or len(opt.state.get(p, {})) > 0:
                continue
            if isinstance(opt, (NorMuon, Muon)):
                # the optimizer's own lazy initialization: momentum, step and (NorMuon) v, each
                # sharded like the parameter
                opt._init_state(p, opt._layouts[id(p)])
            elif isinstance(opt, torch.optim.Adam):  # AdamW too: the same state as Adam
                if group.get("capturable") or group.get("fused"):
                    step = torch.zeros((), dtype=torch.float32, device=p.device)
                else:
                    # torch keeps this step on the CPU, float64 only under a float64 default
                    dtype = (torch.float64 if torch.get_default_dtype() == torch.float64
                             else torch.float32)
                    step = torch.tensor(0.0, dtype=dtype)
                state = opt.state[p]
                state["step"] = step
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
            else:
                raise ValueError(
                    f"{type(opt).__name__} has no state yet for parameter "
                    f"{names.get(id(p), '<not in model>')!r}; checkpoint knows how to create the "
                    f"initial state of NorMuon, Muon, Adam and AdamW only. Take one optimizer step "
                    f"before saving.")


def _optimizer_options():
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _check_params_in_model(model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> None:
    names = _param_names(model)
    for i, opt in enumerate(opts):
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(f"optimizer {i} ({type(opt).__name__}) holds a parameter of "
                                     f"shape {tuple(p.shape)} that is not in the model; state is "
                                     f"keyed by the model's parameter names")


def _state_dicts(model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> dict[str, Any]:
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if opts:
        state["optimizers"] = {str(i): get_optimizer_state_dict(model, opt,
                                                                options=_optimizer_options())
                               for i, opt in enumerate(opts)}
    return state


# -- RNG and per-rank files ------------------------------------------------------------------------
def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _reseed(step: int, rank: int) -> None:
    torch.manual_seed(derive_seed(step, rank))  # seeds every CUDA device as well


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


# -- save / load -----------------------------------------------------------------------------------
def save(checkpoint_dir: str | os.PathLike, step: int, model: torch.nn.Module,
         optimizer: OptimizerArg,
         loader: Loader | None = None, extra: dict | None = None) -> Path:
    """Write the checkpoint of `step` on every rank (a collective: call it on all ranks) and
    return its folder. `optimizer`: a CombinedOptimizer, one torch optimizer, a list of them, or
    None. `extra`: JSON-serializable data returned by `checkpoint_info`. An existing checkpoint of
    the same step is replaced (moved aside, then deleted once the new one is in place)."""
    step = _check_step(step)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _optimizer_list(optimizer)
    _check_params_in_model(model, opts)
    if loader is not None and not callable(getattr(loader, "state_dict", None)):
        raise ValueError(f"loader must have state_dict()/load_state_dict(), got "
                         f"{type(loader).__name__}")
    try:
        extra_json = json.loads(json.dumps(extra if extra is not None else {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable: {exc}") from exc

    rank, world = _dist()
    root = Path(checkpoint_dir)
    final = root / _step_name(step)
    partial = root / f".{final.name}.partial"

    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a save that was killed
                shutil.rmtree(partial)
            partial.mkdir()
        except OSError as exc:
            error = exc
    _agree(error, f"save to {str(root)!r}")

    for opt in opts:
        _ensure_state(model, opt)
    with _single_process_quiet():
        dcp.save(_state_dicts(model, opts), checkpoint_id=str(partial),
                 no_dist=not _distributed())

    error = None
    try:
        per_rank = {"rng": _rng_state(),
                    "loader": loader.state_dict() if loader is not None else None}
        buffer = BytesIO()
        torch.save(per_rank, buffer)
        atomic_write_bytes(_rank_file(partial, rank), buffer.getvalue())
    except Exception as exc:
        error = exc
    _agree(error, f"save of {str(final)!r}")

    error = None
    if rank == 0:
        try:
            meta = dict(format=FORMAT_VERSION, step=step, world_size=world,
                        optimizers=[type(o).__name__ for o in opts], has_loader=loader is not None,
                        torch_version=torch.__version__, extra=extra_json)
            atomic_write_bytes(partial / META_FILE, json.dumps(meta, indent=1).encode())
            _fsync_dir(partial)
            old = root / f".{final.name}.replaced"
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.rename(final, old)
            os.rename(partial, final)
            _fsync_dir(root)
            atomic_write_bytes(root / LATEST_FILE, (final.name + "\n").encode())
            _fsync_dir(root)
            if old.exists():
                shutil.rmtree(old)
        except OSError as exc:
            error = exc
    _agree(error, f"commit of {str(final)!r}")
    return final


def load(checkpoint_dir: str | os.PathLike, model: torch.nn.Module, optimizer: OptimizerArg,
         loader: Loader | None = None, step: int | None = None) -> int:
    """Load the checkpoint of `step` (default: the latest) into `model`, `optimizer` (as in
    `save`; None loads the model only) and `loader`, restore the RNG states, and return the step.
    A collective: call it on all ranks. The world size may differ from the one that saved."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _optimizer_list(optimizer)
    _check_params_in_model(model, opts)
    path, step = _resolve(checkpoint_dir, step)
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format {meta.get('format')!r}; this "
                         f"version reads format {FORMAT_VERSION}")
    saved = meta["optimizers"]
    if opts and [type(o).__name__ for o in opts] != saved:
        raise ValueError(f"{str(path)!r} holds optimizers {saved}, but "
                         f"{[type(o).__name__ for o in opts]} were given; pass the same "
                         f"optimizers (in the same order) as when saving")
    if loader is not None and not meta["has_loader"]:
        raise ValueError(f"{str(path)!r} was saved without a data loader; pass loader=None")

    for opt in opts:
        _ensure_state(model, opt)
    state = _state_dicts(model, opts)
    # DCP fills the DTensors (and plain tensors) of `state` in place from whatever shards the
    # checkpoint holds, and replaces non-tensor values (hyperparameters) by the saved ones.
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(opts):
        set_optimizer_state_dict(model, opt, state["optimizers"][str(i)],
                                 options=_optimizer_options())

    rank, world = _dist()
    same_world = meta["world_size"] == world
    mine = torch.load(_rank_file(path, rank if same_world else 0), weights_only=True)
    if loader is not None:
        loader.load_state_dict(mine["loader"])
    if same_world:
        _set_rng_state(mine["rng"])
    else:
        _reseed(step, rank)
        if rank == 0:
            log.warning("checkpoint %s was saved at world size %d, loaded at %d: model and "
                        "optimizer resharded; RNG states reseeded from (step, rank)",
                        path, meta["world_size"], world)
    return step


# -- a run's checkpoints (the glue between dist_ortho.run and save/load) ----------------------------
# `state` is a dist_ortho.run.RunState; only its attributes are used here, so this layer does not
# import the run loop.

def model_identity(config: Config) -> dict:
    """What a checkpoint must match to be loaded into this run's model."""
    m = config.model
    return {"preset": m.preset, "num_layers": m.num_layers, "dtype": m.dtype}


def _gather_object(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def resume_run(state) -> None:
    """Load the latest checkpoint of checkpoint.dir into the run and continue after its step;
    with none there, start at step 0 and say so (rank 0 logs a warning). A checkpoint of another
    model, seed or global batch, or past train.steps, is a ConfigError naming the key."""
    cfg = state.config
    root = cfg.checkpoint.dir
    seen = _gather_object(latest_step(root), state.world_size)
    if len(set(seen)) > 1:
        raise RuntimeError(f"ranks see different latest checkpoints in {root!r} ({seen} by rank); "
                           f"checkpoint.dir must be one folder every rank sees")
    step = seen[0]
    if step is None:
        if state.rank == 0:
            log.warning("checkpoint.resume: no complete checkpoint in %s; starting from step 0",
                        root)
        return
    path = checkpoint_path(root, step)
    info = checkpoint_info(root, step)
    extra = info.get("extra") or {}
    saved_model, mine = extra.get("model") or {}, model_identity(cfg)
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
    load(root, state.model, state.optimizer, state.loader, step=step)
    state.step = state.first_step = state.resumed_from = state.last_checkpoint_step = step
    state.skipped_steps = [int(s) for s in extra.get("skipped_steps", [])]
    state.losses = [(int(s), float(v)) for s, v in extra.get("losses", [])]
    if state.rank == 0:
        log.info("resumed from %s: step %d of %d (saved at %d rank(s), now %d)", path, step,
                 cfg.train.steps, info.get("world_size"), state.world_size)


def save_run(state) -> Path:
    """Save the run at its current step into checkpoint.dir (a collective): model, optimizers,
    RNG, data position, and what a resume checks and carries on (model, seed, global batch,
    skipped steps, logged losses). Returns the checkpoint folder."""
    cfg, train = state.config, state.config.train
    for hook in state.hooks:
        hook.before_save(state, state.step)
    extra = {"run": state.out_dir.name, "config_hash": state.config_hash,
             "model": model_identity(cfg), "strategy": cfg.strategy.name, "seed": train.seed,
             "global_batch_size": None if state.loader is None
             else train.batch_size * state.world_size,
             "skipped_steps": list(state.skipped_steps), "losses": [list(x) for x in state.losses]}
    path = save(cfg.checkpoint.dir, state.step, state.model, state.optimizer, state.loader,
                extra=extra)
    state.last_checkpoint_step = state.step
    if state.rank == 0:
        log.info("saved checkpoint %s", path)
    return path


def save_due(state) -> bool:
    """Whether the run saves now: checkpoint.dir set, the step a multiple of checkpoint.every,
    and this step not saved yet."""
    ckpt = state.config.checkpoint
    return ckpt.dir is not None and ckpt.every > 0 and state.step % ckpt.every == 0 \
        and state.last_checkpoint_step != state.step
