"""A run's checkpoints: the glue between the run loop (`dist_ortho.studies.run`) and
`dist_ortho.checkpointing.checkpoint`.

- `precheck_resume(config, world_size)`: before any process group exists, on every rank alike,
  the newest checkpoint whose manifest reads is compared with the run (model, optimizer, seed,
  global batch, steps); a mismatch, or a folder of checkpoints none of which has a readable
  manifest, is a ConfigError naming the key: one line, nothing started.
- `resume_run(state)`: the newest *intact* checkpoint (verified on every rank, the verdict agreed)
  is checked again and loaded; the damaged newer ones are named in one warning line; when there
  are checkpoints but none is intact, a ConfigError on `checkpoint.dir` says what is wrong with
  each (nothing is loaded).
- `save_run(state)`: what a save carries (model, optimizers, RNG, data position, LR scheduler,
  and the run's identity for the checks above), blocking or through the run's `AsyncSaver`, with
  the configured retention.

`state` is a `dist_ortho.studies.run.RunState`; only its attributes are used, so this module does
not import the run loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dist_ortho import models
from dist_ortho.checkpointing import checkpoint
from dist_ortho.checkpointing.async_save import AsyncSaver
from dist_ortho.checkpointing.manifest import Damaged, read_manifest
from dist_ortho.studies.config import Config, ConfigError
from dist_ortho.studies.phase_marker import Tee

__all__ = ["model_identity", "precheck_resume", "check_run_compatible", "resume_run", "save_run",
           "save_due", "make_saver"]

log = logging.getLogger("dist_ortho")


def model_identity(config: Config) -> dict:
    """What a checkpoint must match to be loaded into this run's model."""
    m = config.model
    return {"preset": m.preset, "num_layers": m.num_layers, "dtype": m.dtype}


def check_run_compatible(meta: dict, config: Config, world_size: int, path: Path) -> None:
    """ConfigError naming the key when the checkpoint at `path` (its manifest's `meta`) cannot
    continue this run: another model, optimizer, seed or global batch, or a step past train.steps.
    The strategy and the world size may differ."""
    extra = meta.get("extra") or {}
    where = f"checkpoint {str(path)!r}"
    saved_model, mine = extra.get("model") or {}, model_identity(config)
    for key in mine:
        if key in saved_model and saved_model[key] != mine[key]:
            raise ConfigError(f"model.{key}", f"is {mine[key]!r}, but {where} holds a model with "
                                              f"{key} {saved_model[key]!r}")
    name = extra.get("optimizer")
    if name is not None and name != config.optimizer.name:
        raise ConfigError("optimizer.name", f"is {config.optimizer.name!r}, but {where} holds the "
                                            f"state of {name!r} ({' + '.join(meta['optimizers'])})"
                                            f"; set optimizer.name={name} to resume it, or use "
                                            f"another checkpoint.dir")
    if "seed" in extra and extra["seed"] != config.train.seed:
        raise ConfigError("train.seed", f"is {config.train.seed}, but {where} was saved by a run "
                                        f"with seed {extra['seed']}; the data and gradient "
                                        f"streams would not continue")
    saved_batch = extra.get("global_batch_size")
    if not models.is_shape_only(config.model.preset) and saved_batch is not None \
            and saved_batch != config.train.batch_size * world_size:
        raise ConfigError("train.batch_size",
                          f"{config.train.batch_size} x {world_size} ranks is a global batch of "
                          f"{config.train.batch_size * world_size}, but {where} was saved with "
                          f"{saved_batch}; set train.batch_size so that batch_size x world size "
                          f"= {saved_batch}")
    if meta["step"] > config.train.steps:
        raise ConfigError("train.steps", f"is {config.train.steps}, but the newest checkpoint "
                                         f"{str(path)!r} is at step {meta['step']}")


def _none_intact(root, skipped: list[tuple[int, str]]) -> ConfigError:
    what = "; ".join(f"step_{s:08d}: {p}" for s, p in skipped)
    return ConfigError("checkpoint.dir", f"no intact checkpoint in {str(root)!r} ({what}); move "
                                         f"the damaged folders away to start from step 0, or "
                                         f"point checkpoint.dir elsewhere")


