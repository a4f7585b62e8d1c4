"""The cost model's time model: alpha-beta collectives, NS and element-wise compute, and the step.

Time is an alpha-beta model, one (alpha, beta) per collective kind:

    t(collective) = alpha_kind * steps(kind, P) + beta_kind * bytes

steps: P-1 for ring all-gather / reduce-scatter and for pairwise all-to-all, gather and scatter;
ceil(log2 P) for a tree broadcast and 2 ceil(log2 P) for a tree all-reduce (NCCL and gloo both pick
latency-optimal trees for the small all-reduces the optimizer issues). bytes is what the busiest
rank moves in that call (the larger of its send and receive bytes under the byte convention, which
already is the ring / all-to-all formula: (P-1)s for an all-gather of s bytes per rank, 2(P-1)/P n
for an all-reduce); a broadcast is a pipeline, so its receivers' n bytes. A collective ends for
everyone when it ends for the busiest rank, so one duration per call is the right unit.

Compute is NS FLOPs / sustained rate plus a fixed cost per NS call, and the optimizer's element-wise
work (momentum, normalization, update) per local element and per parameter. On a CPU host whose
ranks share `shared_slots` cores, concurrently busy ranks share them (processor sharing); on GPUs
every rank has its own device.

The step: the optimizer's own all-reduces and element-wise work, then the strategy's schedule,
walked by the one simulator (`profiling.simulator`) with `exchange_seconds` pricing each exchange:
every strategy is priced from the actions it declared, with no time model of its own.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import yaml

from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.plan import CommItem, Plan, TimedCall
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.profiling.simulator import simulate

__all__ = ["KINDS", "latency_steps", "CommModel", "ComputeModel", "CostConstants", "StepTime",
           "load_constants", "shared_makespan", "shape_key", "step_time", "aligned_calls",
           "exchange_seconds", "exchange_times"]

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter", "broadcast",
         "all_reduce")


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
    # point-to-point messages of a node-aware exchange, by link class ("intra_node",
    # "inter_node"): seconds per message and per byte; a class not given takes the all-to-all's
    # alpha (per peer) and beta
    link_alpha_s: dict = field(default_factory=dict)
    link_beta_s_per_byte: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rates("CommModel.alpha_s", self.alpha_s)
        _check_rates("CommModel.beta_s_per_byte", self.beta_s_per_byte)
        for name in ("link_alpha_s", "link_beta_s_per_byte"):
            for link, v in getattr(self, name).items():
                if link not in ("intra_node", "inter_node") or not (
                        isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"CommModel.{name}[{link!r}] must be a finite number >= 0 "
                                     f"for link 'intra_node' or 'inter_node', got {v!r}")

    def link_time(self, link: str, nbytes: float, messages: int) -> float:
        """One rank's sends (or receives) on one link class: alpha per message + beta per byte."""
        if not messages:
            return 0.0
        alpha = self.link_alpha_s.get(link, self.alpha_s.get("all_to_all"))
        beta = self.link_beta_s_per_byte.get(link, self.beta_s_per_byte.get("all_to_all"))
        if alpha is None or beta is None:
            raise ValueError(f"no rate for {link!r} messages in this CommModel (neither "
                             f"link rates nor an all-to-all alpha/beta); calibrate or add them")
        return alpha * messages + beta * nbytes

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
    # co-located ranks also slow each other beyond sharing cores (memory bandwidth, caches):
    # with b ranks busy each runs 1 + contention * (min(b, shared_slots) - 1) times slower than
    # its share of the cores alone (`shared_makespan`); 0 on GPUs
    contention: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ns_flops_per_s) and self.ns_flops_per_s > 0):
            raise ValueError(f"ns_flops_per_s must be > 0, got {self.ns_flops_per_s!r}")
        for name in ("ns_call_s", "elementwise_s_per_element", "elementwise_s_per_param"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"ComputeModel.{name} must be >= 0, got {v!r}")
        if self.shared_slots is not None and not self.shared_slots > 0:
            raise ValueError(f"shared_slots must be > 0 or None, got {self.shared_slots!r}")
        if not (math.isfinite(self.contention) and self.contention >= 0):
            raise ValueError(f"ComputeModel.contention must be >= 0, got {self.contention!r}")

    def ns_seconds(self, flops: float, calls: int) -> float:
        return calls * self.ns_call_s + flops / self.ns_flops_per_s

    def concurrent(self, works: Sequence[float]) -> list[float]:
        """Finish time of each rank's work when all run at once (see `shared_makespan`)."""
        return shared_makespan(works, self.shared_slots, self.contention)

    def ns_matrices_seconds(self, matrices: Sequence[MatrixSpec], batched: bool) -> float:
        """NS time of `matrices` on one rank: measured per-shape times where known, the fitted
        rate and per-call cost for the rest (one call per shape when `batched`, else per matrix)."""
        table = self.ns_seconds_by_shape
        t, rest = 0.0, []
        for m in matrices:
            key = shape_key(m.shape, m.ns_steps)
            if key in table and m.ns_form == "standard":  # the table timed the standard form
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
        if path.endswith((".yaml", ".yml")):
            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


def load_constants(path: str) -> CostConstants:
    if not os.path.exists(path):
        raise ValueError(f"no cost-model constants file at {path!r}")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            return CostConstants.from_dict(yaml.safe_load(f))
        return CostConstants.from_dict(json.load(f))


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


