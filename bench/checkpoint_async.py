"""What a checkpoint save costs the training loop: blocking against asynchronous saves, side by
side in one run, with 95% intervals, and the staging memory an asynchronous save holds.

    python bench/checkpoint_async.py                          # gpt-mini, 2 gloo ranks
    python bench/checkpoint_async.py --model gpt-small --rounds 12 --out /tmp/ck

One FSDP2 model with NorMuon + AdamW (`build_optimizers`) trains on P gloo ranks (CPU, one thread
per rank). Training runs in windows of W steps; a window saves a checkpoint as its first step
ends, in one of three settings, and the settings take turns within every round (the order
rotating from round to round) so that slow drifts of a shared machine hit all of them alike:
  none      no save (the baseline)
  blocking  `checkpoint.save`: DCP's write with checksums, commit, verification, retention
  async     `dist_ortho.checkpointing.async_save.AsyncSaver`: the state is copied into a reused staging buffer,
            then written, checksummed and committed by a background thread while training goes
            on; the window ends once that save is complete (its cost is all inside the window)
A window's time is its slowest rank's. Reported per setting: the mean time per step of a window,
and the paired difference against `none` per round (mean and 95% t-interval over rounds); the
time the save call itself held the loop (median), and the staging bytes per rank. Both save
modes keep 2 checkpoints (keep_last=2), as a run would. Writes checkpoint_async.md and .csv.
On CPU the background thread competes with training for the same cores, so part of an async
save's cost shows up as slower steps rather than as a stall; on a GPU node the write overlaps
with GPU compute instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dist_ortho import OptimizerConfig, build_optimizers
from dist_ortho.checkpointing import checkpoint  # noqa: E402
from dist_ortho.checkpointing.async_save import AsyncSaver  # noqa: E402
from dist_ortho.core.io import atomic_write_text  # noqa: E402
from dist_ortho.models import build_model  # noqa: E402
from dist_ortho.testing.processes import spawn  # noqa: E402

SETTINGS = ("none", "blocking", "async")
# two-sided 95% Student t quantiles by degrees of freedom (no scipy here)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    if df > 30:
        return 1.96
    return _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]  # the next lower: wider


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def worker(rank: int, world: int, model_name: str, strategy: str, rounds: int, window: int,
           batch: int, folder: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh  # FSDP2 only inside the ranks
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = build_model(model_name)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"), strategy=strategy)
    seq, vocab = model.config.seq_len, model.config.vocab_size
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    saver = AsyncSaver(timeout_s=300)
    dirs = {s: os.path.join(folder, s) for s in SETTINGS}

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    for _ in range(2):  # warm up: allocations, the first save's staging buffer and process group
        step()
    checkpoint.save(dirs["blocking"], 0, model, opt, keep_last=2)
    saver.save(checkpoint.snapshot(dirs["async"], 0, model, opt), keep_last=2)
    saver.wait()
    out = {s: [] for s in SETTINGS}
    stall = {s: [] for s in SETTINGS}
    n = 1
    for r in range(rounds):
        for setting in SETTINGS[r % 3:] + SETTINGS[:r % 3]:
            dist.barrier()
            start = time.perf_counter()
            for i in range(window):
                step()
                if i == 0 and setting != "none":
                    held = time.perf_counter()
                    if setting == "blocking":
                        checkpoint.save(dirs["blocking"], n, model, opt, keep_last=2)
                    else:
                        saver.save(checkpoint.snapshot(dirs["async"], n, model, opt),
                                   keep_last=2)
                    stall[setting].append(slowest(time.perf_counter() - held))
                    n += 1
            saver.wait()  # the async save's cost stays inside its window
            out[setting].append(slowest(time.perf_counter() - start) / window)
    staging = saver.staging_bytes
    saver.close()
    return {"per_step": out, "stall": stall, "staging_bytes": staging,
            "state_bytes": sum(f.stat().st_size for f in checkpoint.checkpoint_path(
                dirs["blocking"], checkpoint.complete_steps(dirs["blocking"])[-1]).iterdir())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-mini")
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--window", type=int, default=5, help="steps per window (one save)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "bench"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="ckpt_async_") as tmp:
        results = spawn(worker, args.world_size, args=(args.model, args.strategy, args.rounds,
                                                       args.window, args.batch_size, tmp),
                        timeout_s=300, join_timeout_s=3600)
    r = results[0]  # every rank returns the slowest rank's times
    per_step, stall = r["per_step"], r["stall"]
    base = per_step["none"]
    rows = []
    for s in SETTINGS:
        mean, half = interval(per_step[s])
        dmean, dhalf = interval([a - b for a, b in zip(per_step[s], base)])
        rows.append({"setting": s, "rounds": len(per_step[s]),
                     "step_s_mean": f"{mean:.4f}", "step_s_ci95": f"{half:.4f}",
                     "vs_none_s_mean": f"{dmean:.4f}", "vs_none_s_ci95": f"{dhalf:.4f}",
                     "vs_none_pct": f"{100 * dmean / statistics.fmean(base):.1f}",
                     "save_call_s_median": f"{statistics.median(stall[s]):.4f}" if stall[s]
                     else "",
                     "staging_bytes_per_rank": r["staging_bytes"] if s == "async" else 0})
    amean, ahalf = interval([a - b for a, b in zip(per_step["async"], per_step["blocking"])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "checkpoint_async.csv", table.getvalue())
    mib = 2 ** 20
    lines = [
        "# Checkpoint saves: asynchronous against blocking",
        "",
        f"Written by `bench/checkpoint_async.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPU core(s) shared with other work, gloo, "
        f"{args.world_size} ranks of one thread. {args.model} ({args.strategy}), NorMuon + AdamW, "
        f"batch {args.batch_size} per rank; {args.rounds} rounds, each one window of "
        f"{args.window} steps per setting, taking turns; a save after the first step of a "
        f"window, keep_last 2. A checkpoint is {r['state_bytes'] / mib:.1f} MiB on disk. "
        f"Time per step: the window's time (slowest rank; an async save's completion included) "
        f"/ {args.window}. Intervals: 95% t-intervals over rounds; `vs none`: paired per round.",
        "",
        "| setting | s per step (mean ± 95%) | vs none, s per step | vs none | save call held "
        "the loop (median s) | staging memory per rank |",
        "|---|---|---|---|---|---|"]
    for row in rows:
        staging = (f"{row['staging_bytes_per_rank'] / mib:.1f} MiB" if row["setting"] == "async"
                   else "-")
        held = row["save_call_s_median"] or "-"
        lines.append(f"| {row['setting']} | {row['step_s_mean']} ± {row['step_s_ci95']} "
                     f"| {row['vs_none_s_mean']} ± {row['vs_none_s_ci95']} "
                     f"| {row['vs_none_pct']}% | {held} | {staging} |")
    lines += ["", f"async - blocking, per step: {amean:.4f} ± {ahalf:.4f} s (95%, paired per "
                  f"round), i.e. per save {amean * args.window:.3f} ± {ahalf * args.window:.3f} s."]
    atomic_write_text(out / "checkpoint_async.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
