"""HSDP at 2x2 (replicate x shard), 4 gloo ranks: optimizer-step time with replicas="spread"
(each matrix orthogonalized once in the job) against "repeat" (each replica group does all of
them), every strategy, measured side by side in one process group.

    python bench/hsdp_spread.py --model transformer-small --rounds 15

Parameters are the shape preset's matrices placed (Replicate(), Shard(0)) on the mesh, as FSDP2's
HSDP places them, with synthetic gradients. Every round steps each (strategy, replicas) optimizer
once, in an order rotated from round to round, so drifts of a shared machine hit all alike; a
step's time is the slowest rank's. Reported per strategy: the median step time of each mode with
its 95% order-statistic interval, and the paired ratio spread / repeat with its interval and the
verdict of `profiling.stats.compare` (a claim only where the interval clears the margin).
On 2 cores, 4 ranks oversubscribe the CPU for both modes alike: read the ratios, not the times.
Writes results/bench/hsdp_spread.md and .csv.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dist_ortho import NorMuon, strategies  # noqa: E402
from dist_ortho.core.io import atomic_write_text  # noqa: E402
from dist_ortho.models.shapes import matrix_shapes  # noqa: E402
from dist_ortho.profiling.stats import compare, median_interval  # noqa: E402
from dist_ortho.testing.processes import spawn  # noqa: E402

MODES = ("spread", "repeat")


def worker(rank: int, world_size: int, model: str, rounds: int, warmup: int,
           names: list[str]) -> dict:
    from common import timed_step
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    shapes = matrix_shapes(model)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for name in names:
        for mode in MODES:
            params = [torch.nn.Parameter(distribute_tensor(
                torch.randn(s, generator=gen), mesh, [Replicate(), Shard(0)], src_data_rank=None))
                for _, s in shapes]
            opt = NorMuon(list(zip([n for n, _ in shapes], params)), ns_dtype="float32",
                          strategy=name, replicas=mode)
            runs[(name, mode)] = (params, opt)
    keys = list(runs)
    times = {k: {} for k in keys}
    for r in range(warmup + rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            params, opt = runs[key]
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * r + i))
                p.grad = distribute_tensor(g, mesh, [Replicate(), Shard(0)], src_data_rank=None)
            elapsed = timed_step(opt)
            if r >= warmup:
                times[key][r] = elapsed
    plans = {k: runs[k][1].plan() for k in keys}
    return dict(times=times,
                max_ns_flops={k: max(c.ns_flops for c in plans[k].ranks) for k in keys},
                job_flops=sum(m.flops for m in plans[keys[0]].matrices),
                max_send={k: max(c.send_bytes for c in plans[k].ranks) for k in keys})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="transformer-small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "hsdp_spread"))
    args = parser.parse_args(argv)
    names = (strategies.available_exact() if args.strategies == "all"
             else args.strategies.split(","))
    res = spawn(worker, 4, args=(args.model, args.rounds, args.warmup, names),
                timeout_s=1800, join_timeout_s=3600)[0]
    lines = ["| strategy | spread step ms | repeat step ms | spread / repeat | verdict | "
             "busiest-rank NS FLOPs / job (spread, repeat) | busiest-rank send MB (spread, "
             "repeat) |", "|---|---|---|---|---|---|---|"]
    csv = ["strategy,mode,median_s,low_s,high_s,n,max_ns_flops_over_job,max_send_bytes"]
    for name in names:
        t = {m: res["times"][(name, m)] for m in MODES}
        iv = {m: median_interval(t[m].values()) for m in MODES}
        c = compare("spread", "repeat", t["spread"], t["repeat"])
        frac = {m: res["max_ns_flops"][(name, m)] / res["job_flops"] for m in MODES}
        send = {m: res["max_send"][(name, m)] for m in MODES}
        lines.append(f"| {name} | {iv['spread'].format('.3g', 1e3)} | "
                     f"{iv['repeat'].format('.3g', 1e3)} | {c.ratio.format('.2f')} | "
                     f"{c.verdict} | {frac['spread']:.3f}, {frac['repeat']:.3f} | "
                     f"{send['spread'] / 1e6:.2f}, {send['repeat'] / 1e6:.2f} |")
        for m in MODES:
            csv.append(f"{name},{m},{iv[m].median},{iv[m].low},{iv[m].high},{iv[m].n},"
                       f"{frac[m]},{send[m]}")
    text = (f"# HSDP 2x2 (replicate x shard), 4 gloo ranks: replicas spread vs repeat\n\n"
            f"Command: `python bench/hsdp_spread.py --model {args.model} --rounds {args.rounds}` "
            f"(NorMuon, NS in float32, one thread per rank, interleaved rounds; intervals: 95% "
            f"order-statistic intervals of the median; verdict from `profiling.stats.compare`, "
            f"margin included). 4 ranks on a 2-core machine: both modes are oversubscribed "
            f"alike, read the ratio.\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(args.out + ".md", text)
    atomic_write_text(args.out + ".csv", "\n".join(csv) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
