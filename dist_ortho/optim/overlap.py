"""Orthogonalization during the backward pass: FSDP2 hooks that run an `overlapped` strategy.

    opt = NorMuon(model.parameters(), strategy="overlapped")   # schedule: backward (default)
    opt.overlap_with_backward(model)        # build_optimizers(model, ...) does this itself
    loss.backward()                         # units' exchanges and NS start as grads arrive
    opt.step()                              # waits for what is left, normalizes, applies

Which hook. FSDP2 (torch >= 2.6) assigns each sharded gradient in `foreach_reduce`, right after
its unit's reduce-scatter, and then calls the sharded parameter's post-accumulate-grad hooks
itself (the sharded parameter is not in the autograd graph, so autograd never would). So the
public `Tensor.register_post_accumulate_grad_hook` on the FSDP2 parameter fires once per unit
per backward, after the reduce-scatter, with the reduced shard in `p.grad`; on CUDA it is called
on FSDP2's post-reduce stream, from the autograd engine's device thread. The work a hook starts
runs on the optimizer's own stream, entered from that stream with an event, and `step()` joins it
(`dist_ortho.optim.streams` states the rules). A unit is ready when every optimizer parameter it
manages has fired. `tests/strategies/test_backward_overlap_matches_the_reference.py` fails loudly
if torch stops calling the hook this way.

What runs in the hook. The unit's momentum directions are computed from the final shard
(`lerp(M, G, 1-mu)`, Nesterov `lerp(G, M', mu)`) into new tensors, without touching the
optimizer's state, and the unit's buckets are pushed into the strategy's run (`Strategy.start`,
the executor's `Run`: forward all-to-all issued async; the bucket pushed `lag` buckets earlier is
waited for, orthogonalized and its return issued; the last ones wait for step()'s drain). Units are launched in plan order (backward order, known
from the model): a unit that fires early waits for the ones before it, so every rank issues the
same collectives in the same order whatever order its hooks fire in.

Process group. The optimizer's collectives run on a group of their own (same ranks as the
parameters' shard group, `new_group(use_local_synchronization=True)`): on one communicator every
collective queues behind the previous one, so an all-to-all in flight on a slow link would hold up
FSDP2's next reduce-scatter (and the reverse); on its own group the two streams of collectives are
independent, and each is issued in one order on every rank.

What step() does. One all-reduce (the non-finite check, which in this mode carries a second
float) agrees on every rank whether the work started in backward can be used: it cannot when no
hook fired (gradients set by hand, plain tensors, no backward), when some parameters have no
gradient, when momentum/nesterov changed, or when a gradient changed after its hook fired
(clipping, unscaling: caught by comparing a float64 sum and norm of every shard, kept on the
device and folded into that all-reduce, so the step still makes one host sync, and its storage
pointer). Then every rank drains the pipeline (units whose hooks never fired are pushed first),
commits the new momentum, and normalizes and applies; or, if any rank cannot use it, every rank
drops it and runs the same plan at step time. A skipped step (NaN/Inf) drops it too.

Gradient accumulation. With FSDP2's `model.set_requires_gradient_sync(False)` on all but the last
micro-batch (its way to accumulate without communication), reduce-scatters and therefore the hooks
happen on the last micro-batch only, and the overlap works as above. If gradients are reduced on
every micro-batch, each backward fires the hooks again: the work started for the earlier
micro-batch is dropped (its collectives completed on every rank) and started over from the
accumulated gradient, so the update is exact but the earlier work is wasted (warned once).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dist_ortho.core.sharding import local_tensor
from dist_ortho.optim.streams import Streams

__all__ = ["BackwardOverlap", "fsdp_units", "unit_members", "unit_positions", "null_comm_context"]

log = logging.getLogger("dist_ortho")


def fsdp_units(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(FSDP2 module, the parameters its `fully_shard` manages), in backward order.

    A parameter belongs to its nearest enclosing `FSDPModule` (fully_shard manages a module's
    parameters except those of nested fully_shard modules). Backward finishes units in reverse
    forward order, and for the usual model (blocks wrapped one by one, then the root) that is the
    reverse of their pre-order in `model.modules()`: the last block first, the root last."""
    order: list[nn.Module] = []
    owned: dict[int, list[nn.Parameter]] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, owner: nn.Module | None) -> None:
        if isinstance(module, FSDPModule):
            owner = module
            order.append(module)
            owned[id(module)] = []
        for p in module.parameters(recurse=False):
            if owner is not None and id(p) not in seen:
                seen.add(id(p))
                owned[id(owner)].append(p)
        for child in module.children():
            visit(child, owner)

    visit(model, None)
    return [(m, owned[id(m)]) for m in reversed(order)]


