"""The convergence study file: `run` (a `dist-ortho run` config shared by every run) and
`convergence` (`ConvergenceConfig`), read by the project's typed loader (`dist_ortho.core.schema`).

    run:                          # a Config: model, optimizer, strategy, train, ...
      model: {preset: gpt-mini}
    convergence:
      out_dir: results/latest/convergence
      optimizers: {normuon: {lr: 0.04}, muon: {lr: 0.04}, adamw: {adamw_lr: 1.0e-3}}
      seeds: [0, 1, 2]
      ...

Overrides: `convergence.<key>=value` goes to the convergence section, anything else to the run
config (`train.steps=100`), each checked against its schema and named in errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dist_ortho import models, rules
from dist_ortho.core.hparams import check_lr
from dist_ortho.core.schema import ConfigError
from dist_ortho.core.schema import apply_overrides as apply_schema_overrides
from dist_ortho.core.schema import (at_least, build, fraction, parse_overrides, read_yaml,
                                    to_dict)
from dist_ortho.optim.param_groups import ADAMW_BASELINE, OptimizerConfig
from dist_ortho.studies.config import Config, apply_overrides, config_from_dict

__all__ = ["OPTIMIZERS", "lr_key", "SweepConfig", "DistributedCheck", "ConvergenceConfig",
           "ConvergenceStudy", "load_study", "RUN_SETTINGS"]

# the optimizers a study compares by default; any update rule of `dist_ortho.rules` (or adamw,
# the baseline) may be named
OPTIMIZERS: tuple[str, ...] = ("normuon", "muon", ADAMW_BASELINE)


def lr_key(optimizer: str) -> str:
    """The learning rate the sweep varies: the matrix LR of an update rule, AdamW's only LR."""
    return "adamw_lr" if optimizer == ADAMW_BASELINE else "lr"


def _check_optimizer(key: str, name: str) -> None:
    names = (*rules.available(), ADAMW_BASELINE)
    if name not in names:
        raise ConfigError(key, f"unknown optimizer {name!r}; use an update rule or adamw: "
                               f"{', '.join(names)}")
# the convergence keys one run's worker needs (its job settings): they change its curve
RUN_SETTINGS = ("eval_every", "eval_batches", "eval_batch_size", "eval_seed", "lr_warmup_frac",
                "lr_decay_frac", "train_window")


@dataclass
class SweepConfig:
    """The LR sweep: `lrs` maps an optimizer to the values of its `lr_key` to try."""

    steps: int = 300
    seed: int = 0
    lrs: dict[str, list[float]] = field(default_factory=dict)

    def check(self, key: str) -> None:
        at_least(f"{key}.steps", self.steps, 1)
        at_least(f"{key}.seed", self.seed, 0)
        for name, values in self.lrs.items():
            _check_optimizer(f"{key}.lrs.{name}", name)
            if not values:
                raise ConfigError(f"{key}.lrs.{name}", "must be a non-empty list of learning rates")
            for i, v in enumerate(values):
                try:
                    check_lr(lr_key(name), v)  # the check of optimizer.<that key>
                except ValueError as exc:
                    raise ConfigError(f"{key}.lrs.{name}[{i}]", str(exc)) from None


@dataclass
class DistributedCheck:
    """Runs of the study repeated at `nproc_per_node` ranks with a sharding `strategy`, each
    beside its single-process run (same optimizer and seed): the same global batch (the per-rank
    batch is the run's divided by the ranks, and the data loader hands each rank its rows of the
    same global draw), so the curves must agree up to float rounding. Empty `optimizers`: none."""

    optimizers: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc_per_node: int = 2
    strategy: str = "balanced"

    def check(self, key: str) -> None:
        at_least(f"{key}.nproc_per_node", self.nproc_per_node, 2, "(a distributed check needs "
                                                                   "more than one rank)")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"{key}.optimizers", f"must not repeat, got {self.optimizers}")
        for i, seed in enumerate(self.seeds):
            at_least(f"{key}.seeds[{i}]", seed, 0)


