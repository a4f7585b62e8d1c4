"""The update-rule interface: what turns orthogonalized rows into the update of each parameter.

The optimizer (`dist_ortho.optim.optimizer`) does what every orthogonalized optimizer shares: the
non-finite check, momentum, asking its strategy for NS(U) of this rank's rows, and applying
`W <- W (1 - lr wd) - lr update`. A rule says the rest:

- `defaults`: its own hyperparameters and their defaults (NorMuon's beta2), validated by `validate`;
- `init_state(p, layout)`: the state it keeps per parameter beyond the momentum (NorMuon's row
  second moment v), sharded like the parameter; `float32_state` names the keys that must stay
  float32 through a checkpoint; `state_bytes_per_row(spec)` sizes it for the cost model;
- `reductions(specs, world_size)`: the global reductions it issues per step, as plan items (the
  optimizer appends them to the strategy's plan; the cost model asks the same function);
- `updates(groups, states, specs, results, layout, ok=None)`: this rank's update rows, issuing
  exactly the reductions it declared. Its ops run once per batch of equal (param group, shape,
  local rows, dtype) on stacked tensors (`dist_ortho.core.batching`), not once per matrix.
  Hyperparameters may be Python floats or 0-d tensors and are never read on the host; with `ok`
  (a 0-d bool tensor on the device) a False step leaves the state exactly as it was and returns
  zero updates, decided by `torch.where` on the device.

Rules are stateless objects; their numeric constants live in their own file. A new rule is one file
with an `UpdateRule` subclass decorated with `@register` (rules.registry) and one import line
in `rules/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dist_ortho.core.newton_schulz import matrix_view_shape
from dist_ortho.core.plan import CommItem
from dist_ortho.core.sharding import Layout, MatrixSpec

__all__ = ["UpdateRule", "shape_scale"]


def shape_scale(shape: tuple[int, ...]) -> float:
    """max(1, m/n) ** 0.5 of the matrix view: keeps the update RMS of tall matrices comparable."""
    view = matrix_view_shape(shape)
    return max(1.0, view[-2] / view[-1]) ** 0.5


class UpdateRule:
    """Base class; see the module docstring. Subclasses set `name` and implement `updates`."""

    name: str = "base"
    defaults: Mapping[str, object] = {}
    float32_state: tuple[str, ...] = ()

    def validate(self, group: dict) -> None:
        """Raise ValueError for a bad value of one of this rule's hyperparameters in `group`
        (`dist_ortho.core.hparams` has the shared checks); the optimizer calls it for each param
        group, the run config for its `optimizer` section."""

    def init_state(self, p: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        """Extra state of a new parameter, sharded like it (default: none)."""
        return {}

    def state_bytes_per_row(self, spec: MatrixSpec) -> int:
        """Bytes of extra state per dim-0 row of `spec` (default: none)."""
        return 0

    def reductions(self, specs: Sequence[MatrixSpec], world_size: int) -> list[CommItem]:
        """The collectives `updates` issues, as every rank sees them (default: none)."""
        return []

    def updates(self, groups: Sequence[dict], states: Sequence[dict],
                specs: Sequence[MatrixSpec], results: Sequence[torch.Tensor],
                layout: Layout, ok: torch.Tensor | None = None) -> list[torch.Tensor]:
        """This rank's update rows for each matrix: results[i] is this rank's rows of NS(U_i) (in
        the NS dtype), shaped like its shard; groups[i] / states[i] are its param group and state.
        Returns float32 tensors the optimizer reshapes to the shard and applies with -lr. `ok`:
        see the module docstring (None: the step is taken)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
