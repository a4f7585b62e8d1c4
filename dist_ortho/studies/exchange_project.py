"""`balanced`'s owner exchange, flat against two-level, projected to large world sizes.

    dist-ortho exchange --model llama-8b --world-sizes 64,256,1024,4096
    dist-ortho exchange --model llama-70b -o results/examples/exchange

For each world size, the cost model prices one optimizer step of `balanced` with its flat
exchange (one all-to-all each way over all P ranks) and with its node-aware one
(`exchange="two_level"`, `strategies.two_level`: inside the node first, then across nodes in
fewer, larger messages) on a hardware preset, and the plan says what crosses nodes: the busiest
rank's inter-node bytes and messages per step (forward + return, the larger of its sends and
receives), and its intra-node ones. Predictions, not measurements: the preset's link figures
and per-message latencies are data sheet and assumptions (`profiling.hardware`).

Writes <model>_<hardware>_exchange.md and .csv to --out (default results/latest/exchange).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from dist_ortho.core.commands import add_grammar, run_command
from dist_ortho.core.errors import UserError
from dist_ortho.core.io import atomic_write_text, writable_dir
from dist_ortho.core.sharding import dtype_size
from dist_ortho.models.shapes import matrix_shapes
from dist_ortho.profiling.costmodel import matrix_specs, predict, torch_dtype
from dist_ortho.profiling.hardware import get_preset
from dist_ortho.strategies import two_level
from dist_ortho.strategies.owner_exchange import owner_pairs

__all__ = ["exchange_rows", "markdown", "main"]

DEFAULT_OUT = os.path.join("results", "latest", "exchange")


def _busiest(stages, link: str, b_in: int, b_out: int) -> tuple[float, float]:
    """(bytes, messages) of the busiest rank on one link over forward and return."""
    fwd, ret = stages
    per_rank = np.zeros((2, fwd[0][link].shape[1]))
    for traffic, itemsize in ((fwd, b_in), (ret, b_out)):
        for stage in traffic:
            a = stage[link]
            per_rank[0] += np.maximum(a[0], a[1]) * itemsize
            per_rank[1] += np.maximum(a[2], a[3])
    return float(per_rank[0].max()), float(per_rank[1].max())


def exchange_rows(model: str, world_sizes: list[int], hardware: str = "h100",
                  param_dtype: str = "float32", ns_dtype: str = "bfloat16") -> list[dict]:
    preset = get_preset(hardware)
    G = preset.gpus_per_node
    shapes = matrix_shapes(model)
    b_in = dtype_size(torch_dtype(param_dtype))
    b_out = dtype_size(torch_dtype(ns_dtype))
    rows = []
    for P in world_sizes:
        for exchange in two_level.EXCHANGES:
            options = {} if exchange == "flat" else {"exchange": exchange, "ranks_per_node": G}
            pred = predict(shapes, P, "balanced", options, constants=preset,
                           param_dtype=param_dtype, ns_dtype=ns_dtype)
            specs = matrix_specs(shapes, P, torch_dtype(param_dtype), ns_dtype)
            owners = [pred.plan.owner[m.index] for m in specs]
            src, dst, n = owner_pairs(specs, owners, P)
            walk = two_level.flat_link_traffic if exchange == "flat" else two_level.link_traffic
            stages = (walk(src, dst, n, P, G), walk(dst, src, n, P, G))
            inter = _busiest(stages, "inter_node", b_in, b_out)
            intra = _busiest(stages, "intra_node", b_in, b_out)
            rows.append(dict(model=model, hardware=hardware, world_size=P, exchange=exchange,
                             step_s=pred.time.total_s, comm_s=pred.time.comm_s,
                             inter_node_bytes=inter[0], inter_node_messages=inter[1],
                             intra_node_bytes=intra[0], intra_node_messages=intra[1]))
    return rows


def markdown(rows: list[dict], command: str) -> str:
    first = rows[0]
    lines = [f"# balanced's owner exchange, flat vs two-level: {first['model']} on "
             f"{first['hardware']}", "",
             f"Predicted by `profiling.costmodel` with the `{first['hardware']}` preset "
             f"(data sheet + assumptions; {get_preset(first['hardware']).gpus_per_node} GPUs "
             f"per node), not measured. Per step (forward + return), the busiest rank's larger "
             f"direction. Command: `{command}`", "",
             "| P | exchange | step ms | comm ms | inter-node MB/rank | inter-node messages/rank "
             "| intra-node MB/rank | intra-node messages/rank |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['exchange']} | {r['step_s'] * 1e3:.4g} | "
                     f"{r['comm_s'] * 1e3:.4g} | {r['inter_node_bytes'] * 1e-6:.4g} | "
                     f"{r['inter_node_messages']:.0f} | {r['intra_node_bytes'] * 1e-6:.4g} | "
                     f"{r['intra_node_messages']:.0f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--world-sizes", default="64,256,1024,4096")
    parser.add_argument("--hardware", default="h100", help="a preset: h100 or h200")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_grammar(parser, config=None, overrides=None,
                out=f"folder for the tables (default: {DEFAULT_OUT}, which git ignores)")


def main(args: argparse.Namespace) -> int:
    return run_command("exchange", _main, args)


def _main(args: argparse.Namespace) -> int:
    out = str(args.out or DEFAULT_OUT)
    writable_dir(out, "-o/--out")
    try:
        sizes = sorted({int(x) for x in args.world_sizes.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--world-sizes must be comma-separated integers, got "
                         f"{args.world_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--world-sizes must be positive integers, got {args.world_sizes!r}")
    rows = exchange_rows(args.model, sizes, args.hardware, args.param_dtype, args.ns_dtype)
    command = (f"dist-ortho exchange --model {args.model} "
               f"--world-sizes {','.join(map(str, sizes))} --hardware {args.hardware} -o {out}")
    prefix = os.path.join(out, f"{args.model}_{args.hardware}_exchange")
    atomic_write_text(prefix + ".csv", pd.DataFrame(rows).to_csv(index=False))
    text = markdown(rows, command)
    atomic_write_text(prefix + ".md", text)
    print(text)
    print(f"wrote {prefix}.md and {prefix}.csv")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="dist-ortho exchange",
                                      description=__doc__.split("\n")[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
