"""NorMuon and Muon as torch optimizers that work on FSDP2-sharded, replicated or local parameters.

One step, on every rank, whatever the world size:
1. non-finite check: one tiny all-reduce agrees across ranks whether any gradient holds NaN/Inf; if
   so the step is skipped everywhere with a warning (`nonfinite="skip"`) or raises ("raise"),
   before any state is touched.
2. momentum: on local rows only (momentum is sharded exactly like the parameter).
3. orthogonalize: the strategy moves row shards so that each matrix is whole on some rank, runs
   Newton-Schulz there and brings back each rank's rows of the result (see `strategies`).
4. NorMuon normalization, on local rows: each row's second moment v is local, and the two Frobenius
   norms that need the whole matrix come from one batched all-reduce of per-matrix sums of squares.
5. apply: decoupled weight decay and the update, written in place into the local shard.

With one rank, the same code runs with every collective skipped. Parameters must be 2-D or more
(4-D conv weights are viewed as (out, -1), 3-D stacks as batches of matrices); use
`dist_ortho.split_params` to send embeddings, heads, norms and biases to AdamW.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from dist_ortho import strategies as strategy_registry
from dist_ortho.newton_schulz import NSConfig, matrix_view_shape, newton_schulz, ns_flops
from dist_ortho.reference import NORM_EPS, ROW_EPS, shape_scale
from dist_ortho.sharding import Layout, MatrixSpec, chunk_sizes, local_tensor, resolve_layout
from dist_ortho.strategies.base import CommItem, ExecContext, Plan, Strategy, all_reduce_bytes

__all__ = ["NorMuon", "Muon", "NONFINITE_POLICIES"]

log = logging.getLogger("dist_ortho")
NONFINITE_POLICIES = ("skip", "raise")


def _check_unit_interval(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")


def _check_nonnegative(name: str, value) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def count_nonfinite(grads: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                    world_size: int, device: torch.device) -> int:
    """Number of gradient shards holding NaN/Inf, summed over the ranks of `group`: one tiny
    all-reduce, so every rank gets the same verdict. A sum is NaN/Inf iff an element is (or the
    sum overflows float32, which is no healthier)."""
    sums = [torch.sum(g, dtype=torch.float32).to(device) for g in grads]
    bad = ((~torch.isfinite(torch.stack(sums))).sum().to(torch.float32).reshape(1) if sums
           else torch.zeros(1, device=device))
    if world_size > 1:
        dist.all_reduce(bad, group=group)
    return int(bad.item())


def handle_nonfinite(count: int, policy: str, who: str) -> None:
    """Raise (policy "raise") or warn that the step is skipped (policy "skip")."""
    message = f"{who}: non-finite gradient on {count} parameter shard(s) across ranks"
    if policy == "raise":
        raise FloatingPointError(message + "; nothing was updated (nonfinite='raise').")
    warnings.warn(message + "; step skipped on every rank, weights and state unchanged.",
                  RuntimeWarning, stacklevel=4)
    log.warning("%s; step skipped on every rank", message)


class _Orthogonalized(torch.optim.Optimizer):
    """Shared machinery of Muon and NorMuon; subclasses set `algorithm`."""

    algorithm = "muon"

    def __init__(self, params, defaults: dict, strategy: str | Strategy = "replicated",
                 nonfinite: str = "skip", process_group: dist.ProcessGroup | None = None) -> None:
        if isinstance(strategy, str):
            strategy = strategy_registry.build(strategy)
        elif not isinstance(strategy, Strategy):
            raise ValueError(f"strategy must be a name from {strategy_registry.available()} or a "
                             f"dist_ortho.strategies.Strategy instance, got {type(strategy).__name__}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.strategy = strategy
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.phases = None  # a profiler's phase timer; None costs nothing
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.executed_ns_flops = 0  # NS FLOPs actually run on this rank, counted from the shapes
        self._layouts: dict[int, Layout] = {}
        self._names: dict[int, str] = {}
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        self.plan()  # surfaces every planning error now, on every rank, before any collective

    # -- construction-time validation ------------------------------------------------------------
    def _validate_hparams(self, group: dict) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        _check_nonnegative("lr", lr)
        _check_unit_interval("momentum", group["momentum"])
        if "beta2" in group:
            _check_unit_interval("beta2", group["beta2"])
        _check_nonnegative("weight_decay", group["weight_decay"])
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
        NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_hparams(group)
        g = len(self.param_groups) - 1
        names = group.get("param_names") or [f"param_groups[{g}].params[{j}]"
                                             for j in range(len(group["params"]))]
        for p, name in zip(group["params"], names):
            if p.ndim < 2:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}: {type(self).__name__} "
                    f"orthogonalizes matrices (2-D, 3-D stacks, 4-D conv) only. Give 0-D/1-D "
                    f"parameters (biases, norms) to AdamW, e.g. with dist_ortho.split_params.")
            if p.numel() == 0:
                raise ValueError(f"parameter {name!r} has no elements (shape {tuple(p.shape)})")
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; needs floating point")
            matrix_view_shape(p.shape)  # raises for 5-D and up
            layout = resolve_layout(p, name, self.process_group)
            if layout.sharded:
                expected = chunk_sizes(p.shape[0], layout.world_size)[layout.rank]
                if local_tensor(p).shape[0] != expected:
                    raise ValueError(
                        f"parameter {name!r} holds {local_tensor(p).shape[0]} rows on rank "
                        f"{layout.rank}, but FSDP2's torch.chunk layout gives {expected}; custom "
                        f"uneven shardings are not supported.")
            self._layouts[id(p)] = layout
            self._names[id(p)] = name
        if self._ready:
            self._plans.clear()
            self.plan()

    def _group_layout(self, params: Sequence[torch.Tensor]) -> Layout:
        layouts = [self._layouts[id(p)] for p in params]
        first = layouts[0]
        for p, lay in zip(params, layouts):
            if lay.group is not first.group or lay.world_size != first.world_size:
                raise ValueError(
                    f"parameter {self._names[id(p)]!r} lives on a different process group than "
                    f"{self._names[id(params[0])]!r}; one optimizer schedules over one group. Use "
                    f"one optimizer per mesh, or pass process_group= for plain parameters.")
        return first

    # -- planning --------------------------------------------------------------------------------
    def _entries(self, require_grad: bool) -> list[tuple[dict, torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"]
                if not require_grad or p.grad is not None]

    def _ns_config(self, group: dict) -> NSConfig:
        return NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"])

    def plan(self, entries: list[tuple[dict, torch.Tensor]] | None = None) -> Plan:
        """The strategy's plan for these parameters (default: all), plus the optimizer's own
        all-reduces, cached by which parameters take part."""
        entries = self._entries(require_grad=False) if entries is None else entries
        key = tuple(id(p) for _, p in entries)
        if key in self._plans:
            return self._plans[key]
        if not entries:
            raise ValueError(f"{type(self).__name__} has no parameters to step")
        layout = self._group_layout([p for _, p in entries])
        out_dtypes = {self._ns_config(g).torch_dtype(layout.device) for g, _ in entries}
        if len(out_dtypes) > 1:
            raise ValueError(f"param groups use different ns_dtype values {sorted(map(str, out_dtypes))}; "
                             f"results travel in one buffer dtype, so use one ns_dtype per optimizer")
        specs = []
        for i, (g, p) in enumerate(entries):
            lay = self._layouts[id(p)]
            sizes = (chunk_sizes(p.shape[0], lay.world_size) if lay.sharded
                     else (p.shape[0],) * lay.world_size)
            specs.append(MatrixSpec(i, self._names[id(p)], tuple(p.shape), p.dtype, sizes,
                                    lay.sharded, g["ns_steps"], next(iter(out_dtypes))))
        plan = self.strategy.plan(specs, layout.world_size, layout.rank)
        if layout.world_size > 1:
            for cost in plan.ranks:
                flag = all_reduce_bytes(4, layout.world_size)
                cost.comm.append(CommItem("all_reduce", flag, flag, "nonfinite_check"))
                if self.algorithm == "normuon":
                    nbytes = 2 * 4 * self._norm_slots(specs)[1]
                    if nbytes:
                        red = all_reduce_bytes(nbytes, layout.world_size)
                        cost.comm.append(CommItem("all_reduce", red, red, "normalize"))
        plan.details["layout"] = layout
        self._plans[key] = plan
        return plan

    @staticmethod
    def _norm_slots(specs: Sequence[MatrixSpec]) -> tuple[list[int], int]:
        """Offset of each sharded matrix's Frobenius-norm slots in the all-reduced vector (one slot
        per matrix, one per stacked matrix of a 3-D parameter), and the total."""
        offsets, total = [], 0
        for m in specs:
            offsets.append(total)
            if m.sharded:
                total += m.view_shape[0] if len(m.view_shape) == 3 else 1
        return offsets, total

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, layout: Layout) -> dict:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
            state["step"] = torch.zeros((), dtype=torch.float32)
            if self.algorithm == "normuon":
                state["v"] = self._row_state(p, layout)
        return state

    @staticmethod
    def _row_state(p: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Zeros with one float32 entry per matrix row, sharded on dim 0 exactly like `p`."""
        view = matrix_view_shape(p.shape)
        local_rows = local_tensor(p).shape[0]
        local = torch.zeros((local_rows,) + view[1:-1], dtype=torch.float32,
                            device=local_tensor(p).device)
        if layout.mesh is None:
            return local
        from torch.distributed.tensor import DTensor

        shape = torch.Size(view[:-1])
        return DTensor.from_local(local, layout.mesh, layout.placements, run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load, which would round v to
        # bf16 for bf16 parameters; keep the saved float32 tensors and put them back afterwards.
        # torch maps saved ids to parameters by position across param groups; so do we.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        exact = {}
        for saved_id, p in zip(saved_ids, params):
            entry = state_dict["state"].get(saved_id, {})
            exact[p] = {k: entry[k] for k in ("v", "step") if k in entry}
        super().load_state_dict(state_dict)
        for p, kept in exact.items():
            for key, value in kept.items():
                self.state[p][key] = value.to(device=self.state[p][key].device,
                                              dtype=torch.float32, copy=True)

    # -- the step --------------------------------------------------------------------------------
    def _phase(self, name: str):
        from contextlib import nullcontext

        return self.phases.phase(name) if self.phases is not None else nullcontext()

    @torch.no_grad()
    def step(self, closure=None, companion_grads: Sequence[torch.Tensor] = ()):
        """One step. `companion_grads`: this rank's gradient shards of other optimizers stepped
        together with this one (CombinedOptimizer's AdamW); they join the non-finite check, so
        that one all-reduce decides for all of them and `last_step_skipped` tells them."""
        loss = None
        self.last_step_skipped = False
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._entries(require_grad=True)
        if len(entries) < sum(len(g["params"]) for g in self.param_groups):
            # FSDP2 leaves grads None on all ranks together, so skipping them keeps ranks in step.
            log.debug("%s: %d parameters have no gradient and are skipped this step",
                      type(self).__name__,
                      sum(len(g["params"]) for g in self.param_groups) - len(entries))
        if not entries:
            return loss
        plan = self.plan(entries)
        layout: Layout = plan.details["layout"]
        grads = [local_tensor(p.grad) for _, p in entries]

        with self._phase("nonfinite_check"):
            bad = count_nonfinite(list(grads) + [local_tensor(g) for g in companion_grads],
                                  layout.group, layout.world_size, layout.device)
            if bad:
                handle_nonfinite(bad, self.nonfinite, type(self).__name__)
                self.skipped_steps += 1
                self.last_step_skipped = True
                return loss

        with self._phase("momentum"):
            directions = []
            for (group, p), g in zip(entries, grads):
                state = self._init_state(p, self._layouts[id(p)])
                state["step"] += 1
                buf = local_tensor(state["momentum_buffer"])
                buf.lerp_(g, 1 - group["momentum"])
                u = torch.lerp(g, buf, group["momentum"]) if group["nesterov"] else buf
                directions.append(u.contiguous())

        ctx = ExecContext(layout.group, layout.rank, layout.world_size,
                          self._make_orthogonalize(entries, layout), plan.matrices[0].out_dtype,
                          layout.device, self.phases)
        with self._phase("orthogonalize"):
            results = self.strategy.execute(plan, directions, ctx)
        del directions

        with self._phase("normalize"):
            if self.algorithm == "normuon":
                updates = self._normuon_updates(entries, plan, results, layout)
            else:
                updates = [o.float() * shape_scale(p.shape) for (_, p), o in zip(entries, results)]
        with self._phase("apply"):
            for (group, p), update in zip(entries, updates):
                local = local_tensor(p)
                local.mul_(1 - group["lr"] * group["weight_decay"])
                local.add_(update.reshape(local.shape).to(local.dtype), alpha=-group["lr"])
        return loss

    def _make_orthogonalize(self, entries, layout: Layout):
        configs = [self._ns_config(g) for g, _ in entries]

        def orthogonalize(indices: Sequence[int], stacked: torch.Tensor) -> torch.Tensor:
            ns = configs[indices[0]]
            assert all(configs[i] == ns for i in indices), "a batch mixes NS settings"
            shape = tuple(stacked.shape[1:])
            view = matrix_view_shape(shape)
            out = newton_schulz(stacked.reshape((len(indices),) + view), ns.steps,
                                ns.torch_dtype(layout.device), ns.coefficients, ns.eps)
            self.executed_ns_flops += len(indices) * ns_flops(shape, ns.steps)
            return out.reshape(stacked.shape)

        return orthogonalize

    def _normuon_updates(self, entries, plan: Plan, results, layout: Layout) -> list[torch.Tensor]:
        specs = plan.matrices
        offsets, total = self._norm_slots(specs)
        device = layout.device
        shard_sums = torch.zeros(2, total, dtype=torch.float32, device=device)
        normalized, local_norms = [], []
        for (group, p), spec, o, offset in zip(entries, specs, results, offsets):
            v = local_tensor(self.state[p]["v"])
            view = (o.shape[0],) + spec.view_shape[1:]
            O = o.float().reshape(view)
            f2 = O.square().sum(dim=(-2, -1))
            v.lerp_(O.square().mean(dim=-1), 1 - group["beta2"])
            O = O / (v.sqrt().unsqueeze(-1) + ROW_EPS)
            g2 = O.square().sum(dim=(-2, -1))
            if spec.sharded:
                # local rows of a 2-D/4-D matrix add to one slot; a 3-D stack's local matrices
                # each own the slot of their global index
                start = offset + (spec.shard_offset(layout.rank) if f2.ndim else 0)
                span = f2.numel() if f2.ndim else 1
                shard_sums[0, start:start + span] += f2.reshape(-1)
                shard_sums[1, start:start + span] += g2.reshape(-1)
                local_norms.append(None)
            else:
                local_norms.append((f2, g2))
            normalized.append(O)
        if layout.world_size > 1 and total:
            dist.all_reduce(shard_sums, group=layout.group)
        updates = []
        for (group, p), spec, O, offset, norms in zip(entries, specs, normalized, offsets,
                                                      local_norms):
            if norms is None:
                start = offset + (spec.shard_offset(layout.rank) if O.ndim == 3 else 0)
                span = O.shape[0] if O.ndim == 3 else 1
                f2, g2 = shard_sums[0, start:start + span], shard_sums[1, start:start + span]
            else:
                f2, g2 = norms
            scale = f2.sqrt() / (g2.sqrt() + NORM_EPS)
            scale = scale.reshape(-1, 1, 1) if O.ndim == 3 else scale.reshape(())
            updates.append(O * scale * shape_scale(spec.shape))
        return updates


class Muon(_Orthogonalized):
    """Muon: momentum, then Newton-Schulz, scaled by max(1, m/n) ** 0.5."""

    algorithm = "muon"

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: str = "auto", ns_coefficients: str = "jordan",
                 strategy: str | Strategy = "replicated", nonfinite: str = "skip",
                 process_group: dist.ProcessGroup | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_coefficients=ns_coefficients)
        super().__init__(params, defaults, strategy, nonfinite, process_group)


class NorMuon(_Orthogonalized):
    """NorMuon (arXiv:2510.05491): Muon plus a per-row second-moment normalization of the
    orthogonalized update, rescaled to keep Muon's update norm. See `dist_ortho.reference`."""

    algorithm = "normuon"

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95,
                 beta2: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str = "auto", ns_coefficients: str = "jordan",
                 strategy: str | Strategy = "replicated", nonfinite: str = "skip",
                 process_group: dist.ProcessGroup | None = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                        nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        ns_coefficients=ns_coefficients)
        super().__init__(params, defaults, strategy, nonfinite, process_group)