def unit_members(entries, model: nn.Module, names: dict) -> list[list[nn.Parameter]]:
    """The optimizer's parameters (`entries`: (group, param) pairs) per FSDP2 unit of `model`, in
    backward order, units without any left out. ValueError (naming the parameter) when one is not
    an FSDP2 DTensor managed by a unit of the model."""
    mine = {id(p) for _, p in entries}
    units = [[p for p in ps if id(p) in mine] for _, ps in fsdp_units(model)]
    units = [ps for ps in units if ps]
    covered = {id(p) for ps in units for p in ps}
    for _, p in entries:
        if id(p) not in covered or not isinstance(p, DTensor):
            raise ValueError(
                f"parameter {names[id(p)]!r} of this optimizer is not managed by an FSDP2 "
                f"`fully_shard` unit of the model given to overlap_with_backward; ordering or "
                f"overlapping by backward needs every parameter sharded by fully_shard (plain "
                f"tensors run at step time)")
    return units


def unit_positions(entries, model: nn.Module, names: dict) -> dict[int, int]:
    """id(parameter) -> the position of its FSDP2 unit in backward order (MatrixSpec.unit)."""
    return {id(p): u for u, ps in enumerate(unit_members(entries, model, names)) for p in ps}


def _fingerprint(g: torch.Tensor) -> torch.Tensor:
    """float64 sum and 2-norm of a gradient shard: any rescaling or edit of it changes them."""
    return torch.stack([torch.sum(g, dtype=torch.float64),
                        torch.linalg.vector_norm(g, dtype=torch.float64)])


