"""Tolerances of the exactness tests, derived from floating-point error growth.

What is compared. The optimizer under test (any strategy, any world size) and the single-process
reference (`dist_ortho.optim.reference`) run the same optimizer on the same float32 inputs. They may
differ only in where rounding lands: the BLAS kernel path (SSE4.2 / AVX2 / AVX-512 blocking, FMA or
not, 1 or 2 threads), a batched matmul where the reference runs a single one, and the order in
which ranks' partial sums are all-reduced. So a tolerance has to bound float rounding on *any*
such path: it is written in units of the unit roundoff u and grows with the sizes that make errors
grow. A number fitted on one CPU (the old "err <= 1e-6") is not that: it failed on AVX-512 Xeons.

Model. A sum or dot product of n terms carries a relative error of about sqrt(n)*u whatever its
order or blocking (probabilistic rounding analysis: Higham & Mary, SIAM J. Sci. Comput. 41(5),
2019; the worst case n*u needs every rounding to go the same way). An elementwise op costs one u.

1. Newton-Schulz, s steps on an m x n view (k = min(m, n), l = max(m, n)): a step is three matmuls
   of inner dimension l (X X^T), k (A A) and k (B X), so it adds ~(sqrt(l) + 2 sqrt(k)) u and s
   steps add   eps_ns = s (sqrt(l) + 2 sqrt(k)) u_ns.   The iterates' singular values live in
   (0, 1.21], where a small one grows by <= a = 3.44 per step together with its own error, and
   near 1 the quintic contracts (|p'(1)| = 0.72); so errors do not compound geometrically (the
   worst-case Lipschitz bound, 3.97 per step, would be ~300x looser than anything observed).
   bfloat16: matmuls accumulate in float32 and round each output once, so two kernel paths give
   different bf16 bits only where their float32 sums (sqrt(l) u32 apart) straddle a bf16 rounding
   boundary, a fraction q = 2 sqrt(l) u32 / u_bf16 of the entries, one bf16 ulp each:
   eps_ns = 3 s sqrt(q) u_bf16 (the path-independent bf16 error, ~3%, is the same on both sides).
2. NorMuon's normalization, in float32: the two Frobenius norms sum N = B m n squares (the ranks'
   partial sums in any order), v sums the n squares of a row, ~10 elementwise roundings:
   eps_norm = (2 sqrt(N) + sqrt(n) + 10) u.  The NS error enters the update twice (the row and its
   v): eps_update = 2 eps_ns + eps_norm.  Muon: eps_update = eps_ns + 2u.
3. Parameters. Each step rounds W <- W (1 - lr wd) - lr U once (twice with weight decay) on each
   side: a difference of at most 2u|W| per rounding, whatever the updates (rigorous; this term is
   why the old test failed: unit-scale weights that move by ~2.5% in 4 steps make it up to 80u,
   typically ~30u, per step relative to the displacement). The updates of the two sides differ by
   at most 2 C eps_update ||U||. Over T steps (weight decay only shrinks earlier differences):
       ||p_T - r_T||_F <= sum_t [ 2u (||W_t|| + [wd > 0] ||W_{t-1}||) + 2 C eps_update lr ||U_t|| ]
   with ||W_t||, ||U_t|| (Frobenius) taken from the reference run.
C = 10 holds the O(1) factors the model leaves out (the lambda of the probabilistic bound, the
quintic's coefficients |a| + |b| + |c| = 10.3 that cancel to p(sigma) ~ 0.7-1.2). Measured, with
kernel paths emulated beyond what one CPU offers (tests/optimizer/test_tolerances_catch_bugs.py),
errors stay at or below ~1/10 of the bound, while a bug has to move the update by about 2 C
eps_update (1e-4 to 3e-4 relative) to be seen; the mutation tests there show which real bugs are.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence

import torch

from dist_ortho.core.newton_schulz import matrix_view_shape, step_coefficients

__all__ = ["C", "unit_roundoff", "ns_error", "ns_scale_sensitivity", "update_error", "param_bound", "Trajectory",
           "assert_within", "distance_ratios", "report", "split_ns_error", "gram_ns_error"]

C = 10.0

_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
_DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "auto": torch.float32}  # "auto" is float32 on CPU, where these tests run


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """u = 2^-(mantissa bits + 1): the largest relative error of one rounding to nearest."""
    return _UNIT_ROUNDOFF[_DTYPE_NAMES.get(dtype, dtype)]


def _dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """(batch, m, n) of the matrix view Newton-Schulz sees."""
    view = matrix_view_shape(tuple(shape))
    batch = math.prod(view[:-2])
    return batch, view[-2], view[-1]


def ns_error(shape: Sequence[int], ns_dtype: torch.dtype | str, steps: int = 5) -> float:
    """Relative Newton-Schulz error that may differ between two kernel paths (model item 1)."""
    _, m, n = _dims(shape)
    k, l = min(m, n), max(m, n)
    u_ns = unit_roundoff(ns_dtype)
    if u_ns > unit_roundoff(torch.float32):  # bfloat16: float32 accumulation, one output rounding
        q = min(1.0, 2 * math.sqrt(l) * unit_roundoff(torch.float32) / u_ns)
        return 3 * steps * math.sqrt(q) * u_ns
    return steps * (math.sqrt(l) + 2 * math.sqrt(k)) * u_ns


@functools.lru_cache(maxsize=None)  # 0.7 s a call; a pure function of steps
def ns_scale_sensitivity(steps: int = 5) -> float:
    """sup over sigma in (0, 1] of |d log p^s(sigma) / d log sigma| for Jordan's quintic p: a
    relative change delta of the input's scale (e.g. NS's eps / ||G||) moves every output singular
    value, hence the output, by at most this times delta (10.04 for 5 steps)."""
    from dist_ortho.core.newton_schulz import JORDAN_COEFFICIENTS

    a, b, c = JORDAN_COEFFICIENTS
    sigma = torch.logspace(-6, 0, 200_001, dtype=torch.float64)
    value, slope = sigma, torch.ones_like(sigma)
    for _ in range(steps):
        slope = slope * (a + 3 * b * value**2 + 5 * c * value**4)
        value = a * value + b * value**3 + c * value**5
    return float((slope * sigma / value).abs().max())


def split_ns_error(shape: Sequence[int], ns_dtype: torch.dtype | str, steps: int = 5) -> float:
    """Relative NS error when the matrix's NS is split across ranks (strategy `split_ns`).

    Two sums change order. (a) Each Gram entry (X X^T)_ij is a dot product of l terms; split, it
    is a sum over members of partial dot products (each over its block of l), added in block
    order in float32 (bfloat16: rounded once to bfloat16 after the float32 sum, as a float32-
    accumulating matmul does). That is a reordering of the same l terms, which item 1 already
    bounds by sqrt(l) u whatever the order, so eps_ns is unchanged. (b) The starting norm is a
    sum of N = B m n squares, now as member partial sums: relative error sqrt(N) u on the sum,
    half of it (+1 u for the sqrt) on the norm, and a change delta of the input's scale moves
    the output by at most ns_scale_sensitivity * delta. So
        eps_split = eps_ns + S (sqrt(N) / 2 + 1) u32,    S = ns_scale_sensitivity(steps).
    B's rows are computed from the same A by the same inner products and travel losslessly."""
    batch, m, n = _dims(shape)
    u = unit_roundoff(torch.float32)
    return ns_error(shape, ns_dtype, steps) + ns_scale_sensitivity(steps) * (
        math.sqrt(batch * m * n) / 2 + 1) * u


