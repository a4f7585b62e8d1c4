"""Run configuration: typed sections read from YAML, checked, overridable from the command line.

A config file has up to eight sections; every key is optional and falls back to the default below.

    model:      preset, num_layers (override of the preset's depth), dtype (parameter dtype)
    optimizer:  name normuon|muon|adamw, lr, momentum, beta2, weight_decay, nesterov, ns_steps,
                ns_dtype auto|float32|bfloat16, ns_coefficients jordan|polar_express,
                adamw_lr, adamw_betas, adamw_weight_decay, nonfinite skip|raise
    strategy:   name (see `strategies.available()`), options (checked by `strategies.build`)
    train:      steps, warmup_steps (excluded from timings), batch_size (per rank), seq_len, seed,
                data stdlib|synthetic, grad_clip (null = off), log_every; testing aids (off by
                default): inject_nan_step/_rank/_param, fault_step/_rank/_mode kill|hang|kill_in_save
    dist:       backend auto|gloo|nccl, timeout_s
    profiling:  enabled, memory, trace_step (null = no trace)
    output:     dir, name (null = "<preset>-<strategy>-p<world size>")
    checkpoint: dir (null = off), every (steps, 0 = off), resume

Loading is strict: an unknown key, a wrong type or a value out of range raises `ConfigError` (a
ValueError) that names the full key (`optimizer.lrr`) and says what would be accepted. Any key can
be overridden with `--set optimizer.lr=0.01`; the value is parsed as YAML, so `[0.9, 0.99]`, `null`
and `true` work, and so does `3e-4` (plain PyYAML reads that as a string; our loader does not).

`resolve(config, device_type)` replaces the "auto" choices with what a run on that device uses
(ns_dtype: float32 on CPU, where bfloat16 matmul is ~90x slower, bfloat16 on accelerators; backend:
gloo on CPU, nccl on CUDA), so a run's recorded config says what actually ran. `config_hash` is a
short, stable digest of everything that changes what a run computes or measures: every section but
`output` and `checkpoint`, which only say where files go. Keys added after results existed
(`HASH_NEW_KEYS`) count only when set away from their default, so those results stay complete.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["ConfigError", "Config", "ModelConfig", "OptimizerSection", "StrategyConfig",
           "TrainConfig", "DistConfig", "ProfilingConfig", "OutputConfig", "CheckpointConfig",
           "load_config", "config_from_dict", "apply_overrides", "parse_overrides", "resolve",
           "config_hash", "dump_config", "yaml_load", "default_device_type"]


class ConfigError(ValueError):
    """A user mistake in a config; `key` is the full dotted key it is about."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _choices(*values: str) -> dict:
    return {"choices": values}


# --- sections -----------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Which model: a preset of `dist_ortho.models` (GPT presets train; shape-only ones step the
    optimizer on synthetic gradients). `num_layers` overrides the preset's depth."""

    preset: str = "gpt-tiny"
    num_layers: int | None = None
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16"))

    def check(self, key: str) -> None:
        from dist_ortho import models

        if self.preset not in models.available():
            raise ConfigError(f"{key}.preset", f"unknown model {self.preset!r}; available: "
                                               f"{', '.join(models.available())}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"{key}.num_layers", f"must be >= 1 or null, got {self.num_layers}")


@dataclass
class OptimizerSection:
    """The matrix optimizer and the AdamW that takes embeddings, head, norms and biases."""

    name: str = field(default="normuon", metadata=_choices("normuon", "muon", "adamw"))
    lr: float = 0.02
    momentum: float = 0.95
    beta2: float = 0.95
    weight_decay: float = 0.0
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = field(default="auto", metadata=_choices("auto", "float32", "bfloat16"))
    ns_coefficients: str = field(default="jordan", metadata=_choices("jordan", "polar_express"))
    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = 0.0
    # what a step does when a gradient holds NaN/Inf on any rank: skip it on every rank (weights
    # and optimizer state untouched; counted in the profiler's `skipped` rows) or raise
    nonfinite: str = field(default="skip", metadata=_choices("skip", "raise"))

    def check(self, key: str) -> None:
        _positive(f"{key}.lr", self.lr)
        _unit(f"{key}.momentum", self.momentum)
        _unit(f"{key}.beta2", self.beta2)
        _nonnegative(f"{key}.weight_decay", self.weight_decay)
        if self.ns_steps < 1:
            raise ConfigError(f"{key}.ns_steps", f"must be >= 1, got {self.ns_steps}")
        _positive(f"{key}.adamw_lr", self.adamw_lr)
        for i, beta in enumerate(self.adamw_betas):
            _unit(f"{key}.adamw_betas[{i}]", beta)
        _nonnegative(f"{key}.adamw_weight_decay", self.adamw_weight_decay)

    def to_optimizer_config(self):
        """The `dist_ortho.param_groups.OptimizerConfig` for `build_optimizers` (`nonfinite` is
        not part of it: pass `nonfinite=` to `build_optimizers`, as `dist_ortho.run` does)."""
        from dist_ortho.param_groups import OptimizerConfig

        known = {f.name for f in dataclasses.fields(OptimizerConfig)}
        return OptimizerConfig(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self) if f.name in known})


