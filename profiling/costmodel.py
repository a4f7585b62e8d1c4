"""Cost model: predict what one NorMuon step costs each rank under each strategy, from shapes alone.

Given matrix shapes, a world size P, a strategy and its options, `predict` returns per rank: the
bytes sent and received in each kind of collective, the Newton-Schulz FLOPs, the transient bytes the
strategy holds and the persistent optimizer state (momentum in the parameter dtype, plus NorMuon's
float32 row second moment v and a float32 step counter per parameter), and, given model constants,
the optimizer step time.

Who does what is not re-derived here: the strategy's own `plan()` (see `strategies.base`) is the one
source of truth for owners, buckets, bytes and FLOPs, and the optimizer's two small all-reduces
(the non-finite check and NorMuon's Frobenius norms) are added exactly as `NorMuon.plan()` adds them.
The model is validated byte-for-byte against the dispatcher-level counter (`profiling.comm`) on real
gloo ranks and, for P up to 1024, on torch's fake process group (tests/test_costmodel.py).

Time is an alpha-beta model, one (alpha, beta) per collective kind:

    t(collective) = alpha_kind * steps(kind, P) + beta_kind * bytes

steps: P-1 for ring all-gather / reduce-scatter and for pairwise all-to-all, gather and scatter;
ceil(log2 P) for a tree broadcast and 2 ceil(log2 P) for a tree all-reduce (NCCL and gloo both pick
latency-optimal trees for the small all-reduces the optimizer issues). bytes is what the busiest rank
moves in that call (the larger of its send and receive bytes under the byte convention, which already
is the ring / all-to-all formula: (P-1)s for an all-gather of s bytes per rank, 2(P-1)/P n for an
all-reduce); a broadcast is a pipeline, so its receivers' n bytes. A collective ends for everyone
when it ends for the busiest rank, so one duration per call is the right unit.

Compute is NS FLOPs / sustained rate plus a fixed cost per NS call, and the optimizer's element-wise
work (momentum, normalization, update) per local element and per parameter. On a CPU host whose
ranks share `shared_slots` cores, concurrently busy ranks share them (processor sharing); on GPUs
every rank has its own device.

The schedule follows each strategy's `execute`: collectives are synchronous, so a step is
forward collectives + the slowest rank's NS + return collectives, except `bucketed_async`, whose
all-to-alls are asynchronous: it is simulated bucket by bucket on one communication channel
(collectives are serialized on one communicator, as on one NCCL stream), which gives the pipeline
time = sum over buckets of max(compute_k, comm_{k+1}) plus the ends.

Calibration (`calibrate`) fits alpha and beta per collective kind and the NS rate by least squares
from a short measured run on the current process group (gloo -> CPU, NCCL -> GPU); every timing is
the best of a few repeats, since other jobs on a shared machine only ever add time. The NS times of
the shapes it measured are kept too and used for those shapes. The GPU presets in
`profiling.hardware` give data-sheet constants for projections to 1024 GPUs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from dist_ortho import strategies as strategy_registry
from dist_ortho.newton_schulz import matrix_view_shape, ns_flops
from dist_ortho.sharding import MatrixSpec, chunk_sizes, dtype_size
from dist_ortho.strategies.base import EVERY_RANK, CommItem, Plan, Strategy, all_reduce_bytes

__all__ = [
    "KINDS", "latency_steps", "CommModel", "ComputeModel", "CostConstants", "RankPrediction",
    "StepTime", "LowerBounds", "Prediction", "matrix_specs", "predict_plan", "predict",
    "lower_bounds", "whole_matrix_makespan_bound", "persistent_bytes", "CommSample", "NSSample",
    "ElementwiseSample", "fit_comm_model", "fit_ns_rate", "fit_elementwise", "measure_collectives",
    "measure_ns", "measure_elementwise", "calibrate", "load_constants", "shared_makespan",
    "shape_key",
]

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter", "broadcast",
         "all_reduce")
# the kinds the strategies and the optimizer issue, which calibration measures
CALIBRATED_KINDS = ("all_gather", "all_to_all", "gather", "scatter", "broadcast", "all_reduce")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Model constants
# ---------------------------------------------------------------------------------------------

def latency_steps(kind: str, world_size: int) -> int:
    """Latency terms of one collective of `kind` on `world_size` ranks (see the module doc)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; known: {KINDS}")
    if world_size <= 1:
        return 0
    log = math.ceil(math.log2(world_size))
    if kind == "broadcast":
        return log
    if kind == "all_reduce":
        return 2 * log
    return world_size - 1


