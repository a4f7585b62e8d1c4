"""Shape-only models for optimizer microbenchmarks.

An optimizer step does not care what a model computes, only which parameter
matrices it has and what their gradients are. This module builds models that
hold exactly the weight matrices of a real architecture (Llama-3 layers) and
nothing else: there is no forward pass. Gradients come from
:func:`synthetic_grads`, which fills ``p.grad`` with reproducible random
values. That lets us time or compare optimizer steps at Llama-70B layer shapes
without the memory and time a real forward/backward would take.

Layer layout follows Hugging Face's Llama naming, with weights stored as
``(out_features, in_features)`` like ``nn.Linear``::

    layers.{i}.self_attn.q_proj.weight   (n_heads * head_dim,    hidden)
    layers.{i}.self_attn.k_proj.weight   (n_kv_heads * head_dim, hidden)
    layers.{i}.self_attn.v_proj.weight   (n_kv_heads * head_dim, hidden)
    layers.{i}.self_attn.o_proj.weight   (hidden, n_heads * head_dim)
    layers.{i}.mlp.gate_proj.weight      (intermediate, hidden)
    layers.{i}.mlp.up_proj.weight        (intermediate, hidden)
    layers.{i}.mlp.down_proj.weight      (hidden, intermediate)

Embeddings, the output head and norm gains are left out on purpose: they are
not orthogonalized, so they only add noise to an orthogonalization benchmark.

Determinism across world sizes: both the initial weights and the synthetic
gradients of a parameter are generated in full on the CPU from a generator
seeded by (seed, [step,] crc32(parameter name)). When the parameter is an
FSDP2 DTensor, each rank then keeps only its own shard. So a sharded model on
P ranks sees exactly the same global values as an unsharded one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dist_ortho.core.seeds import derive_seed

__all__ = [
    "ShapeConfig",
    "SHAPE_PRESETS",
    "ShapeOnlyModel",
    "matrix_shapes",
    "synthetic_grads",
    "count_parameters",
]

INIT_STD = 0.02


@dataclass(frozen=True)
class ShapeConfig:
    """Dimensions of a Llama-style layer stack."""

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    num_layers: int

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ShapeConfig.{f.name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ShapeConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


SHAPE_PRESETS: dict[str, ShapeConfig] = {
    # Published Llama-3 configurations (Llama-3.2-1B, Llama-3-8B, Llama-3-70B).
    "llama-1b": ShapeConfig(
        hidden=2048, intermediate=8192, n_heads=32, n_kv_heads=8, head_dim=64, num_layers=16
    ),
    "llama-8b": ShapeConfig(
        hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8, head_dim=128, num_layers=32
    ),
    "llama-70b": ShapeConfig(
        hidden=8192, intermediate=28672, n_heads=64, n_kv_heads=8, head_dim=128, num_layers=80
    ),
    # Same structure (GQA, non-square MLP), cheap enough for unit tests on CPU.
    "llama-tiny": ShapeConfig(
        hidden=128, intermediate=344, n_heads=4, n_kv_heads=2, head_dim=32, num_layers=2
    ),
    # Big enough that Newton-Schulz dominates a CPU optimizer step, small
    # enough that one float32 step takes about a second on one thread.
    "transformer-bench": ShapeConfig(
        hidden=512, intermediate=1376, n_heads=8, n_kv_heads=4, head_dim=64, num_layers=2
    ),
    # Half transformer-bench's width (1/8 of its NS FLOPs): still NS-dominated on a CPU, cheap
    # enough that the default study repeats every strategy 15 times per world size in minutes.
    "transformer-small": ShapeConfig(
        hidden=256, intermediate=688, n_heads=4, n_kv_heads=2, head_dim=64, num_layers=2
    ),
}


def _resolve(preset: str | ShapeConfig, num_layers: int | None) -> ShapeConfig:
    if isinstance(preset, ShapeConfig):
        config = preset
    elif preset in SHAPE_PRESETS:
        config = SHAPE_PRESETS[preset]
    else:
        raise ValueError(
            f"unknown shape preset {preset!r}; available: {', '.join(sorted(SHAPE_PRESETS))}"
        )
    if num_layers is not None:
        config = replace(config, num_layers=num_layers)
    config.validate()
    return config


def _layer_shapes(c: ShapeConfig) -> list[tuple[str, tuple[int, int]]]:
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return [
        ("self_attn.q_proj", (q_dim, c.hidden)),
        ("self_attn.k_proj", (kv_dim, c.hidden)),
        ("self_attn.v_proj", (kv_dim, c.hidden)),
        ("self_attn.o_proj", (c.hidden, q_dim)),
        ("mlp.gate_proj", (c.intermediate, c.hidden)),
        ("mlp.up_proj", (c.intermediate, c.hidden)),
        ("mlp.down_proj", (c.hidden, c.intermediate)),
    ]


def matrix_shapes(
    preset: str | ShapeConfig, num_layers: int | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter name, shape) for every matrix, in ``named_parameters`` order."""
    config = _resolve(preset, num_layers)
    return [
        (f"layers.{i}.{module}.weight", shape)
        for i in range(config.num_layers)
        for module, shape in _layer_shapes(config)
    ]


