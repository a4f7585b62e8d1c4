"""Newton-Schulz orthogonalization: the one piece of Muon that needs a whole matrix.

`newton_schulz(G)` returns an approximation of the orthogonal polar factor U V^T of G = U S V^T by
running a fixed odd matrix polynomial a few times. The quintic iteration with Keller Jordan's
coefficients (3.4445, -4.7750, 2.0315) does not converge to exactly 1: it drives every singular
value into a band around 1 (roughly [0.7, 1.2]), which is what Muon wants and is much cheaper than
an SVD. Polar Express (Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods
and Their Application to the Muon Algorithm", arXiv:2505.16932) uses a different, minimax-optimal
polynomial per step; its 5-step table is the one published in modded-nanogpt.

Gram Newton-Schulz (`form="gram"`) runs the same polynomial steps in the k x k Gram space: with
X_t = Q_t X_0 and A_t = X_t X_t^T, a step's p_t(A) = a I + b A + c A^2 gives Q_{t+1} = p_t(A_t) Q_t
and, as everything is a polynomial in A_0 and commutes, A_{t+1} = p_t(A_t)^2 A_t. Only the first
Gram X_0 X_0^T and the last product Q X_0 touch the long side l, so it costs
4 k^2 l + (8 s - 6) k^3 FLOPs against s (4 k^2 l + 2 k^3): fewer when l > 1.5 k (44% fewer for a
Llama MLP matrix, l = 3.5 k, 5 steps), more for square ones. Same polynomial, so the same result
up to rounding; but A_t is carried forward instead of recomputed from X_t, so rounding is not
corrected by the next step (measured and bounded in
tests/strategies/test_megabatch_split_ns_and_gram_plans.py).

The function is pure and deterministic. It works on any batch of matrices (..., m, n), transposes
tall matrices so the Gram matrix X X^T is the small one, normalizes by the Frobenius norm in the
input's precision (so a tiny-norm input does not underflow when cast to bfloat16), and then runs the
iteration in `compute_dtype`. The result is returned in `compute_dtype`; callers decide when to
cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_ortho.core.hparams import check_choice, check_ns_steps

__all__ = [
    "NSConfig",
    "JORDAN_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "newton_schulz",
    "ns_flops",
    "matrix_view_shape",
    "resolve_ns_dtype",
    "ns_dtype_name",
    "step_coefficients",
    "normalized",
    "matmul_add",
    "NS_FORMS",
]

# Keller Jordan's quintic coefficients (https://kellerjordan.github.io/posts/muon/).
JORDAN_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express, 5 steps, safety factor 2e-2 (arXiv:2505.16932; table as used by modded-nanogpt).
# Steps beyond the table reuse its last row, which is the converged polynomial.
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
_POLAR_EXPRESS_SAFETY = 1.0 + 2e-2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
COEFFICIENT_SETS = ("jordan", "polar_express")
NS_FORMS = ("standard", "gram")


@dataclass(frozen=True)
class NSConfig:
    """How to orthogonalize. `dtype` is the compute dtype of the iteration: "float32", "bfloat16",
    "float64", the same as a torch.dtype (stored as its name), or "auto" (the default, as in the
    optimizers): bfloat16 on accelerators, float32 on CPU where bf16 matmul is ~90x slower."""

    steps: int = 5
    dtype: str = "auto"
    coefficients: str = "jordan"
    eps: float = 1e-7
    form: str = "standard"  # "standard" or "gram" (Gram Newton-Schulz; see the module docstring)

    def __post_init__(self) -> None:
        check_ns_steps("ns_steps", self.steps)
        object.__setattr__(self, "dtype", ns_dtype_name(self.dtype))
        check_choice("ns_coefficients", self.coefficients, COEFFICIENT_SETS)
        if not (self.eps > 0 and self.eps < 1):
            raise ValueError(f"ns eps must be in (0, 1), got {self.eps!r}")
        check_choice("ns_form", self.form, NS_FORMS)

    def torch_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        return resolve_ns_dtype(self.dtype, device)


def ns_dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of an NS dtype given as a name or a torch.dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str) and (dtype in _DTYPES or dtype == "auto"):
        return dtype
    raise ValueError(
        f"ns_dtype must be one of {sorted(_DTYPES) + ['auto']} or the matching torch.dtype, "
        f"got {dtype!r}"
    )


def resolve_ns_dtype(name: str | torch.dtype, device: torch.device | str | None) -> torch.dtype:
    """Map a dtype name (or torch.dtype) to a torch dtype; "auto" picks by device type."""
    name = ns_dtype_name(name)
    if name == "auto":
        device_type = torch.device(device).type if device is not None else "cpu"
        return torch.float32 if device_type == "cpu" else torch.bfloat16
    return _DTYPES[name]


def matrix_view_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape Newton-Schulz sees for a parameter of `shape`.

    2-D stays as is, 3-D is a batch of matrices, 4-D conv weights (out, in, kh, kw) become
    (out, in*kh*kw): rows stay output neurons, which keeps the FSDP2 row sharding meaningful.
    """
    shape = tuple(shape)
    if len(shape) in (2, 3):
        return shape
    if len(shape) == 4:
        return (shape[0], shape[1] * shape[2] * shape[3])
    raise ValueError(
        f"Newton-Schulz needs a 2-D, 3-D (stacked) or 4-D (conv) tensor, got shape {shape}"
    )