def precheck_resume(config: Config, world_size: int) -> None:
    """The checks of a resume that need no process group (module docstring); a no-op unless
    checkpoint.resume is set. Files are not hashed here: `resume_run` verifies them."""
    ckpt = config.checkpoint
    if not ckpt.resume or ckpt.dir is None:
        return
    skipped = []
    for step in reversed(checkpoint.complete_steps(ckpt.dir)):
        path = checkpoint.checkpoint_path(ckpt.dir, step)
        try:
            meta = read_manifest(path)["meta"]
        except Damaged as exc:
            skipped.append((step, str(exc)))
            continue
        check_run_compatible(meta, config, world_size, path)
        return
    if skipped:
        raise _none_intact(ckpt.dir, skipped)


def resume_run(state) -> None:
    """Load the newest intact checkpoint of checkpoint.dir into the run and continue after its
    step; with none there, start at step 0 and say so (rank 0 logs a warning)."""
    cfg = state.config
    root = cfg.checkpoint.dir
    step, skipped = checkpoint.find_intact(root)
    if step is None:
        if skipped:
            raise _none_intact(root, skipped)
        if state.rank == 0:
            log.warning("checkpoint.resume: no complete checkpoint in %s; starting from step 0",
                        root)
        return
    path = checkpoint.checkpoint_path(root, step)
    if skipped and state.rank == 0:
        # one line: which folders were passed over and why, and where the run goes on from
        log.warning("checkpoint.resume: skipped %s; resuming from %s",
                    "; ".join(f"damaged {checkpoint.checkpoint_path(root, s)} ({p})"
                              for s, p in skipped), path.name)
    info = checkpoint.checkpoint_info(root, step)
    check_run_compatible(info, cfg, state.world_size, path)
    extra = info.get("extra") or {}
    checkpoint.load(root, state.model, state.optimizer, state.loader, step=step,
                    scheduler=state.scheduler, verified=True)  # by find_intact
    state.step = state.first_step = state.resumed_from = state.last_checkpoint_step = step
    state.skipped_steps = [int(s) for s in extra.get("skipped_steps", [])]
    state.losses = [(int(s), float(v)) for s, v in extra.get("losses", [])]
    if state.rank == 0:
        log.info("resumed from %s: step %d of %d (saved at %d rank(s), now %d)", path, step,
                 cfg.train.steps, info.get("world_size"), state.world_size)


def make_saver(config: Config) -> AsyncSaver | None:
    """The run's background writer when checkpoint.async_save is set."""
    ckpt = config.checkpoint
    if ckpt.dir is None or not ckpt.async_save:
        return None
    return AsyncSaver(timeout_s=config.dist.timeout_s)


def save_run(state) -> Path:
    """Save the run at its current step into checkpoint.dir (a collective): model, optimizers,
    RNG, data position, LR scheduler, and what a resume checks and carries on (model, optimizer,
    seed, global batch, skipped steps, logged losses). Blocking, or handed to `state.saver`
    (returns at once). Returns the checkpoint folder."""
    cfg, train, ckpt = state.config, state.config.train, state.config.checkpoint
    for hook in state.hooks:
        hook.before_save(state, state.step)
    extra = {"run": state.out_dir.name, "config_hash": state.config_hash,
             "model": model_identity(cfg), "optimizer": cfg.optimizer.name,
             "strategy": cfg.strategy.name, "seed": train.seed,
             "global_batch_size": None if state.loader is None
             else train.batch_size * state.world_size,
             "skipped_steps": list(state.skipped_steps), "losses": [list(x) for x in state.losses]}
    timers = [t.for_checkpoint(state.step) for t in state.markers]
    timer = Tee(*timers)
    snap = checkpoint.snapshot(ckpt.dir, state.step, state.model, state.optimizer, state.loader,
                               extra, state.scheduler)
    if state.saver is not None:
        path = state.saver.save(snap, timer=timer, keep_last=ckpt.keep_last,
                                keep_every=ckpt.keep_every)
    else:
        path = checkpoint.write_snapshot(snap, timer=timer, keep_last=ckpt.keep_last,
                                         keep_every=ckpt.keep_every)
    state.last_checkpoint_step = state.step
    if state.rank == 0:
        log.info("%s checkpoint %s", "saving" if state.saver is not None else "saved", path)
    return path


def save_due(state) -> bool:
    """Whether the run saves now: checkpoint.dir set, the step a multiple of checkpoint.every,
    and this step not saved yet."""
    ckpt = state.config.checkpoint
    return ckpt.dir is not None and ckpt.every > 0 and state.step % ckpt.every == 0 \
        and state.last_checkpoint_step != state.step
