"""A small GPT-style decoder-only language model.

The model is deliberately plain: token embedding, a stack of pre-norm
transformer blocks, a final RMSNorm and an output projection (``lm_head``).
Positions are encoded with rotary embeddings (RoPE) applied to queries and
keys inside attention, so there are no positional parameters at all. That
keeps the parameter set to "embeddings + 2-D matrices + norm gains", which is
exactly the split an orthogonalizing optimizer such as NorMuon cares about:
the 2-D hidden matrices get orthogonalized updates, the rest get AdamW.

Two knobs matter for optimizer experiments:

* ``fused_qkv``: one ``qkv_proj`` matrix of shape (3*d_model, d_model) instead
  of separate ``q_proj``/``k_proj``/``v_proj``. An orthogonalizing optimizer
  treats the fused matrix as one matrix, which is a different update than
  orthogonalizing the three projections separately.
* ``tie_embeddings``: share ``lm_head.weight`` with ``tok_emb.weight``.
  Off by default; FSDP2 sharding is simplest with untied weights.

Each transformer block is its own ``nn.Module`` in ``model.blocks`` so that
FSDP2's ``fully_shard`` can wrap one block at a time.

Initialization (``GPT.reset_parameters``) follows GPT-2: every Linear and the
embedding are drawn from N(0, 0.02^2); the projections that write back into
the residual stream (``o_proj`` and ``fc_out``) use std 0.02/sqrt(2*n_layers)
so the residual stream's variance does not grow with depth; RMSNorm gains are
ones. Draws come from torch's global RNG, so ``torch.manual_seed`` makes
initialization reproducible. Construction on the ``meta`` device skips
initialization; call ``model.to_empty(device=...)`` and then
``model.reset_parameters()`` to materialize it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "GPT_PRESETS", "Block", "CausalSelfAttention", "MLP"]

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a :class:`GPT`.

    ``seq_len`` is the longest sequence the model accepts; RoPE itself has
    no maximum, but the training loop and data loader use it as the context
    length, and rejecting longer inputs catches mismatched configs early.
    ``mlp_ratio`` sets the MLP hidden width as ``int(mlp_ratio * d_model)``.
    """

    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    fused_qkv: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that cannot work."""
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}); pick n_heads that divides d_model"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig head_dim = d_model/n_heads = {self.head_dim} must be even "
                "for rotary embeddings; change d_model or n_heads"
            )
        if not self.mlp_ratio > 0 or self.mlp_hidden < 1:
            raise ValueError(f"GPTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Small presets use a byte vocabulary (256) because the bundled corpus is bytes.
GPT_PRESETS: dict[str, GPTConfig] = {
    # Fast enough for unit tests: a forward+backward is a few milliseconds.
    "gpt-tiny": GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=2, n_heads=4),
    "gpt-mini": GPTConfig(vocab_size=256, seq_len=128, d_model=128, n_layers=4, n_heads=4),
    # About 4.85M parameters: small enough for CPU training runs.
    "gpt-small": GPTConfig(vocab_size=256, seq_len=256, d_model=256, n_layers=6, n_heads=8),
    # GPT-2 small shapes (vocab padded to 50304 for matmul-friendly sizes). With
    # an untied lm_head this is ~163M parameters rather than GPT-2's tied 124M.
    "gpt-125m": GPTConfig(vocab_size=50304, seq_len=1024, d_model=768, n_layers=12, n_heads=12),
}


def _rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed per forward instead of cached in a buffer: it is tiny, and a
    # buffer would be garbage after meta-device construction + to_empty().
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, head_dim). Rotates interleaved pairs (x[2i], x[2i+1]); the
    # math runs in float32 so low-precision inputs do not lose the phase.
    x_f = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x_f[..., 0], x_f[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.fused_qkv = config.fused_qkv
        d = config.d_model
        if config.fused_qkv:
            self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, d, bias=False)
            self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if self.fused_qkv:
            q, k, v = self.qkv_proj(x).split(C, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = _rotary_cos_sin(T, self.head_dim, self.rope_theta, x.device)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.fc_out = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer; see the module docstring for the design."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # Build on meta, then materialize on the caller's device: submodule
        # default inits would otherwise consume RNG draws, making eager
        # construction disagree with meta + to_empty + reset_parameters.
        target = torch.get_default_device()
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialize every parameter from torch's global RNG.

        Safe to call after ``to_empty()``. Modules are visited in a fixed
        order, so the same seed gives the same weights. ``to_empty()``
        unties shared weights, so with ``tie_embeddings`` the tie is restored
        here (before any FSDP2 sharding; tying sharded weights is unsupported).
        """
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=INIT_STD)
        for block in self.blocks:
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    is_residual_out = name.endswith(("o_proj", "fc_out"))
                    nn.init.normal_(module.weight, 0.0, out_std if is_residual_out else INIT_STD)
                elif isinstance(module, nn.RMSNorm):
                    nn.init.ones_(module.weight)
        nn.init.ones_(self.norm.weight)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=INIT_STD)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits of shape (B, T, vocab), or (logits, mean CE loss)."""
        if idx.dim() != 2:
            raise ValueError(f"GPT expects idx of shape (batch, seq), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds GPTConfig.seq_len="
                f"{self.config.seq_len}; use shorter inputs or raise seq_len"
            )
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        # Loss in float32 so bf16 logits do not bias the log-softmax.
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss
