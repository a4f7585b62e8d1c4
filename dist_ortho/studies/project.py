"""`dist-ortho project`: project every strategy's optimizer step to large world sizes.

    dist-ortho project --model llama-8b --world-sizes 8,64,512,1024 --hardware h100
    python -m dist_ortho.studies.project --model llama-70b --hardware h200 --param-dtype bfloat16

For each world size and strategy, the cost model (`profiling.costmodel`) runs the strategy's own
plan on the model's matrix shapes and prices it with a hardware preset (`profiling.hardware`:
data-sheet bandwidths and FLOP rates, with stated efficiency and latency assumptions) or with
constants calibrated on a real machine (a JSON/YAML file written by `calibrate`). Nothing runs on
a GPU: these are predictions, and the table says which constants they came from.

Writes to --out (default results/latest/projection, which git ignores; the committed example is
results/examples/projection, regenerated with --out results/examples/projection):
<model>_<hardware>.csv and .md (the table), <model>_<hardware>_time.png and _bytes.png (log-log
plots per strategy with the lower bounds drawn), and prints the table.
Lower bounds: bytes per rank >= (P-1)/P^2 N (b_in + b_out) (every matrix assembled once and
returned once), NS time >= total FLOPs / P / rate; "ratio" columns are a strategy's distance to
them (1.0 = on the bound).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from io import BytesIO

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dist_ortho import rules, strategies
from dist_ortho.core.commands import run_command  # noqa: E402
from dist_ortho.core.errors import UserError, user_input  # noqa: E402
from dist_ortho.core.io import atomic_write_bytes  # noqa: E402
from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.sharding import dtype_size  # noqa: E402
from dist_ortho.models.shapes import matrix_shapes  # noqa: E402
from dist_ortho.profiling.costmodel import CostConstants  # noqa: E402
from dist_ortho.profiling.costmodel import load_constants, predict, torch_dtype
from dist_ortho.profiling.hardware import HARDWARE_PRESETS  # noqa: E402
from dist_ortho.reporting.families import families_section  # noqa: E402
from dist_ortho.reporting.families import split_ns_options
from dist_ortho.studies import mesh_project  # noqa: E402
from dist_ortho.studies.preflight import writable_dir  # noqa: E402

__all__ = ["add_arguments", "main", "project"]

DEFAULT_OUT = os.path.join("results", "latest", "projection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-8b",
                        help="shape preset (dist_ortho.models.SHAPE_PRESETS), default llama-8b")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="override the preset's number of layers")
    parser.add_argument("--world-sizes", default="8,64,512,1024",
                        help="comma-separated world sizes (GPUs), default 8,64,512,1024")
    parser.add_argument("--hardware", default="h100",
                        help="preset name (h100, h200) or a calibrated constants file "
                             "(.json/.yaml from dist_ortho.profiling.costmodel.calibrate)")
    parser.add_argument("--strategies", default="all",
                        help="comma-separated strategy names, default all registered")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameter (and momentum) dtype: the forward path's bytes")
    parser.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="Newton-Schulz dtype: the return path's bytes and the FLOP rate; "
                             "auto (default) is bfloat16 on a hardware preset (a GPU) and the "
                             "dtype a calibrated constants file was measured in")
    parser.add_argument("--rule", default="normuon", choices=rules.available(),
                        help="update rule (dist_ortho.rules.available()), default normuon")
    parser.add_argument("--bucket-bytes", type=int, default=None,
                        help="bucketed_async bucket size; default max(64 MiB, largest matrix, "
                             "a quarter of all matrix bytes)")
    parser.add_argument("-o", "--out", default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    parser.add_argument("--mesh", default=None,
                        help="a 2-D/3-D mesh, axis=size outermost first (e.g. dp=128,tp=8 or "
                             "replicate=8,shard=16,tp=8; axes tp, ep, replicate, others FSDP): "
                             "bytes per mesh axis and inter-node bytes per strategy and replicas "
                             "mode instead of --world-sizes (dist_ortho.studies.mesh_project)")


def _world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--world-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(p < 1 for p in sizes):
        raise UserError(f"--world-sizes must be positive integers, got {text!r}")
    return sorted(set(sizes))


def _constants_source(hardware: str):
    if hardware in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[hardware], hardware
    if os.path.exists(hardware):
        return load_constants(hardware), os.path.splitext(os.path.basename(hardware))[0]
    raise UserError(f"--hardware must be one of {sorted(HARDWARE_PRESETS)} or an existing "
                     f"constants file, got {hardware!r}")


def _ns_dtype(ns_dtype: str, hardware: str) -> str:
    """`auto`: bfloat16 on a hardware preset (accelerators run NS in bfloat16), else the dtype
    the constants file's NS rate was measured in (float32 when it does not say)."""
    if ns_dtype != "auto":
        return ns_dtype
    if hardware in HARDWARE_PRESETS or not os.path.exists(hardware):
        return "bfloat16"  # an unknown name fails later with the presets listed
    return getattr(load_constants(hardware), "meta", {}).get("ns_dtype") or "float32"


