"""Cost-model predictions: what one optimizer step costs each rank under a strategy, from shapes.

Given matrix shapes, a world size P, a strategy and its options, `predict` returns per rank: the
bytes sent and received in each kind of collective, the Newton-Schulz FLOPs, the transient bytes the
strategy holds and the persistent optimizer state (momentum in the parameter dtype, the update
rule's state such as NorMuon's float32 row second moment v, and a float32 step counter per
parameter), the lower bounds, and, given model constants (`profiling.timemodel`), the step time.

Who does what is not re-derived here: `optimizer.plan_step` (the strategy's own `plan()` completed
with the optimizer's all-reduces and the update rule's reductions) is the one source of truth for
owners, buckets, bytes and FLOPs, for the optimizer at run time and for this module alike. The
model is validated byte-for-byte against the dispatcher-level counter (`profiling.comm`) on real
gloo ranks and, for P up to 1024, on torch's fake process group (tests/profiling/test_cost_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from dist_ortho import rules as rule_registry
from dist_ortho import strategies as strategy_registry
from dist_ortho.core.hparams import check_choice, check_ns_steps
from dist_ortho.core.newton_schulz import NS_FORMS, matrix_view_shape
from dist_ortho.core.plan import Plan, owner_bound_bytes
from dist_ortho.core.sharding import MatrixSpec, chunk_sizes, dtype_size
from dist_ortho.optim.optimizer import plan_step
from dist_ortho.optim.precision import momentum_dtype_for
from dist_ortho.profiling.hardware import HardwarePreset
from dist_ortho.profiling.timemodel import CostConstants, StepTime, step_time
from dist_ortho.strategies.base import Strategy

__all__ = ["RankPrediction", "LowerBounds", "Prediction", "matrix_specs", "predict_plan",
           "predict", "lower_bounds", "whole_matrix_makespan_bound", "persistent_bytes",
           "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "float16": torch.float16}


def torch_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d in _DTYPES:
        return _DTYPES[d]
    raise ValueError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def _named_shapes(shapes) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for i, s in enumerate(shapes):
        if (isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str)):
            name, shape = s
        else:
            name, shape = f"matrix{i}", s
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or any(d <= 0 for d in shape):
            raise ValueError(f"matrix {name!r} has shape {shape}; the cost model takes the "
                             f"optimizer's matrices: 2-D or more, no empty dimension")
        matrix_view_shape(shape)  # raises for 5-D and up
        out.append((name, shape))
    if not out:
        raise ValueError("no matrix shapes given")
    return out


def matrix_specs(shapes, world_size: int, param_dtype=torch.float32, ns_dtype="float32",
                 ns_steps: int = 5, sharded: bool = True,
                 ns_form: str = "standard") -> list[MatrixSpec]:
    """The MatrixSpecs the optimizer builds for these shapes (FSDP2 dim-0 sharding, torch.chunk
    extents), so that a strategy's plan() here is the plan it makes at run time."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    check_ns_steps("ns_steps", ns_steps)
    check_choice("ns_form", ns_form, NS_FORMS)
    pdt, ndt = torch_dtype(param_dtype), torch_dtype(ns_dtype)
    specs = []
    for i, (name, shape) in enumerate(_named_shapes(shapes)):
        sizes = chunk_sizes(shape[0], world_size) if sharded else (shape[0],) * world_size
        specs.append(MatrixSpec(i, name, shape, pdt, sizes, sharded, ns_steps, ndt, ns_form=ns_form))
    return specs


def _build_strategy(strategy, options: Mapping | None) -> Strategy:
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError("pass options either to strategies.build or here, not both")
        return strategy
    return strategy_registry.build(strategy, **dict(options or {}))


def predict_plan(specs: Sequence[MatrixSpec], world_size: int, strategy: Strategy,
                 rule: str = "normuon", rank: int = 0) -> Plan:
    """The plan of one optimizer step with update rule `rule`: equal to `opt.plan()`."""
    return plan_step(strategy, specs, world_size, rank, rule_registry.get(rule))


def persistent_bytes(specs: Sequence[MatrixSpec], rank: int, rule: str = "normuon") -> int:
    """Optimizer state held by `rank`: momentum (the optimizer's default momentum dtype: float32
    for 16-bit parameters, else theirs) on its shard, the update rule's state
    (NorMuon's float32 v, one entry per local matrix row) and a float32 step counter per
    parameter."""
    return _persistent_all(specs, rule)[rank]