def gram_ns_error(shape: Sequence[int], steps: int = 5, sigma: torch.Tensor | None = None,
                  coefficients: str = "jordan") -> float:
    """Relative float32 difference between Gram Newton-Schulz (NSConfig form "gram") and the
    standard iteration, before the constant C.

    Both evaluate the same polynomial of X_0, so they differ by rounding only. (a) The Gram form
    rounds A_0 = X_0 X_0^T once (sqrt(l) u, item 1), then per step A A, p(A) Q and p(A) (p(A) A),
    four products of inner dimension k (4 sqrt(k) u), and at the end Q X_0 (sqrt(k) u). Unlike
    the standard form it carries A_t forward instead of recomputing it from X_t, so an error made
    in A at one step is not corrected: the remaining steps move it as they move any change of
    the input's singular values, by at most S = ns_scale_sensitivity(steps). The standard side
    has its own eps_ns:    eps_a = S (sqrt(l) + (4 s + 1) sqrt(k)) u + eps_ns.
    (b) A holds sigma^2, not sigma, and this is not covered by (a) for small singular values.
    A matmul is backward stable row by row: fl(X X^T) = (X + dX) X^T with |dX| <= sqrt(l) u |X|
    (probabilistically), so sigma_i^2 = v_i^T A v_i moves by at most ||dX^T v_i|| sigma_i <=
    sqrt(l) u sigma_max sigma_i, i.e. sigma_i by sqrt(l) u sigma_max / 2 (absolute: large
    relative to a small sigma_i, which the standard form never squares). The s steps turn a
    change of sigma_i into one of the output by the slope f'(sigma_i) of the composed polynomial
    (up to prod_t a_t = 482 for Jordan's 5 steps near 0). With `sigma` (the input's singular
    values, any scale; normalized here by their Frobenius norm as NS does):
        eps_b = sqrt(sum_i (f'(sigma_i) sqrt(l) u sigma_max / 2)^2) / ||f(sigma)||.
    Without `sigma` only eps_a is returned (well-conditioned inputs)."""
    _, m, n = _dims(shape)
    k, l = min(m, n), max(m, n)
    u = unit_roundoff(torch.float32)
    eps = (ns_scale_sensitivity(steps) * (math.sqrt(l) + (4 * steps + 1) * math.sqrt(k)) * u
           + ns_error(shape, torch.float32, steps))
    if sigma is None:
        return eps
    s = sigma.double().flatten()
    s = s / s.norm()
    slope, out = torch.ones_like(s), s.clone()
    for t in range(steps):
        a, b, c = step_coefficients(coefficients, t)
        slope = slope * (a + 3 * b * out**2 + 5 * c * out**4)
        out = a * out + b * out**3 + c * out**5
    err = slope.abs() * math.sqrt(l) * u * float(s.max()) / 2
    return eps + float(err.norm() / out.norm())


