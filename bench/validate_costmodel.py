"""Does the cost model predict measured optimizer-step times? Out of sample first, then in sample.

    flock -x /tmp/dist_ortho_cpu.lock python bench/validate_costmodel.py --world-sizes 2,4 \
        --calibration-world-size 3 --model transformer-bench --repeats 3 --steps 3 --reruns 2 \
        --max-load 1.0   # about 10 minutes on 2 cores

1. Out-of-sample calibration: one gloo process group at a world size that is NOT validated (3 by
   default) fits the NS rate on shapes that are NOT the model's (`NS_CALIBRATION_SHAPES` less the
   model's shapes) and alpha/beta per collective kind (`profiling.costmodel.calibrate`: the median
   of each collective's repeats, pieces up to 8 MiB). The prediction for another world size and the
   model's shapes is then a genuine extrapolation. The same samples fitted on the best of each
   collective's repeats instead are reported beside ("comm on best of repeats"), to show what the
   choice of statistic does.
2. Per validated world size P, `reruns` process groups one after another (the same points
   rerun: how far the measurement itself repeats), each: the in-sample calibration (at P, with the
   model's own shapes, whose measured NS seconds the model then uses), then the shape-only model
   sharded with FSDP2 and stepped by NorMuon (float32 NS) under every strategy, interleaved as the
   study does (`dist_ortho.studies.interleaved`): `repeats` x `steps` rounds, one step of each
   strategy per round, the order rotated every repeat. Every timed step is recorded (steps.csv): the step's
   time (slowest rank), the slowest rank's seconds in Newton-Schulz (`ns`) and blocked in
   collectives (`comm_wait`), and that blocked time split in two (`profiling.transfer`): the
   transfer, the time the group's link was busy (the union of the collectives' in-flight
   intervals, each from the last rank's arrival to completion, so collectives queued behind each
   other count once), and the wait for a slower rank (per collective, the last arrival after this
   rank's own; the slowest rank's sum).
3. In the parent, both calibrations predict every strategy from shapes alone, and each prediction
   is compared with the MEDIAN of the measured steps and its order-statistic 95% interval
   (`profiling.stats.median_interval`), for the whole step and separately for the compute (NS)
   and communication terms.

Writes results/costmodel_validation/: validation.md (out of sample first), validation.csv (one row
per P, strategy and calibration), steps.csv (every timed step, with its process group `run`),
calibration_oos_P<k>.json and calibration_P<P>.json (the first process group's). Error =
predicted / median - 1; target |error| <= 25% per term. Beside the errors it reports what the
measurement says about each miss: the steps' spread, the same points rerun in another process
group, and how the out-of-sample constants carry over to the validated world size's own
calibration calls.

What "measured comm" is: the transfer time, the part of the blocked time the cost model's comm term
prices. The blocked time (`comm_wait`) also holds the time a rank waits for a slower rank to
arrive (uneven NS, or on a 2-core machine at P = 4 a rank descheduled while another computes),
which the cost model counts as compute; it is reported beside, as "blocked".
The compute model includes co-located ranks' contention (`ComputeModel.contention`, measured by
`calibrate` from NS timed alone and on every rank at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import sharded_runs  # noqa: E402

from dist_ortho import strategies  # noqa: E402
from dist_ortho.core.timing import SecondsTimer  # noqa: E402
from dist_ortho.models import synthetic_grads  # noqa: E402
from dist_ortho.models.shapes import matrix_shapes  # noqa: E402
from dist_ortho.profiling.calibration import (NS_CALIBRATION_SHAPES, CommSample,  # noqa: E402
                                              calibrate, fit_comm_model)
from dist_ortho.profiling.comm import CommCounter  # noqa: E402
from dist_ortho.profiling.transfer import TransferClock  # noqa: E402
from dist_ortho.profiling.costmodel import CostConstants, predict  # noqa: E402
from dist_ortho.profiling.env import busy_cpu_s  # noqa: E402
from dist_ortho.profiling.stats import median_interval  # noqa: E402
from dist_ortho.testing.processes import spawn  # noqa: E402

OUT = os.path.join(ROOT, "results", "costmodel_validation")
TARGET = 0.25


def options_for(name: str, bucket_bytes: int) -> dict:
    return {"bucket_bytes": bucket_bytes} if name == "bucketed_async" else {}


def calibration_worker(rank: int, world_size: int, ns_shapes: list) -> dict:
    start = time.perf_counter()
    constants = calibrate(ns_shapes=tuple(ns_shapes))
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this rank's CPU: not another process's
    return dict(constants=constants.to_dict(), seconds=time.perf_counter() - start,
                cpu_s=usage.ru_utime + usage.ru_stime)


def step_worker(rank: int, world_size: int, model_name: str, repeats: int, steps: int,
                warmup: int, names: list[str], bucket_bytes: int) -> dict:
    model_shapes = sorted({s for _, s in matrix_shapes(model_name)})
    start = time.perf_counter()
    constants = calibrate(ns_shapes=tuple(NS_CALIBRATION_SHAPES) + tuple(model_shapes))
    calibration_s = time.perf_counter() - start
    runs = sharded_runs(model_name, world_size,
                        {n: strategies.build(n, **options_for(n, bucket_bytes)) for n in names})
    rows = []

    def one(name: str, step: int, repeat, index) -> None:
        model, opt = runs[name]
        synthetic_grads(model, step, seed=0)
        timer = SecondsTimer()
        opt.set_timer(timer)
        dist.barrier()  # every rank starts together; not part of the step
        with CommCounter(), TransferClock() as clock:
            t0 = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - t0
        split = clock.split()  # after the step: gathering the spans is not part of it
        mine = [elapsed, timer.seconds.get("ns", 0.0), timer.seconds.get("comm_wait", 0.0),
                split.transfer_s, split.wait_s]
        opt.set_timer(None)
        # the slowest rank's step, NS, comm wait, transfer (the same on all) and wait for others
        stats = torch.tensor(mine, dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if repeat is not None:
            rows.append(dict(strategy=name, repeat=repeat, index=index, step_s=stats[0].item(),
                             ns_s=stats[1].item(), comm_wait_s=stats[2].item(),
                             transfer_s=stats[3].item(), peer_wait_s=stats[4].item()))

    step = 0
    for _ in range(warmup):
        for name in names:
            one(name, step, None, None)
        step += 1
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for i in range(steps):
            for name in order:
                one(name, step, r, i)
            step += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return dict(constants=constants.to_dict(), calibration_s=calibration_s, rows=rows,
                cpu_s=usage.ru_utime + usage.ru_stime)



def best_of_repeats(constants: CostConstants) -> CostConstants:
    """The same calibration with alpha/beta refitted on the best of each collective's repeats (the
    samples it recorded) instead of their median."""
    samples = [CommSample(d["kind"], d["world_size"], d["nbytes"], min(d["times"]),
                          tuple(d["times"])) for d in constants.meta["comm_samples"]]
    return dataclasses.replace(constants, comm=fit_comm_model(samples))


def calibration_spread(constants: CostConstants, min_bytes: float = 2**20) -> float:
    """Median over the calibration's collectives of at least `min_bytes` of their median / best
    repeat: how much a transfer's typical time exceeds its best on this host."""
    ratios = [float(np.median(d["times"])) / min(d["times"])
              for d in constants.meta["comm_samples"]
              if d["nbytes"] >= min_bytes and min(d["times"]) > 0]
    return float(np.median(ratios)) if ratios else float("nan")


