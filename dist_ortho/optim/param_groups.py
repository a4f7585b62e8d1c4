"""Split a model's parameters the usual Muon way, and step several optimizers as one.

Hidden matrices (2-D and up, inside the network) go to NorMuon/Muon. Embeddings, the output head,
norms and biases go to torch's own AdamW: orthogonalizing an embedding table or a head treats
vocabulary rows as neurons, which the Muon and NorMuon papers both avoid.

`split_model_params(model)` decides by role first: parameters of `nn.Embedding`/`nn.EmbeddingBag`
modules are embeddings; the output head is `model.get_output_embeddings()` where the model has it
(Hugging Face models), else the model's last `nn.Linear` projecting to a vocabulary size of one of
its embeddings, else (no embeddings: a generic network) its last `nn.Linear`, the output layer.
Tied weights are one parameter and are listed once. Name patterns (`SplitConfig`) are overrides:
`matrix_patterns` force a parameter to the matrix optimizer, `adamw_patterns` to AdamW. Models
without such modules (e.g. the shape-only benchmark models) are split by shape and name alone.
`split_params(named_params)` is the name-only form.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dist_ortho import rules as rule_registry
from dist_ortho.core.hparams import (check_beta, check_choice, check_lr, check_ns_steps,
                                     check_weight_decay)
from dist_ortho.core.newton_schulz import COEFFICIENT_SETS, NS_FORMS, ns_dtype_name
from dist_ortho.core.schema import ConfigError
from dist_ortho.core.sharding import local_tensor
from dist_ortho.optim.optimizer import (NONFINITE_POLICIES, OrthogonalizedOptimizer,
                                        count_nonfinite, handle_nonfinite)
from dist_ortho.strategies.mesh import REPLICA_MODES

__all__ = ["SplitConfig", "split_params", "split_model_params", "assign_params",
           "CombinedOptimizer", "OptimizerConfig", "build_optimizers", "ADAMW_BASELINE"]


@dataclass(frozen=True)
class SplitConfig:
    """`adamw_patterns`: fnmatch patterns of names that go to AdamW even when 2-D+ (embeddings and
    heads by default). `matrix_patterns`: names forced to the matrix optimizer (checked first)."""

    adamw_patterns: tuple[str, ...] = ("*emb*", "*embedding*", "*lm_head*", "*head.*", "*wte*",
                                       "*wpe*", "*output.weight")
    matrix_patterns: tuple[str, ...] = ()


MATRIX, ADAMW = "matrix", "adamw"


def _roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> "embedding" or "output head", from module types (see the module doc)."""
    roles: dict[int, str] = {}
    embeddings = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    for m in embeddings:
        for p in m.parameters(recurse=False):
            roles.setdefault(id(p), "embedding")
    head = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        vocab = {m.num_embeddings for m in embeddings}
        if vocab:
            linears = [m for m in linears if m.out_features in vocab]
        head = linears[-1] if linears else None
    if head is not None:
        for p in head.parameters(recurse=False):
            roles.setdefault(id(p), "output head")  # a tied head weight is the embedding's
    return roles


def assign_params(named_params: Iterable[tuple[str, nn.Parameter]],
                  config: SplitConfig | None = None, roles: dict[int, str] | None = None
                  ) -> list[tuple[str, nn.Parameter, str, str]]:
    """(name, param, MATRIX or ADAMW, reason) for each trainable parameter, in order."""
    config = config or SplitConfig()
    roles = roles or {}
    out = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        forced = next((pat for pat in config.matrix_patterns if fnmatch.fnmatch(name, pat)), None)
        if forced is not None:
            if p.ndim < 2:
                raise ValueError(f"parameter {name!r} matches matrix_patterns but has shape "
                                 f"{tuple(p.shape)}; only 2-D+ parameters can be orthogonalized")
            out.append((name, p, MATRIX, f"matrix_patterns {forced!r}"))
            continue
        excluded = next((pat for pat in config.adamw_patterns if fnmatch.fnmatch(name, pat)), None)
        if p.ndim < 2:
            out.append((name, p, ADAMW, f"{p.ndim}-D"))
        elif id(p) in roles:  # the role first, so the reason names it even where a pattern agrees
            out.append((name, p, ADAMW, roles[id(p)]))
        elif excluded is not None:
            out.append((name, p, ADAMW, f"adamw_patterns {excluded!r}"))
        else:
            out.append((name, p, MATRIX, "hidden matrix"))
    return out


