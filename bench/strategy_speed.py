"""Optimizer-step time of every strategy as a ratio to `replicated`, side by side in one run.

    python bench/strategy_speed.py --world-sizes 2,4 --model transformer-bench --steps 4

For each world size, one gloo process group (one thread per rank) builds the shape-only model,
shards it with FSDP2 and steps NorMuon on synthetic gradients under every strategy, interleaving
the strategies round by round so slow drifts of a noisy machine hit them all alike. A step's time
is the slowest rank's (the step ends for everyone when the last rank is done). Ratios, not absolute
times, are the result: on a 2-core machine P > 2 oversubscribes the cores, for every strategy alike.
Writes results/bench/strategy_speed.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dist_ortho import strategies  # noqa: E402
from dist_ortho.testing.processes import spawn  # noqa: E402


def worker(rank: int, world_size: int, model_name: str, steps: int, warmup: int,
           names: list[str]) -> dict:
    from common import sharded_runs, timed_step

    from dist_ortho.models import synthetic_grads

    runs = sharded_runs(model_name, world_size, {n: n for n in names})
    times: dict[str, list[float]] = {n: [] for n in names}
    for step in range(warmup + steps):
        for name in names:
            model, opt = runs[name]
            synthetic_grads(model, step, seed=0)
            elapsed = timed_step(opt)
            if step >= warmup:
                times[name].append(elapsed)
    plans = {n: runs[n][1].plan() for n in names}
    return {n: dict(median_s=statistics.median(times[n]), times=times[n],
                    flops_imbalance=plans[n].flops_imbalance,
                    recv_bytes=plans[n].mine.recv_bytes) for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--model", default="transformer-bench")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench",
                                                      "strategy_speed.csv"))
    args = parser.parse_args(argv)
    names = strategies.available_exact()
    rows = []
    for P in [int(p) for p in args.world_sizes.split(",")]:
        res = spawn(worker, P, args=(args.model, args.steps, args.warmup, names),
                    timeout_s=1800, join_timeout_s=3600)[0]
        base = res["replicated"]["median_s"]
        for n in names:
            rows.append(dict(world_size=P, strategy=n, median_step_s=res[n]["median_s"],
                             speedup_vs_replicated=base / res[n]["median_s"],
                             target=0.7 * P, flops_imbalance=res[n]["flops_imbalance"],
                             recv_bytes_rank0=res[n]["recv_bytes"], model=args.model))
    import pandas as pd

    df = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    df.to_csv(args.out + ".tmp", index=False)
    os.replace(args.out + ".tmp", args.out)
    print(df.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else df.to_string())
    print(f"\nwritten {args.out}")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
