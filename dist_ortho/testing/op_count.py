"""ATen ops dispatched by one optimizer step, for the launch-count test and bench/launches.py.

On a GPU every ATen op that reaches a kernel is a launch and, for small matrices, the host time to
dispatch it is most of the step. `OpCounter` (a `TorchDispatchMode`) counts every op dispatched
inside its block, views included (they cost host dispatch time even where they launch nothing); a
`torch._foreach_*` op counts once whatever the length of its lists, as it is one dispatch.

`llama_stack(world_size)` is a Llama-like stack of 112 matrices in 3 shapes (16 layers of q, k, v,
o, gate, up, down at small dims), FSDP2-sharded over the default process group; `count_step`
counts the ATen ops of one `NorMuon` step on it (after a first step, so lazily created state is not
counted). Only public API is used, so bench/launches.py can run it against an older checkout.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.strategies import registry
from dist_ortho.models.shapes import ShapeConfig, ShapeOnlyModel, synthetic_grads

__all__ = ["OpCounter", "LLAMA_STACK", "llama_stack", "count_step", "ops_per_matrix"]


class OpCounter(TorchDispatchMode):
    """`ops`: how many times each ATen op was dispatched inside the block; `total` their sum.
    It is also a phase timer (`opt.set_timer(counter)`): `by_phase` counts the ops of each
    innermost phase the optimizer and its strategy mark ("" outside any)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.by_phase: Counter = Counter()
        self.by_phase_op: Counter = Counter()
        self._phases: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @contextmanager
    def phase(self, name: str):
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        phase = self._phases[-1] if self._phases else ""
        self.by_phase[phase] += 1
        self.by_phase_op[(phase, str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))


def _config() -> ShapeConfig:
    # n_kv_heads == n_heads: q, k, v, o share one shape, so the stack has exactly 3 shapes
    return ShapeConfig(hidden=64, intermediate=128, n_heads=4, n_kv_heads=4, head_dim=16,
                       num_layers=16)


LLAMA_STACK = "16 layers x (q, k, v, o: 64x64; gate, up: 128x64; down: 64x128)"


def llama_stack(world_size: int | None, config=None, dtype: torch.dtype | None = None):
    """The shape-only Llama stack (default: `LLAMA_STACK`), each layer and the root
    `fully_shard`-ed over the default group's `world_size` ranks (None: plain tensors)."""
    model = ShapeOnlyModel(config or _config(), dtype=dtype)
    if world_size is None:
        return model
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def count_step(model, opt, step: int = 1, seed: int = 0) -> OpCounter:
    """The ops of `opt.step()` on synthetic gradients of `step` (after one uncounted step)."""
    synthetic_grads(model, step - 1, seed)
    opt.step()
    synthetic_grads(model, step, seed)
    counter = OpCounter()
    opt.set_timer(counter)
    try:
        with counter:
            opt.step()
    finally:
        opt.set_timer(None)
    return counter


def ops_per_matrix(rank: int, world_size: int, names: list[str],
                   rules: tuple[str, ...] = ("normuon", "muon"), sharded: bool = True) -> dict:
    """Worker for `dist_ortho.testing.spawn` (or a call in one process with `sharded` False):
    {(rule, strategy): (ATen ops per matrix of one step on `llama_stack`, that step's ops by
    phase)} on this rank."""
    out = {}
    for rule in rules:
        for name in names:
            model = llama_stack(world_size if sharded else None)
            opt = OrthogonalizedOptimizer(list(model.named_parameters()), rule,
                                          registry.build(name), ns_dtype="float32")
            counter = count_step(model, opt)
            n = len(list(model.parameters()))
            out[(rule, name)] = (counter.total / n, dict(counter.by_phase))
    return out