def split_params(named_params: Iterable[tuple[str, nn.Parameter]],
                 config: SplitConfig | None = None
                 ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(matrix params, adamw params), each a list of (name, param), trainable params only, by
    shape and name patterns alone (see `split_model_params` for the role-aware split)."""
    rows = assign_params(named_params, config)
    return ([(n, p) for n, p, dest, _ in rows if dest == MATRIX],
            [(n, p) for n, p, dest, _ in rows if dest == ADAMW])


def split_model_params(model: nn.Module, config: SplitConfig | None = None
                       ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(matrix params, adamw params) of `model`: by role (embeddings, output head), shape and name
    patterns (overrides); see the module docstring."""
    rows = assign_params(model.named_parameters(), config, _roles(model))
    return ([(n, p) for n, p, dest, _ in rows if dest == MATRIX],
            [(n, p) for n, p, dest, _ in rows if dest == ADAMW])


class _MergedState(Mapping):
    """The inner optimizers' state dicts as one mapping, without touching them (their state is a
    defaultdict, which a plain lookup would grow)."""

    def __init__(self, optimizers) -> None:
        self._states = [opt.state for opt in optimizers]

    def __getitem__(self, param):
        for state in self._states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator:
        return (p for state in self._states for p in state)

    def __len__(self) -> int:
        return sum(len(state) for state in self._states)


class CombinedOptimizer(torch.optim.Optimizer):
    """Steps several optimizers as one (e.g. NorMuon for matrices + AdamW for the rest), all or
    none: a NaN/Inf gradient anywhere, on any rank, skips (or raises, `nonfinite`) the whole step,
    so AdamW's weights and moments never see what NorMuon refused. The matrix optimizer's one
    all-reduce decides for everybody; without one, a check of its own does (same cost).

    It is a `torch.optim.Optimizer` whose `param_groups` are the inner optimizers' group dicts
    themselves (shared by reference, recomputed on access so that an inner `load_state_dict` is
    followed), so `torch.optim.lr_scheduler` schedulers drive every inner optimizer's lr.
    `assignment` (set by `build_optimizers`): parameter name -> the optimizer it went to."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], nonfinite: str = "skip",
                 process_group=None) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        if nonfinite not in NONFINITE_POLICIES or nonfinite == "mask":
            # "mask" keeps the verdict on the device, where torch's AdamW cannot obey it
            raise ValueError(f"CombinedOptimizer's nonfinite must be 'skip' or 'raise', got "
                             f"{nonfinite!r}; nonfinite='mask' is for a NorMuon/Muon stepped alone")
        self.optimizers = list(optimizers)
        self.nonfinite = nonfinite
        self.process_group = process_group
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.assignment: dict[str, str] = {}
        self._reasons: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], {})

    # torch.optim.Optimizer's constructor assigns these; the inner optimizers own the real ones
    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        if value:
            raise AttributeError("CombinedOptimizer.param_groups are its optimizers' groups; "
                                 "change those")

    @property
    def state(self) -> Mapping:
        """Every inner optimizer's state, read through one read-only mapping."""
        return _MergedState(self.optimizers)

    @state.setter
    def state(self, value) -> None:
        if value:
            raise AttributeError("CombinedOptimizer.state is its optimizers' state")

    # torch.optim.Optimizer pickles only defaults/state/param_groups; this object is its parts
    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict) -> None:
        if not any(param_group is g for g in self.param_groups):  # the constructor's: inner groups
            raise ValueError("add parameter groups to one of CombinedOptimizer.optimizers")

    @property
    def strategy(self):
        """The matrix optimizer's strategy (None without one)."""
        leader = self._leader()
        return leader.strategy if leader is not None else None

    def _leader(self) -> OrthogonalizedOptimizer | None:
        return next((o for o in self.optimizers if isinstance(o, OrthogonalizedOptimizer)), None)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        leader = self._leader()
        others = [o for o in self.optimizers if o is not leader]
        companion = [p.grad for o in others if not isinstance(o, OrthogonalizedOptimizer)
                     for g in o.param_groups for p in g["params"] if p.grad is not None]
        self.last_step_skipped = False
        if leader is not None:
            leader.step(companion_grads=companion)
            skipped = leader.last_step_skipped
        else:
            skipped = self._check_alone(companion)
        if skipped:
            self.skipped_steps += 1
            self.last_step_skipped = True
            return loss
        for opt in others:
            opt.step()
        return loss

    def _check_alone(self, grads) -> bool:
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
        """torch.optim's shape: {"state": {id: ...}, "param_groups": [...]}, the inner optimizers'
        state dicts one after the other, ids numbered through all of them in `param_groups` order
        (what `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` maps to
        parameter names)."""
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            inner = opt.state_dict()
            assert set(inner) == {"state", "param_groups"}, sorted(inner)
            state.update({offset + i: value for i, value in inner["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]}
                       for g in inner["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """The inverse of `state_dict`: groups are handed out in order, as many to each inner
        optimizer as it has, with the state of their parameters (keys may be ids or names)."""
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict holds {len(groups)} parameter groups, this "
                             f"CombinedOptimizer has {len(self.param_groups)}; load a state "
                             f"saved by the same optimizers")
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            keys = [k for g in mine for k in g["params"]]
            opt.load_state_dict({"state": {k: state_dict["state"][k] for k in keys
                                           if k in state_dict["state"]},
                                 "param_groups": mine})

    def __repr__(self) -> str:
        strategy = self.strategy
        lines = [f"CombinedOptimizer(nonfinite={self.nonfinite}"
                 + (f", strategy={strategy.name}" if strategy is not None else "") + ")"]
        for k, opt in enumerate(self.optimizers):
            if isinstance(opt, OrthogonalizedOptimizer):
                text = repr(opt).replace("\n", "\n    ")
            else:
                text = "\n    ".join([type(opt).__name__] + [
                    f"  group {g}: {len(group['params'])} params, " + ", ".join(
                        f"{key}={value}" for key, value in group.items()
                        if key not in ("params", "param_names"))
                    for g, group in enumerate(opt.param_groups)])
            lines.append(f"  [{k}] {text}")
        return "\n".join(lines)

    def describe(self) -> str:
        """Which parameter went to which optimizer and why, one line each (from
        `build_optimizers`; empty if the optimizers were combined by hand)."""
        if not self.assignment:
            return "(no parameter assignment recorded)"
        width = max(len(n) for n in self.assignment)
        note = []
        if self.strategy.runs_in_backward:
            note = ["note: strategy 'overlapped' starts its work in backward; global-norm "
                    "gradient clipping changes the gradients after that, so every clipped step "
                    "redoes the work after backward (exact, but not overlapped; the profiler "
                    "counts it as overlap_redos)"]
        rows = [f"{name:<{width}}  {str(self._shapes.get(name, '')):<16} -> {dest:<8} "
                f"({self._reasons.get(name, '')})" for name, dest in self.assignment.items()]
        return "\n".join(note + rows)


ADAMW_BASELINE = "adamw"  # OptimizerConfig.name that sends every parameter to AdamW


@dataclass
class OptimizerConfig:
    """What `build_optimizers` needs (the YAML `optimizer:` section).

    `name`: the matrix optimizer: an update rule from `dist_ortho.rules.available()` (normuon,
    muon, and any rule registered there), or adamw (AdamW for every parameter, the baseline).
    The rule's own hyperparameters: `beta2` (NorMuon's) is a key of its own; any other rule's go
    in `rule_hparams` (e.g. {scale: 0.5}). Every value is checked by the function the optimizer's
    constructor calls (`dist_ortho.core.hparams`, the rule's `validate`)."""

    name: str = "normuon"
    lr: float = 0.02
    momentum: float = 0.95
    beta2: float = 0.95
    weight_decay: float = 0.0
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str | torch.dtype = "auto"
    ns_coefficients: str = "jordan"
    # "standard" Newton-Schulz or "gram" (the same polynomial in the k x k Gram space; fewer FLOPs
    # for long matrices, see dist_ortho.core.newton_schulz)
    ns_form: str = "standard"
    rule_hparams: dict = field(default_factory=dict)
    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = 0.0
    split: SplitConfig = field(default_factory=SplitConfig)
    # a NaN/Inf gradient on any rank: "skip" the step on every rank, or "raise"
    nonfinite: str = "skip"
    # on a mesh with replica groups (HSDP's replicate axis): "spread" orthogonalizes each matrix
    # once in the job and sends the results across the replicas, "repeat" has every replica group
    # do the same work (see dist_ortho.optim.optimizer)
    replicas: str = "spread"

    def check(self, key: str = "optimizer") -> None:
        """Raise ConfigError naming the first bad field (`key` is this section's dotted path);
        called by dist_ortho.core.schema.build when a config is loaded."""
        try:
            ns_dtype_name(self.ns_dtype)  # a name or a torch.dtype
        except ValueError:
            raise ConfigError(f"{key}.ns_dtype", f"must be one of auto, float32, bfloat16, float64 "
                                                 f"(or the torch.dtype), got {self.ns_dtype!r}") from None
        names = (*rule_registry.available(), ADAMW_BASELINE)
        checks = [("name", self.name, check_choice, names),
                  ("ns_coefficients", self.ns_coefficients, check_choice, COEFFICIENT_SETS),
                  ("ns_form", self.ns_form, check_choice, NS_FORMS),
                  ("nonfinite", self.nonfinite, check_choice, ("skip", "raise")),
                  ("replicas", self.replicas, check_choice, REPLICA_MODES),
                  ("lr", self.lr, check_lr), ("momentum", self.momentum, check_beta),
                  ("beta2", self.beta2, check_beta),
                  ("weight_decay", self.weight_decay, check_weight_decay),
                  ("ns_steps", self.ns_steps, check_ns_steps),
                  ("adamw_lr", self.adamw_lr, check_lr),
                  ("adamw_betas[0]", self.adamw_betas[0], check_beta),
                  ("adamw_betas[1]", self.adamw_betas[1], check_beta),
                  ("adamw_weight_decay", self.adamw_weight_decay, check_weight_decay)]
        for name, value, check, *choices in checks:
            try:
                check(name, value, *choices)
            except ValueError as exc:
                raise ConfigError(f"{key}.{name}", str(exc)) from None
        if self.name != ADAMW_BASELINE:
            rule = rule_registry.get(self.name)
            for name in self.rule_hparams:
                if name not in rule.defaults or name in _FIELDS:
                    own = sorted(set(rule.defaults) - _FIELDS)
                    raise ConfigError(f"{key}.rule_hparams.{name}",
                                      (f"set it as {key}.{name}" if name in _FIELDS else
                                       f"not a hyperparameter of update rule {rule.name!r} (its "
                                       f"own: {', '.join(own) or 'none'})"))
            try:
                rule.validate({**rule.defaults, **self.hyperparameters_of_rule()})
            except ValueError as exc:
                raise ConfigError(f"{key}.rule_hparams", str(exc)) from None

    def hyperparameters_of_rule(self) -> dict:
        """The update rule's own keyword arguments: those of its `defaults` this section sets
        (beta2 as a key of its own, the others in `rule_hparams`); {} for adamw."""
        if self.name == ADAMW_BASELINE:
            return {}
        defaults = rule_registry.get(self.name).defaults
        return {**{k: getattr(self, k) for k in defaults if k in _FIELDS},
                **{k: v for k, v in self.rule_hparams.items() if k in defaults}}


_FIELDS = {f.name for f in fields(OptimizerConfig)}


def build_optimizers(model: nn.Module, config: OptimizerConfig | None = None,
                     strategy="replicated", **optimizer_kwargs) -> CombinedOptimizer:
    """Matrix optimizer (an update rule's: NorMuon, Muon, ...; or AdamW as a baseline) + AdamW for
    the rest, split by `split_model_params`. The result's `assignment` maps each parameter name to
    `config.name` or "adamw"; `describe()` prints it with the reasons."""
    config = config or OptimizerConfig()
    optimizer_kwargs.setdefault("nonfinite", config.nonfinite)
    matrix_kwargs = dict(replicas=config.replicas) if "replicas" not in optimizer_kwargs else {}
    with_adamw = (*rule_registry.available(), ADAMW_BASELINE)
    if config.name not in with_adamw:
        raise ValueError(f"optimizer name must be one of {', '.join(with_adamw)}, got "
                         f"{config.name!r}")
    rows = assign_params(model.named_parameters(), config.split, _roles(model))
    matrices = [(n, p) for n, p, dest, _ in rows if dest == MATRIX]
    others = [(n, p) for n, p, dest, _ in rows if dest == ADAMW]
    if config.name == ADAMW_BASELINE:  # the baseline: everything to AdamW, matrices first
        others, matrices = matrices + others, []
        rows = [(n, p, ADAMW, f"adamw baseline ({reason})") for n, p, _, reason in rows]
    opts: list[torch.optim.Optimizer] = []
    common = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                  nesterov=config.nesterov, ns_steps=config.ns_steps,
                  ns_dtype=ns_dtype_name(config.ns_dtype),
                  ns_coefficients=config.ns_coefficients, ns_form=config.ns_form,
                  strategy=strategy, **optimizer_kwargs,
                  **matrix_kwargs)
    if matrices:
        opts.append(_matrix_optimizer(config.name)(matrices, **config.hyperparameters_of_rule(),
                                                   **common))
        # a strategy that follows the backward pass gets the model's FSDP2 units (and, with
        # schedule backward, its hooks); without them (plain tensors) it runs at step time
        if (opts[0].strategy.follows_backward
                and any(isinstance(m, FSDPModule) for m in model.modules())):
            opts[0].overlap_with_backward(model)
    if others:
        opts.append(torch.optim.AdamW([p for _, p in others], lr=config.adamw_lr,
                                      betas=config.adamw_betas,
                                      weight_decay=config.adamw_weight_decay))
    combined = CombinedOptimizer(opts, nonfinite=optimizer_kwargs.get("nonfinite", "skip"),
                                 process_group=optimizer_kwargs.get("process_group"))
    for n, p, dest, reason in rows:
        combined.assignment[n] = config.name if dest == MATRIX else "adamw"
        combined._reasons[n] = reason
        combined._shapes[n] = tuple(p.shape)
    return combined


def _matrix_optimizer(rule: str):
    """The optimizer class for update rule `rule`: its named class where it has one (NorMuon,
    Muon: checkpoints record the class name), else OrthogonalizedOptimizer with that rule."""
    for cls in OrthogonalizedOptimizer.__subclasses__():
        if cls.rule_name == rule:
            return cls
    return functools.partial(OrthogonalizedOptimizer, rule=rule)
