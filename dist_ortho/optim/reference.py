"""Single-process reference NorMuon and Muon: the test oracle for every distributed strategy.

This is the update of the NorMuon paper's official normuon.py (arXiv:2510.05491), written for one
full, unsharded parameter at a time, as plainly as possible. Everything faster in this project must
produce the same numbers as these few lines.

Per matrix W (m x n, m = output rows = neurons), gradient G, momentum M, row second moment v (m):
    M <- lerp(M, G, 1 - beta1);  U = lerp(G, M, beta1) if nesterov else M
    O = NS(U) cast to float32            (4-D conv: view (out, -1); 3-D: batch of matrices)
    f = ||O||_F;  v <- lerp(v, mean_cols(O*O), 1 - beta2)
    O = O / (sqrt(v) + 1e-10);  O = O * f / (||O||_F + 1e-10);  O = O * max(1, m/n) ** 0.5
    W <- W * (1 - lr * wd) - lr * O

Muon is the same without the v, f lines. One documented departure from the official code: for 4-D
conv weights the official code takes m/n from the 4-D gradient's last two dims (kh/kw); here m, n
are the dims of the (out, in*kh*kw) matrix that Newton-Schulz actually sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dist_ortho.core.newton_schulz import NSConfig, matrix_view_shape, newton_schulz

__all__ = [
    "ReferenceHParams",
    "ROW_EPS",
    "NORM_EPS",
    "momentum_direction",
    "orthogonalize",
    "shape_scale",
    "normuon_update",
    "normuon_normalize",
    "muon_update",
    "reference_step",
]

ROW_EPS = 1e-10  # added to sqrt(v) before dividing the rows
NORM_EPS = 1e-10  # added to ||O_hat||_F before restoring the pre-normalization norm


@dataclass(frozen=True)
class ReferenceHParams:
    lr: float = 0.02
    momentum: float = 0.95
    beta2: float = 0.95
    weight_decay: float = 0.0
    nesterov: bool = True
    ns: NSConfig = field(default_factory=NSConfig)


def momentum_direction(grad: torch.Tensor, momentum_buf: torch.Tensor, beta1: float,
                       nesterov: bool) -> torch.Tensor:
    """Update the momentum in place and return what gets orthogonalized."""
    momentum_buf.lerp_(grad, 1 - beta1)
    return torch.lerp(grad, momentum_buf, beta1) if nesterov else momentum_buf


def orthogonalize(U: torch.Tensor, ns: NSConfig) -> torch.Tensor:
    """NS(U) on the matrix view of U, returned in the NS compute dtype and U's own shape."""
    view = matrix_view_shape(U.shape)
    O = newton_schulz(U.reshape(view), ns.steps, ns.torch_dtype(U.device), ns.coefficients, ns.eps)
    return O.reshape(U.shape)


def shape_scale(shape: tuple[int, ...]) -> float:
    """max(1, m/n) ** 0.5 of the matrix view: keeps the update RMS of tall matrices comparable."""
    view = matrix_view_shape(shape)
    return max(1.0, view[-2] / view[-1]) ** 0.5


def normuon_update(grad: torch.Tensor, momentum_buf: torch.Tensor, v: torch.Tensor,
                   hp: ReferenceHParams) -> torch.Tensor:
    """The NorMuon update for one full parameter; updates momentum_buf and v in place."""
    U = momentum_direction(grad, momentum_buf, hp.momentum, hp.nesterov)
    return normuon_normalize(orthogonalize(U, hp.ns), v, hp)


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, hp: ReferenceHParams) -> torch.Tensor:
    """NorMuon's update from O = NS(U) of one full parameter (shaped like it); updates v."""
    shape = O.shape
    O = O.float().reshape(matrix_view_shape(shape))
    f = O.norm(dim=(-2, -1), keepdim=True)
    v.lerp_(O.square().mean(dim=-1), 1 - hp.beta2)
    O = O / (v.sqrt().unsqueeze(-1) + ROW_EPS)
    O = O * (f / (O.norm(dim=(-2, -1), keepdim=True) + NORM_EPS))
    return (O * shape_scale(shape)).reshape(shape)


def muon_update(grad: torch.Tensor, momentum_buf: torch.Tensor,
                hp: ReferenceHParams) -> torch.Tensor:
    U = momentum_direction(grad, momentum_buf, hp.momentum, hp.nesterov)
    return orthogonalize(U, hp.ns).float() * shape_scale(grad.shape)


def reference_step(params: list[torch.Tensor], grads: list[torch.Tensor], state: dict,
                   hp: ReferenceHParams, rule: str = "normuon") -> None:
    """One optimizer step over full tensors. `state` maps index -> dict of buffers (created
    here)."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            s = state.setdefault(i, {})
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = torch.zeros_like(p)
                if rule == "normuon":
                    s["v"] = torch.zeros(matrix_view_shape(p.shape)[:-1], dtype=torch.float32,
                                         device=p.device)
            if rule == "normuon":
                update = normuon_update(g, s["momentum_buffer"], s["v"], hp)
            elif rule == "muon":
                update = muon_update(g, s["momentum_buffer"], hp)
            else:
                raise ValueError(f"unknown rule {rule!r}; use 'normuon' or 'muon'")
            p.mul_(1 - hp.lr * hp.weight_decay)
            p.add_(update.to(p.dtype), alpha=-hp.lr)
