"""Asynchronous checkpoint saves: a staged copy written by a background thread.

    saver = AsyncSaver(timeout_s=300)
    saver.save(checkpoint.snapshot(dir, step, model, opt, loader), keep_last=3)  # returns at once
    ...                      # training goes on; saver.check() raises if the save failed
    saver.wait()             # the save's folder, or its error
    saver.close()

What blocks training: `save` first waits for the previous save (one in flight at most), then
copies this rank's shards of the model and optimizer state into a CPU staging buffer (pinned
memory with CUDA; allocated at the first save and reused, so it costs one copy of the rank's state
for the whole run: `staging_bytes`), and returns. Everything else runs on one background thread:
DCP's write with the checksums (`dist_ortho.checkpointing.manifest`), the commit, the verification
and the retention of `dist_ortho.checkpointing.checkpoint.write_snapshot`, so the integrity and
atomicity guarantees are those of a blocking save: a folder named `step_*` appears only once every
rank has written and checksummed its files, and a process killed mid-save leaves only a `.partial`
folder.

The background thread's collectives (DCP's planning, the checksum gather, the commit agreement,
the verification) run on a gloo process group of their own, created at the first save (every rank
saves at the same steps), so they never interleave with the training's collectives on the
default group (NCCL or gloo). Its timeout is the run's collective timeout: a rank that dies or
hangs during a save makes the other ranks' saves fail within it, and `check()` (called by the run
loop after every step) raises that error on the training thread.

torch's own `dcp.async_save` does the staging and the background write too, but the commit must
follow the write on every rank; doing both on one thread keeps one code path for blocking and
asynchronous saves.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.tensor import DTensor

from dist_ortho.checkpointing.checkpoint import Snapshot, write_snapshot
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer

__all__ = ["AsyncSaver", "AsyncSaveError"]


class AsyncSaveError(RuntimeError):
    """A background save failed; the message names the step and the first failing rank."""


def _tensor_bytes(obj) -> int:
    if isinstance(obj, DTensor):
        return _tensor_bytes(obj.to_local())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class AsyncSaver:
    """One background checkpoint writer per process (see the module docstring)."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self.group = None
        self._group_made = False
        self._future: Future | None = None
        self._step: int | None = None
        self._staged: dict | None = None
        self.staging_bytes = 0
        self.stage_seconds: list[float] = []

    def _ensure_group(self) -> None:
        if not self._group_made:
            self._group_made = True
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.group = dist.new_group(backend="gloo",
                                            timeout=timedelta(seconds=self.timeout_s))

    def _stage(self, state: dict) -> dict:
        """A CPU copy of `state`'s tensors into the reused staging buffer."""
        if self._staged is None:
            self._staged = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
            self.staging_bytes = _tensor_bytes(self._staged)
        staged = _copy_state_dict(state, self._staged)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged

    def save(self, snap: Snapshot, *, timer: PhaseTimer = NULL_TIMER, keep_last: int = 0,
             keep_every: int = 0) -> Path:
        """Wait for the previous save, stage this one and start writing it; returns its folder
        (complete once `wait` returns). A collective in effect: call it on every rank."""
        self.wait()
        self._ensure_group()
        start = time.perf_counter()
        with timer.phase("stage"):
            snap.state = self._stage(snap.state)
        self.stage_seconds.append(time.perf_counter() - start)
        self._step = snap.step
        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(write_snapshot(snap, group=self.group, timer=timer,
                                                 keep_last=keep_last, keep_every=keep_every))
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                future.set_exception(exc)

        # a daemon thread: a process that fails while a save hangs must still be able to exit
        threading.Thread(target=work, name=f"dist-ortho-ckpt-{snap.step}", daemon=True).start()
        self._future = future
        return snap.path

    @property
    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    def check(self) -> None:
        """Raise AsyncSaveError if the save in flight has failed (do nothing while it runs)."""
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> Path | None:
        """Wait for the save in flight; its folder (None when there was none), or its error."""
        future, self._future = self._future, None
        if future is None:
            return None
        try:
            return future.result()
        except Exception as exc:
            raise AsyncSaveError(f"asynchronous save of the checkpoint of step {self._step} "
                                 f"failed: {exc}") from exc

    def close(self) -> None:
        """Wait for the save in flight, then free the staging buffer and the process group."""
        try:
            self.wait()
        finally:
            self._staged = None
            if self.group is not None and dist.is_initialized():
                dist.destroy_process_group(self.group)
            self.group = None