def carried_over(measured_at: CostConstants, fitted: CostConstants,
                 min_bytes: float = 2**20) -> dict:
    """{kind: median over `measured_at`'s calibration calls of at least `min_bytes` of their
    measured seconds / what `fitted`'s alpha-beta predicts for them}: how well constants fitted
    at one world size carry over to the calls of another (the same microbenchmark, so the step
    plays no part)."""
    ratios: dict[str, list[float]] = {}
    for d in measured_at.meta["comm_samples"]:
        predicted = fitted.comm.time(d["kind"], d["nbytes"], d["world_size"])
        if d["nbytes"] >= min_bytes and predicted > 0:
            ratios.setdefault(d["kind"], []).append(d["seconds"] / predicted)
    return {k: float(np.median(v)) for k, v in sorted(ratios.items())}


def _measured(fn, P: int, args: tuple) -> tuple[list, float | None, list]:
    """One spawn; the cores other processes used meanwhile (machine busy time minus this run's
    own CPU time, over the wall time), and the load averages at start and end."""
    loads = [os.getloadavg()[0]]
    busy0, wall0 = busy_cpu_s(), time.time()
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    per_rank = spawn(fn, P, args=args, timeout_s=1800, join_timeout_s=3600)
    busy1, wall1 = busy_cpu_s(), time.time()
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    loads.append(os.getloadavg()[0])
    if busy0 is None or busy1 is None:
        return per_rank, None, loads
    own = sum(r.get("cpu_s", 0.0) for r in per_rank) + (own1.ru_utime + own1.ru_stime
                                                        - own0.ru_utime - own0.ru_stime)
    return per_rank, max(0.0, (busy1 - busy0) - own) / (wall1 - wall0), loads