def ns_flops(shape: tuple[int, ...], steps: int, form: str = "standard") -> int:
    """Matmul FLOPs of `steps` iterations on a (batch of) matrix of `shape` (after
    matrix_view_shape).

    Per step with k = min(m, n), l = max(m, n): X X^T is 2 k^2 l, A A is 2 k^3, B X is 2 k^2 l.
    Gram form: X_0 X_0^T and Q X_0 (2 k^2 l each); per step A A and p(A) Q (2 k^3 each, the
    first p(A) Q is p(A) itself) and, but after the last step, p(A) (p(A) A) (4 k^3).
    torch's FlopCounterMode counts the same (tested).
    """
    view = matrix_view_shape(shape)
    batch = 1
    for d in view[:-2]:
        batch *= d
    m, n = view[-2], view[-1]
    k, l = min(m, n), max(m, n)
    if form == "gram":
        return batch * (4 * k * k * l + (8 * steps - 6) * k * k * k)
    return batch * steps * (4 * k * k * l + 2 * k * k * k)


def step_coefficients(coefficients: str, step: int) -> tuple[float, float, float]:
    """(a, b, c) of iteration `step` (0-based) of a coefficient set."""
    if coefficients == "jordan":
        return JORDAN_COEFFICIENTS
    return POLAR_EXPRESS_COEFFICIENTS[min(step, len(POLAR_EXPRESS_COEFFICIENTS) - 1)]


def normalized(X: torch.Tensor, norm: torch.Tensor, coefficients: str, eps: float) -> torch.Tensor:
    """X scaled by its Frobenius norm `norm` as the iteration starts (Polar Express with its
    safety factor), in X's precision."""
    if coefficients == "polar_express":
        return X / (norm * _POLAR_EXPRESS_SAFETY + eps)
    return X / (norm + eps)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    compute_dtype: torch.dtype = torch.bfloat16,
    coefficients: str = "jordan",
    eps: float = 1e-7,
    form: str = "standard",
) -> torch.Tensor:
    """Approximately orthogonalize each matrix in G (..., m, n); returns `compute_dtype`."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a tensor with >= 2 dims, got shape {tuple(G.shape)}")
    if coefficients not in COEFFICIENT_SETS:
        raise ValueError(f"unknown coefficients {coefficients!r}; use one of {COEFFICIENT_SETS}")
    transpose = G.size(-2) > G.size(-1)
    X = G.mT if transpose else G
    # Normalize before the cast: dividing in the input precision keeps tiny-norm inputs from
    # flushing to zero in bfloat16.
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = normalized(X, norm, coefficients, eps).to(compute_dtype)
    if form == "gram":
        X = _gram_iterations(X, steps, coefficients)
        return X.mT if transpose else X
    for step in range(steps):
        a, b, c = step_coefficients(coefficients, step)
        A = X @ X.mT
        B = matmul_add(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = matmul_add(X, B, X, beta=a)  # a X + B X
    return X.mT if transpose else X


def matmul_add(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, beta: float = 1.0,
               alpha: float = 1.0) -> torch.Tensor:
    """beta C + alpha (A @ B) for (batches of) matrices in one BLAS call (addmm / baddbmm): the
    scaling and the sum ride in the GEMM instead of three element-wise passes over the result
    (8-15% of a float32 NS on CPU). Leading batch dims beyond one are flattened."""
    if C.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    batch = C.shape[:-2]
    out = torch.baddbmm(C.reshape(-1, *C.shape[-2:]), A.reshape(-1, *A.shape[-2:]),
                        B.reshape(-1, *B.shape[-2:]), beta=beta, alpha=alpha)
    return out.reshape(*batch, *out.shape[-2:])


def _gram_iterations(X: torch.Tensor, steps: int, coefficients: str) -> torch.Tensor:
    """The steps of `newton_schulz` on the Gram matrix (module docstring): Q X for the final Q."""
    A = X @ X.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    Q = None
    for step in range(steps):
        a, b, c = step_coefficients(coefficients, step)
        P = matmul_add(b * A + a * eye, A, A, alpha=c)  # a I + b A + c A A
        Q = P if Q is None else P @ Q
        if step + 1 < steps:
            A = P @ (P @ A)
    return Q @ X