def shared_makespan(works: Sequence[float], slots: float | None,
                    contention: float = 0.0) -> list[float]:
    """Finish time of each rank's work (seconds if run alone) when the busy ranks share `slots`
    cores equally (processor sharing), each also slowed by 1 + contention (min(busy, slots) - 1)
    while `busy` ranks run at once; with slots None every rank runs at full speed."""
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
        speed = min(1.0, slots / busy) / (1.0 + contention * (min(busy, slots) - 1))
        t += (w - prev) / speed
        finish[r] = t
        prev = w
        busy -= 1
    return finish


def exchange_times(items: list[list[CommItem]], comm: CommModel,
                   world_size: int) -> dict[str, float]:
    """Seconds of one exchange from every rank's items (its call(s) as each rank sees them), by
    collective kind (by link class for the stages of a node-aware exchange): a collective lasts
    as long as its busiest rank; the stages of a node-aware exchange (items with a `link` and no
    `group`) run one after another, each rank's sends and receives at once (full duplex); point-
    to-point messages among a few members (items with a `group`) are priced per message on their
    link (`CommModel.link_time`; the all-to-all's rates where the link is not known). Given one
    rank's items alone, that rank's own time."""
    out: dict[str, float] = {}
    flat = [c for its in items for c in its]
    if flat and flat[0].group is not None:  # messages: sends and receives at once
        sends = [c for c in flat if c.kind == "send"]
        recvs = [c for c in flat if c.kind == "recv"]
        link = flat[0].link
        out["send"] = max(comm.link_time(link, sum(c.send_bytes for c in sends), len(sends)),
                          comm.link_time(link, sum(c.recv_bytes for c in recvs), len(recvs)))
        return out
    n = max((len(its) for its in items), default=0)
    j = 0
    while j < n:
        column = [its[j] for its in items if j < len(its)]
        first = column[0]
        if first.link is not None:  # one stage: item j sends, item j + 1 receives
            recvs = [its[j + 1] for its in items if j + 1 < len(its)]
            assert all(a.kind == "send" and b.kind == "recv" for a, b in zip(column, recvs))
            seconds = max(max(comm.link_time(a.link, a.send_bytes, a.messages),
                              comm.link_time(b.link, b.recv_bytes, b.messages))
                          for a, b in zip(column, recvs))
            out[first.link] = out.get(first.link, 0.0) + seconds
            j += 2
            continue
        assert all(c.kind == first.kind for c in column), [c.kind for c in column]
        if first.kind == "broadcast":  # a pipelined broadcast: the root streams n bytes
            nbytes = max(c.recv_bytes for c in column)
        else:
            nbytes = max(max(c.send_bytes, c.recv_bytes) for c in column)
        out[first.kind] = out.get(first.kind, 0.0) + comm.time(first.kind, nbytes, world_size)
        j += 1
    return out


def exchange_seconds(items: list[list[CommItem]], comm: CommModel, world_size: int) -> float:
    """The total of `exchange_times`."""
    return sum(exchange_times(items, comm, world_size).values())


def aligned_calls(plan: Plan, comm: CommModel, phases=("nonfinite_check", "normalize")
                  ) -> list[TimedCall]:
    """The optimizer's own collectives (the items `optim.step_plan` adds after the schedule's):
    every rank's j-th such item is the same call, timed by the busiest rank."""
    P = plan.world_size
    per_rank = [[c for c in cost.comm if c.phase in phases] for cost in plan.ranks]
    n = len(per_rank[0])
    if any(len(c) != n for c in per_rank):
        raise ValueError(f"plan of {plan.strategy!r} lists different numbers of optimizer "
                         f"collectives on different ranks")
    return [TimedCall(per_rank[0][j].kind, per_rank[0][j].phase,
                      exchange_seconds([[c[j]] for c in per_rank], comm, P)) for j in range(n)]


def step_time(plan: Plan, constants: CostConstants, ranks: Sequence) -> StepTime:
    """The optimizer step's time under `constants`, following the optimizer's step: non-finite
    all-reduce, momentum, the strategy's schedule (simulated), normalize (+ all-reduce), apply.
    `ranks`: per rank, an object with `local_numel` (the prediction's RankPrediction)."""
    P = plan.world_size
    comp = constants.compute
    calls = aligned_calls(plan, constants.comm)
    sim = simulate(plan, lambda items: exchange_times(items, constants.comm, P), comp)
    by_kind: dict[str, float] = defaultdict(float)
    for c in calls:
        by_kind[c.kind] += c.seconds
    for kind, seconds in sim.comm_by_kind.items():
        by_kind[kind] += seconds
    optimizer_comm = sum(c.seconds for c in calls)
    comm_total = optimizer_comm + sim.comm_s

    ew_work = [len(plan.matrices) * comp.elementwise_s_per_param
               + r.local_numel * comp.elementwise_s_per_element for r in ranks]
    elementwise = max(comp.concurrent(ew_work), default=0.0)
    ns_total = max(sim.ns_busy, default=0.0)
    total = elementwise + optimizer_comm + max(sim.end, default=0.0)
    return StepTime(total_s=total, comm_s=comm_total, ns_s=ns_total, elementwise_s=elementwise,
                    overlap_s=max(0.0, comm_total + ns_total + elementwise - total),
                    comm_by_kind_s=dict(by_kind))
