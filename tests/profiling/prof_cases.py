"""Workers for tests/profiling/test_profiler_counts.py, run on real gloo process groups by
dist_ortho.testing.processes.spawn.

One worker per world size trains a small FSDP2 GPT under every strategy with the profiler on and
returns plain data (this rank's profiler rows, the plan's prediction, a FlopCounterMode count, the
written file's path); the tests derive what the numbers should be and compare.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Small, and with dimensions that do not divide by 2 or 3, so FSDP2 pads dim 0 (vocab 255, d 40
# -> 14 rows at P=3, hidden 160 -> 54): the byte checks then cover the padding rule.
GPT_KW = dict(n_layers=2, d_model=40, n_heads=4, seq_len=16, vocab_size=255)
BATCH_PER_RANK = 2
STEPS = 2
WARMUP = 1


def build_gpt():
    from dist_ortho.models import build_model

    torch.manual_seed(0)
    return build_model("gpt-tiny", **GPT_KW)


def sharded_gpt(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_gpt()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, GPT_KW["vocab_size"], (BATCH_PER_RANK, GPT_KW["seq_len"] + 1),
                           generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train(model, optimizer, prof, steps: int = STEPS, flop_step: int | None = None) -> dict:
    """The lead's loop; optionally counts the optimizer's matmul FLOPs with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    rank = dist.get_rank()
    flop_counted = None
    for step in range(steps):
        x, y = batch(step, rank)
        with prof.step(step, warmup=step < WARMUP):
            with prof.phase("forward_backward"):
                _, loss = model(x, y)
                loss.backward()
            with prof.phase("optimizer"):
                if step == flop_step:
                    with FlopCounterMode(display=False) as counter:
                        optimizer.step()
                    flop_counted = counter.get_total_flops()
                else:
                    optimizer.step()
            optimizer.zero_grad()
    return {"flop_counted": flop_counted}


def _optimizer(model, name: str, options: dict | None = None):
    from dist_ortho import OptimizerConfig, build_optimizers, strategies

    return build_optimizers(model, OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3),
                            strategy=strategies.build(name, **(options or {})))


def profile_worker(rank: int, world_size: int, names: list[str], out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho.profiling import Profiler, ProfilerConfig

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {"strategies": {}}
    for name in names:
        model = sharded_gpt(mesh)
        opt = _optimizer(model, name)
        prof = Profiler(ProfilerConfig(enabled=True, memory=True),
                        run_info={"strategy": name, "world_size": world_size, "model": "gpt-test",
                                  "config_hash": f"h-{name}"}, device=torch.device("cpu"))
        prof.attach(opt)
        extra = train(model, opt, prof, flop_step=STEPS - 1)
        matrix_opt = opt.optimizers[0]
        plan = matrix_opt.plan()
        written = prof.write(f"{out_dir}/{name}-p{world_size}")
        out["strategies"][name] = dict(
            rows=prof.rows(), collectives=prof.collectives(),
            plan_bytes=plan.mine.bytes_by_kind(), plan_flops=[c.ns_flops for c in plan.ranks],
            matrix_shapes=[tuple(m.shape) for m in plan.matrices],
            phases_attached=matrix_opt.timer is prof, written=None if written is None
            else str(written), **extra)
        prof.detach()
    out["implicit"] = implicit_redistribution(mesh)
    if world_size == 2:  # one world size is enough for the on/off comparison
        out["numerics"] = numerics_on_off(mesh, out_dir)
    return out


def numerics_on_off(mesh, out_dir: str) -> dict:
    """The same training with the profiler fully on (memory, comm, a trace) and off: the
    parameters must come out bitwise equal. bucketed_async with small buckets so async
    collectives are in flight across phase boundaries."""
    from dist_ortho.profiling import Profiler, ProfilerConfig

    initial = {n: p.to_local().detach().clone() for n, p in sharded_gpt(mesh).named_parameters()}
    results = {}
    for enabled in (True, False):
        model = sharded_gpt(mesh)
        opt = _optimizer(model, "bucketed_async", {"bucket_bytes": 32768})
        prof = Profiler(ProfilerConfig(enabled=enabled, memory=True, trace_step=1))
        prof.attach(opt)
        train(model, opt, prof, steps=3)
        results[enabled] = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        prof.write(f"{out_dir}/numerics-{enabled}")
        results[f"rows_{enabled}"] = len(prof.rows())
    on, off = results[True], results[False]
    return {"bitwise_equal": all(torch.equal(on[n], off[n]) for n in on),
            "changed": all(not torch.equal(on[n], initial[n]) for n in on if on[n].numel()),
            "rows_on": results["rows_True"], "rows_off": results["rows_False"]}



def implicit_redistribution(mesh) -> list[dict]:
    """A collective DTensor issues inside its own dispatch (Partial -> Replicate when a norm meets
    a sharded tensor, as in gradient clipping) must be counted in the phase that caused it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_ortho.profiling import Profiler

    a = distribute_tensor(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), mesh,
                          [Shard(0)], src_data_rank=None)
    prof = Profiler()
    with prof.step(0):
        with prof.phase("grad_clip"):
            a * (1.0 / (torch.linalg.vector_norm(a) + 1e-6))
    return prof.collectives()
