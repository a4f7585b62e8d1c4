"""Sharded training checkpoints that resume exactly, verified before they are loaded.

    path = checkpoint.save("ckpt", step, model, optimizer, loader=train_loader, extra={"lr": lr})
    step = checkpoint.load("ckpt", model, optimizer, loader=train_loader)  # newest intact one

What one checkpoint holds, in `<checkpoint_dir>/step_<k:08d>/`:
- the model and the optimizer state, written by torch.distributed.checkpoint (DCP). Every rank
  writes only its own shards; DCP records each shard's place in the global tensor, so a checkpoint
  written at world size P loads at any other world size, or in a single process without a process
  group (into plain tensors). NorMuon's row second moment `v` is a DTensor placed Shard(0) like its
  parameter, so it reshards like the parameter does.
- `rank_<r:05d>.pt`: rank r's RNG states (torch CPU, and the current CUDA device's when CUDA is in
  use), its data-loader position and the LR scheduler's state (when one is given).
- `manifest.json` (`dist_ortho.checkpointing.manifest`): the step, the world size, the optimizers'
  classes and the caller's `extra`, and every file's size and SHA-256, computed while the files were
  written; written last.

Integrity: `load` verifies a checkpoint before reading any of it (`verify`: every rank checks
the manifest and every file's size, each rank re-hashes its share of the files, and the findings
are gathered so that every rank reaches the same verdict). Without an explicit step it takes the
newest intact checkpoint (`find_intact`), skipping damaged ones; a damaged checkpoint is never
half-loaded. DCP's `.metadata` is a pickle: load checkpoints only from folders you trust.

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
`save` (take one step first) or a ValueError says so. NorMuon's own load_state_dict keeps its
float32 `v` exact for bfloat16 parameters (torch's would round it to the parameter dtype).

Why a killed save never looks complete: all ranks write into `.step_<k:08d>.partial/`; after
everyone has finished (a collective that also spreads any rank's error and gathers the checksums),
rank 0 writes the manifest, fsyncs, renames the folder to `step_<k:08d>/` and replaces the `latest`
pointer file through a temporary file and `os.replace`. A folder named `step_*` is therefore
always complete when made; partial folders are removed by the next save or retention pass.
`checkpoint_dir` must be one folder that every rank sees (a shared file system), as DCP's file
writer requires anyway. Retention (`keep_last`, `keep_every`; `dist_ortho.checkpointing.retention`)
deletes older checkpoints only after the new one is complete and verified, crash-safely.

Saving in two halves: `snapshot` takes what a save needs (the state dict, each rank's RNG, loader
and scheduler state) and `write_snapshot` writes and commits it. `save` is both, blocking;
`dist_ortho.checkpointing.async_save.AsyncSaver` copies the snapshot's tensors and writes it on a
background thread over a process group of its own. Both accept a `PhaseTimer`; the phases are
"checkpoint", "write", "commit", "retention" and (rank 0, per deleted folder) "delete".

Changing the world size: the model and the optimizer reshard; the loader position and the
scheduler state are taken from rank 0's file (dist_ortho.studies.data's loaders keep a global
position that is the same on every rank, and they check that the global batch size and the seed
match). The RNG streams of a different number of ranks cannot be continued, so each rank then seeds
its RNGs from (step, rank) and rank 0 logs a warning. At the same world size, every rank gets back
exactly its own RNG states.
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
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dist_ortho.checkpointing.manifest import (FORMAT_VERSION, Damaged, HashingWriter,
                                               describe_problems, hash_bytes, hash_file, rank_files,
                                               read_manifest, verify_folder, write_manifest)
from dist_ortho.checkpointing.retention import (fsync_dir, plan_deletions, remove_checkpoint,
                                                remove_leftovers)
from dist_ortho.core.io import atomic_write_bytes
from dist_ortho.core.seeds import derive_seed
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer
from dist_ortho.optim.optimizer import Muon, NorMuon
from dist_ortho.optim.param_groups import CombinedOptimizer

__all__ = ["save", "load", "snapshot", "write_snapshot", "Snapshot", "verify", "find_intact",
           "latest_step", "complete_steps", "checkpoint_info", "checkpoint_path",
           "FORMAT_VERSION", "Damaged"]

log = logging.getLogger("dist_ortho")

LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class Loader(Protocol):
    """What `loader` needs (dist_ortho.studies.data's loaders have it): its position as a small dict
    of plain values, and a way to go back there. An LR scheduler passed as `scheduler` needs the
    same two methods."""

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


def complete_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The steps of the `step_*` folders in `checkpoint_dir` (complete when made; see `verify`
    for whether they are still intact), ascending; [] when the folder does not exist."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The step the `latest` pointer names, or, if the pointer is missing or names a folder that
    no longer exists, the largest `step_*` folder; None if there is none. (Informational: `load`
    and a resume take the newest *intact* checkpoint, whatever the pointer says.)"""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        m = _STEP_RE.match(pointer.read_text().strip())
        if m and (root / m.group(0)).is_dir():
            return int(m.group(1))
    steps = complete_steps(root)
    return steps[-1] if steps else None


def checkpoint_info(checkpoint_dir: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata of one checkpoint (the `latest_step` by default) from its manifest: step,
    world_size, optimizers, has_loader, has_scheduler, extra (what `save` was given), format.
    Raises Damaged (a ValueError) if the manifest is missing or damaged; files are not hashed."""
    root = Path(checkpoint_dir)
    if step is None:
        step = latest_step(root)
        if step is None:
            raise ValueError(f"checkpoint directory {str(root)!r} holds no checkpoint "
                             f"(no step_XXXXXXXX folder)")
    path = checkpoint_path(root, step)
    if not path.is_dir():
        raise ValueError(f"no checkpoint for step {step} in {str(root)!r}; steps there: "
                         f"{complete_steps(root)}")
    try:
        manifest = read_manifest(path)
    except Damaged as exc:
        raise Damaged(f"checkpoint {str(path)!r}: {exc}") from None
    return {**manifest["meta"], "format": manifest["format"]}


# -- distributed helpers ---------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dist(group=None) -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(obj, group=None) -> list:
    _, world = _dist(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(error: BaseException | None, what: str, group=None, payload=None) -> list:
    """A barrier that also raises on every rank if any rank failed (instead of leaving the others
    waiting at the next collective until the timeout); returns every rank's `payload`."""
    cause = error
    if isinstance(error, CheckpointException):  # DCP raised it on every rank: the ranks it names
        cause = error.failures.get(_dist(group)[0], (None,))[0]
    mine = None if cause is None else f"{type(cause).__name__}: {cause}"
    gathered = _gather((mine, payload), group)
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if failed or error is not None:
        failed = failed or [(_dist(group)[0], f"{type(error).__name__}: {error}")]
        message = f"checkpoint {what} failed on rank(s) {[r for r, _ in failed]}: {failed[0][1]}"
        if error is not None:
            raise RuntimeError(message) from error
        raise RuntimeError(message)
    return [p for _, p in gathered]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
                # the state the optimizer's first step creates: momentum, step and (NorMuon) v
                opt._init_state(p)
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


def _rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _check_stateful(obj, name: str) -> None:
    if obj is not None and not (callable(getattr(obj, "state_dict", None))
                                and callable(getattr(obj, "load_state_dict", None))):
        raise ValueError(f"{name} must have state_dict()/load_state_dict(), got "
                         f"{type(obj).__name__}")


# -- save ------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What one rank contributes to the checkpoint of `step`: the state dict DCP writes (live
    tensors, or a staged copy), the bytes of its rank file, and rank 0's metadata."""

    root: Path
    step: int
    state: dict
    rank_bytes: bytes
    meta: dict

    @property
    def path(self) -> Path:
        return self.root / _step_name(self.step)


def snapshot(checkpoint_dir: str | os.PathLike, step: int, model: torch.nn.Module,
             optimizer: OptimizerArg, loader: Loader | None = None, extra: dict | None = None,
             scheduler: Loader | None = None) -> Snapshot:
    """Check the arguments and take what the checkpoint of `step` needs from this rank (no
    collective; no copy of the tensors: they are the live ones until staged)."""
    step = _check_step(step)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _optimizer_list(optimizer)
    _check_params_in_model(model, opts)
    _check_stateful(loader, "loader")
    _check_stateful(scheduler, "scheduler")
    try:
        extra_json = json.loads(json.dumps(extra if extra is not None else {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable: {exc}") from exc
    for opt in opts:
        _ensure_state(model, opt)
    per_rank = {"rng": _rng_state(), "loader": loader.state_dict() if loader is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
    buffer = BytesIO()
    torch.save(per_rank, buffer)
    _, world = _dist()
    meta = dict(step=step, world_size=world, optimizers=[type(o).__name__ for o in opts],
                has_loader=loader is not None, has_scheduler=scheduler is not None,
                torch_version=torch.__version__, extra=extra_json)
    return Snapshot(Path(checkpoint_dir), step, _state_dicts(model, opts), buffer.getvalue(), meta)


def _own_files(writer: HashingWriter, folder: Path, rank: int) -> dict[str, dict]:
    """Size and SHA-256 of the DCP files this rank wrote: as hashed while writing, or (a file the
    writer did not see) hashed from disk now."""
    written = writer.written()
    return {name: written.get(name) or hash_file(folder / name)
            for name in rank_files(folder, rank)}


def write_snapshot(snap: Snapshot, *, group=None, timer: PhaseTimer = NULL_TIMER,
                   keep_last: int = 0, keep_every: int = 0) -> Path:
    """Write, checksum and commit a snapshot, then apply retention (a collective over `group`,
    default: the default group). Returns the checkpoint folder."""
    rank, _ = _dist(group)
    root, final = snap.root, snap.path
    partial = root / f".{final.name}.partial"
    with timer.phase("checkpoint"):
        error = None
        if rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if partial.exists():  # left by a save that was killed
                    shutil.rmtree(partial)
                partial.mkdir()
            except OSError as exc:
                error = exc
        _agree(error, f"save to {str(root)!r}", group)

        error, files = None, {}
        with timer.phase("write"):
            try:
                writer = HashingWriter(partial)
                with _single_process_quiet():
                    dcp.save(snap.state, storage_writer=writer, process_group=group,
                             no_dist=not _distributed())
                files = _own_files(writer, partial, rank)
                name = _rank_file_name(rank)
                atomic_write_bytes(partial / name, snap.rank_bytes)
                files[name] = hash_bytes(snap.rank_bytes)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - see _agree
                error = exc
        with timer.phase("commit"):
            gathered = _agree(error, f"save of {str(final)!r}", group, payload=files)
            error = None
            if rank == 0:
                try:
                    _commit(root, partial, final, snap.meta,
                            {k: v for part in gathered for k, v in part.items()})
                except OSError as exc:
                    error = exc
            _agree(error, f"commit of {str(final)!r}", group)
        if keep_last > 0:
            with timer.phase("retention"):
                _retain(root, snap.step, keep_last, keep_every, group, timer)
    return final


def _commit(root: Path, partial: Path, final: Path, meta: dict, files: dict) -> None:
    """Rank 0: manifest (fsynced), rename to step_*, `latest`; an older folder of the same step
    is moved aside first and deleted last."""
    write_manifest(partial, {**meta, "format": FORMAT_VERSION}, files)
    fsync_dir(partial)
    old = root / f".{final.name}.replaced"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(partial, final)
    fsync_dir(root)
    atomic_write_bytes(root / LATEST_FILE, (final.name + "\n").encode())
    fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)


def _retain(root: Path, newest: int, keep_last: int, keep_every: int, group,
            timer: PhaseTimer) -> None:
    """Delete what `plan_deletions` says, once the newest checkpoint verifies on every rank."""
    rank, _ = _dist(group)
    doomed = plan_deletions(complete_steps(root), newest, keep_last, keep_every) if rank == 0 \
        else None
    doomed = _gather(doomed, group)[0]
    problems = verify(checkpoint_path(root, newest), group) if doomed else []
    if rank != 0:
        return
    if problems:
        log.warning("checkpoint retention: kept older checkpoints, because the new %s does not "
                    "verify: %s", checkpoint_path(root, newest), describe_problems(problems))
        return
    try:
        for step in doomed:
            remove_checkpoint(root, _step_name(step), timer)
        remove_leftovers(root)
    except OSError as exc:
        log.warning("checkpoint retention in %s stopped: %s", root, exc)


def save(checkpoint_dir: str | os.PathLike, step: int, model: torch.nn.Module,
         optimizer: OptimizerArg, loader: Loader | None = None, extra: dict | None = None, *,
         scheduler: Loader | None = None, keep_last: int = 0, keep_every: int = 0,
         timer: PhaseTimer = NULL_TIMER) -> Path:
    """Write the checkpoint of `step` on every rank (a collective: call it on all ranks) and
    return its folder. `optimizer`: a CombinedOptimizer, one torch optimizer, a list of them, or
    None. `extra`: JSON-serializable data returned by `checkpoint_info`. `scheduler`: an LR
    scheduler (any object with state_dict/load_state_dict). An existing checkpoint of the same
    step is replaced (moved aside, then deleted once the new one is in place). `keep_last` > 0:
    then delete all but the newest `keep_last` checkpoints (and steps divisible by `keep_every`)."""
    snap = snapshot(checkpoint_dir, step, model, optimizer, loader, extra, scheduler)
    return write_snapshot(snap, timer=timer, keep_last=keep_last, keep_every=keep_every)


# -- verify / load ---------------------------------------------------------------------------------
def verify(path: str | os.PathLike, group=None) -> list[str]:
    """What is wrong with the checkpoint folder `path`, agreed by every rank (a collective):
    [] when it is intact. Each rank checks the manifest and all sizes and hashes its share."""
    rank, world = _dist(group)
    mine = verify_folder(Path(path), rank, world)
    return list(dict.fromkeys(p for ps in _gather(mine, group) for p in ps))


def find_intact(checkpoint_dir: str | os.PathLike, group=None,
                below: int | None = None) -> tuple[int | None, list[tuple[int, str]]]:
    """(the newest intact step, [(step, what is wrong) for each newer damaged one]) in
    `checkpoint_dir` (a collective): rank 0's list of folders is checked newest first; None when
    none is intact. `below`: only steps <= below."""
    steps = _gather(complete_steps(checkpoint_dir), group)[0]
    skipped = []
    for step in reversed(steps):
        if below is not None and step > below:
            continue
        problems = verify(checkpoint_path(checkpoint_dir, step), group)
        if not problems:
            return step, skipped
        skipped.append((step, describe_problems(problems)))
    return None, skipped


def load(checkpoint_dir: str | os.PathLike, model: torch.nn.Module, optimizer: OptimizerArg,
         loader: Loader | None = None, step: int | None = None, *,
         scheduler: Loader | None = None, verified: bool = False) -> int:
    """Load the checkpoint of `step` (default: the newest intact one) into `model`, `optimizer`
    (as in `save`; None loads the model only), `loader` and `scheduler`, restore the RNG states,
    and return the step. The checkpoint is verified first (Damaged, a ValueError, names what is
    wrong; nothing is loaded then) unless `verified` says the caller just did (`find_intact`).
    A collective: call it on all ranks. The world size may differ from the one that saved."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _optimizer_list(optimizer)
    _check_params_in_model(model, opts)
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {str(root)!r} does not exist")
    if step is None:
        step, skipped = find_intact(root)
        if step is None:
            what = "; ".join(f"{_step_name(s)}: {p}" for s, p in skipped)
            raise Damaged(f"checkpoint directory {str(root)!r} holds no intact checkpoint"
                          + (f" ({what})" if what else " (no step_XXXXXXXX folder)"))
        for s, problems in skipped:
            log.warning("checkpoint %s skipped: %s", checkpoint_path(root, s), problems)
    else:
        path = checkpoint_path(root, step)
        if not path.is_dir():
            raise ValueError(f"no checkpoint for step {step} in {str(root)!r}; steps there: "
                             f"{complete_steps(root)}")
        problems = [] if verified else verify(path)
        if problems:
            raise Damaged(f"checkpoint {str(path)!r} is damaged: {describe_problems(problems)}")
    path = checkpoint_path(root, step)
    meta = read_manifest(path)["meta"]
    check_compatible(meta, path, opts, loader, scheduler)
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
    # weights_only: plain containers and tensors only, never arbitrary pickled objects
    mine = torch.load(path / _rank_file_name(rank if same_world else 0), weights_only=True)
    if loader is not None:
        loader.load_state_dict(mine["loader"])
    if scheduler is not None:
        scheduler.load_state_dict(mine["scheduler"])
    if same_world:
        _set_rng_state(mine["rng"])
    else:
        _reseed(step, rank)
        if rank == 0:
            log.warning("checkpoint %s was saved at world size %d, loaded at %d: model and "
                        "optimizer resharded; RNG states reseeded from (step, rank)",
                        path, meta["world_size"], world)
    return step


def check_compatible(meta: dict, path: Path, opts: list, loader, scheduler) -> None:
    """ValueError when what is being loaded into does not fit what the checkpoint holds."""
    saved = meta["optimizers"]
    if opts and [type(o).__name__ for o in opts] != saved:
        raise ValueError(f"{str(path)!r} holds optimizers {saved}, but "
                         f"{[type(o).__name__ for o in opts]} were given; pass the same "
                         f"optimizers (in the same order) as when saving")
    if loader is not None and not meta["has_loader"]:
        raise ValueError(f"{str(path)!r} was saved without a data loader; pass loader=None")
    if scheduler is not None and not meta.get("has_scheduler"):
        raise ValueError(f"{str(path)!r} was saved without an LR scheduler; pass scheduler=None")
