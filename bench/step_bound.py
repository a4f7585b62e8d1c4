"""Every strategy's optimizer step against its lower bound on this machine, and code A against B.

    python bench/step_bound.py --world-size 2 --model transformer-bench --repeats 21 \
        --label after --json /tmp/after.json
    python bench/step_bound.py --code /tmp/base ...   # the same with another checkout's package
    python bench/step_bound.py --table before.json after.json ... > results/bench/step_bound.md

One gloo process group (one thread per rank) builds the shape-only model, shards it with FSDP2
and steps NorMuon (float32 NS) under every strategy. The bound is measured in the same rounds
as the steps, because this shared host's speed drifts by tens of percent within a minute and a
bound calibrated once, before, would be compared against steps taken on another machine state:

- `ideal`: every rank runs Newton-Schulz on its share of the job's matrices (LPT by FLOPs; an
  exact half each at P = 2 on transformer-bench) at the same time, nothing else: no momentum, no
  norms, no exchange. It is the NS FLOPs / P at the rate P ranks sustain together on this host,
  the one part of the step no schedule can remove. Plus the owner byte bound at the measured
  all-to-all bandwidth: `bound` = ideal + comm bound.
- `alone`: rank 0 runs every matrix's NS while the other ranks wait; / P, plus the same byte
  term, it is the issue's FLOP bound at the rate of one rank alone. On a host whose cores share
  cache, memory bandwidth and a hypervisor's time slices, P ranks cannot all run at that rate;
  the gap between `alone` and `ideal` is that contention, measured, not overhead of any schedule.

Each round takes one sample of `ideal`, `alone` and one step of every strategy, in an order that
rotates between rounds; a step's (and the ideal's) time is its slowest rank's. Ratios are paired
by round (profiling/stats.py: median of the per-round ratios with its 95% order-statistic
interval); "best/best" is the fastest step over the fastest bound sample (both are best-of-n,
the convention of the cost model's calibration: load only ever adds time).

`--code DIR` imports dist_ortho from another checkout (DIR/dist_ortho with DIR/strategies and
DIR/profiling linked inside it; run it with DIR as the working directory: the ranks' fork server
puts the working directory first on sys.path) so that two versions are measured by one script,
alternately; `--table` joins the runs per label.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CONTROLS = ("ideal", "alone")


def worker(rank: int, world_size: int, code: str | None, model_name: str, repeats: int,
           warmup: int, names: list[str]) -> dict:
    if code:
        sys.path.insert(0, code)
    sys.path.insert(0, BENCH)

    import torch
    from common import sharded_runs, timed_call, timed_step

    import dist_ortho
    from dist_ortho.core.newton_schulz import newton_schulz
    from dist_ortho.core.plan import owner_bound_bytes
    from dist_ortho.models import synthetic_grads
    from dist_ortho.strategies.ownership import lpt_owners
    from dist_ortho.studies.interleaved import measure_machine
    runs = sharded_runs(model_name, world_size, {n: n for n in names})
    plan = runs[names[0]][1].plan()
    numel = sum(m.numel for m in plan.matrices if m.sharded)
    flops = [int(m.flops) for m in plan.matrices]
    facts = {"shapes": [list(m.shape) for m in plan.matrices], "ns_flops": flops,
             "matrix_numel": numel,
             "bound_bytes_per_rank": owner_bound_bytes(world_size, numel, 4, 4)}
    machine = measure_machine(facts, world_size, "float32", repeats=3)
    inputs = [torch.randn(m.view_shape) for m in plan.matrices]
    steps = [m.ns_steps for m in plan.matrices]
    owners = lpt_owners(plan.matrices, world_size)  # the ideal split: LPT by NS FLOPs
    share = [k for k, o in enumerate(owners) if o == rank]

    def sweep(positions) -> None:
        for k in positions:
            newton_schulz(inputs[k], steps[k], torch.float32)

    everything = list(range(len(inputs)))
    controls = {"ideal": lambda: sweep(share),
                "alone": lambda: sweep(everything if rank == 0 else [])}
    labels = list(CONTROLS) + names
    times: dict[str, list[float]] = {n: [] for n in labels}
    for r in range(warmup + repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for name in order:
            if name in controls:
                elapsed = timed_call(controls[name])
            else:
                model, opt = runs[name]
                synthetic_grads(model, r, seed=0)
                elapsed = timed_step(opt)
            if r >= warmup:
                times[name].append(elapsed)
    load = [sum(f for f, o in zip(flops, owners) if o == q) for q in range(world_size)]
    return {"code": os.path.dirname(os.path.dirname(os.path.abspath(dist_ortho.__file__))),
            "comm_bound_s": machine["comm_bound_s"], "study_bound_s": machine["bound_s"],
            "ns_flops": sum(flops), "ideal_flop_imbalance": max(load) * world_size / sum(flops),
            "ns_rate_alone_flops": machine["ns_rate_alone_flops"],
            "ns_rate_busy_flops": machine["ns_rate_busy_flops"], "times": times}


def bounds(run: dict) -> tuple[list[float], list[float]]:
    """Per round: (ideal + comm bound, alone / P + comm bound)."""
    comm, P = run["comm_bound_s"], run["world_size"]
    return ([t + comm for t in run["times"]["ideal"]],
            [t / P + comm for t in run["times"]["alone"]])


def table(paths: list[str]) -> str:
    sys.path.insert(0, ROOT)
    from dist_ortho.profiling.stats import compare_unpaired, median_interval

    runs = [json.load(open(p)) for p in paths]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    names = [n for n in dict.fromkeys(n for r in runs for n in r["times"]) if n not in CONTROLS]
    counts = ", ".join(f"{lab} x{sum(r['label'] == lab for r in runs)}" for lab in labels)
    fmt = lambda iv: f"{iv.median:.3f} ({iv.low:.3f}-{iv.high:.3f})"  # noqa: E731
    lines = [f"runs: {len(runs)} ({counts}), P = {runs[0]['world_size']}, model "
             f"{runs[0]['model']}, rounds per run: {len(runs[0]['times']['ideal'])}", ""]
    for lab in labels:
        mine = [r for r in runs if r["label"] == lab]
        per = [bounds(r) for r in mine]
        ideal = [b for i, _ in per for b in i]
        alone = [b for _, a in per for b in a]
        lines += [f"**{lab}** (code {', '.join(sorted({r['code'] for r in mine}))}): bound = "
                  f"ideal + comm {fmt(median_interval(ideal))} s, best {min(ideal):.3f} s; FLOP "
                  f"bound (one rank alone) {fmt(median_interval(alone))} s, best "
                  f"{min(alone):.3f} s; comm bound "
                  f"{statistics.median(r['comm_bound_s'] for r in mine) * 1e3:.1f} ms; ideal "
                  f"split FLOP imbalance {max(r['ideal_flop_imbalance'] for r in mine):.3f}", "",
                  "| strategy | step s (95% CI) | step / bound, per round (95% CI) | best step / "
                  "best bound | step / FLOP bound alone, per round (95% CI) | best step / "
                  "best FLOP bound |", "|---|---|---|---|---|---|"]
        for n in names:
            have = [(r, b) for r, b in zip(mine, per) if n in r["times"]]
            if not have:
                continue
            steps = [t for r, _ in have for t in r["times"][n]]
            to_ideal = [t / b for r, (i, _) in have for t, b in zip(r["times"][n], i)]
            to_alone = [t / b for r, (_, a) in have for t, b in zip(r["times"][n], a)]
            best_i = min(b for _, (i, _) in have for b in i)
            best_a = min(b for _, (_, a) in have for b in a)
            lines.append(f"| {n} | {fmt(median_interval(steps))} | "
                         f"{fmt(median_interval(to_ideal))} | {min(steps) / best_i:.3f} | "
                         f"{fmt(median_interval(to_alone))} | {min(steps) / best_a:.3f} |")
        lines.append("")
    if len(labels) == 2:  # code B against code A: separate process groups, so unpaired
        first, second = labels
        lines += [f"**{second} / {first}**, step time (unpaired: interval arithmetic on the two "
                  "medians' intervals; a verdict needs the margin of profiling/stats.py)", "",
                  f"| strategy | {second} / {first} (95%) | verdict |", "|---|---|---|"]
        for n in names:
            ivs = [median_interval([t for r in runs if r["label"] == lab and n in r["times"]
                                    for t in r["times"][n]]) for lab in (second, first)]
            if all(iv.n for iv in ivs):
                c = compare_unpaired(second, first, *ivs)
                verdict = "not distinguishable" if c.verdict == "tie" else c.verdict
                lines.append(f"| {n} | {fmt(c.ratio)} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="transformer-bench")
    parser.add_argument("--repeats", type=int, default=21)
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
    from dist_ortho.testing.processes import spawn

    names = args.strategies.split(",") if args.strategies else strategies.available_exact()
    out = spawn(worker, args.world_size, args=(code, args.model, args.repeats, args.warmup,
                                                names), join_timeout_s=3000)[0]
    out.update(label=args.label, world_size=args.world_size, model=args.model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    ideal, alone = bounds(out)
    for n, ts in out["times"].items():
        if n in CONTROLS:
            continue
        ratio = statistics.median(t / b for t, b in zip(ts, ideal))
        print(f"{n:20s} {statistics.median(ts):.3f} s  step/bound {ratio:.3f} (per round)")
    print(f"bound {statistics.median(ideal):.3f} s (ideal split + comm "
          f"{out['comm_bound_s']:.3f}), FLOP bound alone {statistics.median(alone):.3f} s, "
          f"code {out['code']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
