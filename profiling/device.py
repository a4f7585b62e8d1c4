"""Everything device-specific the profiler does, behind one small interface.

The profiler needs four things from a device: wait for queued work (`synchronize`), take a
timestamp that is correct relative to the work queued so far (`mark` / `elapsed_s`), and measure
memory (`memory_meter`). They differ by device:

- CPU: work runs when it is called, so `synchronize` does nothing and a timestamp is
  `time.perf_counter()`. There is no allocator with statistics, so memory comes from a tracker of
  live tensor storages (`profiling.memory.LiveTensorMeter`, built on torch's `MemTracker`).
- CUDA: kernels and NCCL collectives run asynchronously. A host clock read inside the step would
  time kernel *launches*, and a `torch.cuda.synchronize()` at every phase boundary would serialize
  the communication streams with compute, destroying the very overlap an async strategy is built
  for. So phase boundaries record CUDA events on the current stream (no sync) and their elapsed
  times are read once, after the single synchronize at the end of the step. Memory is the caching
  allocator's own counters (`memory_allocated`, `max_memory_allocated`, peak reset per window).
- Other accelerators (XPU, ...) go through the generic `torch.accelerator` API and `torch.Event`
  when this torch build provides them; otherwise `DeviceOps.for_device` raises ValueError.

Nothing here chooses a device: the caller passes the one its tensors live on.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import torch

from dist_ortho.profiling.memory import LiveTensorMeter

__all__ = ["DeviceOps", "CPUOps", "CUDAOps", "AcceleratorOps", "MemoryMeter", "AllocatorMeter",
           "resolve_device"]


class MemoryMeter(Protocol):
    """Live-bytes measurement over a window of code. `take_peak` returns the highest live bytes
    since the previous `take_peak` (or `start`) and starts a new window at the current level."""

    categories: bool  # True when peaks come with a breakdown by kind of tensor
    per_op_cost: bool  # True when measuring slows every op down (so it is sampled)

    def start(self, params, optimizers) -> None: ...

    def current(self) -> int: ...

    def take_peak(self) -> tuple[int, dict[str, int] | None]: ...

    def stop(self) -> None: ...


def resolve_device(device) -> torch.device:
    """torch.device from a device, a string or an int-less type name; ValueError otherwise."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {device!r}: {exc}") from None
    raise ValueError(f"device must be a torch.device or a string like 'cpu' or 'cuda:0', "
                     f"got {type(device).__name__}")


class DeviceOps:
    """The interface; `DeviceOps.for_device(device)` picks the implementation."""

    device: torch.device
    asynchronous: bool = False  # True when work is queued: timing needs events and a final sync

    @staticmethod
    def for_device(device) -> "DeviceOps":
        device = resolve_device(device)
        if device.type == "cpu":
            return CPUOps(device)
        if device.type == "cuda":
            return CUDAOps(device)
        if device.type == "meta":
            raise ValueError("cannot profile on the meta device: nothing runs there")
        return AcceleratorOps(device)

    def synchronize(self) -> None:
        """Wait until all work queued on the device has finished."""
        raise NotImplementedError

    def mark(self):
        """A timestamp token ordered with the work queued so far."""
        raise NotImplementedError

    def elapsed_s(self, start, end) -> float:
        """Seconds between two marks; call after `synchronize` when `asynchronous`."""
        raise NotImplementedError

    def memory_meter(self) -> MemoryMeter:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"device": str(self.device), "device_type": self.device.type}


class CPUOps(DeviceOps):
    asynchronous = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        pass  # CPU ops complete when they return

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_s(self, start: float, end: float) -> float:
        return end - start

    def memory_meter(self) -> MemoryMeter:
        return LiveTensorMeter(self.device)

    def describe(self) -> dict:
        return {"device": str(self.device), "device_type": "cpu",
                "device_name": "cpu", "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count()}


class AllocatorMeter:
    """Peak bytes from a device allocator's own statistics (exact, includes every allocation on
    the device, no per-op cost). The peak counter is reset at every window boundary."""

    categories = False
    per_op_cost = False

    def __init__(self, allocated, max_allocated, reset_peak) -> None:
        self._allocated, self._max_allocated, self._reset_peak = allocated, max_allocated, reset_peak

    def start(self, params, optimizers) -> None:
        self._reset_peak()

    def current(self) -> int:
        return int(self._allocated())

    def take_peak(self) -> tuple[int, None]:
        peak = int(self._max_allocated())
        self._reset_peak()  # host-side allocator counters: no device sync is needed
        return peak, None

    def stop(self) -> None:
        pass


class CUDAOps(DeviceOps):
    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        self.device = device if device.index is not None else torch.device(
            "cuda", torch.cuda.current_device())

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: after the work queued so far, without a sync
        return event

    def elapsed_s(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0

    def memory_meter(self) -> MemoryMeter:
        d = self.device
        return AllocatorMeter(lambda: torch.cuda.memory_allocated(d),
                              lambda: torch.cuda.max_memory_allocated(d),
                              lambda: torch.cuda.reset_peak_memory_stats(d))

    def describe(self) -> dict:
        return {"device": str(self.device), "device_type": "cuda",
                "device_name": torch.cuda.get_device_name(self.device),
                "cuda_version": torch.version.cuda}


class AcceleratorOps(DeviceOps):
    """Any other accelerator through torch's device-generic API."""

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        acc = getattr(torch, "accelerator", None)
        current = acc.current_accelerator() if acc is not None and acc.is_available() else None
        if current is None or current.type != device.type or not hasattr(torch, "Event"):
            raise ValueError(f"cannot profile on device {device}: it is not this torch build's "
                             f"available accelerator ({current})")
        self.device = device
        self._acc = acc

    def synchronize(self) -> None:
        self._acc.synchronize(self.device)

    def mark(self):
        event = torch.Event(device=self.device, enable_timing=True)
        event.record()
        return event

    def elapsed_s(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0

    def memory_meter(self) -> MemoryMeter:
        acc, d = self._acc, self.device
        return AllocatorMeter(lambda: acc.memory_allocated(d), lambda: acc.max_memory_allocated(d),
                              lambda: acc.reset_peak_memory_stats(d))