def project(model: str, world_sizes: list[int], hardware: str = "h100",
            strategy_names: list[str] | None = None, param_dtype: str = "float32",
            ns_dtype: str = "bfloat16", rule: str = "normuon",
            bucket_bytes: int | None = None, num_layers: int | None = None) -> list[dict]:
    """One row per (world size, strategy): the prediction's summary plus its inputs."""
    with user_input("--model/--num-layers"):
        shapes = matrix_shapes(model, num_layers)
    constants, hw_name = _constants_source(hardware)
    measured_dtype = getattr(constants, "meta", {}).get("ns_dtype")
    if measured_dtype and measured_dtype != ns_dtype:
        print(f"dist-ortho project: note: the NS rate in {hardware} was measured in "
              f"{measured_dtype}; --ns-dtype {ns_dtype} changes the return bytes, not that rate",
              file=sys.stderr)
    names = strategy_names or strategies.available_exact()
    with user_input("--strategies"):
        for n in names:
            strategies.options_class(n)  # ValueError naming the unknown strategy
    itemsize = dtype_size(torch_dtype(param_dtype))
    largest = max(math.prod(s) for _, s in shapes) * itemsize
    total = sum(math.prod(s) for _, s in shapes) * itemsize
    if bucket_bytes is None:
        # the strategy's 64 MiB default cannot hold a billion-parameter model's matrices; about
        # four buckets keep a pipeline without cutting the model into one-matrix buckets, whose
        # all-to-alls each wait on a single owner
        bucket_bytes = max(64 * 2**20, largest, math.ceil(total / 4))
    rows = []
    for P in world_sizes:
        for name in names:
            options = {"bucket_bytes": bucket_bytes} if name == "bucketed_async" else {}
            if name == "split_ns":  # the planner weighs Gram bytes as this machine prices them
                options = split_ns_options(constants, P, ns_dtype)
            pred = predict(shapes, P, name, options, constants=constants,
                           param_dtype=param_dtype, ns_dtype=ns_dtype, rule=rule)
            row = dict(model=model, hardware=hw_name, param_dtype=param_dtype,
                       ns_dtype=ns_dtype, rule=rule, **pred.summary())
            row["options"] = ",".join(f"{k}={v}" for k, v in options.items())
            memory = getattr(constants, "memory_bytes", None)
            row["hbm_bytes"] = memory
            rows.append(row)
    return rows