def _wait_for_quiet(max_load: float | None, max_wait_s: float) -> None:
    start = time.time()
    while max_load is not None and os.getloadavg()[0] >= max_load \
            and time.time() - start < max_wait_s:
        time.sleep(10)


def compare_rows(steps: pd.DataFrame, shapes, P: int, names, bucket_bytes: int,
                 calibrations: dict) -> list[dict]:
    """Per strategy and calibration: predicted total / NS / comm against the measured medians
    and their intervals."""
    rows = []
    for name in names:
        mine = steps[(steps["world_size"] == P) & (steps["strategy"] == name)]
        columns = {"step": "total", "ns": "ns", "transfer": "comm", "comm_wait": "wait"}
        measured = {k: median_interval(mine[f"{k}_s"]) for k in list(columns) + ["peer_wait"]}
        # run to run: the interquartile range of the timed steps over their median
        spread = {term: (mine[f"{k}_s"].quantile(0.75) - mine[f"{k}_s"].quantile(0.25))
                  / mine[f"{k}_s"].median() for k, term in columns.items()}
        # the same point in separate process groups: largest / smallest run median - 1
        runs = mine.groupby("run")
        between = {term: runs[f"{k}_s"].median().max() / runs[f"{k}_s"].median().min() - 1
                   for k, term in columns.items()}
        for label, constants in calibrations.items():
            pred = predict(shapes, P, name, options_for(name, bucket_bytes), constants=constants,
                           param_dtype=torch.float32, ns_dtype="float32").time
            row = dict(world_size=P, strategy=name, calibration=label)
            for term, predicted, m in (("total", pred.total_s, measured["step"]),
                                       ("ns", pred.ns_s, measured["ns"]),
                                       ("comm", pred.comm_s, measured["transfer"]),
                                       ("wait", pred.comm_s, measured["comm_wait"])):
                row.update({f"{term}_predicted_s": predicted, f"{term}_median_s": m.median,
                            f"{term}_low_s": m.low, f"{term}_high_s": m.high,
                            f"{term}_error": predicted / m.median - 1 if m.median else None,
                            f"{term}_in_interval": bool(m.low <= predicted <= m.high),
                            f"{term}_spread": spread[term],
                            f"{term}_between_runs": between[term]})
            row.update(peer_wait_median_s=measured["peer_wait"].median,
                       elementwise_predicted_s=pred.elementwise_s, overlap_predicted_s=pred.overlap_s,
                       timed_steps=measured["step"].n, coverage=measured["step"].coverage)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="2,4", help="the validated world sizes")
    parser.add_argument("--calibration-world-size", type=int, default=3,
                        help="where the out-of-sample constants are fitted (not a validated one)")
    parser.add_argument("--model", default="transformer-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reruns", type=int, default=2,
                        help="process groups per validated world size: the same points rerun, "
                             "whose medians' spread says how far the measurement itself repeats")
    parser.add_argument("--bucket-bytes", type=int, default=4 * 2**20,
                        help="bucketed_async bucket size (default 4 MiB: several buckets)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each process group, wait until the 1-minute load average "
                             "is below this (other jobs on a shared machine skew every timing)")
    parser.add_argument("--max-wait-s", type=float, default=600)
    args = parser.parse_args(argv)

    world_sizes = [int(p) for p in args.world_sizes.split(",")]
    if args.calibration_world_size in world_sizes:
        parser.error(f"--calibration-world-size {args.calibration_world_size} is validated too; "
                     f"pick one outside --world-sizes {args.world_sizes} (out of sample)")
    names = strategies.available_exact()
    shapes = matrix_shapes(args.model)
    model_shapes = {tuple(s) for _, s in shapes}
    oos_shapes = [s for s in NS_CALIBRATION_SHAPES if tuple(s) not in model_shapes]
    os.makedirs(args.out, exist_ok=True)
    machine = []

    _wait_for_quiet(args.max_load, args.max_wait_s)
    Pc = args.calibration_world_size
    per_rank, foreign, loads = _measured(calibration_worker, Pc, (oos_shapes,))
    oos = CostConstants.from_dict(per_rank[0]["constants"])
    oos.save(os.path.join(args.out, f"calibration_oos_P{Pc}.json"))
    oos_best = best_of_repeats(oos)
    machine.append(dict(job=f"out-of-sample calibration, P={Pc}", foreign=foreign, loads=loads,
                        seconds=per_rank[0]["seconds"]))
    print(f"calibrated at P={Pc} on {oos_shapes} in {per_rank[0]['seconds']:.0f} s", flush=True)

    frames, rows, carried = [], [], {}
    for P in world_sizes:
        mine = []
        for run in range(args.reruns):
            _wait_for_quiet(args.max_load, args.max_wait_s)
            per_rank, foreign, loads = _measured(
                step_worker, P, (args.model, args.repeats, args.steps, args.warmup, names,
                                 args.bucket_bytes))
            res = per_rank[0]
            if run == 0:  # the in-sample constants: the first process group's
                ins = CostConstants.from_dict(res["constants"])
                ins.save(os.path.join(args.out, f"calibration_P{P}.json"))
            machine.append(dict(job=f"calibration and steps, P={P}, run {run + 1}",
                                foreign=foreign, loads=loads, seconds=res["calibration_s"]))
            mine.append(pd.DataFrame(res["rows"]).assign(world_size=P, run=run))
            print(f"P={P} run {run + 1}: {len(mine[-1])} timed steps; other processes {foreign}",
                  flush=True)
        steps = pd.concat(mine, ignore_index=True)
        frames.append(steps)
        # the in-sample constants, without the model's per-shape NS times: the fitted rate only
        rate_only = dataclasses.replace(
            ins, compute=dataclasses.replace(ins.compute, ns_seconds_by_shape={}))
        carried[P] = carried_over(ins, oos)
        rows += compare_rows(steps, shapes, P, names, args.bucket_bytes,
                             {"out-of-sample": oos, BEST: oos_best, "in-sample": ins,
                              "in-sample, fitted rate only": rate_only})
    steps = pd.concat(frames, ignore_index=True)
    steps.to_csv(os.path.join(args.out, "steps.csv"), index=False)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(args.out, "validation.csv"), index=False)
    md = markdown(table, args, oos_shapes, machine, calibration_spread(oos), carried)
    with open(os.path.join(args.out, "validation.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def _worst(table: pd.DataFrame, label: str, term: str) -> str:
    sel = table[table["calibration"] == label]
    err = sel[f"{term}_error"].astype(float)
    i = err.abs().idxmax()
    return (f"worst {err[i]:+.0%} (P={int(sel.loc[i, 'world_size'])} "
            f"{sel.loc[i, 'strategy']}), median |error| {err.abs().median():.0%}, "
            f"{int((err.abs() <= TARGET).sum())}/{len(err)} within {TARGET:.0%}")


def _cell(r, term: str) -> list[str]:
    return [f"{r[f'{term}_median_s'] * 1e3:.0f} [{r[f'{term}_low_s'] * 1e3:.0f}, "
            f"{r[f'{term}_high_s'] * 1e3:.0f}]", f"{r[f'{term}_predicted_s'] * 1e3:.0f}",
            f"{r[f'{term}_error']:+.0%}"]


BEST = "out-of-sample, comm on best of repeats"
QUIET_CORES = 0.25  # other processes' mean CPU (cores) below which a run counts as quiet


def _why(table: pd.DataFrame, label: str, term: str, col: str) -> str | None:
    """What the measurement says about one term's misses under one calibration: how many miss,
    how many of those lie inside the measured median's 95% interval, and the run-to-run spread
    (interquartile range / median of the timed steps) at the missed points."""
    sel = table[table["calibration"] == label]
    miss = sel[sel[f"{col}_error"].abs() > TARGET]
    if miss.empty:
        return None
    inside = int(miss[f"{col}_in_interval"].sum())
    low = int((miss[f"{col}_error"] < 0).sum())
    return (f"{term}: {len(miss)}/{len(sel)} beyond {TARGET:.0%} ({low} predicted short), "
            f"{inside} of them inside the measured median's 95% interval; run-to-run spread "
            f"(interquartile range / median of the timed steps) at those points "
            f"{miss[f'{col}_spread'].min():.0%} to {miss[f'{col}_spread'].max():.0%} "
            f"(median {miss[f'{col}_spread'].median():.0%})"
            + (f"; the same points' medians in separate process groups differ by "
               f"{miss[f'{col}_between_runs'].min():.0%} to "
               f"{miss[f'{col}_between_runs'].max():.0%}"
               if miss[f"{col}_between_runs"].max() > 0 else ""))


def markdown(table: pd.DataFrame, args, oos_shapes, machine, comm_spread: float,
             carried: dict) -> str:
    labels = ("out-of-sample", BEST, "in-sample", "in-sample, fitted rate only")
    lines = [f"# Cost model vs measured optimizer step ({args.model}, gloo CPU, one thread per "
             f"rank, NorMuon float32 NS)", "",
             "## Summary (error = predicted / measured median - 1; target |error| <= 25% per "
             "term)", "",
             "| calibration | whole step | compute (NS) | comm (transfer) | comm vs blocked "
             "time (transfer + wait for peers) |", "|---|---|---|---|---|"]
    for label in labels:
        lines.append(f"| {label} | {_worst(table, label, 'total')} | "
                     f"{_worst(table, label, 'ns')} | {_worst(table, label, 'comm')} | "
                     f"{_worst(table, label, 'wait')} |")
    # other processes' CPU during the validated runs (not the out-of-sample calibration job)
    foreign = [m["foreign"] for m in machine
               if m["foreign"] is not None and m["job"].startswith("calibration and steps")]
    shared = ("quiet" if foreign and max(foreign) < QUIET_CORES else
              "a shared machine: the model assumes free cores, so every measured term is inflated")
    lines += ["", f"Other processes used {min(foreign):.2f} to {max(foreign):.2f} of the "
                  f"{os.cpu_count()} cores on average during the validated runs (table at the "
                  f"end; {shared})." if foreign else "", ""]
    sel = table[table["calibration"] == "out-of-sample"]
    if args.reruns > 1:
        lines.append("The measurement repeated (the same points in " + str(args.reruns)
                     + " process groups; largest / smallest run median - 1, per point): "
                     + "; ".join(f"{term} median {sel[f'{col}_between_runs'].median():.0%}, "
                                 f"worst {sel[f'{col}_between_runs'].max():.0%}"
                                 for term, col in (("whole step", "total"), ("NS", "ns"),
                                                   ("comm", "comm"))) + ".")
        lines.append("")
    for label in ("out-of-sample", "in-sample"):
        why = [w for w in (_why(table, label, "whole step", "total"),
                           _why(table, label, "NS", "ns"), _why(table, label, "comm", "comm"))
               if w]
        lines.append(f"Misses, {label}: " + ("; ".join(why) if why else "none") + ".")
    lines += ["", f"Comm constants: each collective's median repeat is {comm_spread:.2f}x its best "
                  f"(median over the out-of-sample calibration's collectives of 1 MiB and more); "
                  f"the row '{BEST}' shows the fit on the best repeats. Against the blocked time "
                  f"(last "
                  f"column) the comm term is further off: that time also holds the wait for a "
                  f"slower or descheduled rank, which the transfer column leaves out (see below)."]
    for P, ratios in carried.items():
        lines += ["", f"Constants carried from P = {args.calibration_world_size} to P = {P}: the "
                      f"P = {P} calibration's own calls of 1 MiB and more take "
                      + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())
                      + f" what the P = {args.calibration_world_size} fit predicts for them "
                        f"(median per kind; the same microbenchmark, no step involved)."]
    lines += ["", f"- **out-of-sample**: constants fitted at P = {args.calibration_world_size} "
                  f"(not validated), NS rate on shapes {', '.join('x'.join(map(str, s)) for s in oos_shapes)}"
                  f" (none of the model's), alpha/beta per collective kind there (median of each "
                  f"collective's repeats); predictions at P = {args.world_sizes} are "
                  f"extrapolations.",
              "- **in-sample**: constants fitted in the same process group as the measurement, "
              "with the model's own shapes (whose measured NS seconds the model uses); "
              "'fitted rate only' drops those per-shape times.",
              f"- measured: median over {args.reruns} process groups x {args.repeats} x "
              f"{args.steps} interleaved timed steps "
              f"per strategy with its order-statistic 95% interval `[low, high]` (ms); a step is "
              f"its slowest rank; NS and comm are the slowest rank's seconds in the strategy's "
              f"`ns` phase; comm is the transfer time of the whole-group collectives "
              f"(`profiling.transfer`: the union of their in-flight intervals, each from the last "
              f"rank's arrival to completion); blocked is the slowest rank's `comm_wait` phase, "
              f"which also holds its wait for slower ranks (peer wait, median in validation.csv). "
              f"Every step is in steps.csv.",
              "- the blocked time holds the wait for a slower rank (uneven NS, and at P = 4 on 2 "
              "cores a rank descheduled while others compute): the model counts that as compute "
              "and prices the transfer only.", ""]
    head = ["P", "strategy", "calibration", "step meas. (ms)", "pred.", "error",
            "NS meas. (ms)", "pred.", "error", "transfer meas. (ms)", "pred.", "error",
            "blocked meas. (ms)", "error"]
    lines += ["## Every point", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table[table["calibration"] != BEST].iterrows():
        lines.append("| " + " | ".join([str(int(r["world_size"])), r["strategy"],
                                         r["calibration"]] + _cell(r, "total") + _cell(r, "ns")
                                        + _cell(r, "comm") + [_cell(r, "wait")[0],
                                                              _cell(r, "wait")[2]]) + " |")
    lines += ["", "## Machine", "", "| job | 1-min load at start / end | other processes "
              "(cores, mean) | calibration (s) |", "|---|---|---|---|"]
    for m in machine:
        foreign = "unknown" if m["foreign"] is None else f"{m['foreign']:.2f}"
        lines.append(f"| {m['job']} | {m['loads'][0]:.2f} / {m['loads'][1]:.2f} | {foreign} | "
                     f"{m['seconds']:.0f} |")
    lines += ["", f"{os.cpu_count()} CPU cores, torch {torch.__version__}, one thread per rank; "
              f"bucketed_async bucket_bytes={args.bucket_bytes}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
