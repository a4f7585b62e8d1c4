"""Run configuration: typed sections read from YAML, checked, overridable from the command line.

A config file has up to eight sections; every key is optional and falls back to the default below.

    model:      preset, num_layers (override of the preset's depth), dtype (parameter dtype)
    optimizer:  `dist_ortho.optim.param_groups.OptimizerConfig` itself: name (an update rule of
                `dist_ortho.rules`, normuon|muon, or adamw), lr, momentum, beta2, weight_decay,
                nesterov, ns_steps, ns_dtype auto|float32|bfloat16, ns_coefficients
                jordan|polar_express, ns_form standard|gram, rule_hparams (the rule's own
                hyperparameters other than beta2), adamw_lr, adamw_betas, adamw_weight_decay,
                split (adamw_patterns, matrix_patterns), nonfinite skip|raise,
                replicas spread|repeat (HSDP replica groups share the NS work or each repeat it)
    strategy:   name (see `strategies.available()`), options (checked by `strategies.build`)
    train:      steps, warmup_steps (excluded from timings), batch_size (per rank), seq_len, seed,
                data stdlib|synthetic, grad_clip (null = off), log_every, replicate (HSDP: a
                (replicate, shard) mesh with this many replica groups; 1 = plain FSDP2)
    dist:       backend auto|gloo|nccl, timeout_s
    profiling:  enabled, memory, trace_step (null = no trace), instrument_every
    output:     dir, name (null = "<preset>-<strategy>-p<world size>")
    checkpoint: dir (null = off), every (steps, 0 = off), resume, keep_last (0 = keep all),
                keep_every (milestones, 0 = none), async_save

Loading goes through `dist_ortho.core.schema` (the project's one typed loader): an unknown key, a
wrong type or a value out of range raises `ConfigError` (a ValueError) that names the full key
(`optimizer.lrr: unknown key; did you mean 'lr'?`). Any key can be overridden with
`--set optimizer.lr=0.01`; the value is parsed as YAML, so `[0.9, 0.99]`, `null`, `true` and `3e-4`
work. Testing aids (fault and NaN injection) are not part of a config: see
`dist_ortho.studies.faults`.

`resolve(config, device_type)` replaces the "auto" choices with what a run on that device uses
(ns_dtype: float32 on CPU, where bfloat16 matmul is ~90x slower, bfloat16 on accelerators; backend:
gloo on CPU, nccl on CUDA), so a run's recorded config says what actually ran. `config_hash` is a
short, stable digest of everything that changes what a run computes or measures: every section but
`output` and `checkpoint`, which only say where files go.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from dist_ortho import models, strategies
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.newton_schulz import resolve_ns_dtype
from dist_ortho.core.schema import ConfigError
from dist_ortho.core.schema import apply_overrides as _apply_overrides
from dist_ortho.core.schema import (at_least, build, parse_overrides, plain_name, positive,
                                    read_yaml, to_dict, yaml_load)
from dist_ortho.optim.param_groups import OptimizerConfig
from dist_ortho.profiling.hardware import HARDWARE_PRESETS
from dist_ortho.profiling.interconnect import LINKS

__all__ = ["ConfigError", "Config", "ModelConfig", "OptimizerConfig", "StrategyConfig",
           "TrainConfig", "DistConfig", "ProfilingConfig", "OutputConfig", "CheckpointConfig",
           "load_config", "config_from_dict", "apply_overrides", "parse_overrides", "resolve",
           "config_hash", "dump_config", "yaml_load", "default_device_type", "HASH_EXCLUDED"]


# --- sections -----------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Which model: a preset of `dist_ortho.models` (GPT presets train; shape-only ones step the
    optimizer on synthetic gradients). `num_layers` overrides the preset's depth."""

    preset: str = "gpt-tiny"
    num_layers: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"

    def check(self, key: str) -> None:
        if self.preset not in models.available():
            raise ConfigError(f"{key}.preset", f"unknown model {self.preset!r}; available: "
                                               f"{', '.join(models.available())}")
        at_least(f"{key}.num_layers", self.num_layers, 1, "or null")


@dataclass
class StrategyConfig:
    """How matrices are orthogonalized across ranks: a name from `strategies.available()` and
    that strategy's options (e.g. `bucket_bytes` for bucketed_async)."""

    name: str = "replicated"
    options: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        if self.name not in strategies.available():
            raise ConfigError(f"{key}.name", f"unknown strategy {self.name!r}; available: "
                                             f"{', '.join(strategies.available())}")
        known = [f.name for f in dataclasses.fields(strategies.options_class(self.name))]
        for name in self.options:
            if name not in known:
                raise ConfigError(f"{key}.options.{name}",
                                  f"unknown option for strategy {self.name!r}; known: "
                                  f"{', '.join(known) or 'none'}")
        try:
            strategies.build(self.name, **self.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}.options", str(exc)) from None