def _check_rates(name: str, values: Mapping[str, float]) -> None:
    for kind, v in values.items():
        if kind not in KINDS:
            raise ValueError(f"{name} has unknown collective kind {kind!r}; known: {KINDS}")
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}[{kind!r}] must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class CommModel:
    """alpha_s: seconds per latency step, by collective kind. beta_s_per_byte: seconds per byte
    moved by the busiest rank (1 / bandwidth), by kind."""

    alpha_s: dict = field(default_factory=dict)
    beta_s_per_byte: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rates("CommModel.alpha_s", self.alpha_s)
        _check_rates("CommModel.beta_s_per_byte", self.beta_s_per_byte)

    def time(self, kind: str, nbytes: float, world_size: int) -> float:
        if world_size <= 1:
            return 0.0
        if kind not in self.alpha_s or kind not in self.beta_s_per_byte:
            raise ValueError(f"no alpha/beta for collective kind {kind!r} in this CommModel "
                             f"(has {sorted(self.beta_s_per_byte)}); calibrate or add it")
        return (self.alpha_s[kind] * latency_steps(kind, world_size)
                + self.beta_s_per_byte[kind] * nbytes)


@dataclass(frozen=True)
class ComputeModel:
    """ns_flops_per_s: sustained NS matmul rate of one rank running alone. ns_call_s: fixed cost
    per NS call (launches, small-matrix inefficiency). elementwise_*: the optimizer's local work
    (momentum, normalization, update) per local element and per parameter. shared_slots: ranks on
    one CPU host share this many cores (None: every rank has its own device, as with GPUs).
    ns_seconds_by_shape: measured seconds of one NS call on one matrix of a given shape (key
    "m x n" of the full matrix, as `shape_key` writes it). CPU BLAS speed depends on the shape
    (a 512 x 512 product can run at half the rate of a 500 x 500 one), so calibration records the
    shapes it timed and the model uses them where it can, and the fitted rate elsewhere."""

    ns_flops_per_s: float
    ns_call_s: float = 0.0
    elementwise_s_per_element: float = 0.0
    elementwise_s_per_param: float = 0.0
    shared_slots: float | None = None
    ns_seconds_by_shape: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ns_flops_per_s) and self.ns_flops_per_s > 0):
            raise ValueError(f"ns_flops_per_s must be > 0, got {self.ns_flops_per_s!r}")
        for name in ("ns_call_s", "elementwise_s_per_element", "elementwise_s_per_param"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"ComputeModel.{name} must be >= 0, got {v!r}")
        if self.shared_slots is not None and not self.shared_slots > 0:
            raise ValueError(f"shared_slots must be > 0 or None, got {self.shared_slots!r}")

    def ns_seconds(self, flops: float, calls: int) -> float:
        return calls * self.ns_call_s + flops / self.ns_flops_per_s

    def ns_matrices_seconds(self, matrices: Sequence[MatrixSpec], batched: bool) -> float:
        """NS time of `matrices` on one rank: measured per-shape times where known, the fitted
        rate and per-call cost for the rest (one call per shape when `batched`, else per matrix)."""
        table = self.ns_seconds_by_shape
        t, rest = 0.0, []
        for m in matrices:
            key = shape_key(m.shape, m.ns_steps)
            if key in table:
                t += table[key]
            else:
                rest.append(m)
        if rest:
            calls = len({(m.shape, m.ns_steps) for m in rest}) if batched else len(rest)
            t += self.ns_seconds(sum(m.flops for m in rest), calls)
        return t


def shape_key(shape: Sequence[int], steps: int = 5) -> str:
    """Key of `ComputeModel.ns_seconds_by_shape`: "m x n" (x steps when not 5)."""
    key = " x ".join(str(int(d)) for d in shape)
    return key if steps == 5 else f"{key} @ {steps} steps"


