"""How much the profiler slows a training step: on and off, side by side, in one run.

    python bench/profiler_overhead.py                       # gpt-tiny, 2 gloo ranks, balanced
    python bench/profiler_overhead.py --model gpt-mini --world-size 2 --steps 30

One FSDP2 model and optimizer are trained on P gloo ranks (CPU; one thread per rank). Steps cycle
through three settings so that slow drifts of the machine hit all of them alike:
  off      no profiler in the loop (the optimizer's phase hook unset)
  comm     Profiler(memory=False): clocks, FLOPs, plan, and the collective counter (a dispatch mode)
  full     Profiler(memory=True): the above plus memory (on CPU the live-tensor tracker)
A step's time is its slowest rank's. Printed: median step time of each setting and its ratio to
`off`. The ratio is the price of instrumenting a step; `ProfilerConfig.instrument_every` exists so
most steps of a long run can skip it. Only ratios between settings of the same run mean anything
on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

SETTINGS = ("off", "comm", "full")


def worker(rank: int, world_size: int, model_name: str, strategy: str, steps: int,
           warmup: int, batch_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_ortho import OptimizerConfig, build_optimizers, strategies
    from dist_ortho.models import build_model
    from dist_ortho.profiling import Profiler, ProfilerConfig

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    model = build_model(model_name)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"),
                           strategy=strategies.build(strategy))
    matrix_opt = opt.optimizers[0]
    profs = {"comm": Profiler(ProfilerConfig(memory=False)),
             "full": Profiler(ProfilerConfig(memory=True))}
    for prof in profs.values():
        prof.attach(opt)
    seq, vocab = model.config.seq_len, model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (batch_size, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = {s: [] for s in SETTINGS}
    for step in range(warmup + steps * len(SETTINGS)):
        setting = SETTINGS[step % len(SETTINGS)]
        prof = profs.get(setting)
        matrix_opt.set_timer(prof)  # None when off: the null timer costs nothing
        dist.barrier()
        start = time.perf_counter()
        if prof is None:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            with prof.step(step, warmup=step < warmup):
                with prof.phase("forward_backward"):
                    _, loss = model(x, y)
                    loss.backward()
                with prof.phase("optimizer"):
                    opt.step()
                opt.zero_grad()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank does
        if step >= warmup:
            times[setting].append(float(elapsed))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/profiler_overhead.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("world size, steps and batch size must be >= 1, warmup >= 0")
    from dist_ortho.testing.processes import spawn

    times = spawn(worker, args.world_size, args=(args.model, args.strategy, args.steps,
                                                 args.warmup, args.batch_size))[0]
    base = statistics.median(times["off"])
    print(f"model {args.model}, strategy {args.strategy}, {args.world_size} gloo rank(s), "
          f"{args.steps} steps per setting, torch {torch.__version__}")
    print(f"{'setting':8s} {'median step s':>14s} {'ratio to off':>13s}")
    for setting in SETTINGS:
        med = statistics.median(times[setting])
        print(f"{setting:8s} {med:14.4f} {med / base:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
