"""Mixture-of-experts models with fused expert stacks, as MoE checkpoints store them.

Each MoE layer keeps its experts in two 3-D parameters: `gate_up_proj` (E, 2I, H) (the gate and
up projections of every expert, fused) and `down_proj` (E, H, I). An orthogonalizing optimizer
treats a stack as E matrices, one per expert; on an expert-parallel axis the stacks are split
on dim 0, so an expert is whole on one rank and is orthogonalized there with no traffic.

- `MOE_SHAPE_PRESETS` / `moe_matrix_shapes`: shape-only models for the cost model
  (`dist-ortho project --model moe-large --mesh ep=8,dp=16`), attention as in Llama (q, k, v, o
  2-D) plus the router and the two stacks per layer.
- `TinyMoE`: a trainable small model (token embedding, pre-norm blocks of attention-free
  mixing + a soft-routed MoE MLP, output head) for CPU tests: every expert runs on every token,
  weighted by the router's softmax, so training is deterministic (no capacity, no dropping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoEShapeConfig", "MOE_SHAPE_PRESETS", "moe_matrix_shapes", "TinyMoE", "MoEMLP"]


@dataclass(frozen=True)
class MoEShapeConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    n_experts: int
    expert_intermediate: int


MOE_SHAPE_PRESETS: dict[str, MoEShapeConfig] = {
    # about DeepSeek-MoE-16B / Qwen1.5-MoE-A2.7B sizes: 64 fine-grained experts per layer
    "moe-large": MoEShapeConfig(n_layers=28, hidden=2048, n_heads=16, n_kv_heads=16,
                                n_experts=64, expert_intermediate=1408),
    "moe-tiny": MoEShapeConfig(n_layers=2, hidden=64, n_heads=4, n_kv_heads=4, n_experts=4,
                               expert_intermediate=32),
}


def moe_matrix_shapes(preset: str, num_layers: int | None = None
                      ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every matrix and expert stack, in named_parameters order."""
    if preset not in MOE_SHAPE_PRESETS:
        raise ValueError(f"unknown MoE preset {preset!r}; available: "
                         f"{', '.join(sorted(MOE_SHAPE_PRESETS))}")
    c = MOE_SHAPE_PRESETS[preset]
    layers = c.n_layers if num_layers is None else num_layers
    if layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {layers}")
    head = c.hidden // c.n_heads
    out = []
    for i in range(layers):
        p = f"layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (c.hidden, c.hidden)),
                (f"{p}.self_attn.k_proj.weight", (c.n_kv_heads * head, c.hidden)),
                (f"{p}.self_attn.v_proj.weight", (c.n_kv_heads * head, c.hidden)),
                (f"{p}.self_attn.o_proj.weight", (c.hidden, c.hidden)),
                (f"{p}.mlp.router.weight", (c.n_experts, c.hidden)),
                (f"{p}.mlp.experts.gate_up_proj",
                 (c.n_experts, 2 * c.expert_intermediate, c.hidden)),
                (f"{p}.mlp.experts.down_proj",
                 (c.n_experts, c.hidden, c.expert_intermediate))]
    return out


class MoEMLP(nn.Module):
    """Soft-routed experts: out = sum_e softmax(router(x))_e * down_e(silu(gate_e x) * up_e x)."""

    def __init__(self, hidden: int, intermediate: int, n_experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * intermediate, hidden) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(n_experts, hidden, intermediate) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.router(x), dim=-1)  # (..., E)
        gate, up = torch.einsum("...h,eih->...ei", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("...ei,ehi->...eh", F.silu(gate) * up, self.down_proj)
        return torch.einsum("...e,...eh->...h", weights, out)


class TinyMoE(nn.Module):
    """Embedding, `n_layers` residual MoE blocks (RMSNorm + MoEMLP), RMSNorm, output head."""

    def __init__(self, vocab: int = 256, hidden: int = 32, intermediate: int = 16,
                 n_experts: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(n_layers))
        self.blocks = nn.ModuleList(MoEMLP(hidden, intermediate, n_experts)
                                    for _ in range(n_layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.tok_emb(tokens)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        logits = self.lm_head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss
