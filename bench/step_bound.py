"""Every strategy's optimizer step over its lower bound on this machine, and code A against code B.

    python bench/step_bound.py --world-size 2 --model transformer-bench --repeats 9 \
        --label after --json /tmp/after.json
    python bench/step_bound.py --code /tmp/base ...   # the same with another checkout's package
    python bench/step_bound.py --table before.json after.json ... > results/bench/step_bound.md

One gloo process group (one thread per rank) builds the shape-only model, shards it with FSDP2
and steps NorMuon (float32 NS) under every strategy, interleaved: each repeat takes one step of
every strategy in turn, the order rotating between repeats; the step's time is its slowest
rank's. The bound is the study's (`dist_ortho.study.step_bound`, calibrated in the same process
group just before: max(sum of NS seconds with every rank busy / P, the largest matrix's NS
seconds alone) + the owner byte bound / the measured all-to-all bandwidth).

`--code DIR` imports dist_ortho from another checkout (DIR/dist_ortho with DIR/strategies and
DIR/profiling linked inside it, see --help; run it with DIR as the working directory: the ranks'
fork server puts the working directory first on sys.path) so that two versions are measured by
one script, alternately (`--table` joins the runs: per strategy and label, the median over all
runs' steps with its 95% order-statistic interval, and the distance to each run's own bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def worker(rank: int, world_size: int, code: str | None, model_name: str, repeats: int,
           warmup: int, names: list[str]) -> dict:
    if code:
        sys.path.insert(0, code)
    sys.path.insert(0, BENCH)

    from common import sharded_runs, timed_step
    from dist_ortho.models import synthetic_grads
    from dist_ortho.plan import owner_bound_bytes
    from dist_ortho.study import measure_machine

    import dist_ortho
    runs = sharded_runs(model_name, world_size, {n: n for n in names})
    plan = runs[names[0]][1].plan()
    numel = sum(m.numel for m in plan.matrices if m.sharded)
    facts = {"shapes": [list(m.shape) for m in plan.matrices],
             "ns_flops": [int(m.flops) for m in plan.matrices], "matrix_numel": numel,
             "bound_bytes_per_rank": owner_bound_bytes(world_size, numel, 4, 4)}
    machine = measure_machine(facts, world_size, "float32", repeats=3)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model, opt = runs[name]
            synthetic_grads(model, r, seed=0)
            elapsed = timed_step(opt)
            if r >= warmup:
                times[name].append(elapsed)
    flops = sum(facts["ns_flops"])
    # the bound: all NS FLOPs spread over P ranks at the calibrated rate of one rank
    # running alone (the machine's best), plus the owner byte bound at the measured bandwidth
    flop_bound = flops / world_size / machine["ns_rate_alone_flops"] + machine["comm_bound_s"]
    return {"code": os.path.dirname(os.path.dirname(os.path.abspath(dist_ortho.__file__))),
            "bound_s": machine["bound_s"], "ns_bound_s": machine["ns_bound_s"],
            "comm_bound_s": machine["comm_bound_s"], "flop_bound_s": flop_bound,
            "ns_rate_alone_flops": machine["ns_rate_alone_flops"],
            "ns_rate_busy_flops": machine["ns_rate_busy_flops"], "times": times}


def table(paths: list[str]) -> str:
    sys.path.insert(0, ROOT)
    from dist_ortho.profiling.stats import median_interval

    runs = [json.load(open(p)) for p in paths]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    names = list(dict.fromkeys(n for r in runs for n in r["times"]))
    counts = ", ".join(f"{lab} x{sum(r['label'] == lab for r in runs)}" for lab in labels)
    lines = [f"runs: {len(runs)} ({counts}), P = {runs[0]['world_size']}, model "
             f"{runs[0]['model']}, steps per strategy and run: {len(runs[0]['times'][names[0]])}",
             "",
             "| strategy | " + " | ".join(f"{lab}: step s (95% CI) | {lab}: step / study bound "
                                          f"| {lab}: step / FLOP bound" for lab in labels) + " |",
             "|---|" + "---|---|---|" * len(labels)]
    for n in names:
        cells = []
        for lab in labels:
            mine = [r for r in runs if r["label"] == lab and n in r["times"]]
            if not mine:
                cells += ["-", "-", "-"]
                continue
            steps = [t for r in mine for t in r["times"][n]]
            iv = median_interval(steps)
            ratios = [t / r["bound_s"] for r in mine for t in r["times"][n]]
            riv = median_interval(ratios)
            fiv = median_interval([t / r["flop_bound_s"] for r in mine for t in r["times"][n]])
            cells += [f"{iv.median:.3f} ({iv.low:.3f}-{iv.high:.3f})",
                      f"{riv.median:.3f} ({riv.low:.3f}-{riv.high:.3f})",
                      f"{fiv.median:.3f} ({fiv.low:.3f}-{fiv.high:.3f})"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for key, what in (("bound_s", "study bound"), ("flop_bound_s", "FLOP bound")):
        bounds = {lab: statistics.median(r[key] for r in runs if r["label"] == lab)
                  for lab in labels}
        lines += ["", f"{what} (median over runs): " + ", ".join(
            f"{lab} {b:.3f} s" for lab, b in bounds.items())]
    lines += ["", "code measured: " + ", ".join(sorted({f"{r['label']}={r['code']}"
                                                        for r in runs}))]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="transformer-bench")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--strategies", default=None, help="comma-separated (default: all)")
    parser.add_argument("--code", default=None,
                        help="import dist_ortho from this checkout (its dist_ortho/ must hold "
                             "strategies and profiling links to ../strategies, ../profiling)")
    parser.add_argument("--label", default="this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    code = os.path.abspath(args.code) if args.code else ROOT
    sys.path.insert(0, code)
    # the ranks are fresh interpreters: they must find the same package first
    os.environ["PYTHONPATH"] = os.pathsep.join([code, os.environ.get("PYTHONPATH", "")])
    from dist_ortho import strategies
    from dist_ortho.testing import spawn

    names = args.strategies.split(",") if args.strategies else strategies.available()
    out = spawn(worker, args.world_size, args=(code, args.model, args.repeats, args.warmup,
                                                names), join_timeout_s=3000)[0]
    out.update(label=args.label, world_size=args.world_size, model=args.model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    for n, ts in out["times"].items():
        med = statistics.median(ts)
        print(f"{n:20s} {med:.3f} s  step/bound {med / out['bound_s']:.3f}")
    print(f"bound {out['bound_s']:.3f} s (ns {out['ns_bound_s']:.3f}, comm "
          f"{out['comm_bound_s']:.3f}), FLOP bound {out['flop_bound_s']:.3f} s, code {out['code']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