@dataclass
class ConvergenceConfig:
    """The `convergence` section. `optimizers` maps each optimizer of the study to the
    `optimizer.*` keys it overrides (its tuned LR); `eval_batch_size` is global (split over
    ranks, so a multiple of `nproc_per_node`); `processes` = 0 picks one run per CPU core (or per
    GPU group on CUDA)."""

    out_dir: str = "results/latest/convergence"
    optimizers: dict[str, dict] = field(
        default_factory=lambda: {n: {} for n in OPTIMIZERS})
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
    distributed: DistributedCheck = field(default_factory=DistributedCheck)

    def check(self, key: str) -> None:
        for name in ("eval_every", "eval_batches", "eval_batch_size", "train_window",
                     "nproc_per_node"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        for name in ("eval_seed", "processes"):
            at_least(f"{key}.{name}", getattr(self, name), 0)
        for name in ("lr_warmup_frac", "lr_decay_frac"):
            fraction(f"{key}.{name}", getattr(self, name))
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise ConfigError(f"{key}.lr_decay_frac", f"lr_warmup_frac + lr_decay_frac must be "
                                                      f"<= 1, got {self.lr_warmup_frac} + "
                                                      f"{self.lr_decay_frac}")
        if self.eval_batch_size % self.nproc_per_node:
            raise ConfigError(f"{key}.eval_batch_size",
                              f"{self.eval_batch_size} is not divisible by the world size "
                              f"(convergence.nproc_per_node={self.nproc_per_node}): the global "
                              f"validation batch is split over ranks; pick a multiple of "
                              f"{self.nproc_per_node}")
        if not self.out_dir:
            raise ConfigError(f"{key}.out_dir", "must be a non-empty path")
        if not self.seeds:
            raise ConfigError(f"{key}.seeds", "must be a non-empty list of integers")
        for i, seed in enumerate(self.seeds):
            at_least(f"{key}.seeds[{i}]", seed, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{key}.seeds", f"must not repeat a seed, got {self.seeds}")
        if not self.optimizers:
            raise ConfigError(f"{key}.optimizers", "must name at least one optimizer")
        for name, overrides in self.optimizers.items():
            okey = f"{key}.optimizers.{name}"
            _check_optimizer(okey, name)
            if "name" in overrides:
                raise ConfigError(f"{okey}.name", f"the optimizer is this entry's key ({name}); "
                                                  f"remove the name")
            # types and ranges, named by key; the rule's own hyperparameters against that rule
            build(OptimizerConfig, {**overrides, "name": name}, okey)
        check = self.distributed
        for i, name in enumerate(check.optimizers):
            if name not in self.optimizers:
                raise ConfigError(f"{key}.distributed.optimizers[{i}]",
                                  f"{name!r} is not one of the study's optimizers "
                                  f"({', '.join(self.optimizers)}); its P = 1 run is the "
                                  f"reference")
        for i, seed in enumerate(check.seeds):
            if check.optimizers and seed not in self.seeds:
                raise ConfigError(f"{key}.distributed.seeds[{i}]",
                                  f"seed {seed} is not one of the study's seeds {self.seeds}; "
                                  f"its P = 1 run is the reference")
        if check.optimizers and self.eval_batch_size % check.nproc_per_node:
            raise ConfigError(f"{key}.eval_batch_size",
                              f"{self.eval_batch_size} is not divisible by "
                              f"distributed.nproc_per_node={check.nproc_per_node}; pick a "
                              f"multiple of it")

    def run_settings(self) -> dict:
        return {k: getattr(self, k) for k in RUN_SETTINGS}


@dataclass
class ConvergenceStudy:
    """A convergence study file: the run config shared by every run, and the study's section."""

    run: Config = field(default_factory=Config)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)

    def check(self, key: str) -> None:
        check = self.convergence.distributed
        ranks = check.nproc_per_node // self.convergence.nproc_per_node
        if check.optimizers and (check.nproc_per_node % self.convergence.nproc_per_node
                                 or self.run.train.batch_size % ranks):
            raise ConfigError("convergence.distributed.nproc_per_node",
                              f"{check.nproc_per_node} ranks must be a multiple of "
                              f"convergence.nproc_per_node={self.convergence.nproc_per_node}, "
                              f"and train.batch_size={self.run.train.batch_size} divisible by "
                              f"the ratio, so that the global batch stays the same")
        if models.is_shape_only(self.run.model.preset):
            raise ConfigError("run.model.preset", f"{self.run.model.preset!r} is a shape-only "
                                                  f"model; a convergence run needs a GPT preset "
                                                  f"(e.g. gpt-mini)")

    @property
    def out_dir(self) -> Path:
        return Path(self.convergence.out_dir)

    def run_config(self, optimizer: str, seed: int, overrides: Mapping | None = None,
                   name: str | None = None, out_dir: Path | None = None) -> Config:
        """The checked `dist_ortho.studies.config.Config` of one run."""
        conv = self.convergence
        sets = {"optimizer.name": optimizer, "train.seed": seed,
                "output.dir": str(out_dir or self.out_dir / "runs"),
                "output.name": name or f"{optimizer}-s{seed}"}
        for k, v in conv.optimizers.get(optimizer, {}).items():
            sets[f"optimizer.{k}"] = v
        sets.update(overrides or {})
        return config_from_dict(apply_overrides(to_dict(self.run), sets))

    def check_configs(self) -> list[tuple[str, int, Config]]:
        """(optimizer, seed, config) of every distributed-check run: the study's run with the
        check's strategy and the per-rank batch that keeps the global batch."""
        conv, check = self.convergence, self.convergence.distributed
        ranks = check.nproc_per_node // conv.nproc_per_node
        out = []
        for optimizer in check.optimizers:
            for seed in check.seeds:
                name = f"{optimizer}-s{seed}-p{check.nproc_per_node}-{check.strategy}"
                sets = {"strategy.name": check.strategy,
                        "train.batch_size": self.run.train.batch_size // ranks}
                out.append((optimizer, seed, self.run_config(optimizer, seed, sets, name)))
        return out


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> ConvergenceStudy:
    """Read a study file; `overrides` are `key=value` strings, `convergence.*` going to the
    convergence section and everything else to the run config (checked like `dist-ortho run`)."""
    data = read_yaml(path, "convergence study")
    run_sets, conv_sets = {}, {}
    for key, value in parse_overrides(list(overrides)).items():
        (conv_sets if key.startswith("convergence.") else run_sets)[key] = value
    data = apply_schema_overrides(data, conv_sets, ConvergenceStudy)
    run = data.get("run")
    if run is not None and not isinstance(run, Mapping):
        raise ConfigError("run", f"must be a mapping (a run config), got {run!r}")
    data["run"] = apply_overrides(run, run_sets)
    return build(ConvergenceStudy, data)
