"""Cost model for 2-D/3-D meshes: bytes per mesh axis, inter-node bytes, step time.

A mesh is given by axis names and sizes, outermost first (`init_device_mesh` order: ranks are
row-major, so the last axis is the innermost, contiguous one), e.g. `dp=128,tp=8` or
`replicate=8,shard=16,tp=8`. Axis roles come from the names: "tp" is tensor parallel, "ep"
expert parallel, "replicate" HSDP's replicate axis, any other axis (e.g. "dp", "shard") shards
rows as FSDP2 does. Matrices get the placements torchtitan gives a Llama-style model: q/k/v,
gate/up projections ColwiseParallel (rows split over tp, under FSDP2 a `_StridedShard`),
o/down projections RowwiseParallel (columns over tp); 3-D expert stacks are split over ep on
dim 0 and over the FSDP axis on their rows.

The plan is the mesh scheduler's own (`strategies.mesh.plan_mesh`, the plan the optimizer
executes and the tests count byte for byte), made once for the whole world. Time: each
collective is timed on the bandwidth of the links its group crosses, from the hardware preset's
two figures: a group whose ranks sit on one node moves at NVLink speed; one that spans nodes
sends a pairwise collective's off-node share (peers uniform) and a ring collective's whole share
through the NIC. Collectives run one after another, NS of the busiest rank between them (the
one row group at a time; overlap is not modelled here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import Replicate, Shard

from dist_ortho import rules as rule_registry
from dist_ortho.core.meshes import MatrixLayout, MeshSpec
from dist_ortho.core.plan import CommItem
from dist_ortho.profiling.hardware import PAIRWISE_KINDS, HardwarePreset
from dist_ortho.profiling.prediction import torch_dtype
from dist_ortho.profiling.timemodel import latency_steps
from dist_ortho.strategies import build as build_strategy
from dist_ortho.strategies.mesh import REPLICA_MODES, MeshPlan, plan_mesh

try:
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = None

__all__ = ["parse_mesh", "mesh_layouts", "MeshCost", "mesh_cost", "COLWISE", "ROWWISE"]

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate_up_proj", "fc_in")
ROWWISE = ("o_proj", "down_proj", "fc_out")


def parse_mesh(text: str) -> MeshSpec:
    """'dp=128,tp=8' -> MeshSpec(('dp', 'tp'), (128, 8)); ValueError naming the fix."""
    names, sizes = [], []
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh takes axis=size pairs, outermost first, e.g. "
                             f"'replicate=8,shard=16,tp=8'; got {text!r}")
        names.append(name.strip())
        sizes.append(int(size))
    return MeshSpec(tuple(names), tuple(sizes))


def _role(name: str) -> str:
    return name if name in ("tp", "ep", "replicate") else "fsdp"


def _placements(pname: str, shape, mesh: MeshSpec) -> tuple:
    roles = [_role(n) for n in mesh.names]
    tp = mesh.sizes[roles.index("tp")] if "tp" in roles else 1
    parts = pname.split(".")
    module = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    out = []
    for role, size in zip(roles, mesh.sizes):
        if role == "replicate":
            out.append(Replicate())
        elif role == "ep":
            out.append(Shard(0) if len(shape) == 3 else Replicate())
        elif role == "tp":
            if module in COLWISE:
                out.append(Shard(len(shape) - 2))
            elif module in ROWWISE:
                out.append(Shard(len(shape) - 1))
            else:
                out.append(Replicate())
        else:  # FSDP2 on the rows (a stack: on the experts' rows, its dim 1)
            row = 1 if len(shape) == 3 else 0
            strided = module in COLWISE and tp > 1 and _StridedShard is not None
            out.append(_StridedShard(row, split_factor=tp) if strided else Shard(row))
    return tuple(out)


def mesh_layouts(shapes, mesh: MeshSpec) -> list[MatrixLayout]:
    """Layouts of named matrices on `mesh` (see the module docstring for the placements)."""
    dims = tuple((d,) for d in range(len(mesh.sizes)))
    span = tuple(range(len(mesh.sizes)))
    return [MatrixLayout.analyze(name, tuple(shape), mesh, dims, _placements(name, shape, mesh),
                                 span) for name, shape in shapes]


def _node_of(rank: int, gpus_per_node: int) -> int:
    return rank // gpus_per_node


@dataclass
class MeshCost:
    """What the busiest rank pays per step under one strategy and replicas mode."""

    strategy: str
    replicas: str
    mesh: str
    world_size: int
    bytes_by_axis: dict  # axis label -> bytes sent by the rank that sends the most in total
    inter_node_bytes: float  # of those, the bytes that leave its node
    max_bytes_per_rank: float
    max_ns_flops: int
    total_ns_flops: int  # the job's, each matrix once
    comm_s: float
    ns_s: float

    @property
    def step_s(self) -> float:
        return self.comm_s + self.ns_s

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "bytes_by_axis"}
        out.update({f"bytes[{axis}]": b for axis, b in sorted(self.bytes_by_axis.items())})
        out["step_s"] = self.step_s
        return out


def _item_seconds(item: CommItem, members: tuple[int, ...], rank: int,
                  hw: HardwarePreset) -> tuple[float, float]:
    """(seconds, inter-node bytes) of one collective of `rank` in the group `members`."""
    n = len(members)
    nbytes = max(item.send_bytes, item.recv_bytes)
    nodes = {_node_of(r, hw.gpus_per_node) for r in members}
    intra = hw.intra_node_bytes_per_s * hw.link_efficiency
    inter = hw.inter_node_bytes_per_s * hw.link_efficiency
    if item.kind in ("send", "recv"):  # one message (split_ns's rounds), on its group's link
        if len(nodes) == 1:
            return hw.intra_node_peer_s + nbytes / intra, 0.0
        return hw.inter_node_peer_s + nbytes / inter, item.send_bytes
    if len(nodes) == 1:
        return hw.intra_node_latency_s * latency_steps(item.kind, n) + nbytes / intra, 0.0
    if item.kind in PAIRWISE_KINDS:
        mine = _node_of(rank, hw.gpus_per_node)
        f = sum(_node_of(r, hw.gpus_per_node) != mine for r in members) / (n - 1)
        seconds = max(f * nbytes / inter, (1 - f) * nbytes / intra)
        return hw.inter_node_peer_s * latency_steps(item.kind, n) + seconds, f * item.send_bytes
    return hw.inter_node_latency_s * latency_steps(item.kind, n) + nbytes / inter, item.send_bytes


def mesh_cost(shapes, mesh: MeshSpec | str, strategy: str, hw: HardwarePreset,
              replicas: str = "spread", param_dtype="bfloat16", ns_dtype="bfloat16",
              ns_steps: int = 5, options: dict | None = None,
              rule: str = "normuon") -> MeshCost:
    """Plan one step of these named matrices on `mesh` and price it on `hw` (module docstring)."""
    if replicas not in REPLICA_MODES:
        raise ValueError(f"replicas must be one of {REPLICA_MODES}, got {replicas!r}")
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    layouts = mesh_layouts(shapes, mesh)
    plan: MeshPlan = plan_mesh(build_strategy(strategy, **(options or {})), layouts, 0,
                               torch_dtype(param_dtype), torch_dtype(ns_dtype),
                               [ns_steps] * len(layouts), rule_registry.get(rule).reductions,
                               replicas)
    groups_of = {}
    busiest = max(range(plan.world_size), key=lambda w: plan.ranks[w].send_bytes)
    rank = plan.world[busiest]
    for members, label in plan.groups(rank):
        groups_of.setdefault(label, members)
    by_axis: dict[str, float] = {}
    comm_s = inter_bytes = 0.0
    for item in plan.ranks[busiest].comm:
        by_axis[item.axis] = by_axis.get(item.axis, 0.0) + item.send_bytes
        members = groups_of.get(item.axis, (rank,))
        seconds, off = _item_seconds(item, members, rank, hw)
        comm_s += seconds
        inter_bytes += off
    flops = [c.ns_flops for c in plan.ranks]
    ns_s = max(flops) / hw.ns_flops_per_s(ns_dtype if isinstance(ns_dtype, str)
                                          else str(ns_dtype).replace("torch.", ""))
    total = sum(m.flops for m in plan.matrices)
    return MeshCost(strategy, replicas, ",".join(f"{n}={s}" for n, s in
                                                 zip(mesh.names, mesh.sizes)),
                    plan.world_size, by_axis, inter_bytes, plan.ranks[busiest].send_bytes,
                    max(flops), total, comm_s, ns_s)