@dataclass
class StrategyConfig:
    """How matrices are orthogonalized across ranks: a name from `strategies.available()` and
    that strategy's options (e.g. `bucket_bytes` for bucketed_async)."""

    name: str = "replicated"
    options: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        from dist_ortho import strategies

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
    data: str = field(default="stdlib", metadata=_choices("stdlib", "synthetic"))
    grad_clip: float | None = None
    log_every: int = 10
    # Testing aids, off by default (see dist_ortho.run). At 0-based step `inject_nan_step`, rank
    # `inject_nan_rank` writes a NaN into its shard of the gradient of `inject_nan_param` (null:
    # the model's first parameter), after the gradients and before the optimizer step.
    inject_nan_step: int | None = None
    inject_nan_rank: int = 0
    inject_nan_param: str | None = None
    # At step `fault_step`, rank `fault_rank` fails on purpose: "kill" (SIGKILL to itself after
    # its gradients, before the optimizer step), "hang" (sleeps forever at that point) or
    # "kill_in_save" (SIGKILL as it enters the checkpoint save that follows that step).
    fault_step: int | None = None
    fault_rank: int = 0
    fault_mode: str = field(default="kill", metadata=_choices("kill", "hang", "kill_in_save"))

    def check(self, key: str) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"{key}.warmup_steps",
                              f"must be in [0, train.steps={self.steps}) so at least one step is "
                              f"measured, got {self.warmup_steps}")
        if self.seed < 0:
            raise ConfigError(f"{key}.seed", f"must be >= 0, got {self.seed}")
        if self.grad_clip is not None:
            _positive(f"{key}.grad_clip", self.grad_clip, "or null to turn clipping off")
        for name in ("inject_nan_step", "fault_step"):
            step = getattr(self, name)
            if step is not None and not 0 <= step < self.steps:
                raise ConfigError(f"{key}.{name}", f"must be in [0, train.steps={self.steps}) or "
                                                   f"null, got {step}")
        for name in ("inject_nan_rank", "fault_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.inject_nan_param is not None and not self.inject_nan_param:
            raise ConfigError(f"{key}.inject_nan_param", "must be a parameter name or null")


@dataclass
class DistConfig:
    """Process group: backend "auto" is nccl with CUDA, gloo without; timeout_s bounds every
    collective, so a hang fails instead of stalling a sweep."""

    backend: str = field(default="auto", metadata=_choices("auto", "gloo", "nccl"))
    timeout_s: float = 300.0

    def check(self, key: str) -> None:
        _positive(f"{key}.timeout_s", self.timeout_s)


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

    def check(self, key: str) -> None:
        if self.instrument_every < 1:
            raise ConfigError(f"{key}.instrument_every",
                              f"must be >= 1, got {self.instrument_every}")


@dataclass
class OutputConfig:
    """Files go to `<dir>/<name>/`: metrics.csv, the resolved config and environment, DONE."""

    dir: str = "results/runs"
    name: str | None = None

    def check(self, key: str) -> None:
        if not self.dir:
            raise ConfigError(f"{key}.dir", "must be a non-empty path")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._+=-]+", self.name):
            raise ConfigError(f"{key}.name", f"must be a plain file name (letters, digits, "
                                             f"'._+=-'), got {self.name!r}")


@dataclass
class CheckpointConfig:
    """Where and how often to save, and whether to resume from the latest checkpoint there."""

    dir: str | None = None
    every: int = 0
    resume: bool = False

    def check(self, key: str) -> None:
        if self.every < 0:
            raise ConfigError(f"{key}.every", f"must be >= 0 (0 = never), got {self.every}")
        if self.dir is None and self.every > 0:
            raise ConfigError(f"{key}.dir", "is null but checkpoint.every > 0; set a directory "
                                            "or set checkpoint.every=0")
        if self.dir is None and self.resume:
            raise ConfigError(f"{key}.dir", "is null but checkpoint.resume is true; set the "
                                            "directory to resume from")
        if self.dir is not None and not self.dir:
            raise ConfigError(f"{key}.dir", "must be a non-empty path or null")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check(f.name)
        # cross-section rules
        from dist_ortho import models

        if not models.is_shape_only(self.model.preset):
            limit = models.GPT_PRESETS[self.model.preset].seq_len
            if self.train.seq_len > limit:
                raise ConfigError("train.seq_len", f"{self.train.seq_len} exceeds model "
                                                   f"{self.model.preset!r}'s seq_len {limit}")
        trace = self.profiling.trace_step
        if trace is not None and not 0 <= trace < self.train.steps:
            raise ConfigError("profiling.trace_step", f"must be in [0, train.steps="
                                                      f"{self.train.steps}) or null, got {trace}")
        train, ckpt = self.train, self.checkpoint
        if train.fault_step is not None and train.fault_mode == "kill_in_save":
            saved = train.fault_step + 1  # the save that follows step fault_step, if any
            if ckpt.dir is None or not (saved == train.steps
                                        or (ckpt.every > 0 and saved % ckpt.every == 0)):
                raise ConfigError("train.fault_step", f"fault_mode kill_in_save needs a checkpoint "
                                                      f"save after step {train.fault_step}, but "
                                                      f"checkpoint.dir={ckpt.dir!r} and "
                                                      f"checkpoint.every={ckpt.every} save none "
                                                      f"there")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["optimizer"]["adamw_betas"] = list(self.optimizer.adamw_betas)
        return out

    @property
    def run_name(self) -> str:
        """output.name, or "<preset>-<strategy>" when unset (the run appends -p<world size>)."""
        return self.output.name or f"{self.model.preset}-{self.strategy.name}"


SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


# --- range helpers ------------------------------------------------------------------------------

def _positive(key: str, value: float, hint: str = "") -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0{' ' + hint if hint else ''}, "
                               f"got {value!r}")


def _nonnegative(key: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")


def _unit(key: str, value: float) -> None:
    if not math.isfinite(value) or not 0 <= value < 1:
        raise ConfigError(key, f"must be in [0, 1), got {value!r}")


# --- YAML ---------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 / 3E+4 (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


# --- typed conversion ---------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    raise AssertionError(f"config field {key} has unsupported type {tp!r}")


def _unknown(key: str, name, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"unknown key{hint} (known: {', '.join(known)})")


def _build_section(cls: type, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}"
        if name not in fields_:
            raise _unknown(key, name, fields_)
        value = _coerce(key, value, hints[name])
        choices = fields_[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: Mapping | None) -> Config:
    """Build and check a Config from plain data (as read from YAML)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise _unknown(str(name), name, SECTIONS)
        sections[name] = _build_section(SECTIONS[name], value, name)
    config = Config(**sections)
    config.check()
    return config


# --- overrides ----------------------------------------------------------------------------------

def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """["optimizer.lr=0.01", ...] -> {"optimizer.lr": 0.01, ...}; values are parsed as YAML."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key, f"override {item!r} must look like section.key=value, e.g. "
                                   f"optimizer.lr=0.01")
        try:
            out[key] = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"value {raw!r} is not valid YAML: {exc}") from None
    return out


def apply_overrides(data: Mapping | None, overrides: Mapping[str, object] | Sequence[str]) -> dict:
    """A deep copy of `data` with dotted-key overrides applied. Keys are checked against the schema
    (so `--set optimizer.lrr=1` fails here, naming the key); under `strategy.options` any name may
    be set and is checked by the strategy."""
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    data = copy.deepcopy(dict(data or {}))
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(key, "an override key must be section.key (e.g. optimizer.lr)")
        section, name = parts[0], parts[1]
        if section not in SECTIONS:
            raise _unknown(section, section, SECTIONS)
        fields_ = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if name not in fields_:
            raise _unknown(f"{section}.{name}", name, fields_)
        if len(parts) > 2 and not (section == "strategy" and name == "options" and len(parts) == 3):
            raise ConfigError(key, "too deep: only strategy.options.<name> has sub-keys")
        node = data.setdefault(section, {})
        if node is None:
            node = data[section] = {}
        if not isinstance(node, dict):
            raise ConfigError(section, f"must be a mapping, got {node!r}")
        if len(parts) == 3:
            opts = node.get("options")
            if opts is None:
                opts = node["options"] = {}
            if not isinstance(opts, dict):
                raise ConfigError("strategy.options", f"must be a mapping, got {opts!r}")
            opts[parts[2]] = value
        else:
            node[name] = value
    return data


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, object] | Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} does not exist")
        data = yaml_load(path.read_text())
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError("", f"{path}: a config must be a mapping of sections")
    return config_from_dict(apply_overrides(data, overrides))


# --- resolution and identity --------------------------------------------------------------------

def default_device_type() -> str:
    """"cuda" when torch sees a GPU, else "cpu": the device a run on this machine uses."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(config: Config, device_type: str | None = None) -> Config:
    """A copy with "auto" choices made for `device_type` (default: this machine's)."""
    from dist_ortho.newton_schulz import resolve_ns_dtype

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


HASH_EXCLUDED = ("output", "checkpoint")
# keys added after results existed: hashed only when set away from their default
HASH_NEW_KEYS = {("optimizer", "nonfinite"): "skip", ("train", "inject_nan_step"): None,
                 ("train", "inject_nan_rank"): 0, ("train", "inject_nan_param"): None,
                 ("train", "fault_step"): None, ("train", "fault_rank"): 0,
                 ("train", "fault_mode"): "kill"}


def config_hash(config: Config) -> str:
    """12 hex digits of sha256 over the canonical JSON of every section but output/checkpoint.
    Resolve first if "auto" choices should count as what they became."""
    data = {k: v for k, v in config.to_dict().items() if k not in HASH_EXCLUDED}
    for (section, key), default in HASH_NEW_KEYS.items():
        if data[section][key] == default:
            del data[section][key]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_config(config: Config, path: str | Path | None = None) -> str:
    """YAML text of `config` (written to `path` when given); loads back to an equal Config."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