def update_error(shape: Sequence[int], optimizer: str, ns_dtype: torch.dtype | str = "float32",
                 steps: int = 5, split: bool = False) -> float:
    """Relative error of one computed update (model item 2), before the constant C. `split`:
    the NS may be split across ranks (split_ns_error)."""
    batch, m, n = _dims(shape) if optimizer != "adamw" else (1, 1, 1)
    u = unit_roundoff(torch.float32)
    if optimizer == "adamw":  # elementwise: two lerps, a sqrt, a division, bias corrections
        return 8 * u
    eps_ns = (split_ns_error if split else ns_error)(shape, ns_dtype, steps)
    if optimizer == "muon":
        return eps_ns + 2 * u
    if optimizer == "normuon":
        return 2 * eps_ns + (2 * math.sqrt(batch * m * n) + math.sqrt(n) + 10) * u
    raise ValueError(f"unknown optimizer {optimizer!r}")


def param_bound(eps_update: float, w_norms: Sequence[float], steps: Sequence[float],
                weight_decay: float = 0.0) -> float:
    """Bound on ||p_T - r_T||_F between two implementations after T steps (model item 3).

    eps_update: relative error of one update on one side (update_error, plus any input error);
    w_norms: ||W_0||, ..., ||W_T|| of the reference run; steps: lr ||U_1||, ..., lr ||U_T||.
    """
    assert len(w_norms) == len(steps) + 1, (len(w_norms), len(steps))
    u = unit_roundoff(torch.float32)
    total = 0.0
    for t, step in enumerate(steps, start=1):
        total += 2 * u * (w_norms[t] + (w_norms[t - 1] if weight_decay else 0.0))
        total += 2 * C * eps_update * step
    return total


