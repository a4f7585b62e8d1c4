"""The non-finite check of an optimizer step, and how a step that must not count is dropped.

Every step starts with one tiny all-reduce of the number of gradient shards holding NaN/Inf (a
float sum is NaN/Inf iff an element is, or the sum overflows float32, which is no healthier), so
every rank reaches the same verdict. What happens next is the `nonfinite` policy:

- "skip": the verdict is read on the host (one `.item()`); a bad step returns before any state is
  touched, with a warning, on every rank alike.
- "raise": the same read; a bad step raises FloatingPointError.
- "mask": the verdict stays on the device as a 0-d bool `ok`. The step runs in full on every rank
  (its collectives included, so ranks stay in step) and every write it makes, to the weights, the
  momentum, the rule's state and the step counters, is `torch.where(ok, new, old)`: a bad step
  leaves every bit as it was, and a good step writes exactly what "skip" writes. No host read,
  so the step can be queued ahead of the device and captured in a CUDA graph.

`HOST_SYNCS_PER_STEP[policy]` is the number of device-to-host syncs of one `step()`;
`host_syncs_per_step` adds the one read that a strategy running in backward (`overlapped`,
schedule backward, with its hooks installed by `overlap_with_backward`) needs in every policy:
whether the work started in backward is usable decides on the host which code runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from dist_ortho.optim.step_ops import nonfinite_count

__all__ = ["STEP_COUNTED", "step_counts", "NONFINITE_POLICIES", "HOST_SYNCS_PER_STEP",
           "host_syncs_per_step", "nonfinite_counts",
           "count_nonfinite", "handle_nonfinite", "masked_writes", "where_ok"]

log = logging.getLogger("dist_ortho")
NONFINITE_POLICIES = ("skip", "raise", "mask")
# device-to-host syncs in one step() per policy (see the module docstring)
HOST_SYNCS_PER_STEP = {"skip": 1, "raise": 1, "mask": 0}


def host_syncs_per_step(policy: str, runs_in_backward: bool = False) -> int:
    """Host syncs of one step under `policy`; a strategy running in backward reads its
    usability flag on the host in every policy, so its steps make one."""
    return max(HOST_SYNCS_PER_STEP[policy], int(runs_in_backward))


def nonfinite_counts(grads: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                     world_size: int, device: torch.device,
                     flag: torch.Tensor | None = None) -> torch.Tensor:
    """On the device, summed over the ranks of `group` in one all-reduce: [number of gradient
    shards holding NaN/Inf] or, with `flag` (a one-element 0/1 float tensor), [that number,
    number of ranks that raised the flag]. Nothing is read on the host; the local count is one
    reduction over all the shards (`step_ops.nonfinite_count`)."""
    bad = nonfinite_count(grads, device)
    if flag is not None:
        bad = torch.cat([bad, flag.to(device=device, dtype=torch.float32).reshape(1)])
    if world_size > 1:
        dist.all_reduce(bad, group=group)
    return bad


def count_nonfinite(grads: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                    world_size: int, device: torch.device, flag: torch.Tensor | None = None):
    """`nonfinite_counts` read on the host with one `.item()`: the count, or with `flag`
    (count, flags), both small integers packed as count * (P + 1) + flags in float64."""
    bad = nonfinite_counts(grads, group, world_size, device, flag)
    if flag is None:
        return int(bad.item())  # the step's one documented host sync (HOST_SYNCS_PER_STEP)
    packed = bad[0].double() * (world_size + 1) + bad[1].double()
    count, flags = divmod(int(packed.item()), world_size + 1)  # the same one host sync
    return count, flags


def handle_nonfinite(count: int, policy: str, who: str) -> None:
    """Raise (policy "raise") or warn that the step is skipped (policy "skip")."""
    message = f"{who}: non-finite gradient on {count} parameter shard(s) across ranks"
    if policy == "raise":
        raise FloatingPointError(message + "; nothing was updated (nonfinite='raise').")
    warnings.warn(message + "; step skipped on every rank, weights and state unchanged.",
                  RuntimeWarning, stacklevel=4)
    log.warning("%s; step skipped on every rank", message)


def where_ok(ok: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` where the step is good, else `old` (`ok` None: always `new`)."""
    return new if ok is None else torch.where(ok, new, old)


@contextlib.contextmanager
def masked_writes(ok: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Writes the block makes in place to `tensors` take effect only where `ok` (a 0-d bool on
    their device) holds; `ok` None: no copies, no masking. Used for the update rule's state, so
    that any rule's state changes are masked without the rule knowing."""
    if ok is None:
        yield
        return
    saved = [t.clone() for t in tensors]
    yield
    for t, old in zip(tensors, saved):
        t.copy_(torch.where(ok, t, old))


STEP_COUNTED = ("skipped", "overlap_redos")  # the profiler's per-step metrics of step_counts


def step_counts(optimizers: Iterable) -> tuple[int, int]:
    """(steps skipped for a NaN/Inf gradient, steps on which the work `overlapped` started in
    backward was redone after backward, e.g. under global-norm clipping), so far, summed."""
    return (sum(o.skipped_steps for o in optimizers),
            sum(o.overlap.fallbacks for o in optimizers if o.overlap is not None))
