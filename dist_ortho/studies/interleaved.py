"""One world size of a strategy study: every strategy side by side, interleaved, in one process
group.

    torchrun --nproc_per_node=P -m dist_ortho.studies.interleaved --config <job config>.yaml

`dist-ortho study` and `dist-ortho sweep` (`dist_ortho.studies.sweep`) make one such job per world
size (and option set); its settings (the job's `job.json`) list the points, each a complete run
config (model, strategy, output folder `<study>/runs/<point>/`), and the schedule. On every rank:

1. Calibration (`measure_machine`), so that each point's distance to its bound is measured on the
   machine as it is during this job: for each model, Newton-Schulz on each distinct matrix shape,
   on rank 0 alone and on every rank at once (ranks that share CPU cores slow each other down),
   and, at P > 1, all-to-all and all-gather at the size of the owner-based byte bound; every
   timing best of `calibration_repeats` (the machine's best, as a bound needs). The bound of one
   optimizer step (`step_bound`) is
       max(sum_i t_i(all ranks busy) / P, max_i t_i(alone)) + bound bytes / bandwidth,
   i.e. max(sum of NS FLOPs / P, largest single matrix) / calibrated NS rate + the owner-based
   byte bound 2(P-1)/P^2 N b / measured bandwidth (`dist_ortho.core.plan.owner_bound_bytes`).
2. Per model, every strategy is built (`run.build_run`: the same model weights and data from the
   same seed, one copy per strategy) and stepped:
   - step 0 with the profiler's per-op instruments (bytes per collective, memory), not timed;
   - `warmup_steps` clean warm-up steps;
   - `repeats` x `steps` timed steps, interleaved: within a repeat, one step of each strategy in
     turn, `steps` times (a round is one step of every strategy, so strategies compared in a
     round saw the same machine); the strategies' order rotates by one each repeat, so none is
     always first after another. A barrier precedes every step, outside its timing, so each
     rank's step time starts together and the step's time is its slowest rank's.
   Each point's run directory gets what `dist-ortho run` leaves (metrics.csv with every step,
   run.json, config.yaml, environment.json, DONE).
3. The job's own folder (`<study>/groups/<job>/`) gets `schedule.csv` (one row per step taken:
   point, step, phase of the schedule, repeat, round index, position in the round, start time),
   `machine.json` (load averages through the job, the CPU time other processes used meanwhile,
   thread settings, the calibration and each model's bound) and DONE, last.

Timings are compared only within a job (same process group, same model, interleaved): see
`dist_ortho.reporting.comparison`.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from io import StringIO
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from dist_ortho.core.io import atomic_write_text
from dist_ortho.core.plan import owner_bound_bytes
from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.profiling.calibration import measure_collectives, measure_ns
from dist_ortho.profiling.env import busy_cpu_s
from dist_ortho.studies import run as run_mod
from dist_ortho.studies.config import config_from_dict, config_hash, load_config
from dist_ortho.studies.faults import from_sources
from dist_ortho.studies.jobs import JOB_FILE, run_as_rank, write_done

__all__ = ["SCHEDULE_FILE", "MACHINE_FILE", "SCHEDULE_COLUMNS", "step_bound", "matrix_facts",
           "measure_machine", "foreign_cores", "run_group", "main"]

SCHEDULE_FILE = "schedule.csv"
MACHINE_FILE = "machine.json"
SCHEDULE_COLUMNS = ("point", "model", "strategy", "step", "kind", "repeat", "index", "position",
                    "t_start_s")
# the profiler installs its per-op instruments on steps that are multiples of this: step 0 only
INSTRUMENT_ONCE = 1_000_000_000


# --- the bound --------------------------------------------------------------------------------

def step_bound(ns_seconds_alone: Sequence[float], ns_seconds_busy: Sequence[float],
               world_size: int, bound_bytes: float, bandwidth: float | None) -> dict:
    """The lower bound of one optimizer step on this machine (module docstring), from each
    matrix's NS seconds alone and with every rank busy, and the byte bound over the bandwidth
    (bytes/s; None or 0 at P = 1, where nothing moves)."""
    if world_size < 1 or not ns_seconds_alone or len(ns_seconds_alone) != len(ns_seconds_busy):
        raise ValueError("step_bound needs world_size >= 1 and one alone and one busy time per "
                         "matrix")
    spread = sum(ns_seconds_busy) / world_size
    largest = max(ns_seconds_alone)
    comm = bound_bytes / bandwidth if bandwidth and bound_bytes > 0 else 0.0
    return {"ns_spread_s": spread, "ns_largest_s": largest, "ns_bound_s": max(spread, largest),
            "comm_bound_s": comm, "bound_s": max(spread, largest) + comm}


def matrix_facts(state) -> dict:
    """What the bound needs from a built run: every orthogonalized matrix's shape and NS FLOPs,
    and the owner-based byte bound per rank (the plan's own numbers)."""
    shapes, flops, numel = [], [], 0
    b_in = b_out = None
    for opt in state.optimizer.optimizers:
        if not isinstance(opt, OrthogonalizedOptimizer):
            continue
        plan = opt.plan()
        for m in plan.matrices:
            shapes.append(list(m.shape))
            flops.append(int(m.flops))
            if m.sharded:
                numel += m.numel
            b_in = b_in or torch.empty((), dtype=m.dtype).element_size()
            b_out = b_out or m.out_itemsize
    bound = owner_bound_bytes(state.world_size, numel, b_in or 4, b_out) if numel else 0.0
    return {"shapes": shapes, "ns_flops": flops, "matrix_numel": numel,
            "bound_bytes_per_rank": bound}


def measure_machine(facts: dict, world_size: int, ns_dtype: str, repeats: int) -> dict:
    """Collective (every rank): NS seconds per distinct shape (rank 0 alone; every rank at once,
    slowest), and at P > 1 the best bandwidth of all-to-all and all-gather at about the bound's
    size; then the bound. Best of `repeats` each."""
    distinct = sorted({tuple(s) for s in facts["shapes"]})
    alone, busy = measure_ns(None, shapes=distinct, ns_dtype=ns_dtype, repeats=repeats)
    t_alone = {s.shape: s.seconds for s in alone}
    t_busy = {s.shape: s.seconds for s in busy} or t_alone
    if world_size > 1:  # rank 0 measured alone; every rank needs the same numbers
        payload = [t_alone]
        dist.broadcast_object_list(payload, group_src=0)
        t_alone = payload[0]
    per_alone = [t_alone[tuple(s)] for s in facts["shapes"]]
    per_busy = [t_busy[tuple(s)] for s in facts["shapes"]]
    bandwidth, comm = None, []
    if world_size > 1 and facts["bound_bytes_per_rank"] > 0:
        piece = max(4096, int(facts["bound_bytes_per_rank"] / (world_size - 1)))
        comm = measure_collectives(None, sizes_bytes=(piece,), repeats=repeats,
                                   kinds=("all_to_all", "all_gather"))
        bandwidth = max(s.nbytes / s.seconds for s in comm if s.seconds > 0)
    flops = sum(facts["ns_flops"])
    out = {"ns_dtype": ns_dtype, "repeats": repeats,
           "ns_seconds_alone": {"x".join(map(str, k)): v for k, v in t_alone.items()},
           "ns_seconds_busy": {"x".join(map(str, k)): v for k, v in t_busy.items()},
           "ns_rate_alone_flops": flops / sum(per_alone) if sum(per_alone) else None,
           "ns_rate_busy_flops": flops / sum(per_busy) if sum(per_busy) else None,
           "bandwidth_bytes_per_s": bandwidth,
           "comm_samples": [{"kind": s.kind, "bytes": s.nbytes, "seconds": s.seconds}
                            for s in comm]}
    out.update(step_bound(per_alone, per_busy, world_size, facts["bound_bytes_per_rank"],
                          bandwidth))
    return out


# --- the machine's state ----------------------------------------------------------------------


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def foreign_cores(busy0: float | None, busy1: float | None, own_s: float,
                  wall_s: float) -> float | None:
    """Cores other processes kept busy on average: machine busy time minus our ranks' CPU time,
    over the wall time (None where /proc/stat is not readable)."""
    if busy0 is None or busy1 is None or wall_s <= 0:
        return None
    return max(0.0, (busy1 - busy0) - own_s) / wall_s


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _threads() -> dict:
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


# --- the schedule -----------------------------------------------------------------------------

def _step(state, kind: str, rows: list, started: float, repeat=None, index=None,
          position=None) -> None:
    dist.barrier()  # every rank starts the step together; not part of its time
    rows.append({"point": state.config.output.name, "model": state.config.model.preset,
                 "strategy": state.config.strategy.name, "step": state.step, "kind": kind,
                 "repeat": repeat, "index": index, "position": position,
                 "t_start_s": round(time.perf_counter() - started, 4)})
    run_mod.train_step(state, warmup=(kind == "warmup"))


def run_group(configs: list, schedule: dict, started: float, rows: list, faults=None,
              calibrate=None) -> tuple[dict, dict | None]:
    """Build every point of one model, run `calibrate(facts, ns_dtype)` (if given) on the
    model's matrices, step the points as the schedule says (module docstring) and write each
    point's run outputs; returns the model's matrix facts and the calibration."""
    states = [run_mod.build_run(c, faults) for c in configs]
    try:
        facts = matrix_facts(states[0])  # shapes and bytes do not depend on the strategy
        calibration = (calibrate(facts, states[0].config.optimizer.ns_dtype)
                       if calibrate is not None else None)
        for st in states:
            _step(st, "instrumented", rows, started)
        for _ in range(schedule["warmup_steps"]):
            for st in states:
                _step(st, "warmup", rows, started)
        for r in range(schedule["repeats"]):
            order = states[r % len(states):] + states[:r % len(states)]
            for i in range(schedule["steps"]):
                for pos, st in enumerate(order):
                    _step(st, "timed", rows, started, r, i, pos)
        for st in states:
            run_mod.finish(st)
    finally:
        for st in states:
            run_mod.close(st)
        gc.collect()
    return facts, calibration


def _schedule_csv(rows: list[dict]) -> str:
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SCHEDULE_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _point_config(point: dict, total_steps: int, warmup_steps: int):
    data = json.loads(json.dumps(point["config"]))
    data.setdefault("train", {}).update(steps=total_steps, warmup_steps=warmup_steps)
    data.setdefault("profiling", {}).update(instrument_every=INSTRUMENT_ONCE)
    return config_from_dict(data)


def _work(config_path: Path) -> int:
    config = load_config(config_path)
    run_dir = Path(config.output.dir) / str(config.output.name)
    settings = json.loads((run_dir / JOB_FILE).read_text())["settings"]
    schedule = settings["schedule"]
    total = 1 + schedule["warmup_steps"] + schedule["repeats"] * schedule["steps"]
    faults = from_sources()
    device, owns = run_mod.init_distributed(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    started, busy0, own0 = time.perf_counter(), busy_cpu_s(), _own_cpu_s()
    machine = {"world_size": world, "threads": _threads(), "load_start": _load(),
               "models": {}, "load_samples": []}
    rows: list[dict] = []
    models = list(dict.fromkeys(p["model_label"] for p in settings["points"]))
    try:
        for label in models:
            points = [p for p in settings["points"] if p["model_label"] == label]
            configs = [_point_config(p, total, 1 + schedule["warmup_steps"]) for p in points]

            def calibrate(facts, ns_dtype):
                t0 = time.perf_counter()
                out = measure_machine(facts, world, ns_dtype, schedule["calibration_repeats"])
                out["seconds"] = time.perf_counter() - t0
                return out

            machine["load_samples"].append(_load())
            facts, calibration = run_group(configs, schedule, started, rows, faults, calibrate)
            machine["load_samples"].append(_load())
            machine["models"][label] = {"preset": points[0]["config"]["model"]["preset"],
                                        "matrices": len(facts["shapes"]),
                                        "ns_flops_total": sum(facts["ns_flops"]),
                                        "ns_flops_largest": max(facts["ns_flops"]),
                                        "matrix_numel": facts["matrix_numel"],
                                        "bound_bytes_per_rank": facts["bound_bytes_per_rank"],
                                        "calibration": calibration}
        wall = time.perf_counter() - started
        own = torch.tensor([_own_cpu_s() - own0], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(own)
        machine.update(wall_s=wall, load_end=_load(), own_cpu_s=own.item(),
                       foreign_cores=foreign_cores(busy0, busy_cpu_s(), own.item(), wall))
        if rank == 0:
            atomic_write_text(run_dir / SCHEDULE_FILE, _schedule_csv(rows))
            atomic_write_text(run_dir / MACHINE_FILE, json.dumps(machine, indent=2) + "\n")
            write_done(run_dir, {"config_hash": config_hash(config), "world_size": world,
                                 "points": [p["name"] for p in settings["points"]],
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if world > 1:
            dist.barrier()
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="the job's config (written by the sweep; its settings are in the "
                             "job's job.json)")


def main(args: argparse.Namespace) -> int:
    return run_as_rank("study", lambda: _work(args.config))


def _parse_and_run() -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_ortho.studies.interleaved",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(record(_parse_and_run)())