def _full_random(shape: torch.Size, *seed_parts: int, std: float = 1.0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    # Generated where it is used: an 8B model's full gradients drawn on the CPU of every rank at
    # every step would dominate a GPU run. Values depend on the device type's generator (CPU and
    # CUDA streams differ), never on the world size.
    gen = torch.Generator(device=device).manual_seed(derive_seed(*seed_parts))
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std


def _to_param_layout(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Turn a full (global) tensor into something shaped and placed like ``p``."""
    if isinstance(p, DTensor):
        # src_data_rank=None: every rank already holds the same full tensor, so
        # each one slices out its own shard locally with no communication.
        out = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        assert out.to_local().device == p.to_local().device, (out.device, p.device)
        return out
    return full.to(device=p.device, dtype=p.dtype)


class _Weight(nn.Module):
    # A bare weight holder; nn.Linear would run its own (unwanted) init and
    # suggest a forward pass that this module does not have.
    def __init__(self, shape: tuple[int, ...], device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class _Group(nn.Module):
    def __init__(self, shapes: list[tuple[str, tuple[int, int]]], device, dtype) -> None:
        super().__init__()
        for name, shape in shapes:
            self.add_module(name, _Weight(shape, device, dtype))


class ShapeOnlyLayer(nn.Module):
    def __init__(self, config: ShapeConfig, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        shapes = _layer_shapes(config)
        attn = [(n.split(".")[1], s) for n, s in shapes if n.startswith("self_attn.")]
        mlp = [(n.split(".")[1], s) for n, s in shapes if n.startswith("mlp.")]
        self.self_attn = _Group(attn, device, dtype)
        self.mlp = _Group(mlp, device, dtype)

    def forward(self, *args, **kwargs):
        raise RuntimeError(_NO_FORWARD)


_NO_FORWARD = (
    "ShapeOnlyModel has no forward pass: it only holds parameter matrices for "
    "optimizer-only benchmarks. Fill gradients with synthetic_grads(model, step, seed) "
    "and call optimizer.step(); use a GPT preset to train a real model."
)


class ShapeOnlyModel(nn.Module):
    """The weight matrices of a Llama-style stack, with no forward pass.

    ``model.layers`` is a ``ModuleList`` so each layer can be ``fully_shard``-ed.
    Weights are N(0, 0.02^2), drawn per parameter from ``seed`` and the
    parameter's name (see the module docstring), so they do not depend on
    torch's global RNG or on how the model is sharded. On the ``meta`` device
    initialization is skipped; call ``to_empty`` and then ``reset_parameters``.
    """

    def __init__(
        self,
        preset: str | ShapeConfig,
        num_layers: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = _resolve(preset, num_layers)
        self.seed = seed
        device = torch.device(device) if device is not None else None
        self.layers = nn.ModuleList(
            ShapeOnlyLayer(self.config, device, dtype) for _ in range(self.config.num_layers)
        )
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Fill every weight from (seed, crc32(name)); works on FSDP2 DTensors."""
        if seed is not None:
            self.seed = seed
        for name, p in self.named_parameters():
            full = _full_random(p.shape, self.seed, zlib.crc32(name.encode()), std=INIT_STD)
            p.copy_(_to_param_layout(full, p))

    def forward(self, *args, **kwargs):
        raise RuntimeError(_NO_FORWARD)


@torch.no_grad()
def synthetic_grads(model: nn.Module, step: int, seed: int) -> None:
    """Set ``p.grad`` for every parameter to reproducible N(0, 1) values.

    The value for a parameter depends only on (seed, step, crc32(name)) and
    the parameter's global shape, never on the world size: for an FSDP2
    DTensor parameter each rank keeps its slice of the same global gradient.
    Python's ``hash()`` is not used because it is salted per process.
    """
    for name, p in model.named_parameters():
        # FSDP2 keeps the original parameter names, so a sharded and an
        # unsharded model hash every parameter to the same generator seed.
        device = (p.to_local() if isinstance(p, DTensor) else p).device
        full = _full_random(p.shape, seed, step, zlib.crc32(name.encode()), device=device)
        p.grad = _to_param_layout(full, p)


def count_parameters(model: nn.Module) -> int:
    """Number of (global, unsharded) parameter elements; tied weights count once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