def _persistent_all(specs: Sequence[MatrixSpec], rule: str) -> list[int]:
    update_rule = rule_registry.get(rule)
    P = specs[0].world_size
    total = [0] * P
    for m in specs:
        # bytes per dim-0 row: momentum row, plus the rule's state for that row
        per_row = (m.row_numel * dtype_size(momentum_dtype_for(m.dtype, None))
                   + update_rule.state_bytes_per_row(m))
        for r, rows in enumerate(m.dim0_sizes):
            total[r] += rows * per_row + 4  # + the step counter
    return total


@dataclass(frozen=True)
class RankPrediction:
    rank: int
    bytes_by_kind: dict  # kind -> (send bytes, recv bytes)
    send_bytes: float
    recv_bytes: float
    ns_flops: int
    ns_calls: int
    transient_bytes: int
    persistent_bytes: int
    local_numel: int


@dataclass(frozen=True)
class LowerBounds:
    """Bounds that no owner-based strategy can beat.

    bytes_total: every matrix assembled once and returned once, (P-1)/P N (b_in + b_out) bytes sent
    in total across ranks (2 (P-1)/P N b when both ways use b bytes per element); bytes_per_rank is
    that divided by P. ns_flops_per_rank: total NS FLOPs / P (perfect split). ns_flops_whole_matrix:
    the tighter bound when every matrix is orthogonalized whole on one rank (largest matrix, and
    pigeonhole over the largest ones). bytes_whole_matrix_per_rank: likewise for bytes: the owner of
    a matrix receives every shard but its own, so the busiest rank moves at least that much for the
    largest matrix. Times use the given constants (no latency, perfect overlap).
    """

    bytes_total: float
    bytes_per_rank: float
    bytes_whole_matrix_per_rank: float  # busiest rank, matrices whole on their owner
    ns_flops_total: int
    ns_flops_per_rank: float
    ns_flops_whole_matrix: float
    ns_time_s: float | None = None
    ns_time_whole_matrix_s: float | None = None
    comm_time_s: float | None = None
    time_s: float | None = None  # max(ns_time_s, comm_time_s): perfect overlap


def whole_matrix_makespan_bound(flops: Sequence[float], world_size: int) -> float:
    """Lower bound on the busiest rank's NS FLOPs when matrices cannot be split.

    max(mean, largest, and for every k: among the k*P + 1 largest matrices some rank gets k + 1 of
    them, so at least the k + 1 smallest of those). Greedy LPT meets it on Llama shape sets.
    """
    p = sorted((float(f) for f in flops), reverse=True)
    if not p:
        return 0.0
    bound = max(sum(p) / world_size, p[0])
    k = 1
    while k * world_size < len(p):
        top = k * world_size + 1  # the k*P + 1 largest
        bound = max(bound, sum(p[top - k - 1:top]))
        k += 1
    return bound


def lower_bounds(specs: Sequence[MatrixSpec], world_size: int,
                 constants: CostConstants | None = None) -> LowerBounds:
    P = world_size
    b_in = dtype_size(specs[0].dtype)
    b_out = specs[0].out_itemsize
    N = sum(m.numel for m in specs if m.sharded)
    per_rank = owner_bound_bytes(P, N, b_in, b_out)  # the one formula (report.py plots it too)
    total = per_rank * P
    flops = [m.flops for m in specs]
    sharded = [m for m in specs if m.sharded]
    owner_recv = max(((m.numel - max(m.dim0_sizes) * m.row_numel) * b_in for m in sharded),
                     default=0)
    lb = LowerBounds(bytes_total=total, bytes_per_rank=per_rank,
                     bytes_whole_matrix_per_rank=max(per_rank, owner_recv),
                     ns_flops_total=sum(flops),
                     ns_flops_per_rank=sum(flops) / P,
                     ns_flops_whole_matrix=whole_matrix_makespan_bound(flops, P))
    if constants is None:
        return lb
    rate = constants.compute.ns_flops_per_s
    betas = [b for b in constants.comm.beta_s_per_byte.values()]
    comm = lb.bytes_per_rank * min(betas) if betas and P > 1 else 0.0
    ns = lb.ns_flops_per_rank / rate
    return LowerBounds(**{**asdict(lb), "ns_time_s": ns,
                          "ns_time_whole_matrix_s": lb.ns_flops_whole_matrix / rate,
                          "comm_time_s": comm, "time_s": max(ns, comm)})


