"""Peak memory on the CPU, measured for real: live tensor storage bytes, by kind.

The CPU has no allocator statistics to read. `tracemalloc` does not see tensor storage (torch
allocates it in C++), and the resident set size only counts pages once they are touched and keeps
them after a free. What does see every tensor is the dispatcher: torch's own
`torch.distributed._tools.mem_tracker.MemTracker` is a TorchDispatchMode that registers the storage
of every tensor an op creates, drops it through a weak-reference callback when the storage is freed,
and (because FSDP2 grows and frees its unsharded parameters with `UntypedStorage.resize_`, which
the dispatcher does not see) wraps `resize_` while it is active. It keeps the running total of live
bytes, a peak, and a breakdown by kind: parameter, buffer, gradient, activation, temp (backward),
optimizer (everything created inside `optimizer.step()`, the state and the step's temporaries
alike) and other. This was checked under FSDP2 on gloo: the root's unsharded parameters appear
after forward, sharded gradients after backward, and the gathered buffers of a strategy during the
optimizer step.

`LiveTensorMeter` adapts it to the profiler's windows:
- A fresh tracker per step. At the start it is told about what already lives: the attached
  optimizers' parameters (local shards) and their gradients, and the optimizer state. Tensors
  created before the step and owned by nobody of these (e.g. an input batch built outside the step)
  are not counted; everything created during the step is.
- `take_peak()` returns the peak since the previous call and starts a new window at the current
  level. MemTracker has no public peak reset, so the reset does exactly what its `__enter__` does
  (peak := current).
- Per op it only tracks the outputs and the global peak (MemTracker's per-module peak snapshots,
  which walk every tracked module on every op, are skipped), and a second forward of the root in
  one step (gradient accumulation) restarts MemTracker's per-module statistics instead of raising.
These use MemTracker internals (a private torch module); they are checked when the meter is built,
and a torch without them raises, telling to run with memory=False, instead of measuring wrongly.
"""

from __future__ import annotations

import torch

__all__ = ["LiveTensorMeter", "CATEGORY_NAMES"]

# MemTracker's reference types, as the short names used in metric names.
CATEGORY_NAMES = {"Parameter": "parameter", "Buffer": "buffer", "Gradient": "gradient",
                  "Activation": "activation", "Temp": "temp", "Optstate": "optimizer",
                  "Other": "other"}
_TOTAL = "Total"


_INTERNALS = ("_peak_mem", "_peak_mem_snap", "_curr_mem_snap", "_mod_tracker", "_in_opt",
              "_in_ac", "_track", "_update_peak_stats", "_pre_fw_hook", "reset_mod_stats")


def _tracker_class():
    # torch's private MemTracker (and what our subclass of it needs) is imported only when CPU
    # memory is measured: CUDA runs use allocator counters, and a torch that moves these private
    # modules then breaks only this feature, not every import of the profiler
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.distributed.tensor import DTensor
    from torch._guards import active_fake_mode
    from torch.utils._pytree import tree_map_only

    class _WindowedMemTracker(MemTracker):
        """MemTracker with a peak that can be restarted at the current level, made cheaper per op.

        MemTracker also keeps per-module peak snapshots, updated on every op by walking all
        tracked modules; we never read them, and that walk dominated its cost (it grows with the
        number of modules). Here the per-op work is: track the op's output storages, update the
        one global peak. Module hooks still run, because they are how FSDP2's unsharded
        parameters get registered."""

        def reset_peak(self) -> None:
            # the same two assignments MemTracker.__enter__ makes when it starts tracking
            self._peak_mem_snap = self.get_tracker_snapshot("current")
            self._peak_mem = {dev: snap[_TOTAL] for dev, snap in self._peak_mem_snap.items()}

        def _update_peak_stats(self, peak_state=None) -> None:
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

        def _pre_fw_hook(self, module, inputs) -> None:
            try:
                super()._pre_fw_hook(module, inputs)
            except NotImplementedError:
                # a second forward of the root inside one step (gradient accumulation):
                # MemTracker's per-module statistics, which we do not use, refuse it; restart them
                self.reset_mod_stats()
                super()._pre_fw_hook(module, inputs)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor or issubclass(t, DTensor) for t in types):
                return NotImplemented  # let DTensor desugar into local ops, which we then see
            res = func(*args, **(kwargs or {}))
            if active_fake_mode() is self._fake_mode_on_entry:
                if self._in_opt:
                    reftype = _MemRefType.OPT
                elif self._mod_tracker.is_bw and not self._in_ac:
                    reftype = _MemRefType.TEMP
                else:
                    reftype = _MemRefType.ACT
                if type(res) is torch.Tensor:  # the common case, without a pytree walk
                    self._track(reftype, res)
                else:
                    tree_map_only(torch.Tensor, lambda t: self._track(reftype, t), res)
                self._update_peak_stats()
            return res

    probe = _WindowedMemTracker()
    missing = [a for a in _INTERNALS if not hasattr(probe, a)]
    if missing:
        raise RuntimeError(
            f"this torch's MemTracker lacks {missing}; the CPU memory meter relies on them to "
            f"reset its peak per window. Run with ProfilerConfig(memory=False).")
    return _WindowedMemTracker


class _ParamHolder(torch.nn.Module):
    """Holds the optimizers' parameters so MemTracker files them (and their gradients) as
    parameters and gradients. Registering a Parameter here changes nothing about it."""

    def __init__(self, params) -> None:
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)


class LiveTensorMeter:
    """Live tensor bytes on one device, with peaks per window and a breakdown by kind."""

    categories = True
    per_op_cost = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cls = _tracker_class()
        self._tracker = None
        self._holder = None
        self._holder_key: tuple = ()

    def _device_snapshot(self, kind: str) -> dict[str, int]:
        snap = self._tracker.get_tracker_snapshot(kind)
        # MemTracker also files meta tensors (e.g. DTensor stride probes): only our device counts
        for dev, values in snap.items():
            if torch.device(dev).type == self.device.type:
                return values
        return {}

    def start(self, params, optimizers) -> None:
        params = list(params)
        key = tuple(id(p) for p in params)
        if key != self._holder_key:
            self._holder = _ParamHolder([p for p in params if isinstance(p, torch.nn.Parameter)])
            self._holder_key = key
        tracker = self._cls()
        # plain tensors handed to an optimizer are not Parameters: they count as "other"
        plain = [p for p in params if not isinstance(p, torch.nn.Parameter)]
        external = [self._holder, *plain] + [o for o in optimizers
                                             if isinstance(o, torch.optim.Optimizer)]
        tracker.track_external(*external)
        tracker.__enter__()
        self._tracker = tracker

    def current(self) -> int:
        return int(self._device_snapshot("current").get(_TOTAL, 0))

    def take_peak(self) -> tuple[int, dict[str, int]]:
        snap = self._device_snapshot("peak")
        peak = int(snap.get(_TOTAL, 0))
        by_kind = {CATEGORY_NAMES.get(str(getattr(k, "value", k)), str(k)): int(v)
                   for k, v in snap.items() if k != _TOTAL}
        self._tracker.reset_peak()
        return peak, by_kind

    def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None