@dataclass
class TrainConfig:
    """The loop. `batch_size` is per rank (the global batch grows with the world size, as in
    torchtitan's local batch size). Steps before `warmup_steps` run but are left out of timings."""

    steps: int = 20
    warmup_steps: int = 3
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0
    data: Literal["stdlib", "synthetic"] = "stdlib"
    grad_clip: float | None = None
    log_every: int = 10
    # replica groups of an HSDP mesh (replicate x shard = world size; dist_ortho.studies.run_mesh)
    replicate: int = 1

    def check(self, key: str) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "replicate"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"{key}.warmup_steps",
                              f"must be in [0, train.steps={self.steps}) so at least one step is "
                              f"measured, got {self.warmup_steps}")
        at_least(f"{key}.seed", self.seed, 0)
        if self.grad_clip is not None:
            positive(f"{key}.grad_clip", self.grad_clip, "or null to turn clipping off")


@dataclass
class DistConfig:
    """Process group: backend "auto" is nccl with CUDA, gloo without; timeout_s bounds every
    collective, so a hang fails instead of stalling a sweep."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 300.0

    def check(self, key: str) -> None:
        positive(f"{key}.timeout_s", self.timeout_s)


@dataclass
class ProfilingConfig:
    """What the `profiling.Profiler` records: phase times and bytes always when enabled, peak
    memory with `memory`, and a torch.profiler trace of step `trace_step` (null = none)."""

    enabled: bool = True
    memory: bool = True
    trace_step: int | None = None
    # per-op instruments (comm counter, CPU memory tracker) slow a CPU step 1.1-4x; installing them
    # on every k-th step only leaves the other steps' timings undistorted
    instrument_every: int = 1
    # interconnect emulation (profiling.interconnect): every collective is delayed by this
    # hardware preset's link time (link: intra_node or inter_node) times target NS rate / this
    # CPU's (emulate_cpu_ns_flops; null: measured at the start, every rank agreeing). Every output
    # of such a run is labelled "emulated". null hardware: off.
    emulate_hardware: str | None = None
    emulate_link: str = "inter_node"
    emulate_cpu_ns_flops: float | None = None

    def check(self, key: str) -> None:
        at_least(f"{key}.instrument_every", self.instrument_every, 1)
        if self.emulate_hardware is not None and self.emulate_hardware not in HARDWARE_PRESETS:
            raise ConfigError(f"{key}.emulate_hardware", f"unknown hardware preset "
                              f"{self.emulate_hardware!r}; use one of {sorted(HARDWARE_PRESETS)} "
                              f"or null (no emulation)")
        if self.emulate_link not in LINKS:
            raise ConfigError(f"{key}.emulate_link", f"must be one of {list(LINKS)}, got "
                              f"{self.emulate_link!r}")
        if self.emulate_cpu_ns_flops is not None and not self.emulate_cpu_ns_flops > 0:
            raise ConfigError(f"{key}.emulate_cpu_ns_flops", "must be > 0 (FLOP/s) or null "
                              "(measured)")


@dataclass
class OutputConfig:
    """Files go to `<dir>/<name>/`: metrics.csv, the resolved config and environment, DONE."""

    dir: str = "results/runs"
    name: str | None = None

    def check(self, key: str) -> None:
        if not self.dir:
            raise ConfigError(f"{key}.dir", "must be a non-empty path")
        if self.name is not None:
            plain_name(f"{key}.name", self.name)


@dataclass
class CheckpointConfig:
    """Where and how often to save, how many to keep, blocking or in the background, and whether
    to resume from the newest intact checkpoint there (`dist_ortho.checkpointing.checkpoint`)."""

    dir: str | None = None
    every: int = 0
    resume: bool = False
    # retention: keep the newest keep_last checkpoints (0 = keep all) plus every step divisible
    # by keep_every (0 = no milestones); older ones are deleted once a newer one is verified
    keep_last: int = 3
    keep_every: int = 0
    # write in a background thread from a staged copy (dist_ortho.checkpointing.async_save);
    # training waits only for the copy
    async_save: bool = False

    def check(self, key: str) -> None:
        at_least(f"{key}.every", self.every, 0, "(0 = never)")
        at_least(f"{key}.keep_last", self.keep_last, 0, "(0 = keep every checkpoint)")
        at_least(f"{key}.keep_every", self.keep_every, 0, "(0 = no milestones)")
        if self.dir is None and self.every > 0:
            raise ConfigError(f"{key}.dir", "is null but checkpoint.every > 0; set a directory "
                                            "or set checkpoint.every=0")
        if self.dir is None and self.resume:
            raise ConfigError(f"{key}.dir", "is null but checkpoint.resume is true; set the "
                                            "directory to resume from")
        if self.dir is not None and not self.dir:
            raise ConfigError(f"{key}.dir", "must be a non-empty path or null")

    def saves_after(self, step: int, total: int) -> bool:
        """Whether a run of `total` steps saves a checkpoint once `step` steps are done."""
        return self.dir is not None and (step == total or (self.every > 0
                                                           and step % self.every == 0))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def check(self, key: str = "") -> None:
        """Cross-section rules (each section checked itself when it was built)."""
        if not models.is_shape_only(self.model.preset):
            limit = models.GPT_PRESETS[self.model.preset].seq_len
            if self.train.seq_len > limit:
                raise ConfigError("train.seq_len", f"{self.train.seq_len} exceeds model "
                                                   f"{self.model.preset!r}'s seq_len {limit}")
        trace = self.profiling.trace_step
        if trace is not None and not 0 <= trace < self.train.steps:
            raise ConfigError("profiling.trace_step", f"must be in [0, train.steps="
                                                      f"{self.train.steps}) or null, got {trace}")

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def run_name(self) -> str:
        """output.name, or "<preset>-<strategy>" when unset (the run appends -p<world size>)."""
        return self.output.name or f"{self.model.preset}-{self.strategy.name}"


# --- loading ------------------------------------------------------------------------------------

def config_from_dict(data: Mapping | None, key: str = "") -> Config:
    """Build and check a Config from plain data (as read from YAML)."""
    return build(Config, data, key)


def apply_overrides(data: Mapping | None,
                    overrides: Mapping[str, object] | Sequence[str]) -> dict:
    """A deep copy of run-config data with dotted-key overrides applied, keys checked against the
    schema (`--set optimizer.lrr=1` fails here, naming the key)."""
    return _apply_overrides(data, overrides, Config)


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, object] | Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


# --- resolution and identity --------------------------------------------------------------------

def default_device_type() -> str:
    """"cuda" when torch sees a GPU, else "cpu": the device a run on this machine uses."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_device_type(config: Config) -> str:
    """The device type a run of `config` uses on this machine: CPU for `dist.backend: gloo` (gloo
    has no all-to-all for CUDA tensors, so gloo ranks keep their tensors on the CPU even on a GPU
    machine), else CUDA when torch sees a GPU."""
    return "cpu" if config.dist.backend == "gloo" else default_device_type()


