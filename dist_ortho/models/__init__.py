"""Model registry: one name space for trainable GPTs and shape-only models.

``build_model("gpt-tiny")`` returns a trainable :class:`GPT`;
``build_model("llama-8b", num_layers=2)`` returns a :class:`ShapeOnlyModel`
holding Llama-3-8B layer matrices for optimizer-only benchmarks. Keyword
overrides replace fields of the preset's config (``GPTConfig`` or
``ShapeConfig``); shape-only models also accept ``seed``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from dist_ortho.models.gpt import GPT, GPT_PRESETS, GPTConfig
from dist_ortho.models.shapes import (
    SHAPE_PRESETS,
    ShapeConfig,
    ShapeOnlyModel,
    count_parameters,
    matrix_shapes,
    synthetic_grads,
)

__all__ = [
    "GPT",
    "GPTConfig",
    "GPT_PRESETS",
    "SHAPE_PRESETS",
    "ShapeConfig",
    "ShapeOnlyModel",
    "available",
    "build_model",
    "count_parameters",
    "depth_override",
    "is_shape_only",
    "matrix_shapes",
    "synthetic_grads",
]

assert not set(GPT_PRESETS) & set(SHAPE_PRESETS), "preset names must be unique"


def available() -> list[str]:
    """All model names ``build_model`` accepts: GPT presets, then shape-only ones."""
    return sorted(GPT_PRESETS) + sorted(SHAPE_PRESETS)


def is_shape_only(name: str) -> bool:
    """True if ``name`` is a shape-only (no forward pass) preset."""
    _check_name(name)
    return name in SHAPE_PRESETS


def depth_override(name: str, num_layers: int | None) -> dict:
    """The ``build_model`` keyword that sets the preset's depth (GPT: ``n_layers``, shape-only:
    ``num_layers``), or nothing when ``num_layers`` is None."""
    if num_layers is None:
        return {}
    return {"num_layers" if is_shape_only(name) else "n_layers": num_layers}


def _check_name(name: str) -> None:
    if name not in GPT_PRESETS and name not in SHAPE_PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")


def _check_overrides(name: str, overrides: dict, allowed: list[str]) -> None:
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown override(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"allowed keys: {', '.join(allowed)}"
        )


def build_model(
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> nn.Module:
    """Build the named preset on ``device`` (default: torch's default device).

    ``device="meta"`` builds without allocating or initializing; materialize
    with ``model.to_empty(device=...)`` and ``model.reset_parameters()``.
    GPT initialization draws from torch's global RNG (seed it first);
    shape-only models are seeded by the ``seed`` override (default 0).
    """
    _check_name(name)
    if name in GPT_PRESETS:
        _check_overrides(name, overrides, GPTConfig.field_names())
        config = dataclasses.replace(GPT_PRESETS[name], **overrides)
        # Build directly on the target device so large models never exist
        # twice, and meta builds skip initialization entirely.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = GPT(config)
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model
    _check_overrides(name, overrides, ShapeConfig.field_names() + ["seed"])
    seed = overrides.pop("seed", 0)
    config = dataclasses.replace(SHAPE_PRESETS[name], **overrides)
    return ShapeOnlyModel(config, device=device, dtype=dtype, seed=seed)