@dataclass
class Prediction:
    """What `predict` returns: the plan, per-rank costs, the step time and the lower bounds."""

    strategy: str
    options: dict
    world_size: int
    rule: str
    param_dtype: str
    ns_dtype: str
    plan: Plan
    ranks: list[RankPrediction]
    bounds: LowerBounds
    time: StepTime | None = None
    constants_source: str = ""

    def rank(self, r: int) -> RankPrediction:
        return self.ranks[r]

    @property
    def max_bytes_per_rank(self) -> float:
        """The busiest rank's larger direction (send or receive), all collectives of a step."""
        return max(max(r.send_bytes, r.recv_bytes) for r in self.ranks)

    @property
    def bytes_ratio(self) -> float:
        """busiest rank's bytes / the per-rank lower bound (inf where the bound is 0, P = 1)."""
        lb = self.bounds.bytes_per_rank
        return self.max_bytes_per_rank / lb if lb > 0 else (1.0 if self.max_bytes_per_rank == 0
                                                            else math.inf)

    @property
    def max_ns_flops(self) -> int:
        return max(r.ns_flops for r in self.ranks)

    @property
    def flops_imbalance(self) -> float:
        return self.plan.flops_imbalance

    @property
    def peak_bytes(self) -> int:
        return max(r.persistent_bytes + r.transient_bytes for r in self.ranks)

    def summary(self) -> dict:
        """One flat row for tables."""
        row = dict(strategy=self.strategy, world_size=self.world_size,
                   max_bytes_per_rank=self.max_bytes_per_rank,
                   bytes_lower_bound_per_rank=self.bounds.bytes_per_rank,
                   bytes_whole_matrix_bound=self.bounds.bytes_whole_matrix_per_rank,
                   bytes_ratio=self.bytes_ratio, max_ns_flops=self.max_ns_flops,
                   ns_flops_lower_bound=self.bounds.ns_flops_per_rank,
                   flops_ratio=(self.max_ns_flops / self.bounds.ns_flops_per_rank
                                if self.bounds.ns_flops_per_rank else 1.0),
                   flops_imbalance=self.flops_imbalance,
                   persistent_bytes=max(r.persistent_bytes for r in self.ranks),
                   transient_bytes=max(r.transient_bytes for r in self.ranks),
                   peak_bytes=self.peak_bytes)
        if self.time is not None:
            row.update(step_s=self.time.total_s, comm_s=self.time.comm_s, ns_s=self.time.ns_s,
                       elementwise_s=self.time.elementwise_s, overlap_s=self.time.overlap_s,
                       ns_lower_bound_s=self.bounds.ns_time_s,
                       ns_whole_matrix_bound_s=self.bounds.ns_time_whole_matrix_s,
                       time_lower_bound_s=self.bounds.time_s,
                       time_ratio=self.time.total_s / self.bounds.time_s
                       if self.bounds.time_s else math.inf)
        return row


def predict(shapes, world_size: int, strategy="balanced", options: Mapping | None = None, *,
            constants=None, param_dtype=torch.float32, ns_dtype="float32", ns_steps: int = 5,
            rule: str = "normuon", sharded: bool = True,
            ns_form: str = "standard") -> Prediction:
    """Predict one optimizer step of `strategy` on `world_size` ranks.

    shapes: matrix shapes, or (name, shape) pairs as `dist_ortho.models.matrix_shapes` returns.
    constants: a CostConstants, a `profiling.hardware.HardwarePreset` (made into constants for
    this world size), or None for bytes / FLOPs / memory only.
    """
    strat = _build_strategy(strategy, options)
    specs = matrix_specs(shapes, world_size, param_dtype, ns_dtype, ns_steps, sharded, ns_form)
    plan = predict_plan(specs, world_size, strat, rule)
    ns_name = str(specs[0].out_dtype).replace("torch.", "")
    if isinstance(constants, HardwarePreset):
        constants = constants.constants(world_size, ns_name)
    elif constants is not None and not isinstance(constants, CostConstants):
        raise ValueError(f"constants must be CostConstants, a HardwarePreset or None, got "
                         f"{type(constants).__name__}")
    persistent = _persistent_all(specs, rule)
    local = [0] * world_size
    for m in specs:
        row = m.row_numel
        for r, rows in enumerate(m.dim0_sizes):
            local[r] += rows * row
    ranks = []
    for r, cost in enumerate(plan.ranks):
        ranks.append(RankPrediction(
            rank=r, bytes_by_kind=cost.bytes_by_kind(), send_bytes=cost.send_bytes,
            recv_bytes=cost.recv_bytes, ns_flops=cost.ns_flops,
            ns_calls=cost.ns_calls, transient_bytes=cost.transient_bytes,
            persistent_bytes=persistent[r], local_numel=local[r]))
    step = step_time(plan, constants, ranks) if constants is not None else None
    return Prediction(strategy=strat.name, options=asdict(strat.options) if strat.options else {},
                      world_size=world_size, rule=rule,
                      param_dtype=str(specs[0].dtype).replace("torch.", ""), ns_dtype=ns_name,
                      plan=plan, ranks=ranks, bounds=lower_bounds(specs, world_size, constants),
                      time=step, constants_source=constants.source if constants else "")