class BackwardOverlap:
    """Hooks one optimizer's orthogonalization into the backward pass of `model` (see the module
    docstring). Built by `OrthogonalizedOptimizer.overlap_with_backward`; uses the optimizer's
    entries, plan, state, timer and comm context (a friend of the optimizer, same layer)."""

    def __init__(self, optimizer, model: nn.Module) -> None:
        strategy = optimizer.strategy
        if not strategy.runs_in_backward:
            raise ValueError(f"strategy {strategy.name!r} runs after backward; overlapping the "
                             f"backward pass needs strategy 'overlapped' (schedule: backward)")
        entries = optimizer._entries(require_grad=False)
        mine = {id(p): k for k, (_, p) in enumerate(entries)}
        units = unit_members(entries, model, optimizer._names)
        self.opt = optimizer
        self.entries = entries
        self._index = mine
        self.units = [[mine[id(p)] for p in ps] for ps in units]
        self.unit_of = {k: u for u, ks in enumerate(self.units) for k in ks}
        self.restarts = 0
        self.fallbacks = 0
        self._warned: set[str] = set()
        self.group = None
        layout = optimizer._group_layout([p for _, p in entries])
        # the one collective of set-up, after every check above has passed on every rank
        if layout.world_size > 1:
            ranks = dist.get_process_group_ranks(layout.group)
            self.group = dist.new_group(ranks, backend=dist.get_backend(layout.group),
                                        use_local_synchronization=True)
        self.layout = layout
        self.streams = Streams(layout.device)  # its `log` records the calls, for tests
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for _, p in entries]
        self._reset()

    def close(self) -> None:
        """Remove the hooks (the optimizer runs at step time afterwards)."""
        self.discard()
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- per-backward state ----------------------------------------------------------------------
    def _reset(self) -> None:
        self._pipe = None
        self._plan = None
        self._arrived: list[set[int]] = [set() for _ in self.units]
        self._fired: set[int] = set()
        self._next = 0
        self._new_bufs: dict[int, torch.Tensor] = {}
        self._prints: dict[int, tuple[int, torch.Tensor]] = {}
        self._hparams: dict[int, tuple] = {}

    @property
    def started(self) -> bool:
        return self._pipe is not None

    def discard(self) -> None:
        """Drop the work started in backward (waiting for its collectives first)."""
        if self._pipe is not None:
            with self.opt._comm_context(), self.streams.optimizer_stream():
                self._pipe.abandon()
            self.streams.join()
        self._reset()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.debug(message)

    # -- hooks -----------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        k = self._index[id(p)]
        u = self.unit_of[k]
        if u in self._fired:  # a second backward before step(): start over from its gradient
            self.restarts += 1
            self._warn_once("restart", (
                "overlapped: gradients were reduce-scattered again before step() (gradient "
                "accumulation with gradient sync on every micro-batch); the orthogonalization "
                "started for the earlier micro-batch is dropped and redone. Call "
                "model.set_requires_gradient_sync(False) on all but the last micro-batch to "
                "overlap only the last one."))
            self.discard()
        self._arrived[u].add(k)
        if len(self._arrived[u]) == len(self.units[u]):
            self._fired.add(u)
            with torch.no_grad(), self.opt._comm_context(), self.streams.optimizer_stream():
                while self._next < len(self.units) and self._next in self._fired:
                    self._launch(self._next, in_backward=True)
                    self._next += 1

    def _start(self) -> None:
        opt = self.opt
        plan, run = opt._planned(self.entries)
        self._plan = plan
        # the step-time context, on this overlap's own group
        ctx = run.context([opt._ns_config(g) for g, _ in self.entries], opt.timer, self.group)
        self._pipe = opt.strategy.start(plan, ctx)
        # buckets of each unit, in plan order (the plan orders buckets by unit)
        self._unit_buckets = [[] for _ in self.units]
        for b, members in enumerate(plan.buckets):
            self._unit_buckets[self.unit_of[members[0]]].append(b)

    def _direction(self, k: int, record: bool) -> torch.Tensor:
        group, p = self.entries[k]
        g = local_tensor(p.grad)
        state = self.opt.state.get(p, {})
        buf = local_tensor(state["momentum_buffer"]) if "momentum_buffer" in state else None
        self.streams.keep_alive([g, buf])  # made on the gradient's / step's stream, read here
        if record:
            self._prints[k] = (g.data_ptr(), _fingerprint(g))
            self._hparams[k] = (group["momentum"], group["nesterov"], group.get("maximize"))
        buf = local_tensor(self.opt._fresh_momentum(p)) if buf is None else buf
        g = -g if group.get("maximize") else g
        g = g.to(buf.dtype)  # float32 momentum of 16-bit parameters (optim.precision)
        # the same lerps as the step-time path (which updates buf in place), into new tensors:
        # the state is committed in step(), after the non-finite check
        new = torch.lerp(buf, g, 1 - group["momentum"])
        self._new_bufs[k] = new
        u = torch.lerp(g, new, group["momentum"]) if group["nesterov"] else new
        return u.to(p.dtype).contiguous()

    def _launch(self, u: int, in_backward: bool) -> None:
        timer = self.opt.timer
        with timer.phase("overlap" if in_backward else "launch"):
            if self._pipe is None:
                self._start()
            for b in self._unit_buckets[u]:
                with timer.phase("momentum"):
                    inputs = [self._direction(k, in_backward) for k in self._plan.buckets[b]]
                self._pipe.push(b, inputs)

    # -- step ------------------------------------------------------------------------------------
    def verdict(self, entries) -> tuple[str | None, torch.Tensor]:
        """Whether this rank can use the work started in backward for a step on `entries`:
        (the reason it cannot, if known on the host, else None; a one-element float tensor on the
        device, 1 if it cannot). The gradient check stays on the device, so the optimizer agrees
        on the flag across ranks in its one all-reduce and reads it with its one host sync."""
        device = self.layout.device
        if self._pipe is not None:  # the fingerprints were taken on the optimizer's stream
            self.streams.join()
            self.streams.keep_alive(t for _, t in self._prints.values())
        if self._pipe is None:
            return "no backward hook fired", torch.ones(1, device=device)
        if [id(p) for _, p in entries] != [id(p) for _, p in self.entries]:
            return "some parameters have no gradient", torch.ones(1, device=device)
        ks = sorted(self._prints)
        for k in ks:
            group, p = self.entries[k]
            if self._hparams[k] != (group["momentum"], group["nesterov"], group.get("maximize")):
                return ("momentum, nesterov or maximize changed after backward",
                        torch.ones(1, device=device))
        if not ks:
            return None, torch.zeros(1, device=device)
        grads = [local_tensor(self.entries[k][1].grad) for k in ks]
        if any(g.data_ptr() != self._prints[k][0] for k, g in zip(ks, grads)):
            return "a gradient was replaced after backward", torch.ones(1, device=device)
        now = torch.stack([_fingerprint(g) for g in grads])
        changed = (now != torch.stack([self._prints[k][1] for k in ks])).any()
        return None, changed.to(torch.float32).reshape(1)

    def finish(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Push the units whose hooks did not fire, drain, and return (new momentum rows,
        orthogonalized directions), both in entry order. Resets for the next backward."""
        try:
            with self.opt._comm_context(), self.streams.optimizer_stream():
                while self._next < len(self.units):
                    self._launch(self._next, in_backward=False)
                    self._next += 1
                outputs = self._pipe.drain()
            self.streams.join()
            n = len(self.entries)
            new_bufs = [self._new_bufs[k] for k in range(n)]
            results = [outputs[k] for k in range(n)]
            self.streams.keep_alive(new_bufs + results)  # made on the optimizer's stream
            return new_bufs, results
        finally:
            self._reset()

    def fall_back(self, reason: str) -> None:
        """Every rank drops the started work and the step runs at step time."""
        if self._pipe is not None:
            self.fallbacks += 1
            self._warn_once(reason, f"overlapped: {reason}; the orthogonalization started in "
                                    f"backward is dropped and the step runs after backward")
        self.discard()


def null_comm_context():
    """The default comm context of an optimizer: nothing around its collectives."""
    return nullcontext()
