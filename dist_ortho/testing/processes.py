"""Run a function on P real gloo processes and collect what each rank returns.

Used by the test suite (and handy for users' own checks): one spawn per world size runs many
cases, a collective timeout makes a hang fail fast instead of stalling CI, and exceptions come back
with their rank and traceback.

    results = spawn(my_module.worker, world_size=4, args=(cases,))  # worker(rank, world_size, *args)

`worker` must be importable by name from a fresh interpreter (defined at module level in a module
on sys.path), as with any `spawn` start method.

Ranks start from a fork server (where the platform has one) that imported torch, DTensor, FSDP2 and
dist_ortho once: a fresh interpreter spends ~5 s of CPU importing them, which made the imports
about half of the distributed tests' time. Like any fork server it was started with the
environment of the first call, so set environment variables (MKL_ENABLE_INSTRUCTIONS,
OMP_NUM_THREADS, ...) before the first spawn, as one does for a whole test run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_ortho.core.io import atomic_write_bytes

__all__ = ["spawn", "DistributedFailure"]

# imported once by the fork server, so that each rank starts with them loaded
_PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.fsdp", "dist_ortho"]
_CONTEXT = None


class DistributedFailure(RuntimeError):
    pass


def _entry(fn, rank: int, world_size: int, store_path: str, out_dir: str, timeout_s: float,
           args: tuple) -> None:
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            payload = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # report every failure to the parent, whatever it was
        payload = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    atomic_write_bytes(result_path, pickle.dumps(payload))


def _context():
    """The fork server's context, made once (the plain spawn context where there is none)."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(_PRELOAD)
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def spawn(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0,
          join_timeout_s: float = 600.0) -> list:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return each rank's result."""
    ctx = _context()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store_path, tmp, timeout_s,
                                                  args), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              f"{', killed after join timeout' if r in hung else ''})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(value)
            results.append(value)
        if errors:
            raise DistributedFailure("\n".join(errors))
        return results
