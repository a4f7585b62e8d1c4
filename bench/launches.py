"""ATen ops per step and step time of every strategy, this checkout against an older one, in one run.

    git archive BASE | tar -x -C /tmp/base
    ln -s ../strategies /tmp/base/dist_ortho/strategies; ln -s ../profiling /tmp/base/dist_ortho/profiling
    flock -x /tmp/dist_ortho_cpu.lock .venv/bin/python bench/launches.py --before /tmp/base \
        --json /tmp/launches.json > results/bench/launches.md

Two models: "small", the op-count test's Llama-like stack (112 matrices of 3 shapes at dims 64/128:
a step is nearly all dispatch overhead, what a GPU step of small matrices looks like), and "real",
the `transformer-small` preset, whose float32 Newton-Schulz dominates a CPU step (it must not get
slower). NorMuon, float32 NS, FSDP2 on P gloo ranks (one thread each).

One version of dist_ortho per process: each measurement is a child process that imports either
this checkout or `--before` (its directory first on sys.path and as the working directory, where
the ranks' fork server looks), spawns P ranks, and per strategy counts the ATen ops of one step
(`dist_ortho.testing.op_count`, loaded from this checkout by path so both versions are counted
alike) and times `--steps` steps (the slowest rank's time). Rounds alternate which version goes
first; times pair by (round, step), and after/before is the median of the paired ratios with its
95% order-statistic interval (profiling/stats.py: "faster"/"slower" only where the interval
clears the margin, else "tie").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_COUNT = os.path.join(ROOT, "dist_ortho", "testing", "op_count.py")
MODELS = {"small": None, "real": "transformer-small"}


def _op_count():
    """This checkout's op counter, whichever dist_ortho the process imports."""
    spec = importlib.util.spec_from_file_location("launch_op_count", OP_COUNT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(rank: int, world_size: int, preset: str | None, steps: int, names: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    from dist_ortho import NorMuon, strategies
    from dist_ortho.models.shapes import SHAPE_PRESETS, synthetic_grads

    op_count = _op_count()
    out = {}
    for name in names:
        model = op_count.llama_stack(world_size, SHAPE_PRESETS[preset] if preset else None)
        opt = NorMuon(list(model.named_parameters()), ns_dtype="float32",
                      strategy=strategies.build(name))
        counter = op_count.count_step(model, opt)  # also the warm-up
        times = []
        for step in range(steps):
            synthetic_grads(model, 2 + step, 0)
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends with its slowest rank
            times.append(elapsed.item())
        out[name] = {"ops_per_matrix": counter.total / len(list(model.parameters())),
                     "times": times}
    return out


def child(args) -> None:
    from dist_ortho import strategies
    from dist_ortho.testing import spawn

    names = args.strategies.split(",") if args.strategies else strategies.available()
    results = spawn(worker, args.world_size, (MODELS[args.model], args.steps, names))
    print(json.dumps(results[0]))


def measure(code: str, model: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=code)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model,
           "--world-size", str(args.world_size), "--steps", str(args.steps)]
    if args.strategies:
        cmd += ["--strategies", args.strategies]
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measurement in {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(data: dict) -> str:
    sys.path.insert(0, ROOT)
    from dist_ortho.profiling.stats import compare, median_interval

    lines = [f"P = {data['world_size']} gloo ranks, {data['rounds']} rounds x {data['steps']} "
             f"steps per version; load average {data['load_before']} before, "
             f"{data['load_after']} after; before = {data['before']}, after = "
             f"{data.get('after', ROOT)}", "",
             "| model | strategy | ATen ops / matrix before | after | step ms before | after "
             "| after / before | verdict |", "|---|---|---|---|---|---|---|---|"]
    for model, per_version in data["runs"].items():
        for name in per_version["after"][0]:
            times, ops = {}, {}
            for version in ("before", "after"):
                rounds = per_version[version]
                times[version] = {(r, j): t for r, res in enumerate(rounds)
                                  for j, t in enumerate(res[name]["times"])}
                ops[version] = rounds[0][name]["ops_per_matrix"]
            c = compare("after", "before", times["after"], times["before"])
            ms = {v: median_interval(times[v].values()).format(".3g", 1e3) for v in times}
            lines.append(f"| {model} | {name} | {ops['before']:.1f} | {ops['after']:.1f} | "
                         f"{ms['before']} | {ms['after']} | {c.ratio.format('.2f')} | "
                         f"{c.verdict if c.verdict == 'tie' else c.claim[0] + ' faster'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="an exported older checkout (see the module docstring)")
    parser.add_argument("--after", default=ROOT, help="the newer one (default: this checkout)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--strategies", default="")
    parser.add_argument("--json")
    parser.add_argument("--table", help="print the table of an earlier --json and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.table:
        print(table(json.load(open(args.table))))
        return 0
    if not args.before:
        parser.error("--before DIR is required (an exported older checkout)")
    versions = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    data = {"world_size": args.world_size, "rounds": args.rounds, "steps": args.steps,
            "before": versions["before"], "after": versions["after"],
            "load_before": os.getloadavg()[0], "runs": {}}
    for model in args.models.split(","):
        runs = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for version in order:
                runs[version].append(measure(versions[version], model, args))
        data["runs"][model] = runs
    data["load_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
