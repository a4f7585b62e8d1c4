"""Checks made in the parent process before any rank starts: what can be known is known there.

A sweep, study or convergence study calls these for every job before launching anything, and
`dist-ortho run` before it starts its process group, so a mistake costs one line and no launches:

- `check_launch(config, world_size)`: the testing aids against the world size, and the strategy's
  own plan for the model's matrices at that world size. The matrix shapes come from the model
  built on the meta device (no memory, no initialization), split as the optimizer splits them,
  so e.g. a `bucket_bytes` smaller than a matrix fails here with the strategy's own message.
  An HSDP `train.replicate` that does not divide the world size fails here too.
- `writable_dir(path, key)` (from `dist_ortho.core.io`): an output folder that can be created
  and written to, else a ConfigError naming the parameter (`output.dir`, `--out`).
- `oversubscription_warning(world_size)`: a line to print when ranks would outnumber the cores.
"""

from __future__ import annotations

import os

import torch

from dist_ortho import models, strategies
from dist_ortho.core.io import writable_dir
from dist_ortho.core.schema import ConfigError
from dist_ortho.optim.param_groups import split_params
from dist_ortho.profiling.costmodel import matrix_specs
from dist_ortho.studies.config import Config, resolve
from dist_ortho.studies.faults import FaultConfig

__all__ = ["check_launch", "matrix_shapes", "writable_dir", "oversubscription_warning",
           "cpu_cores"]


def matrix_shapes(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter the matrix optimizer (NorMuon/Muon) takes, in order."""
    if config.optimizer.name == "adamw":
        return []
    m = config.model
    model = models.build_model(m.preset, device="meta", dtype=getattr(torch, m.dtype),
                               **models.depth_override(m.preset, m.num_layers))
    matrices, _ = split_params(model.named_parameters(), config.optimizer.split)
    return [(name, tuple(p.shape)) for name, p in matrices]


def check_launch(config: Config, world_size: int, faults: FaultConfig | None = None,
                 device_type: str | None = None) -> None:
    """Everything about a run at `world_size` that can be checked without starting it; raises
    ConfigError naming the key. `faults` are checked when they apply to this run."""
    if world_size < 1:
        raise ConfigError("world_size", f"must be >= 1, got {world_size}")
    if world_size % config.train.replicate:  # HSDP: replicate x shard must be the world
        raise ConfigError("train.replicate", f"{config.train.replicate} does not divide the world "
                                             f"size {world_size}; use a divisor of it (1 = plain "
                                             f"FSDP2, no replica groups)")
    if faults is not None and faults.applies_to(config.output.name
                                                or f"{config.run_name}-p{world_size}"):
        faults.check_against(config, world_size)
    opt = config.optimizer
    if opt.ns_form != "standard" and config.train.replicate > 1 and opt.replicas == "spread":
        raise ConfigError("optimizer.ns_form", f"{opt.ns_form!r} runs on 1-D FSDP only; with "
                                               f"train.replicate > 1 and replicas spread the step "
                                               f"takes the mesh path, which plans standard "
                                               f"Newton-Schulz: use ns_form standard or replicas "
                                               f"repeat")
    resolved = resolve(config, device_type)
    shapes = matrix_shapes(resolved)
    if not shapes:
        return
    specs = matrix_specs(shapes, world_size, param_dtype=resolved.model.dtype,
                         ns_dtype=resolved.optimizer.ns_dtype, ns_steps=resolved.optimizer.ns_steps,
                         ns_form=resolved.optimizer.ns_form)
    strategy = strategies.build(resolved.strategy.name, **resolved.strategy.options)
    try:
        strategy.plan(specs, world_size, 0)
    except ValueError as exc:
        raise ConfigError("strategy.options", f"{exc} (model {config.model.preset} at "
                                              f"{world_size} rank(s))") from None


def cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def oversubscription_warning(world_size: int, device_type: str = "cpu",
                             concurrent: int = 1) -> str | None:
    """A warning when `concurrent` jobs of `world_size` CPU ranks outnumber the cores."""
    cores = cpu_cores()
    ranks = world_size * concurrent
    if device_type != "cpu" or ranks <= cores:
        return None
    what = f"world size {world_size}" + (f" x {concurrent} concurrent runs" if concurrent > 1
                                         else "")
    return (f"warning: {what} = {ranks} ranks on {cores} CPU core(s): ranks share cores, so "
            f"compare timings between strategies at the same world size, not absolute times")
