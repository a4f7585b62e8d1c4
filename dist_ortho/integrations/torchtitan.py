"""NorMuon and Muon in torchtitan: an `OptimizersContainer` for its config system.

torchtitan builds its optimizers from `config.optimizer`, an `OptimizersContainer.Config`; the
container turns parameter groups into optimizers through a fixed table of names. This module's
container, `DistOrthoOptimizers` (built on first use, so that dist_ortho imports without
torchtitan), adds the names "NorMuon" and "Muon", and every update rule of `dist_ortho.rules` by
its own name (e.g. "normuon"), built with a dist_ortho strategy, and by default assigns parameters
by role instead of regex groups:

- the split is `dist_ortho.split_model_params`: hidden matrices to NorMuon/Muon; embeddings, the
  output head, norms and biases to torch's AdamW. Parameter names are recorded without wrapper
  segments (`_checkpoint_wrapped_module.`, `_orig_mod.`: torchtitan's `canonical_fqn`), so
  checkpoints do not depend on activation checkpointing or compilation;
- one non-finite verdict for all of a model part's optimizers: the matrix optimizer's one
  all-reduce counts every gradient (AdamW's included) and, when it skips a step, AdamW skips it
  too (`CombinedOptimizer`'s rule);
- `overlapped`: its backward hooks are installed on the FSDP2 model (`overlap_with_backward`).
  Global-norm gradient clipping (torchtitan's `training.max_norm`) rescales gradients after
  those hooks ran, so every clipped step redoes its orthogonalization after backward (exact, but
  the overlap is lost; counted as `overlap.fallbacks`). Train with `max_norm` off, or use
  another strategy, to keep the overlap;
- regex groups still work: give `param_groups` (torchtitan's `ParamGroupConfig`) naming
  "NorMuon", "Muon", an update rule, "AdamW" or "Adam" and those are used instead of the role
  split.

Checkpoints: torchtitan's checkpointer saves the container's flat, name-keyed state (each inner
optimizer's state by parameter name), so it reshards through DCP like torchtitan's own optimizers.
torch's `get_optimizer_state_dict(model, container.optimizers)` works on the inner optimizers.
Pipeline parallelism (several model parts): each part's optimizers share one verdict.

`optimizers_config(name="NorMuon", strategy="balanced", lr=..., adamw_lr=..., ...)` returns the
container's Config; set it as `config.optimizer` in a torchtitan config function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dist_ortho import rules as rule_registry
from dist_ortho.optim.optimizer import Muon, NorMuon, OrthogonalizedOptimizer
from dist_ortho.optim.param_groups import CombinedOptimizer, SplitConfig, split_model_params
from dist_ortho.strategies import registry as strategy_registry

__all__ = ["optimizers_config", "container_class", "MATRIX_OPTIMIZERS"]

MATRIX_OPTIMIZERS = {"NorMuon": NorMuon, "Muon": Muon}  # torchtitan's names are class names

_GROUP_KEYS_NOT_OURS = ("fused", "foreach")  # torchtitan's AdamW implementation switches
CLIPPING_NOTE = ("global-norm gradient clipping rescales gradients after the backward hooks ran: "
                 "strategy 'overlapped' then redoes its orthogonalization after backward on "
                 "every clipped step (exact; counted as overlap fallbacks)")


def _matrix_class(name: str):
    """The optimizer of a matrix-optimizer name: NorMuon/Muon by class name, any update rule by
    its own name (an OrthogonalizedOptimizer with that rule); None for other names."""
    if name in MATRIX_OPTIMIZERS:
        return MATRIX_OPTIMIZERS[name]
    if name in rule_registry.available():
        return functools.partial(OrthogonalizedOptimizer, rule=name)
    return None


def _matrix_factory(cls, param_groups: list[dict], *, strategy: str = "balanced",
                    strategy_options: dict | None = None, **kwargs) -> OrthogonalizedOptimizer:
    """NorMuon/Muon from torchtitan's group dicts (each with params and param_names)."""
    groups = [{k: v for k, v in g.items() if k not in _GROUP_KEYS_NOT_OURS} for g in param_groups]
    built = strategy_registry.build(strategy, **(strategy_options or {}))
    return cls(groups, strategy=built, **kwargs)


