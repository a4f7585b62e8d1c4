"""What the benchmarks share: a shape-only model sharded with FSDP2 and stepped by NorMuon under
each strategy, all in one process group so that strategies are timed side by side."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def sharded_runs(model_name: str, world_size: int, strategies_by_name: dict) -> dict:
    """{name: (model, NorMuon)}: one FSDP2-sharded copy of the model per strategy (per layer, then
    the root, as a training run shards it), float32 Newton-Schulz (CPU benchmarks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_ortho import NorMuon
    from dist_ortho.models import build_model

    mesh = init_device_mesh("cpu", (world_size,))
    runs = {}
    for name, strategy in strategies_by_name.items():
        model = build_model(model_name)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        runs[name] = (model, NorMuon(list(model.named_parameters()), ns_dtype="float32",
                                     strategy=strategy))
    return runs


def timed_call(fn) -> float:
    """Seconds of `fn()` as the slowest rank saw it (the work ends when that rank's does), every
    rank starting together."""
    import time

    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def timed_step(opt) -> float:
    """Seconds of `opt.step()` as the slowest rank saw it."""
    return timed_call(opt.step)
