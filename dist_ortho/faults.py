"""Testing aids: inject a NaN into one rank's gradient, or make one rank fail on purpose.

They exist so the reliability behaviour (NaN steps skipped everywhere, a dead or hung rank ending
the job within the collective timeout, a rank killed inside a checkpoint save leaving nothing
that reads as complete) can be checked end to end through torchrun. They are not part of a run's
`Config`: they never appear in config.yaml or in the config hash, and production code paths only
see a generic hook (`RunState.hooks`).

How to turn them on (off by default):

    dist-ortho run --config c.yaml --fault fail_step=3 fail_rank=1 fail_mode=kill
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
    runs                            a glob on the run's output name: only matching runs (default
                                    *; quote it: runs='*bucketed*')

Everything that can be checked before launch is (`check_against`: steps, ranks against the world
size, a save after a kill_in_save step); the parameter name is checked once the model is built.
"""

from __future__ import annotations

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

from dist_ortho.config import Config
from dist_ortho.schema import ConfigError, at_least, build, parse_overrides
from dist_ortho.sharding import chunk_sizes, local_tensor

__all__ = ["FaultConfig", "ENV_VAR", "from_sources", "FaultInjector"]

log = logging.getLogger("dist_ortho.run")
ENV_VAR = "DIST_ORTHO_FAULTS"
KEY = "faults"


@dataclass
class FaultConfig:
    nan_step: int | None = None
    nan_rank: int = 0
    nan_param: str | None = None
    fail_step: int | None = None
    fail_rank: int = 0
    fail_mode: Literal["kill", "hang", "raise", "kill_in_save"] = "kill"
    runs: str = "*"

    def check(self, key: str) -> None:
        for name in ("nan_step", "nan_rank", "fail_step", "fail_rank"):
            at_least(f"{key}.{name}", getattr(self, name), 0)
        if self.nan_param is not None and not self.nan_param:
            raise ConfigError(f"{key}.nan_param", "must be a parameter name or null")

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
        if self.fail_step is not None and self.fail_mode == "kill_in_save":
            ckpt = config.checkpoint
            if not ckpt.saves_after(self.fail_step + 1, steps):
                raise ConfigError(f"{KEY}.fail_step", f"fail_mode kill_in_save needs a checkpoint "
                                                      f"save after step {self.fail_step}, but "
                                                      f"checkpoint.dir={ckpt.dir!r} and "
                                                      f"checkpoint.every={ckpt.every} save none "
                                                      f"there")


def from_sources(flags: Sequence[str] = (), environ: Mapping[str, str] | None = None
                 ) -> FaultConfig:
    """The FaultConfig of DIST_ORTHO_FAULTS, then the `--fault` KEY=VALUE flags on top."""
    environ = os.environ if environ is None else environ
    data = {**parse_overrides(environ.get(ENV_VAR, "").split()), **parse_overrides(list(flags))}
    try:
        return build(FaultConfig, data, KEY)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} (testing aid, from --fault or {ENV_VAR})") \
            from None


class FaultInjector:
    """A run hook (see `dist_ortho.run.RunState.hooks`) that acts at its step and rank."""

    def __init__(self, faults: FaultConfig, model: torch.nn.Module, rank: int,
                 world_size: int) -> None:
        self.faults, self.rank = faults, rank
        self.target = None
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
        if f.fail_step == step and self.rank == f.fail_rank and f.fail_mode != "kill_in_save":
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
