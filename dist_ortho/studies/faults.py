"""Testing aids: inject a NaN into one rank's gradient, or make one rank fail on purpose, in any
phase of a step or of a checkpoint save.

They exist so the reliability behaviour (NaN steps skipped everywhere, a dead or hung rank ending
the job within the collective timeout, a rank killed inside a checkpoint save leaving nothing
that reads as complete) can be checked end to end through torchrun. They are not part of a run's
`Config`: they never appear in config.yaml or in the config hash, and production code paths only
see a generic hook (`RunState.hooks`).

How to turn them on (off by default):

    dist-ortho run c.yaml --fault fail_step=3 --fault fail_rank=1 --fault fail_mode=kill
    DIST_ORTHO_FAULTS="nan_step=1 nan_rank=1" dist-ortho sweep study.yaml    # every point whose
                                                                            # name matches `runs`

The environment variable (same KEY=VALUE syntax) reaches every rank of every torchrun a sweep or
study launches; `--fault` flags win over it. Keys (`FaultConfig`):

    nan_step, nan_rank, nan_param   at 0-based step nan_step, rank nan_rank writes a NaN into its
                                    shard of the gradient of nan_param (null: the model's first
                                    trainable parameter), after the gradients, before the step
    fail_step, fail_rank, fail_mode at step fail_step, rank fail_rank fails: "kill" (SIGKILL to
                                    itself after its gradients), "hang" (sleeps forever there),
                                    "raise" (a RuntimeError there) or "kill_in_save" (SIGKILL as it
                                    enters the checkpoint save that follows that step)
    fail_phase                      where in step fail_step the fault strikes instead (kill, hang
                                    or raise), as the rank enters the phase (`PHASES`): forward,
                                    backward, exchange (the optimizer's forward exchange), ns
                                    (Newton-Schulz), return (the exchange back), normalize (the
                                    NorMuon all-reduce), save (the checkpoint save after that
                                    step, once the rank's files are written, before the commit),
                                    retention (rank 0 deleting an old checkpoint after that save)
    runs                            a glob on the run's output name: only matching runs (default
                                    *; quote it: runs='*bucketed*')

Everything that can be checked before launch is (`check_against`: steps, ranks against the world
size, a save after a kill_in_save step, a phase the run has); the parameter name is checked once
the model is built.

How phases are seen: the injector is a `PhaseTimer` (`dist_ortho.core.timing`) that the run puts
beside the profiler on the optimizer (`opt.set_timer`), on the loop's forward and backward, and on
checkpoint saves (`for_checkpoint`), so the optimizer itself knows nothing of it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dist_ortho import models
from dist_ortho.core.schema import ConfigError, at_least, build, parse_overrides
from dist_ortho.core.sharding import chunk_sizes, local_tensor
from dist_ortho.studies.config import Config

__all__ = ["FaultConfig", "ENV_VAR", "from_sources", "FaultInjector", "PHASES"]

log = logging.getLogger("dist_ortho.studies.run")
ENV_VAR = "DIST_ORTHO_FAULTS"
KEY = "faults"
# fault phase -> the timer phase whose entry triggers it ("exchange"/"return": the first
# comm_wait of the orthogonalize phase before / after Newton-Schulz)
PHASES = {"forward": "forward", "backward": "backward", "exchange": "comm_wait", "ns": "ns",
          "return": "comm_wait", "normalize": "normalize", "save": "commit",
          "retention": "delete"}
_OPTIMIZER_PHASES = ("exchange", "ns", "return", "normalize")
_SAVE_PHASES = ("save", "retention")


@dataclass
class FaultConfig:
    nan_step: int | None = None
    nan_rank: int = 0
    nan_param: str | None = None
    fail_step: int | None = None
    fail_rank: int = 0
    fail_mode: Literal["kill", "hang", "raise", "kill_in_save"] = "kill"
    fail_phase: Literal["forward", "backward", "exchange", "ns", "return", "normalize", "save",
                        "retention"] | None = None
    runs: str = "*"

    def check(self, key: str) -> None:
        for name in ("nan_step", "nan_rank", "fail_step", "fail_rank"):
            at_least(f"{key}.{name}", getattr(self, name), 0)
        if self.nan_param is not None and not self.nan_param:
            raise ConfigError(f"{key}.nan_param", "must be a parameter name or null")
        if self.fail_phase is not None and self.fail_mode == "kill_in_save":
            raise ConfigError(f"{key}.fail_mode", "kill_in_save is a phase of its own; with "
                                                  "fail_phase use kill, hang or raise")

    @property
    def active(self) -> bool:
        return self.nan_step is not None or self.fail_step is not None

    def applies_to(self, run_name: str) -> bool:
        return self.active and fnmatch.fnmatchcase(run_name, self.runs)

    def check_against(self, config: Config, world_size: int) -> None:
        """Rules that need the run: steps within train.steps, ranks within the world size, and a
        checkpoint save after a kill_in_save step. The same on every rank, before any collective."""
        steps = config.train.steps
        for name in ("nan_step", "fail_step"):
            step = getattr(self, name)
            if step is not None and step >= steps:
                raise ConfigError(f"{KEY}.{name}", f"must be in [0, train.steps={steps}) or null, "
                                                   f"got {step}")
        for name, used in (("nan_rank", self.nan_step is not None),
                           ("fail_rank", self.fail_step is not None)):
            rank = getattr(self, name)
            if used and rank >= world_size:
                raise ConfigError(f"{KEY}.{name}", f"is {rank}, but this run has {world_size} "
                                                   f"rank(s) (0..{world_size - 1})")
        if self.fail_step is not None and (self.fail_mode == "kill_in_save"
                                           or self.fail_phase in _SAVE_PHASES):
            ckpt = config.checkpoint
            what = f"fail_phase {self.fail_phase}" if self.fail_phase else "fail_mode kill_in_save"
            if not ckpt.saves_after(self.fail_step + 1, steps):
                raise ConfigError(f"{KEY}.fail_step", f"{what} needs a checkpoint save after "
                                                      f"step {self.fail_step}, but "
                                                      f"checkpoint.dir={ckpt.dir!r} and "
                                                      f"checkpoint.every={ckpt.every} save none "
                                                      f"there")
        if self.fail_step is not None and self.fail_phase is not None:
            self._check_phase(config, world_size)

    def _check_phase(self, config: Config, world_size: int) -> None:
        phase, key = self.fail_phase, f"{KEY}.fail_phase"
        if phase in ("forward", "backward") and models.is_shape_only(config.model.preset):
            raise ConfigError(key, f"{phase}: model {config.model.preset!r} is shape-only (its "
                                   f"gradients are synthetic, no forward or backward runs); use "
                                   f"a GPT preset")
        if phase in _OPTIMIZER_PHASES and config.optimizer.name == "adamw":
            raise ConfigError(key, f"{phase} is a phase of NorMuon/Muon, but optimizer.name is "
                                   f"adamw")
        if phase in ("exchange", "return") and world_size == 1:
            raise ConfigError(key, f"{phase}: one rank exchanges nothing; use 2 or more ranks")
        if phase == "return" and config.strategy.name == "replicated":
            raise ConfigError(key, "return: strategy replicated sends no results back (every rank "
                                   "orthogonalizes every matrix); use another strategy")
        if phase == "retention":
            if self.fail_rank != 0:
                raise ConfigError(f"{KEY}.fail_rank", f"is {self.fail_rank}, but only rank 0 "
                                                      f"deletes old checkpoints (fail_phase "
                                                      f"retention); use 0")
            if config.checkpoint.keep_last == 0:
                raise ConfigError(key, "retention: checkpoint.keep_last is 0 (keep all), so "
                                       "nothing is deleted; set checkpoint.keep_last")


def from_sources(flags: Sequence[str] = (), environ: Mapping[str, str] | None = None
                 ) -> FaultConfig:
    """The FaultConfig of DIST_ORTHO_FAULTS, then the `--fault` KEY=VALUE flags on top."""
    environ = os.environ if environ is None else environ
    flags = [pair for flag in flags for pair in flag.split()]  # "--fault 'a=1 b=2'" works too
    data = {**parse_overrides(environ.get(ENV_VAR, "").split()), **parse_overrides(flags)}
    try:
        return build(FaultConfig, data, KEY)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (testing aid, from --fault or {ENV_VAR})") \
            from None


class FaultInjector:
    """A run hook (see `dist_ortho.studies.run.RunState.hooks`) that acts at its step and rank."""

    def __init__(self, faults: FaultConfig, model: torch.nn.Module, rank: int,
                 world_size: int) -> None:
        self.faults, self.rank = faults, rank
        self.target = None
        self.step: int | None = None
        self.fired = False
        self._after_ns = False
        if faults.nan_step is not None:
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            name = faults.nan_param or next(iter(params))
            if name not in params:
                raise ConfigError(f"{KEY}.nan_param",
                                  f"{model.__class__.__name__} has no trainable parameter "
                                  f"{name!r}; some it has: {', '.join(list(params)[:6])}")
            p = params[name]
            if chunk_sizes(p.shape[0], world_size)[faults.nan_rank] == 0:
                raise ConfigError(f"{KEY}.nan_rank", f"rank {faults.nan_rank} holds no rows of "
                                                     f"{name!r} (shape {tuple(p.shape)}) at "
                                                     f"{world_size} ranks")
            self.target = (name, p)

    # -- phases (a PhaseTimer) ------------------------------------------------------------------
    def before_step(self, state, step: int) -> None:
        self.step = step

    def _armed(self, step: int | None) -> bool:
        f = self.faults
        return (f.fail_phase is not None and f.fail_step is not None and step == f.fail_step
                and self.rank == f.fail_rank and not self.fired)

    @contextlib.contextmanager
    def _phase(self, name: str, step: int | None, save: bool):
        f = self.faults
        if name == "orthogonalize":
            self._after_ns = False
        if self._armed(step) and (f.fail_phase in _SAVE_PHASES) == save \
                and PHASES[f.fail_phase] == name \
                and (f.fail_phase != "exchange" or not self._after_ns) \
                and (f.fail_phase != "return" or self._after_ns):
            self.fired = True
            _fail(self.rank, f.fail_mode, f"step {step}, phase {f.fail_phase}")
        try:
            yield
        finally:
            if name == "ns":
                self._after_ns = True

    def phase(self, name: str):
        return self._phase(name, self.step, save=False)

    def for_checkpoint(self, step: int):
        """A timer for the phases of the save after `step` steps (fault phases save, retention
        strike in the save that follows step fail_step)."""
        injector = self

        class _Save:
            def phase(self, name: str):
                return injector._phase(name, step - 1, save=True)

        return _Save()

    def after_gradients(self, state, step: int) -> None:
        f = self.faults
        if f.nan_step == step and self.rank == f.nan_rank:
            name, p = self.target
            if p.grad is None:
                raise RuntimeError(f"faults.nan_param: {name!r} has no gradient at step {step}")
            with torch.no_grad():
                g = local_tensor(p.grad)
                g[(0,) * g.ndim] = float("nan")
            log.warning("testing aid: rank %d wrote NaN into its gradient shard of %s at step %d",
                        self.rank, name, step)
        if f.fail_step == step and self.rank == f.fail_rank and f.fail_mode != "kill_in_save" \
                and f.fail_phase is None:
            _fail(self.rank, f.fail_mode, f"step {step}")

    def before_save(self, state, step: int) -> None:
        f = self.faults
        if (f.fail_mode == "kill_in_save" and f.fail_step is not None
                and step == f.fail_step + 1 and self.rank == f.fail_rank):
            _fail(self.rank, "kill", f"the checkpoint save of step {step}")

    def close(self) -> None:
        self.target = None


def _fail(rank: int, mode: str, where: str) -> None:
    """SIGKILL to this process (no cleanup, no message from it, as when a node or the OOM killer
    takes it), a RuntimeError, or sleep forever. Logs the wall clock first, so a test can time how
    long the job takes to end."""
    what = {"kill": "die by SIGKILL", "hang": "hang", "raise": "raise"}[mode]
    log.error("testing aid: rank %d will %s at %s (time %.3f)", rank, what, where, time.time())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == "raise":
        raise RuntimeError(f"testing aid: rank {rank} failed on purpose at {where}")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)
