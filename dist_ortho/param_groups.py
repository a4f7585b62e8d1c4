"""Split a model's parameters the usual Muon way, and step several optimizers as one.

Hidden matrices (2-D and up, inside the network) go to NorMuon/Muon. Embeddings, the output head,
norms and biases go to torch's own AdamW: orthogonalizing an embedding table or a head treats
vocabulary rows as neurons, which the Muon and NorMuon papers both avoid. The choice is by name
pattern and overridable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dist_ortho.schema import ConfigError, at_least, nonnegative, positive, unit

__all__ = ["SplitConfig", "split_params", "CombinedOptimizer", "build_optimizers"]


@dataclass(frozen=True)
class SplitConfig:
    """`adamw_patterns`: fnmatch patterns of names that go to AdamW even when 2-D+ (embeddings and
    heads by default). `matrix_patterns`: names forced to the matrix optimizer (checked first)."""

    adamw_patterns: tuple[str, ...] = ("*emb*", "*embedding*", "*lm_head*", "*head.*", "*wte*",
                                       "*wpe*", "*output.weight")
    matrix_patterns: tuple[str, ...] = ()


def split_params(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 config: SplitConfig | None = None
                 ) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(matrix params, adamw params), each a list of (name, param), trainable params only."""
    config = config or SplitConfig()
    matrices, others = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        forced = any(fnmatch.fnmatch(name, pat) for pat in config.matrix_patterns)
        if forced and p.ndim < 2:
            raise ValueError(f"parameter {name!r} matches matrix_patterns but has shape "
                             f"{tuple(p.shape)}; only 2-D+ parameters can be orthogonalized")
        excluded = any(fnmatch.fnmatch(name, pat) for pat in config.adamw_patterns)
        (matrices if forced or (p.ndim >= 2 and not excluded) else others).append((name, p))
    return matrices, others


class CombinedOptimizer:
    """Steps several optimizers as one (e.g. NorMuon for matrices + AdamW for the rest), all or
    none: a NaN/Inf gradient anywhere, on any rank, skips (or raises, `nonfinite`) the whole step,
    so AdamW's weights and moments never see what NorMuon refused. The matrix optimizer's one
    all-reduce decides for everybody; without one, a check of its own does (same cost)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], nonfinite: str = "skip",
                 process_group=None) -> None:
        from dist_ortho.optimizer import NONFINITE_POLICIES

        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.optimizers = list(optimizers)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.skipped_steps = 0
        self.last_step_skipped = False

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from dist_ortho.optimizer import _Orthogonalized, count_nonfinite, handle_nonfinite

        leader = next((o for o in self.optimizers if isinstance(o, _Orthogonalized)), None)
        others = [o for o in self.optimizers if o is not leader]
        companion = [p.grad for o in others if not isinstance(o, _Orthogonalized)
                     for g in o.param_groups for p in g["params"] if p.grad is not None]
        self.last_step_skipped = False
        if leader is not None:
            leader.step(companion_grads=companion)
            skipped = leader.last_step_skipped
        else:
            skipped = self._check_alone(companion, count_nonfinite, handle_nonfinite)
        if skipped:
            self.skipped_steps += 1
            self.last_step_skipped = True
            return loss
        for opt in others:
            opt.step()
        return loss

    def _check_alone(self, grads, count_nonfinite, handle_nonfinite) -> bool:
        import torch.distributed as dist

        from dist_ortho.sharding import local_tensor

        if not grads:
            return False
        group = self.process_group if self.process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        bad = count_nonfinite([local_tensor(g) for g in grads], group, world,
                              local_tensor(grads[0]).device)
        if bad:
            handle_nonfinite(bad, self.nonfinite, type(self).__name__)
        return bool(bad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state dict holds {len(states)} optimizers, this has "
                             f"{len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


@dataclass
class OptimizerConfig:
    """What `build_optimizers` needs. `name`: the matrix optimizer, normuon | muon | adamw."""

    name: str = "normuon"
    lr: float = 0.02
    momentum: float = 0.95
    beta2: float = 0.95
    weight_decay: float = 0.0
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "auto"
    ns_coefficients: str = "jordan"
    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = 0.0
    split: SplitConfig = field(default_factory=SplitConfig)
    # a NaN/Inf gradient on any rank: "skip" the step on every rank, or "raise"
    nonfinite: str = "skip"

    def check(self, key: str = "optimizer") -> None:
        """Raise ConfigError naming the first bad field (`key` is this section's dotted path);
        called by dist_ortho.schema.build when a config is loaded."""
        for name, choices in (("name", ("normuon", "muon", "adamw")),
                              ("ns_dtype", ("auto", "float32", "bfloat16")),
                              ("ns_coefficients", ("jordan", "polar_express")),
                              ("nonfinite", ("skip", "raise"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{key}.{name}", f"must be one of {', '.join(choices)}, got "
                                                   f"{getattr(self, name)!r}")
        positive(f"{key}.lr", self.lr)
        unit(f"{key}.momentum", self.momentum)
        unit(f"{key}.beta2", self.beta2)
        nonnegative(f"{key}.weight_decay", self.weight_decay)
        at_least(f"{key}.ns_steps", self.ns_steps, 1)
        positive(f"{key}.adamw_lr", self.adamw_lr)
        for i, beta in enumerate(self.adamw_betas):
            unit(f"{key}.adamw_betas[{i}]", beta)
        nonnegative(f"{key}.adamw_weight_decay", self.adamw_weight_decay)


def build_optimizers(model: torch.nn.Module, config: OptimizerConfig | None = None,
                     strategy="replicated", **optimizer_kwargs) -> CombinedOptimizer:
    """Matrix optimizer (NorMuon/Muon, or AdamW as a baseline) + AdamW for the rest."""
    from dist_ortho.optimizer import Muon, NorMuon

    config = config or OptimizerConfig()
    optimizer_kwargs.setdefault("nonfinite", config.nonfinite)
    matrices, others = split_params(model.named_parameters(), config.split)
    opts: list[torch.optim.Optimizer] = []
    common = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                  nesterov=config.nesterov, ns_steps=config.ns_steps, ns_dtype=config.ns_dtype,
                  ns_coefficients=config.ns_coefficients, strategy=strategy, **optimizer_kwargs)
    if config.name == "adamw":
        others = matrices + others
        matrices = []
    elif config.name not in ("normuon", "muon"):
        raise ValueError(f"optimizer name must be normuon, muon or adamw, got {config.name!r}")
    if matrices:
        if config.name == "normuon":
            opts.append(NorMuon(matrices, beta2=config.beta2, **common))
        else:
            opts.append(Muon(matrices, **common))
    if others:
        opts.append(torch.optim.AdamW([p for _, p in others], lr=config.adamw_lr,
                                      betas=config.adamw_betas,
                                      weight_decay=config.adamw_weight_decay))
    return CombinedOptimizer(opts, nonfinite=optimizer_kwargs.get("nonfinite", "skip"),
                             process_group=optimizer_kwargs.get("process_group"))