_COLUMNS = [  # (key, header, scale, format)
    ("world_size", "P", 1, "d"),
    ("strategy", "strategy", None, "s"),
    ("step_s", "step ms", 1e3, ".3g"),
    ("comm_s", "comm ms", 1e3, ".3g"),
    ("ns_s", "NS ms", 1e3, ".3g"),
    ("time_lower_bound_s", "bound ms", 1e3, ".3g"),
    ("time_ratio", "time/bound", 1, ".3g"),
    ("max_bytes_per_rank", "GB/rank", 1e-9, ".3g"),
    ("bytes_ratio", "bytes/bound", 1, ".3g"),
    ("flops_ratio", "NS FLOPs/bound", 1, ".3g"),
    ("peak_bytes", "opt. peak GB", 1e-9, ".3g"),
]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _, _ in _COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, scale, fmt in _COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("")
            elif scale is None:
                cells.append(str(v))
            else:
                v = v * scale
                cells.append(format(int(v), fmt) if fmt == "d" else format(v, fmt))
        hbm = r.get("hbm_bytes")
        if hbm and r["peak_bytes"] > hbm:
            cells[-1] += f" (> {hbm * 1e-9:.0f} GB HBM)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(rows: list[dict], prefix: str) -> list[str]:
    """Optimizer time and bytes per rank vs world size, per strategy, with the lower bounds."""
    sizes = sorted({r["world_size"] for r in rows})
    names = sorted({r["strategy"] for r in rows})
    first = rows[0]
    title = (f"{first['model']} on {first['hardware']}: {first['rule']}, params "
             f"{first['param_dtype']}, NS {first['ns_dtype']}")
    by = {(r["world_size"], r["strategy"]): r for r in rows}
    any_name = names[0]

    def bound(key):
        return [by[(P, any_name)][key] for P in sizes]

    def plot(key, bounds, ylabel, suffix):
        """One log-log figure: `key` per strategy against P, with two lower bounds drawn."""
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for n in names:
            ax.plot(sizes, [by[(P, n)][key] for P in sizes], marker="o", label=n)
        for (bound_key, label), style in zip(bounds, ("k--", "k:")):
            ax.plot(sizes, bound(bound_key), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("world size P (GPUs)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        plt.close(fig)
        atomic_write_bytes(prefix + suffix, buffer.getvalue())
        return prefix + suffix

    return [
        plot("step_s", [("ns_lower_bound_s", "NS bound: total FLOPs / P / rate"),
                        ("ns_whole_matrix_bound_s", "NS bound, whole matrices per rank")],
             "optimizer step time (s)", "_time.png"),
        plot("max_bytes_per_rank",
             [("bytes_lower_bound_per_rank", "bound: (P-1)/P^2 N (b_in + b_out)"),
              ("bytes_whole_matrix_bound",
               "bound, whole matrices per rank (owner receives the largest)")],
             "bytes per rank per step, busiest rank (B)", "_bytes.png"),
    ]


def main(args: argparse.Namespace) -> int:
    """The command, with the CLI's one-line errors and exit codes (also when called directly)."""
    return run_command("project", _main, args)


def _main(args: argparse.Namespace) -> int:
    writable_dir(args.out, "--out")  # before any work: a bad folder is one line, not a traceback
    args.ns_dtype = _ns_dtype(args.ns_dtype, args.hardware)
    if getattr(args, "mesh", None):
        return mesh_project.main_mesh(args)
    sizes = _world_sizes(args.world_sizes)
    names = None if args.strategies == "all" else [s.strip() for s in
                                                   args.strategies.split(",") if s.strip()]
    rows = project(args.model, sizes, args.hardware, names, args.param_dtype, args.ns_dtype,
                   args.rule, args.bucket_bytes, args.num_layers)
    tag = rows[0]["hardware"]
    suffix = "" if args.param_dtype == "float32" else f"_{args.param_dtype}"
    prefix = os.path.join(args.out, f"{args.model}_{tag}{suffix}")
    atomic_write_text(prefix + ".csv", pd.DataFrame(rows).to_csv(index=False))
    if args.hardware in HARDWARE_PRESETS:
        hw = HARDWARE_PRESETS[args.hardware]
        note = (f"Hardware preset `{hw.name}`: {hw.description}. Data sheet: {hw.sources} "
                f"Assumptions: NS matmuls sustain {hw.ns_efficiency:.0%} of peak; links "
                f"{hw.link_efficiency:.0%} of line rate; latency per ring step "
                f"{hw.intra_node_latency_s * 1e6:g} us (NVLink) / "
                f"{hw.inter_node_latency_s * 1e6:g} us (IB), per all-to-all peer "
                f"{hw.intra_node_peer_s * 1e6:g} / {hw.inter_node_peer_s * 1e6:g} us.")
    else:
        c: CostConstants = _constants_source(args.hardware)[0]
        note = f"Constants from {args.hardware}: {c.source}."
    table = markdown_table(rows)
    families = families_section(rows, matrix_shapes(args.model, args.num_layers),
                                args.param_dtype, args.ns_dtype)
    table += "\n\n" + families if families else ""
    header = (f"# Projection: {args.model}, {args.rule}, params {args.param_dtype}, "
              f"NS {args.ns_dtype}\n\nPredicted by `profiling.costmodel` (not measured). {note}\n"
              f"Bytes are the busiest rank's larger direction per step; bound columns are the "
              f"owner-based lower bounds (see `dist_ortho/studies/project.py`); opt. peak = optimizer "
              f"state + the strategy's transient buffers on the busiest rank (parameters, "
              f"gradients and activations come on top, so a row marked > HBM cannot run).\n\n")
    atomic_write_text(prefix + ".md", header + table + "\n")
    print(header + table)
    if not args.no_plots:
        for path in write_plots(rows, prefix):
            print(f"wrote {path}")
    print(f"wrote {prefix}.csv and {prefix}.md")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m dist_ortho.studies.project",
                                      description=__doc__.split("\n")[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