def resolve(config: Config, device_type: str | None = None) -> Config:
    """A copy with "auto" choices made for `device_type` (default: this machine's)."""
    device_type = device_type or default_device_type()
    config = copy.deepcopy(config)
    if config.optimizer.ns_dtype == "auto":
        config.optimizer.ns_dtype = str(resolve_ns_dtype("auto", device_type)).removeprefix("torch.")
    if config.dist.backend == "auto":
        config.dist.backend = "nccl" if device_type == "cuda" else "gloo"
    elif config.dist.backend == "nccl" and device_type != "cuda":
        raise ConfigError("dist.backend", f"nccl needs CUDA devices, but this run is on "
                                          f"{device_type}; use auto or gloo")
    return config


# sections that only say where files go: not part of what a run computes or measures
HASH_EXCLUDED = ("output", "checkpoint")
# (section, field, default) of fields added after results were recorded
HASH_OMITTED_DEFAULTS = (("train", "replicate", 1), ("optimizer", "replicas", "spread"),
                         ("optimizer", "ns_form", "standard"), ("optimizer", "rule_hparams", {}))


def config_hash(config: Config) -> str:
    """12 hex digits of sha256 over the canonical JSON of every section but HASH_EXCLUDED.
    Resolve first if "auto" choices should count as what they became."""
    data = {k: v for k, v in config.to_dict().items() if k not in HASH_EXCLUDED}
    if config.profiling.emulate_hardware is None:  # off: the same digest as before it existed
        for key in ("emulate_hardware", "emulate_link", "emulate_cpu_ns_flops"):
            data["profiling"].pop(key, None)
    # fields added later are left out at their defaults: the digests of older results stay valid
    for section, name, default in HASH_OMITTED_DEFAULTS:
        if data.get(section, {}).get(name, default) == default:
            data.get(section, {}).pop(name, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_config(config: Config, path: str | Path | None = None) -> str:
    """YAML text of `config` (written atomically to `path` when given); loads back equal."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text