class Trajectory:
    """Records a reference run's ||W_t|| and ||lr U_t|| = ||W_{t-1} (1 - lr wd) - W_t||, the
    sizes param_bound needs. `lr`/`weight_decay`: one value, or one per parameter."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float | Sequence[float],
                 weight_decay: float | Sequence[float] = 0.0) -> None:
        n = len(params)
        self.lr = list(lr) if isinstance(lr, (list, tuple)) else [lr] * n
        self.wd = (list(weight_decay) if isinstance(weight_decay, (list, tuple))
                   else [weight_decay] * n)
        self.last = [p.detach().double().clone() for p in params]
        self.w_norms = [[float(w.norm())] for w in self.last]
        self.steps: list[list[float]] = [[] for _ in params]

    def record(self, params: Sequence[torch.Tensor]) -> None:
        """Call after every reference step with the reference's (full) parameters."""
        for i, p in enumerate(params):
            now = p.detach().double()
            self.steps[i].append(float((self.last[i] * (1 - self.lr[i] * self.wd[i]) - now).norm()))
            self.w_norms[i].append(float(now.norm()))
            self.last[i] = now.clone()

    def bounds(self, eps_updates: Sequence[float]) -> list[float]:
        return [param_bound(e, w, s, wd) for e, w, s, wd
                in zip(eps_updates, self.w_norms, self.steps, self.wd)]

    def loss_bound(self, loss: float, grad_norms: Sequence[float], eps_updates: Sequence[float],
                   eps_loss: float) -> float:
        """Bound on |loss - reference loss| at the step about to be taken: the loss's own rounding
        (2 C eps_loss |loss|) plus, to first order, each gradient's norm times the bound on its
        weights after the steps recorded so far."""
        first_order = sum(g * param_bound(e, w, s) for g, e, w, s
                          in zip(grad_norms, eps_updates, self.w_norms, self.steps))
        return 2 * C * eps_loss * abs(loss) + first_order


def assert_within(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                  bounds: Sequence[float], context=None, family: str | None = None) -> list[float]:
    """Assert ||got_i - want_i||_F <= bounds_i for every parameter; return error / bound."""
    ratios = distance_ratios(got, want, bounds)
    if family is not None:
        report(family, ratios)
    for i, r in enumerate(ratios):
        assert r <= 1.0, (f"parameter {i}: ||p - r||_F is {r:.2f} x its float32 bound "
                          f"{bounds[i]:.3e}", context)
    return ratios


def report(family: str, ratios: Sequence[float]) -> None:
    """Append the worst error / bound of a test family to $DIST_ORTHO_TOLERANCE_LOG (one JSON line),
    so CI can print the headroom of every setting (.ci/run)."""
    path = os.environ.get("DIST_ORTHO_TOLERANCE_LOG")
    if path and ratios:
        with open(path, "a") as f:
            f.write(json.dumps({"family": family, "ratio": max(ratios)}) + "\n")


def distance_ratios(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                    bounds: Sequence[float]) -> list[float]:
    """||got_i - want_i||_F / bounds_i."""
    return [float((g.detach().double() - w.detach().double()).norm()) / b
            for g, w, b in zip(got, want, bounds)]


def summarize(paths: Sequence[str]) -> str:
    """The worst error / bound of every test family in the given logs (see report), as a table."""
    worst: dict[str, float] = {}
    count: dict[str, int] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                family = entry["family"]
                worst[family] = max(worst.get(family, 0.0), entry["ratio"])
                count[family] = count.get(family, 0) + 1
    lines = [f"{'family':58s} {'checks':>6s} {'worst error/bound':>17s}"]
    for family in sorted(worst):
        lines.append(f"{family:58s} {count[family]:6d} {worst[family]:17.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(summarize(sys.argv[1:]))