def _attach(container, model_parts) -> None:
    """One verdict per model part (CombinedOptimizer over its optimizers) and the backward hooks
    of `overlapped`."""
    container._combined = []
    start = 0
    for model, count in zip(model_parts, container._per_part):
        opts = container.optimizers[start:start + count]
        start += count
        leader = next((o for o in opts if isinstance(o, OrthogonalizedOptimizer)), None)
        if leader is not None and leader.strategy.follows_backward and \
                any(isinstance(m, FSDPModule) for m in model.modules()):
            leader.overlap_with_backward(model)
        container._combined.append(CombinedOptimizer(
            opts, nonfinite=leader.nonfinite if leader is not None else "skip"))


@functools.cache
def container_class():
    """`DistOrthoOptimizers`, the torchtitan container (imports torchtitan)."""
    # torchtitan is an optional dependency: imported when its container is first asked for
    try:
        from torchtitan.components.checkpointer.utils import canonical_fqn
        from torchtitan.components.optimizer import OptimizersContainer
    except ImportError as e:
        raise ImportError(f"dist_ortho.integrations.torchtitan needs torchtitan ({e}); install "
                          f"the extra: pip install 'dist-ortho[torchtitan]'") from e

    class DistOrthoOptimizers(OptimizersContainer):
        """torchtitan's OptimizersContainer with NorMuon/Muon (see the module docstring)."""

        @dataclass(kw_only=True, slots=True)
        class Config(OptimizersContainer.Config):
            name: str = "NorMuon"
            """The matrix optimizer: "NorMuon", "Muon" or an update rule's name."""
            strategy: str = "balanced"
            """A name from dist_ortho.strategies.available()."""
            strategy_options: dict[str, Any] = field(default_factory=dict)
            lr: float = 0.02
            momentum: float = 0.95
            beta2: float = 0.95
            """NorMuon's second-moment decay (ignored by Muon)."""
            rule_hparams: dict[str, Any] = field(default_factory=dict)
            """The update rule's own hyperparameters other than beta2."""
            weight_decay: float = 0.0
            nesterov: bool = True
            ns_steps: int = 5
            ns_dtype: str = "auto"
            ns_coefficients: str = "jordan"
            ns_form: str = "standard"
            replicas: str = "spread"
            nonfinite: str = "skip"
            adamw_lr: float = 8e-4
            adamw_betas: tuple[float, float] = (0.9, 0.95)
            adamw_eps: float = 1e-8
            adamw_weight_decay: float = 0.1
            adamw_patterns: tuple[str, ...] = SplitConfig().adamw_patterns
            matrix_patterns: tuple[str, ...] = ()
            implementation: str = "foreach"

        @staticmethod
        def _resolve_optimizer_factory(name: str):
            if _matrix_class(name) is not None:
                return functools.partial(_matrix_factory, _matrix_class(name))
            return OptimizersContainer._resolve_optimizer_factory(name)

        def __init__(self, config, *, model_parts: list[nn.Module]) -> None:
            _check(config)
            if config.param_groups:  # the user's regex groups
                super().__init__(config, model_parts=model_parts)
                # torchtitan builds each part's optimizers in turn: count them by their part
                part_of = {id(p): k for k, m in enumerate(model_parts) for p in m.parameters()}
                firsts = [part_of[id(o.param_groups[0]["params"][0])] for o in self.optimizers]
                self._per_part = [firsts.count(k) for k in range(len(model_parts))]
            else:
                self._build_by_role(config, model_parts)
            _attach(self, model_parts)

        def _build_by_role(self, config, model_parts) -> None:
            impl = self._build_impl_kwargs(config)
            self.optimizers, self.model_parts, self._per_part = [], model_parts, []
            self.assignment: dict[str, str] = {}
            split = SplitConfig(adamw_patterns=tuple(config.adamw_patterns),
                                matrix_patterns=tuple(config.matrix_patterns))
            all_params = []
            for part, model in enumerate(model_parts):
                matrices, others = split_model_params(model, split)
                built = []
                if matrices:
                    beta2 = ({"beta2": config.beta2} if "beta2" in _rule_of(config.name).defaults
                             else {})
                    rule = {**beta2, **config.rule_hparams}
                    built.append(self._resolve_optimizer_factory(config.name)(
                        [{"params": [p for _, p in matrices],
                          "param_names": [canonical_fqn(n) for n, _ in matrices]}],
                        strategy=config.strategy, strategy_options=config.strategy_options,
                        lr=config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay, nesterov=config.nesterov,
                        ns_steps=config.ns_steps, ns_dtype=config.ns_dtype,
                        ns_coefficients=config.ns_coefficients, ns_form=config.ns_form,
                        replicas=config.replicas,
                        nonfinite=config.nonfinite, **rule))
                if others:
                    built.append(torch.optim.AdamW(
                        [{"params": [p for _, p in others],
                          "param_names": [canonical_fqn(n) for n, _ in others]}],
                        lr=config.adamw_lr, betas=tuple(config.adamw_betas),
                        eps=config.adamw_eps, weight_decay=config.adamw_weight_decay, **impl))
                for opt in built:
                    self._log_optimizer(opt, part, ["(role)"] * len(opt.param_groups))
                self.optimizers += built
                self._per_part.append(len(built))
                self.assignment.update({canonical_fqn(n): config.name for n, _ in matrices})
                self.assignment.update({canonical_fqn(n): "AdamW" for n, _ in others})
                all_params += [p for _, p in matrices + others]
            self._validate_params(all_params)
            self._post_init(all_params)

        def step(self, closure=None):
            assert closure is None, "DistOrthoOptimizers does not support closures"
            for combined in self._combined:
                combined.step()
            return None

        @property
        def skipped_steps(self) -> int:
            """Steps skipped for a NaN/Inf gradient (all optimizers of a part skip together)."""
            return max((c.skipped_steps for c in self._combined), default=0)

        def describe(self) -> str:
            """Which optimizer each parameter went to; the clipping note for `overlapped`."""
            lines = [f"{name} -> {dest}" for name, dest in getattr(self, "assignment", {}).items()]
            if any(c.strategy.follows_backward for c in self._combined):
                lines.append(f"note: {CLIPPING_NOTE}")
            return "\n".join(lines)

    DistOrthoOptimizers.__module__ = __name__
    DistOrthoOptimizers.__qualname__ = "DistOrthoOptimizers"
    DistOrthoOptimizers.Config.__qualname__ = "DistOrthoOptimizers.Config"
    return DistOrthoOptimizers


def _rule_of(name: str):
    """The update rule of a matrix-optimizer name ("NorMuon" -> the normuon rule)."""
    cls = MATRIX_OPTIMIZERS.get(name)
    return rule_registry.get(cls.rule_name if cls is not None else name)


def _check(config) -> None:
    """ValueError naming the field, before any optimizer (or collective) is made."""
    if _matrix_class(config.name) is None:
        raise ValueError(f"optimizer.name must be one of "
                         f"{sorted(MATRIX_OPTIMIZERS) + rule_registry.available()}, got "
                         f"{config.name!r}")
    if config.strategy not in strategy_registry.available():
        raise ValueError(f"optimizer.strategy must be one of {strategy_registry.available()}, "
                         f"got {config.strategy!r}")


def optimizers_config(name: str = "NorMuon", strategy: str = "balanced", **fields):
    """`DistOrthoOptimizers.Config` for `config.optimizer` in a torchtitan config function;
    `fields` are the Config's (lr, adamw_lr, strategy_options, replicas, ...)."""
    config = container_class().Config(name=name, strategy=strategy, **fields)
    _check(config)
    return config


def __getattr__(name: str):
    if name == "DistOrthoOptimizers":
        return container_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