@dataclass(frozen=True)
class CostConstants:
    """The constants one prediction needs, and where they came from."""

    comm: CommModel
    compute: ComputeModel
    source: str = ""
    world_size: int | None = None  # the P they were measured or derived for
    device: str = ""
    meta: dict = field(default_factory=dict)  # raw samples, fit residuals, machine notes

    def to_dict(self) -> dict:
        return dict(comm=asdict(self.comm), compute=asdict(self.compute), source=self.source,
                    world_size=self.world_size, device=self.device, meta=self.meta)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CostConstants":
        try:
            return cls(comm=CommModel(**d["comm"]), compute=ComputeModel(**d["compute"]),
                       source=d.get("source", ""), world_size=d.get("world_size"),
                       device=d.get("device", ""), meta=dict(d.get("meta", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a cost-model constants record: {exc}") from exc

    def save(self, path: str) -> None:
        """JSON, or YAML when the path ends in .yaml/.yml."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                yaml.safe_dump(self.to_dict(), f, sort_keys=False)
            else:
                json.dump(self.to_dict(), f, indent=2)
        os.replace(path + ".tmp", path)


def load_constants(path: str) -> CostConstants:
    if not os.path.exists(path):
        raise ValueError(f"no cost-model constants file at {path!r}")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return CostConstants.from_dict(yaml.safe_load(f))
        return CostConstants.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------
# Plans from shapes
# ---------------------------------------------------------------------------------------------

def _torch_dtype(d) -> torch.dtype:
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
                 ns_steps: int = 5, sharded: bool = True) -> list[MatrixSpec]:
    """The MatrixSpecs the optimizer builds for these shapes (FSDP2 dim-0 sharding, torch.chunk
    extents), so that a strategy's plan() here is the plan it makes at run time."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(ns_steps, int) or ns_steps < 1:
        raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
    pdt, ndt = _torch_dtype(param_dtype), _torch_dtype(ns_dtype)
    specs = []
    for i, (name, shape) in enumerate(_named_shapes(shapes)):
        sizes = chunk_sizes(shape[0], world_size) if sharded else (shape[0],) * world_size
        specs.append(MatrixSpec(i, name, shape, pdt, sizes, sharded, ns_steps, ndt))
    return specs


def _build_strategy(strategy, options: Mapping | None) -> Strategy:
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError("pass options either to strategies.build or here, not both")
        return strategy
    return strategy_registry.build(strategy, **dict(options or {}))


def _optimizer_items(specs: Sequence[MatrixSpec], world_size: int,
                     algorithm: str) -> list[CommItem]:
    """The optimizer's own all-reduces, as `NorMuon.plan()` appends them to every rank."""
    from dist_ortho.optimizer import _Orthogonalized

    if world_size <= 1:
        return []
    flag = all_reduce_bytes(4, world_size)
    items = [CommItem("all_reduce", flag, flag, "nonfinite_check")]
    if algorithm == "normuon":
        nbytes = 2 * 4 * _Orthogonalized._norm_slots(specs)[1]
        if nbytes:
            red = all_reduce_bytes(nbytes, world_size)
            items.append(CommItem("all_reduce", red, red, "normalize"))
    return items


def predict_plan(specs: Sequence[MatrixSpec], world_size: int, strategy: Strategy,
                 algorithm: str = "normuon", rank: int = 0) -> Plan:
    """strategy.plan(), completed with the optimizer's all-reduces: equal to `opt.plan()`."""
    if algorithm not in ("normuon", "muon"):
        raise ValueError(f"algorithm must be 'normuon' or 'muon', got {algorithm!r}")
    plan = strategy.plan(specs, world_size, rank)
    extra = _optimizer_items(plan.matrices, world_size, algorithm)
    for cost in plan.ranks:
        cost.comm.extend(extra)
    return plan


def persistent_bytes(specs: Sequence[MatrixSpec], rank: int, algorithm: str = "normuon") -> int:
    """Optimizer state held by `rank`: momentum (param dtype) on its shard, NorMuon's float32 v (one
    entry per local matrix row) and a float32 step counter per parameter."""
    return _persistent_all(specs, algorithm)[rank]


def _persistent_all(specs: Sequence[MatrixSpec], algorithm: str) -> list[int]:
    P = specs[0].world_size
    total = [0] * P
    for m in specs:
        # bytes per dim-0 row: momentum row, plus v's float32 entries for that row
        per_row = m.row_numel * dtype_size(m.dtype)
        if algorithm == "normuon":
            per_row += math.prod(m.view_shape[1:-1]) * 4
        for r, rows in enumerate(m.dim0_sizes):
            total[r] += rows * per_row + 4  # + the step counter
    return total


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------

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
class StepTime:
    """Seconds. total_s is the step; the parts are what the slowest path spends on each term.
    overlap_s = comm_s + ns_s + elementwise_s - total_s (> 0 only where transfers hide)."""

    total_s: float
    comm_s: float
    ns_s: float
    elementwise_s: float
    overlap_s: float
    comm_by_kind_s: dict


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
    total = (P - 1) / P * N * (b_in + b_out)
    flops = [m.flops for m in specs]
    sharded = [m for m in specs if m.sharded]
    owner_recv = max(((m.numel - max(m.dim0_sizes) * m.row_numel) * b_in for m in sharded),
                     default=0)
    lb = LowerBounds(bytes_total=total, bytes_per_rank=total / P,
                     bytes_whole_matrix_per_rank=max(total / P, owner_recv),
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
    algorithm: str
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
    def mean_bytes_per_rank(self) -> float:
        return sum(r.send_bytes for r in self.ranks) / len(self.ranks)

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


def _ns_calls(plan: Plan, strategy: Strategy, rank: int) -> int:
    """NS calls a rank makes: strategies with `batch_same_shape` stack an owner's same-shape
    matrices (per bucket) into one call; the others call once per matrix."""
    batched = bool(getattr(strategy.options, "batch_same_shape", False))
    keys = set()
    calls = 0
    for i in plan.ranks[rank].computes:
        m = plan.matrices[i]
        if batched and m.sharded:
            keys.add((plan.bucket[i], m.shape, m.ns_steps))
        else:
            calls += 1
    return calls + len(keys)


def predict(shapes, world_size: int, strategy="balanced", options: Mapping | None = None, *,
            constants=None, param_dtype=torch.float32, ns_dtype="float32", ns_steps: int = 5,
            algorithm: str = "normuon", sharded: bool = True) -> Prediction:
    """Predict one optimizer step of `strategy` on `world_size` ranks.

    shapes: matrix shapes, or (name, shape) pairs as `dist_ortho.models.matrix_shapes` returns.
    constants: a CostConstants, a `profiling.hardware.HardwarePreset` (made into constants for
    this world size), or None for bytes / FLOPs / memory only.
    """
    from dist_ortho.profiling.hardware import HardwarePreset

    strat = _build_strategy(strategy, options)
    specs = matrix_specs(shapes, world_size, param_dtype, ns_dtype, ns_steps, sharded)
    plan = predict_plan(specs, world_size, strat, algorithm)
    ns_name = str(specs[0].out_dtype).replace("torch.", "")
    if isinstance(constants, HardwarePreset):
        constants = constants.constants(world_size, ns_name)
    elif constants is not None and not isinstance(constants, CostConstants):
        raise ValueError(f"constants must be CostConstants, a HardwarePreset or None, got "
                         f"{type(constants).__name__}")
    persistent = _persistent_all(specs, algorithm)
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
            ns_calls=_ns_calls(plan, strat, r), transient_bytes=cost.transient_bytes,
            persistent_bytes=persistent[r], local_numel=local[r]))
    step = step_time(plan, strat, constants, ranks) if constants is not None else None
    return Prediction(strategy=strat.name, options=asdict(strat.options) if strat.options else {},
                      world_size=world_size, algorithm=algorithm,
                      param_dtype=str(specs[0].dtype).replace("torch.", ""), ns_dtype=ns_name,
                      plan=plan, ranks=ranks, bounds=lower_bounds(specs, world_size, constants),
                      time=step, constants_source=constants.source if constants else "")


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------

def shared_makespan(works: Sequence[float], slots: float | None) -> list[float]:
    """Finish time of each rank's work (seconds if run alone) when the busy ranks share `slots`
    cores equally (processor sharing); with slots None every rank runs at full speed."""
    if slots is None:
        return list(works)
    order = sorted(range(len(works)), key=lambda r: works[r])
    finish = [0.0] * len(works)
    busy = sum(1 for w in works if w > 0)
    t = prev = 0.0
    for r in order:
        w = works[r]
        if w <= 0:
            continue
        speed = min(1.0, slots / busy)
        t += (w - prev) / speed
        finish[r] = t
        prev = w
        busy -= 1
    return finish


@dataclass(frozen=True)
class _Call:
    kind: str
    phase: str
    seconds: float


def _aligned_calls(plan: Plan, comm: CommModel) -> list[_Call]:
    """One entry per collective call: every rank's j-th CommItem is the same call (strategies and
    the optimizer issue collectives in one order on every rank); its time is set by the busiest
    rank."""
    P = plan.world_size
    n = len(plan.ranks[0].comm)
    if any(len(c.comm) != n for c in plan.ranks):
        raise ValueError(f"plan of {plan.strategy!r} lists different numbers of collectives on "
                         f"different ranks; cannot align them into calls")
    calls = []
    for j in range(n):
        items = [c.comm[j] for c in plan.ranks]
        kind, phase = items[0].kind, items[0].phase
        if any(it.kind != kind for it in items):
            raise ValueError(f"collective {j} of plan {plan.strategy!r} has different kinds "
                             f"on different ranks")
        if kind == "broadcast":  # a pipelined broadcast: the root streams n bytes
            nbytes = max(it.recv_bytes for it in items)
        else:
            nbytes = max(max(it.send_bytes, it.recv_bytes) for it in items)
        calls.append(_Call(kind, phase, comm.time(kind, nbytes, P)))
    return calls


def step_time(plan: Plan, strategy: Strategy, constants: CostConstants,
              ranks: Sequence[RankPrediction]) -> StepTime:
    """The optimizer step's time under `constants`, following `NorMuon.step` and the strategy's
    execute: non-finite all-reduce, momentum, orthogonalize, normalize (+ all-reduce), apply."""
    P = plan.world_size
    comp = constants.compute
    calls = _aligned_calls(plan, constants.comm)
    by_kind: dict[str, float] = defaultdict(float)
    for c in calls:
        by_kind[c.kind] += c.seconds
    comm_total = sum(c.seconds for c in calls)

    ew_work = [len(plan.matrices) * comp.elementwise_s_per_param
               + r.local_numel * comp.elementwise_s_per_element for r in ranks]
    elementwise = max(shared_makespan(ew_work, comp.shared_slots), default=0.0)
    optimizer_comm = sum(c.seconds for c in calls if c.phase in ("nonfinite_check", "normalize"))
    strategy_calls = [c for c in calls if c.phase in ("forward", "return")]

    sharded = [m.index for m in plan.matrices if m.sharded]
    plain = [m.index for m in plan.matrices if not m.sharded]
    n_plain_calls = sum(1 for i in plain if plan.owner[i] != EVERY_RANK) if P > 1 else 0
    plain_calls = strategy_calls[len(strategy_calls) - n_plain_calls:]
    sharded_calls = strategy_calls[:len(strategy_calls) - n_plain_calls]

    batched = bool(getattr(strategy.options, "batch_same_shape", False))
    if plan.strategy == "bucketed_async" and "buckets" in plan.details:
        sharded_s, ns_s = _bucketed_time(plan, sharded_calls, comp, batched,
                                         strategy.options.max_in_flight)
    else:
        works = [_ns_work(plan, [i for i in plan.ranks[r].computes if plan.matrices[i].sharded],
                          comp, batched) for r in range(P)]
        ns_s = max(shared_makespan(works, comp.shared_slots), default=0.0)
        sharded_s = sum(c.seconds for c in sharded_calls) + ns_s if sharded else 0.0

    # plain (replicated, DDP-style) matrices run one at a time: the owner computes, then broadcasts
    plain_s = 0.0
    plain_ns = 0.0
    k = 0
    for i in plain:
        m = plan.matrices[i]
        t = comp.ns_matrices_seconds([m], False)
        if plan.owner[i] == EVERY_RANK:
            t = max(shared_makespan([t] * P, comp.shared_slots))
            plain_s += t
        else:
            plain_s += t + (plain_calls[k].seconds if P > 1 else 0.0)
            k += P > 1
        plain_ns += t
    total = elementwise + optimizer_comm + sharded_s + plain_s
    ns_total = ns_s + plain_ns
    return StepTime(total_s=total, comm_s=comm_total, ns_s=ns_total, elementwise_s=elementwise,
                    overlap_s=max(0.0, comm_total + ns_total + elementwise - total),
                    comm_by_kind_s=dict(by_kind))


def _ns_work(plan: Plan, indices: Sequence[int], comp: ComputeModel, batched: bool) -> float:
    return comp.ns_matrices_seconds([plan.matrices[i] for i in indices], batched)


def _bucketed_time(plan: Plan, calls: Sequence[_Call], comp: ComputeModel, batched: bool,
                   max_in_flight: int) -> tuple[float, float]:
    """Simulate `bucketed_async.execute`: (time of the orthogonalize phase, NS time of the slowest
    rank). Collectives run one at a time on the channel, in issue order; a collective starts when
    the last rank has issued it; every rank's NS of bucket k waits for forward(k)."""
    P = plan.world_size
    buckets = plan.details["buckets"]
    fwd = [c.seconds for c in calls if c.phase == "forward"]
    ret = [c.seconds for c in calls if c.phase == "return"]
    if P > 1 and (len(fwd) != len(buckets) or len(ret) != len(buckets)):
        raise ValueError(f"bucketed plan has {len(buckets)} buckets but {len(fwd)} forward and "
                         f"{len(ret)} return collectives")
    if P == 1:
        fwd = ret = [0.0] * len(buckets)
    owned = [[[] for _ in buckets] for _ in range(P)]
    for b, members in enumerate(buckets):
        for i in members:
            owned[plan.owner[i]][b].append(i)
    channel = 0.0
    t = [0.0] * P

    def issue(duration: float) -> float:
        nonlocal channel
        start = max(max(t), channel)
        channel = start + duration
        return channel

    ns_busy = [0.0] * P
    pending = issue(fwd[0])
    returns: deque = deque()
    for b in range(len(buckets)):
        following = issue(fwd[b + 1]) if b + 1 < len(buckets) else None
        t = [max(x, pending) for x in t]
        works = [_ns_work(plan, owned[r][b], comp, batched) for r in range(P)]
        done = shared_makespan(works, comp.shared_slots)
        for r in range(P):
            ns_busy[r] += done[r]
        t = [x + d for x, d in zip(t, done)]
        returns.append(issue(ret[b]))
        while len(returns) > max_in_flight:
            end = returns.popleft()
            t = [max(x, end) for x in t]
        pending = following
    while returns:
        end = returns.popleft()
        t = [max(x, end) for x in t]
    return max(t), max(ns_busy)


# ---------------------------------------------------------------------------------------------
# Calibration: fits (pure) and measurements (on a process group)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CommSample:
    kind: str
    world_size: int
    nbytes: float  # the busiest rank's bytes, as the time model uses them
    seconds: float


@dataclass(frozen=True)
class NSSample:
    shape: tuple
    flops: int
    seconds: float
    calls: int = 1


@dataclass(frozen=True)
class ElementwiseSample:
    n_params: int
    numel: int
    seconds: float


def _lstsq_nonneg(columns: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares y ~ sum_j c_j x_j with c_j >= 0: solve, drop negative coefficients, repeat.
    Rows are weighted by 1/y so that small and large timings count alike (relative error)."""
    import numpy as np

    A = np.array(columns, dtype=float).T
    b = np.array(y, dtype=float)
    w = 1.0 / np.maximum(b, 1e-12)
    active = list(range(A.shape[1]))
    coef = np.zeros(A.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(A[:, active] * w[:, None], b * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            return coef.tolist()
        active = [a for a, s in zip(active, sol) if s > 0]
    return coef.tolist()


def fit_comm_model(samples: Sequence[CommSample]) -> CommModel:
    """alpha and beta per kind by least squares on t = alpha * steps(kind, P) + beta * bytes."""
    by_kind: dict[str, list[CommSample]] = defaultdict(list)
    for s in samples:
        by_kind[s.kind].append(s)
    alpha, beta = {}, {}
    for kind, ss in by_kind.items():
        if len({s.nbytes for s in ss}) < 2:
            raise ValueError(f"calibrating {kind!r} needs at least two message sizes")
        steps = [latency_steps(kind, s.world_size) for s in ss]
        a, b = _lstsq_nonneg([steps, [s.nbytes for s in ss]], [s.seconds for s in ss])
        alpha[kind], beta[kind] = a, b
    return CommModel(alpha_s=alpha, beta_s_per_byte=beta)


def fit_ns_rate(samples: Sequence[NSSample]) -> tuple[float, float]:
    """(FLOP/s, seconds per call) from t = calls * c + flops / rate."""
    if len({s.flops for s in samples}) < 2:
        raise ValueError("calibrating the NS rate needs at least two shapes")
    c, inv = _lstsq_nonneg([[s.calls for s in samples], [s.flops for s in samples]],
                           [s.seconds for s in samples])
    if inv <= 0:
        raise ValueError("NS timings do not grow with FLOPs; cannot fit a rate")
    return 1.0 / inv, c


def fit_elementwise(samples: Sequence[ElementwiseSample]) -> tuple[float, float]:
    """(seconds per parameter, seconds per element) from t = a n_params + b numel."""
    if len(samples) < 2:
        raise ValueError("calibrating element-wise work needs at least two parameter sets")
    a, b = _lstsq_nonneg([[s.n_params for s in samples], [s.numel for s in samples]],
                         [s.seconds for s in samples])
    return a, b


def _device_of(group) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_collective(kind: str, numel: int, group, device: torch.device, P: int, me: int):
    """Issue one collective of `kind` with pieces of `numel` float32 elements."""
    import torch.distributed as dist

    x = torch.ones(numel, dtype=torch.float32, device=device)
    if kind == "all_gather":
        out = torch.empty(P * numel, dtype=torch.float32, device=device)
        from dist_ortho.strategies.collectives import all_gather_single  # the op the strategies issue

        return lambda: all_gather_single(out, x, group=group)
    if kind == "all_to_all":
        inp = torch.ones(P * numel, dtype=torch.float32, device=device)
        out = torch.empty_like(inp)
        return lambda: dist.all_to_all_single(out, inp, group=group)
    if kind == "gather":
        bufs = [torch.empty_like(x) for _ in range(P)] if me == 0 else None
        return lambda: dist.gather(x, bufs, group=group, group_dst=0)
    if kind == "scatter":
        pieces = [torch.ones_like(x) for _ in range(P)] if me == 0 else None
        out = torch.empty_like(x)
        return lambda: dist.scatter(out, pieces, group=group, group_src=0)
    if kind == "broadcast":
        return lambda: dist.broadcast(x, group=group, group_src=0)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    raise ValueError(f"cannot calibrate collective kind {kind!r}; use {CALIBRATED_KINDS}")


def measure_collectives(group=None, sizes_bytes: Sequence[int] = (2**12, 2**16, 2**19, 2**21),
                        repeats: int = 5, kinds: Sequence[str] = CALIBRATED_KINDS
                        ) -> list[CommSample]:
    """Time each collective kind at several piece sizes on every rank of `group` (collective).

    Bytes come from `profiling.comm.CommCounter` (the counter the tests check plans against), taken
    from the busiest rank; a sample's time is the slowest rank's, best of `repeats` (on a shared
    machine other processes only add time, so the minimum is the stable statistic).
    """
    import torch.distributed as dist

    from dist_ortho.profiling.comm import CommCounter

    P, me = dist.get_world_size(group), dist.get_rank(group)
    device = _device_of(group)
    samples = []
    for kind in kinds:
        for size in sizes_bytes:
            op = _run_collective(kind, max(1, size // 4), group, device, P, me)
            with CommCounter() as counter:
                op()  # warm-up, counted
            _sync(device)
            rec = counter.records
            send, recv = sum(r.send_bytes for r in rec), sum(r.recv_bytes for r in rec)
            times = []
            for _ in range(repeats):
                dist.barrier(group=group)
                start = time.perf_counter()
                op()
                _sync(device)
                times.append(time.perf_counter() - start)
            stats = torch.tensor([send, recv] + times, dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            send, recv = stats[0].item(), stats[1].item()
            # a broadcast streams n bytes through a pipeline; every other kind is bound by the
            # busiest rank's larger direction (see the module doc)
            nbytes = recv if kind == "broadcast" else max(send, recv)
            # best of the repeats: background load only ever adds time
            samples.append(CommSample(kind, P, nbytes, min(stats[2:].tolist())))
    return samples


def _time_ns(shape, dtype, device, repeats: int) -> float:
    from dist_ortho.newton_schulz import newton_schulz

    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    newton_schulz(g, 5, dtype)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        newton_schulz(g, 5, dtype)
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


NS_CALIBRATION_SHAPES = ((256, 256), (192, 768), (384, 384), (512, 512), (384, 1280))


def measure_ns(group=None, shapes: Sequence[tuple] = NS_CALIBRATION_SHAPES,
               ns_dtype: str | None = None, repeats: int = 5) -> tuple[list[NSSample], list[NSSample]]:
    """NS timings (alone, loaded): rank 0 alone while the others wait, then every rank at once.

    The alone rate is the model's rate; the loaded one tells how many ranks the host runs at full
    speed (CPU ranks share cores; GPUs do not)."""
    import torch.distributed as dist

    device = _device_of(group) if group is not None or dist.is_initialized() else \
        torch.device("cpu")
    dtype = _torch_dtype(ns_dtype) if ns_dtype else (torch.float32 if device.type == "cpu"
                                                     else torch.bfloat16)
    alone, loaded = [], []
    distributed = dist.is_initialized()
    me = dist.get_rank(group) if distributed else 0
    for shape in shapes:
        if distributed:
            dist.barrier(group=group)
        if me == 0:
            alone.append(NSSample(tuple(shape), ns_flops(shape, 5),
                                  _time_ns(shape, dtype, device, repeats)))
        if distributed:
            dist.barrier(group=group)
            t = torch.tensor([_time_ns(shape, dtype, device, repeats)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            loaded.append(NSSample(tuple(shape), ns_flops(shape, 5), t.item()))
    return alone, loaded


class PhaseTimer:
    """Seconds per optimizer phase, summed: the cheapest timer an optimizer's `.phases` accepts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


_LOCAL_PHASES = ("nonfinite_check", "momentum", "normalize", "apply")
_EW_SETS = ([(32, 32)] * 48, [(512, 512)] * 4 + [(1024, 384)] * 2)


def measure_elementwise(group=None, param_sets: Sequence[Sequence[tuple]] = _EW_SETS,
                        ns_dtype: str = "float32", repeats: int = 3) -> list[ElementwiseSample]:
    """Time NorMuon's local phases (non-finite check, momentum, normalize, apply; not the
    orthogonalization) on plain tensors in this process alone. `group` must be a group of one
    (or None outside torch.distributed), so the optimizer sends nothing."""
    import torch.distributed as dist

    from dist_ortho.optimizer import NorMuon

    if dist.is_initialized() and dist.get_world_size(group) != 1:
        raise ValueError("measure_elementwise times one rank alone: pass a group of one rank "
                         "(dist.new_group([rank])); calibrate() does this for you")
    samples = []
    for shapes in param_sets:
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = NorMuon(params, ns_dtype=ns_dtype, strategy="balanced", process_group=group)
        per_step = []
        for step in range(repeats + 1):
            for p in params:
                p.grad = torch.randn_like(p)
            timer = PhaseTimer()
            opt.phases = timer
            opt.step()
            # the optimizer's own top-level phases; the orthogonalization (and the "ns" and
            # "comm_wait" phases the strategy marks inside it) is not element-wise work
            if step > 0:  # the first step allocates the state
                per_step.append(sum(timer.seconds[k] for k in _LOCAL_PHASES))
        local = min(per_step)
        samples.append(ElementwiseSample(len(params), sum(p.numel() for p in params), local))
    return samples


def calibrate(group=None, *, sizes_bytes: Sequence[int] = (2**12, 2**16, 2**19, 2**21),
              repeats: int = 5, ns_shapes: Sequence[tuple] | None = None,
              ns_dtype: str | None = None,
              elementwise_sets: Sequence[Sequence[tuple]] = _EW_SETS) -> CostConstants:
    """Measure and fit this machine's constants on the current process group (call on all ranks).

    Returns the same CostConstants on every rank (fitted on rank 0 and broadcast)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("calibrate() needs an initialized process group (all ranks call it)")
    P, me = dist.get_world_size(group), dist.get_rank(group)
    device = _device_of(group)
    backend = str(dist.get_backend(group))
    # the NS rate belongs to one dtype: float32 on CPU (bf16 matmul is ~90x slower there),
    # bf16 on GPUs, unless asked; it is recorded with the constants
    ns_dtype = ns_dtype or ("float32" if device.type == "cpu" else "bfloat16")
    comm_samples = measure_collectives(group, sizes_bytes, repeats)
    ns_kwargs = {} if ns_shapes is None else {"shapes": ns_shapes}
    alone, loaded = measure_ns(group, ns_dtype=ns_dtype, **ns_kwargs)
    # element-wise work on rank 0 alone, in a group of one so the optimizer sends nothing; every
    # rank must take part in creating the groups
    solo = [dist.new_group([r]) for r in range(P)] if P > 1 else [None]
    ew: list[ElementwiseSample] = []
    dist.barrier(group=group)
    if me == 0:
        ew = measure_elementwise(solo[0], elementwise_sets, ns_dtype)
    dist.barrier(group=group)
    payload = [None]
    if me == 0:
        comm = fit_comm_model(comm_samples)
        rate, call_s = fit_ns_rate(alone)
        per_param, per_elem = fit_elementwise(ew)
        # CPU ranks share the host's cores: as many run at full speed as there are cores for
        # their threads (the loaded NS timings in meta show it; a count is steadier than a ratio
        # of timings on a machine that other jobs share)
        slots = (os.cpu_count() or 1) / torch.get_num_threads() if device.type == "cpu" else None
        compute = ComputeModel(ns_flops_per_s=rate, ns_call_s=call_s,
                               elementwise_s_per_element=per_elem,
                               elementwise_s_per_param=per_param, shared_slots=slots,
                               ns_seconds_by_shape={shape_key(a.shape): a.seconds
                                                    for a in alone})
        meta = dict(backend=backend, ns_dtype=ns_dtype, torch=torch.__version__,
                    threads=torch.get_num_threads(),
                    cpu_count=os.cpu_count(),
                    comm_samples=[asdict(s) for s in comm_samples],
                    ns_alone=[asdict(s) for s in alone], ns_loaded=[asdict(s) for s in loaded],
                    elementwise=[asdict(s) for s in ew],
                    comm_fit_error=_fit_errors(comm, comm_samples),
                    ns_fit_error=[s.seconds / ComputeModel(rate, call_s).ns_seconds(s.flops, 1)
                                  - 1 for s in alone])
        meta = json.loads(json.dumps(meta))  # plain JSON types, so a saved file loads equal
        payload = [CostConstants(comm=comm, compute=compute,
                                 source=f"calibrated on {backend} ({device.type}), P={P}",
                                 world_size=P, device=device.type, meta=meta).to_dict()]
    if P > 1:
        dist.broadcast_object_list(payload, group=group, group_src=0)
    return CostConstants.from_dict(payload[0])


def _fit_errors(comm: CommModel, samples: Sequence[CommSample]) -> dict:
    """Worst relative error of the fit per kind (how well alpha-beta describes the backend)."""
    out: dict[str, float] = {}
    for s in samples:
        pred = comm.time(s.kind, s.nbytes, s.world_size)
        err = abs(pred / s.seconds - 1) if s.seconds > 0 else 0.0
        out[s.kind] = max(out.get(s.kind, 0.0), err)
    return out
