"""How far an inexact schedule's update is from the exact one, measured step by step.

`DeviationMeter` wraps an optimizer step on the side, when asked (it is off unless a run creates
one: `deviation: true` in the exact-or-not study): before the step (`before_step`, after the
gradients exist) it gathers every orthogonalized parameter's full gradient, weight, momentum and
NorMuon row second moment (an all-gather each, DTensor's `full_tensor`) and computes the *exact*
update from them with the single-process reference (`dist_ortho.optim.reference`), the cheap exact
path; after the step (`after_step`) it gathers the weight again, recovers the update the schedule
actually applied, U = (W_before (1 - lr wd) - W_after) / lr, and records per matrix

    rel_frobenius = ||U - U_exact||_F / ||U_exact||_F,   cosine = <U, U_exact> / (||U|| ||U_exact||).

Both sides start from the same state, so this is the deviation of one step, not of a trajectory.
Recovering U from float32 weights costs about u ||W|| / (lr ||U||) of relative error (u = 2^-24):
an exact strategy measures ~1e-6 here, the floor below which a deviation means nothing. Every rank
gathers (collectives in parameter order on all ranks); rank 0 keeps the rows. The gathers and the
reference NS are outside the timed step: a run that times steps should measure deviation in
separate runs or read its step times with that in mind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dist_ortho.core.newton_schulz import NSConfig, matrix_view_shape
from dist_ortho.optim.optimizer import OrthogonalizedOptimizer
from dist_ortho.optim.reference import ReferenceHParams, muon_update, normuon_update

__all__ = ["DEVIATION_COLUMNS", "DeviationMeter", "deviation", "summarize_deviation"]

DEVIATION_COLUMNS = ("step", "matrix", "rel_frobenius", "cosine")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def deviation(update: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius distance, cosine) of `update` to `exact`."""
    a, b = update.double().flatten(), exact.double().flatten()
    nb, na = float(b.norm()), float(a.norm())
    rel = float((a - b).norm()) / nb if nb > 0 else math.nan
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return rel, cos


class DeviationMeter:
    """Deviation of each orthogonalized matrix's update from the exact one (module docstring).
    `optimizers`: the OrthogonalizedOptimizers to watch (others, e.g. AdamW, are skipped);
    `every`: measure steps with step % every == 0 only."""

    def __init__(self, optimizers: Sequence, rank: int = 0, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"deviation every must be an int >= 1, got {every!r}")
        self.optimizers = [o for o in optimizers if isinstance(o, OrthogonalizedOptimizer)]
        for opt in self.optimizers:
            if opt.rule.name not in ("normuon", "muon"):
                raise ValueError(f"deviation needs the single-process reference of update rule "
                                 f"{opt.rule.name!r}; dist_ortho.optim.reference has normuon "
                                 f"and muon")
        self.rank, self.every = rank, every
        self.rows: list[dict] = []
        self._pending: list[tuple] = []
        self._step: int | None = None

    def _entries(self, opt):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    def before_step(self, step: int) -> None:
        """COLLECTIVE: gather and compute the exact updates of this step (gradients set)."""
        self._pending, self._step = [], None
        if step % self.every:
            return
        self._step = step
        for opt in self.optimizers:
            for group, p in self._entries(opt):
                lr = float(group["lr"])
                state = opt.state.get(p, {})
                grad, weight = _full(p.grad), _full(p)
                buf = (_full(state["momentum_buffer"]) if "momentum_buffer" in state
                       else torch.zeros_like(weight))
                hp = ReferenceHParams(lr=lr, momentum=group["momentum"],
                                      beta2=group.get("beta2", 0.95),
                                      weight_decay=group["weight_decay"],
                                      nesterov=group["nesterov"],
                                      ns=NSConfig(group["ns_steps"], group["ns_dtype"],
                                                  group["ns_coefficients"],
                                                  form=group.get("ns_form", "standard")))
                if opt.rule.name == "normuon":
                    v = (_full(state["v"]) if "v" in state
                         else torch.zeros(matrix_view_shape(weight.shape)[:-1]))
                    exact = normuon_update(grad, buf, v, hp)
                else:  # muon (the constructor refuses other rules)
                    exact = muon_update(grad, buf, hp)
                name = opt._names.get(id(p), f"param{len(self._pending)}")
                self._pending.append((name, p, weight, exact, lr, hp.weight_decay))

    def after_step(self, skipped: bool = False) -> None:
        """COLLECTIVE: gather the weights again and record each matrix's deviation."""
        pending, step = self._pending, self._step
        self._pending, self._step = [], None
        for name, p, before, exact, lr, wd in pending:
            after = _full(p)
            if skipped or not lr > 0 or self.rank != 0:
                continue
            applied = (before * (1 - lr * wd) - after) / lr
            rel, cos = deviation(applied, exact)
            self.rows.append({"step": step, "matrix": name, "rel_frobenius": rel, "cosine": cos})


def summarize_deviation(rows: Sequence[dict]) -> dict:
    """Median and worst over all (step, matrix) rows: worst is the largest distance and the
    smallest cosine."""
    rel = np.asarray([r["rel_frobenius"] for r in rows if math.isfinite(r["rel_frobenius"])])
    cos = np.asarray([r["cosine"] for r in rows if math.isfinite(r["cosine"])])
    if not len(rel):
        return {"n": 0, "rel_median": math.nan, "rel_worst": math.nan, "cos_median": math.nan,
                "cos_worst": math.nan}
    return {"n": int(len(rel)), "rel_median": float(np.median(rel)), "rel_worst": float(rel.max()),
            "cos_median": float(np.median(cos)), "cos_worst": float(cos.min())}
