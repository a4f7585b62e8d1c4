"""`dist-ortho project --mesh ...`: project a 2-D/3-D mesh (HSDP, TP, EP) per strategy and
replicas mode, with the bytes each mesh axis carries and the bytes that leave a node.

    dist-ortho project --model llama-70b --mesh dp=128,tp=8 --hardware h100
    dist-ortho project --model llama-70b --mesh replicate=8,shard=16,tp=8
    dist-ortho project --model moe-large --mesh ep=8,dp=16

The plan is the mesh scheduler's own and the prices are `profiling.mesh_cost`'s (intra-node
links for groups inside a node, the NIC for groups that span nodes; see there). Writes
<model>_<mesh>_<hardware>.md/.csv under --out and prints the table.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from dist_ortho import strategies
from dist_ortho.core.errors import user_input
from dist_ortho.core.io import atomic_write_text
from dist_ortho.models.moe import MOE_SHAPE_PRESETS, moe_matrix_shapes
from dist_ortho.models.shapes import matrix_shapes
from dist_ortho.profiling.hardware import get_preset
from dist_ortho.profiling.mesh_cost import mesh_cost, parse_mesh
from dist_ortho.strategies.mesh import REPLICA_MODES

__all__ = ["project_mesh", "mesh_table", "main_mesh"]


def _shapes(model: str, num_layers: int | None):
    if model in MOE_SHAPE_PRESETS:
        return moe_matrix_shapes(model, num_layers)
    return matrix_shapes(model, num_layers)


def project_mesh(model: str, mesh: str, hardware: str = "h100",
                 strategy_names: list[str] | None = None, param_dtype: str = "bfloat16",
                 ns_dtype: str = "bfloat16", rule: str = "normuon",
                 num_layers: int | None = None) -> list[dict]:
    """One row per (strategy, replicas mode)."""
    with user_input():  # parse_mesh names --mesh itself
        spec = parse_mesh(mesh)
    with user_input("--hardware"):  # names the presets (calibrated files are 1-D only)
        hw = get_preset(hardware)
    with user_input("--model/--num-layers"):
        shapes = _shapes(model, num_layers)
    names = strategy_names or strategies.available_exact()
    with user_input("--strategies"):
        for name in names:
            strategies.options_class(name)
    itemsize = 2 if param_dtype == "bfloat16" else 4
    sizes = [math.prod(s) * itemsize for _, s in shapes]
    # as `dist-ortho project` sizes them: about four buckets, none smaller than a matrix
    bucket_bytes = max(64 * 2**20, max(sizes), math.ceil(sum(sizes) / 4))
    rows = []
    for name in names:
        strategies.options_class(name)
        options = {"bucket_bytes": bucket_bytes} if name == "bucketed_async" else {}
        for replicas in REPLICA_MODES:
            cost = mesh_cost(shapes, spec, name, hw, replicas, param_dtype, ns_dtype,
                             options=options, rule=rule)
            rows.append(dict(model=model, hardware=hw.name, **cost.summary()))
    return rows


def mesh_table(rows: list[dict]) -> str:
    axes = sorted({k for r in rows for k in r if k.startswith("bytes[")})
    head = (["strategy", "replicas", "step ms", "comm ms", "NS ms", "inter-node GB/rank",
             "GB/rank"] + [f"GB {a[6:-1]}" for a in axes] + ["NS FLOPs busiest / job"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["strategy"], r["replicas"], f"{r['step_s'] * 1e3:.3g}",
                 f"{r['comm_s'] * 1e3:.3g}", f"{r['ns_s'] * 1e3:.3g}",
                 f"{r['inter_node_bytes'] * 1e-9:.3g}", f"{r['max_bytes_per_rank'] * 1e-9:.3g}"]
        cells += [f"{r.get(a, 0.0) * 1e-9:.3g}" for a in axes]
        cells.append(f"{r['max_ns_flops'] / r['total_ns_flops']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_mesh(args) -> int:
    names = None if args.strategies == "all" else [s.strip() for s in
                                                   args.strategies.split(",") if s.strip()]
    param_dtype = args.param_dtype
    rows = project_mesh(args.model, args.mesh, args.hardware, names, param_dtype,
                        args.ns_dtype, args.rule, args.num_layers)
    hw = get_preset(args.hardware)
    tag = args.mesh.replace("=", "").replace(",", "x")
    prefix = os.path.join(args.out, f"{args.model}_{tag}_{hw.name}")
    atomic_write_text(prefix + ".csv", pd.DataFrame(rows).to_csv(index=False))
    header = (f"# Mesh projection: {args.model} on {args.mesh} ({rows[0]['world_size']} GPUs), "
              f"{hw.name}, {args.rule}, params {param_dtype}, NS {args.ns_dtype}\n\n"
              f"Predicted by `profiling.mesh_cost` (not measured): the mesh scheduler's plan, "
              f"each collective on NVLink ({hw.intra_node_bytes_per_s / 1e9:g} GB/s) when its "
              f"group sits on one node of {hw.gpus_per_node} GPUs, else its off-node share on "
              f"the NIC ({hw.inter_node_bytes_per_s / 1e9:g} GB/s), both at "
              f"{hw.link_efficiency:.0%} of line rate; collectives and NS run one after another. "
              f"Bytes: sent per step by the rank that sends the most; per axis (the mesh axes "
              f"its group spans); inter-node: the part that leaves its node. `spread`: HSDP/TP "
              f"replicas split the matrices, each orthogonalized once in the job; `repeat`: "
              f"every replica does all of them.\n\n")
    table = mesh_table(rows)
    atomic_write_text(prefix + ".md", header + table + "\n")
    print(header + table)
    print(f"wrote {prefix}.csv and {prefix}.md")
    return 0
