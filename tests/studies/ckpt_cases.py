"""Workers for tests/studies/test_checkpoint_resume.py, run on real gloo ranks by
dist_ortho.testing.processes.spawn.

`train_save_worker` (P=2) trains gpt-tiny under FSDP2 with NorMuon + AdamW for every strategy:
K steps, save, N more steps (the uninterrupted run), then loads step K into fresh objects in the
same processes, runs N steps and compares. It leaves files for the later spawns: the full (gathered)
model and optimizer state at step K, and each rank's uninterrupted final shards and losses.
`resume_worker` loads those checkpoints in freshly spawned processes at any world size, checks the
resharded state against the gathered one bitwise, continues N steps, then saves at its own world
size and loads that back. Workers return plain data; the tests assert on it.
"""

from __future__ import annotations

import contextlib
import errno
import os

import torch
import torch.distributed as dist

from dist_ortho import OptimizerConfig, build_optimizers
from dist_ortho.checkpointing import checkpoint
from dist_ortho.checkpointing.manifest import _HashingStream
from dist_ortho.models import build_model
from dist_ortho.studies.data import CorpusConfig, build_loader

K, N = 2, 2  # save after K steps, continue N more
GLOBAL_BATCH, SEQ = 6, 32  # 6 rows split 3+3 at P=2, 2+2+2 at P=3, 6 in one process
CORPUS = CorpusConfig(max_bytes=300_000)
CONFIG = OptimizerConfig(ns_dtype="float32")


def make_loader(rank: int, world: int):
    return build_loader("stdlib", "train", GLOBAL_BATCH // world, SEQ, seed=3, rank=rank,
                        world_size=world, corpus=CORPUS)


def make_run(strategy: str, seed: int, mesh, rank: int, world: int):
    """gpt-tiny (init from `seed`), fully_shard per block + root when `mesh` is given, the
    NorMuon + AdamW pair from build_optimizers, and a fresh loader at step 0."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = build_model("gpt-tiny", seq_len=SEQ)
    if mesh is not None:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, build_optimizers(model, CONFIG, strategy=strategy), make_loader(rank, world)


def train(model, opt, loader, steps: int, world: int) -> list[float]:
    """`steps` optimizer steps; the global mean loss of each (ranks hold equal-size batches)."""
    losses = []
    for _ in range(steps):
        x, y = next(loader)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def named_state(model, opt, convert) -> dict[str, torch.Tensor]:
    """Parameters and every tensor of optimizer state, keyed `param/<name>` and
    `opt<i>/<name>/<key>`, each passed through `convert` (local shard or gathered tensor)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"param/{n}": convert(p) for n, p in model.named_parameters()}
    opts = getattr(opt, "optimizers", [opt])
    for i, o in enumerate(opts):
        for group in o.param_groups:
            for p in group["params"]:
                for key, value in o.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        out[f"opt{i}/{names[id(p)]}/{key}"] = convert(value)
    return out


def mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Keys that are missing on either side or whose tensors differ in dtype, shape or any bit."""
    bad = sorted(set(got) ^ set(want))
    bad += [k for k in sorted(set(got) & set(want))
            if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    return bad


def train_save_worker(rank: int, world: int, strategies: list[str], root: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for i, s in enumerate(strategies):
        ckpt = os.path.join(root, s)
        model, opt, loader = make_run(s, 0, mesh, rank, world)
        if i == 0:
            checkpoint.save(os.path.join(root, "before_first_step"), 0, model, opt, loader)
        before = train(model, opt, loader, K, world)
        torch.manual_seed(1000 + rank)  # a rank-specific RNG state that a resume must bring back
        checkpoint.save(ckpt, K, model, opt, loader, extra={"strategy": s})
        rng_next = torch.rand(4)
        local_k = named_state(model, opt, _local)
        full_k = named_state(model, opt, _full)
        if rank == 0:
            torch.save(full_k, os.path.join(root, f"{s}.full_k.pt"))
        cont = train(model, opt, loader, N, world)
        final = named_state(model, opt, _local)
        torch.save({"state": final, "losses": cont},
                   os.path.join(root, f"{s}.final.p{world}.r{rank}.pt"))
        checkpoint.save(ckpt, K + N, model, opt, loader)  # `latest` now names K + N

        # resume step K into fresh objects (different init) in the same processes
        model2, opt2, loader2 = make_run(s, 1, mesh, rank, world)
        fresh_differs = bool(mismatches(named_state(model2, opt2, _local), local_k))
        rng_fresh = torch.rand(4)
        step = checkpoint.load(ckpt, model2, opt2, loader2, step=K)
        rng_loaded = torch.rand(4)
        res = dict(
            step=step, loader_step=loader2.step, latest=checkpoint.latest_step(ckpt),
            info=checkpoint.checkpoint_info(ckpt, K),
            fresh_differs=fresh_differs,
            rng_restored=torch.equal(rng_loaded, rng_next),
            rng_fresh_differs=not torch.equal(rng_fresh, rng_next),
            state_mismatch_at_k=mismatches(named_state(model2, opt2, _local), local_k),
            v_keys=sorted(k for k in local_k if k.endswith("/v")),
            losses_before=before, losses_cont=cont)
        res["losses_resumed"] = train(model2, opt2, loader2, N, world)
        res["final_mismatch"] = mismatches(named_state(model2, opt2, _local), final)

        if i == 0:
            # saving must not perturb training: a run that never saved ends identically
            model4, opt4, loader4 = make_run(s, 0, mesh, rank, world)
            train(model4, opt4, loader4, K + N, world)
            res["unsaved_final_mismatch"] = mismatches(named_state(model4, opt4, _local), final)
            # a checkpoint written before the first step resumes exactly too
            model3, opt3, loader3 = make_run(s, 2, mesh, rank, world)
            res["step0_loaded"] = checkpoint.load(os.path.join(root, "before_first_step"),
                                                  model3, opt3, loader3)
            res["step0_losses"] = train(model3, opt3, loader3, K + N, world)
            res["step0_final_mismatch"] = mismatches(named_state(model3, opt3, _local), final)
        out[s] = res
    return out


def resume_worker(rank: int, world: int, strategies: list[str], root: str,
                  saved_world: int = 2) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for s in strategies:
        model, opt, loader = make_run(s, 1, mesh, rank, world)
        step = checkpoint.load(os.path.join(root, s), model, opt, loader, step=K)
        res = dict(step=step, loader_step=loader.step,
                   local_rows={k: v.shape[0] for k, v in named_state(model, opt, _local).items()
                               if v.ndim},
                   full_mismatch=mismatches(named_state(model, opt, _full),
                                            torch.load(os.path.join(root, f"{s}.full_k.pt"))))
        res["losses"] = train(model, opt, loader, N, world)
        if world == saved_world:
            ref = torch.load(os.path.join(root, f"{s}.final.p{world}.r{rank}.pt"))
            res["final_mismatch"] = mismatches(named_state(model, opt, _local), ref["state"])

        # save at this world size (uneven shards at P=3) and load it back into fresh objects
        here = os.path.join(root, f"{s}.p{world}")
        checkpoint.save(here, K + N, model, opt, loader)
        model2, opt2, loader2 = make_run(s, 2, mesh, rank, world)
        checkpoint.load(here, model2, opt2, loader2)
        res["reload_mismatch"] = mismatches(named_state(model2, opt2, _local),
                                            named_state(model, opt, _local))
        res["reload_loader_step"] = loader2.step
        out[s] = res
    return out


class DiskFull:
    """Makes this process's checkpoint writer fail with ENOSPC once `after` bytes of a file went
    out, as a full disk does (the write that crosses it is the one that fails)."""

    def __init__(self, after: int = 4096) -> None:
        self.after = after

    def __enter__(self):
        self._write = write = _HashingStream.write
        after = self.after

        def full(stream, data) -> int:
            if stream.raw.tell() + len(memoryview(data).cast("B")) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(stream, data)

        _HashingStream.write = full
        return self

    def __exit__(self, *exc) -> None:
        _HashingStream.write = self._write


def disk_full_worker(rank: int, world: int, root: str, full_rank: int) -> dict:
    """Save step 1; rank `full_rank` runs out of disk in the save of step 2; then what is on disk,
    what loads, and a save of step 2 once there is room again."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, opt, loader = make_run("balanced", 0, mesh, rank, world)
    train(model, opt, loader, 1, world)
    checkpoint.save(root, 1, model, opt, loader)
    at_1 = named_state(model, opt, _local)
    train(model, opt, loader, 1, world)
    try:
        with DiskFull() if rank == full_rank else contextlib.nullcontext():
            checkpoint.save(root, 2, model, opt, loader)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    res = dict(error=error, steps=checkpoint.complete_steps(root),
               latest=checkpoint.latest_step(root),
               verify_1=checkpoint.verify(checkpoint.checkpoint_path(root, 1)),
               names=sorted(os.listdir(root)))
    model2, opt2, loader2 = make_run("balanced", 1, mesh, rank, world)
    res["loaded"] = checkpoint.load(root, model2, opt2, loader2)
    res["load_mismatch"] = mismatches(named_state(model2, opt2, _local), at_1)
    checkpoint.save(root, 2, model, opt, loader)  # room again: it commits and clears the leftover
    res["after_retry"] = sorted(os.listdir(root))
    return res
