"""Host-sync counting for tests/optimizer/test_gpu_readiness.py, and its worker for real gloo ranks
(spawned by name).

`HostSyncCounter` counts what makes the host wait for a device inside its `with` block:
- scalar reads: `.item()`, `bool(t)`, `int(t)`, `float(t)`, `if t:` (all
  `aten::_local_scalar_dense`);
- ops whose output size depends on the data (`nonzero`, `masked_select`, `unique`, ...);
- copies from another device to the CPU (`.cpu()`, `.to("cpu")` of a CUDA tensor);
- `Tensor.cpu`, `Tensor.tolist`, `Tensor.numpy` calls, counted at the method, since on CPU tensors
  they never reach the dispatcher (a CPU run must count what a CUDA run would wait for).
On CPU none of these waits, but each would on a GPU, so the count is the same on both.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from dist_ortho import NorMuon
from dist_ortho.optim.optimizer import HOST_SYNCS_PER_STEP

# ops whose output shape is read back from the device before they return
DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique",
                  "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
                  "aten::repeat_interleave", "aten::nonzero_static", "aten::argwhere"}
METHODS = ("cpu", "tolist", "numpy")


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


class HostSyncCounter(TorchDispatchMode):
    """`events`: one (kind, op) per host sync seen; `count` is their number."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}
        self._in_method = 0

    @property
    def count(self) -> int:
        return len(self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not self._in_method:
            if name == "aten::_local_scalar_dense":
                self.events.append(("scalar", name))
            elif name in DATA_DEPENDENT:
                self.events.append(("data-dependent shape", name))
            elif name in ("aten::_to_copy", "aten::copy_"):
                src = _device_of(args[1] if name == "aten::copy_" else args[0])
                dst = (_device_of(args[0]) if name == "aten::copy_"
                       else kwargs.get("device", src))
                if (src is not None and dst is not None and torch.device(dst).type == "cpu"
                        and src.type not in ("cpu", "meta")):
                    self.events.append(("to cpu", name))
        return func(*args, **kwargs)

    def _wrap(self, method: str):
        original = self._saved[method]

        def counted(tensor, *args, **kwargs):
            self.events.append(("method", f"Tensor.{method}"))
            self._in_method += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_method -= 1
        return counted

    def __enter__(self):
        for method in METHODS:
            self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._wrap(method))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()


SHAPES = ((8, 6), (6, 10), (4, 6, 3, 3), (3, 5, 7))


def step_syncs(params, make_opt, steps: int = 2, seed: int = 0) -> list[list[tuple[str, str]]]:
    """The host-sync events of each of `steps` optimizer steps (grads drawn outside the count)."""
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        for p in params:
            p.grad = _like(p, gen)
        with HostSyncCounter() as counter:
            opt.step()
        out.append(counter.events)
    return out


def _like(p, gen):
    """A random gradient placed like `p` (a DTensor gets the same global values on every rank)."""
    full = torch.randn(p.shape, generator=gen, device="cpu").to(p.dtype)
    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.to_local().device), p.device_mesh, p.placements,
                                 src_data_rank=None)
    return full.to(p.device)


def sync_count_worker(rank: int, world_size: int, strategies: list[str]) -> dict:
    """On gloo ranks: FSDP2-style Shard(0) DTensor parameters, one NorMuon per strategy; returns
    {strategy: [events of step 1, events of step 2]}."""
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name in strategies:
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen, device="cpu"), mesh,
                                                       [Shard(0)], src_data_rank=None))
                  for s in SHAPES]
        out[name] = step_syncs(params, lambda ps, n=name: NorMuon(ps, strategy=n))
    return out


def assert_one_sync_per_step(events_per_step, context) -> None:
    """Each step's events: exactly the documented one, the non-finite check's scalar read."""
    for events in events_per_step:
        assert len(events) == HOST_SYNCS_PER_STEP["skip"] == 1, (context, events)
        assert events[0] == ("scalar", "aten::_local_scalar_dense"), (context, events)
