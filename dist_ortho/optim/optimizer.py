"""NorMuon and Muon as torch optimizers for FSDP2-sharded parameters (1-D, HSDP, TP/EP meshes)
and plain ones (whole on every rank, as under DDP, or on a single process).

One step, on every rank, whatever the world size:
1. non-finite check: one tiny all-reduce agrees across ranks whether any gradient holds NaN/Inf; if
   so the step is skipped everywhere with a warning (`nonfinite="skip"`) or raises ("raise"),
   before any state is touched, or runs with every write masked on the device ("mask"; see
   `dist_ortho.optim.nonfinite`).
2. momentum: on local rows only (momentum is sharded exactly like the parameter).
3. orthogonalize: the strategy moves row shards so that each matrix is whole on some rank, runs
   Newton-Schulz there and brings back each rank's rows of the result (see `strategies`).
4. normalize: the update rule (`dist_ortho.rules`) turns this rank's rows of NS(U) into update rows
   (Muon: a shape scale; NorMuon: the per-row second-moment normalization, whose two Frobenius
   norms come from one batched all-reduce of per-matrix sums of squares).
5. apply: decoupled weight decay and the update, written in place into the local shard.

`OrthogonalizedOptimizer(params, rule=..., strategy=...)` is the one optimizer class; `Muon` and
`NorMuon` are it with their rule and constructor signatures. Timing: `set_timer(timer)` (any
`dist_ortho.core.timing.PhaseTimer`, e.g. the profiler) receives the phases above and, through the
strategy, comm_wait and ns; `executed_ns_flops` counts the Newton-Schulz FLOPs run on this rank.

Host syncs: `step()` makes `HOST_SYNCS_PER_STEP[nonfinite]` device-to-host syncs: 1 with "skip"
and "raise", the non-finite check's `.item()` (`count_nonfinite`: whether to skip must be known on
the host before any state is touched, on every rank alike), 0 with "mask"; a strategy running in
backward adds its usability read (`host_syncs_per_step`). Everything else is queued: shapes,
owners, split sizes and buckets are Python ints from the cached plan, never read back from a
tensor, and lr and weight_decay may be 0-d tensors, never read on the host, so on CUDA the
strategies' collectives overlap with Newton-Schulz, and a "mask" step can be captured in a CUDA
graph. tests/optimizer/test_gpu_readiness.py counts the syncs of a step (P = 1 and P = 2) and
asserts these numbers.
Streams on CUDA: `dist_ortho.optim.streams`. torch.optim's flags (foreach, fused, capturable,
maximize): `dist_ortho.optim.conventions`.

`step()` runs these five in this order on every layout. Steps 2-4 are asked of a `StepRun` made
with the plan (`dist_ortho.optim.step_runs`): `FlatRun` for parameters on one process group,
`BackwardRun` when the strategy runs in backward (its hooks already computed momentum and started
the exchanges; step() drains them), and on 2-D/3-D meshes (HSDP with replicas="spread", tensor
parallel, expert parallel) `mesh_step.MeshRun` (`strategies.mesh`): the same strategies per row
group, plus the TP column exchange and the replica exchange. A parameter's state is created in one
place, `init_state`, at its first counted step (or by a checkpoint before it).

With one rank, the same code runs with every collective skipped. Parameters must be 2-D or more
(4-D conv weights are viewed as (out, -1), 3-D stacks as batches of matrices); use
`dist_ortho.split_model_params` (or `build_optimizers`) to send embeddings, heads, norms and biases
to AdamW.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from dist_ortho import rules as rule_registry
from dist_ortho import strategies as strategy_registry
from dist_ortho.core.newton_schulz import NSConfig, matrix_view_shape, ns_dtype_name
from dist_ortho.core.orthogonalizer import FlopCount
from dist_ortho.core.plan import Plan
from dist_ortho.core.param_layout import ParamLayout, param_layout
from dist_ortho.core.sharding import Layout, MatrixSpec, chunk_sizes, local_tensor
from dist_ortho.core.timing import NULL_TIMER, PhaseTimer
from dist_ortho.optim import mesh_step
from dist_ortho.core.hparams import check_beta, check_lr, check_weight_decay
from dist_ortho.optim.conventions import TORCH_FLAGS, check_no_duplicates, check_torch_flags
from dist_ortho.optim.nonfinite import (HOST_SYNCS_PER_STEP, NONFINITE_POLICIES, STEP_COUNTED,
                                        count_nonfinite, handle_nonfinite, masked_writes,
                                        nonfinite_counts, step_counts)
from dist_ortho.optim.overlap import BackwardOverlap, null_comm_context, unit_positions
from dist_ortho.optim.precision import (check_momentum_dtype, momentum_dtype_for,
                                        warn_if_updates_round_away)
from dist_ortho.optim.step_plan import optimizer_items, plan_step
from dist_ortho.optim.step_runs import BackwardRun, FlatRun, StepInputs, StepRun, step_apply
from dist_ortho.rules.base import UpdateRule
from dist_ortho.strategies.base import Strategy
from dist_ortho.strategies.mesh import DEFAULT_REPLICAS, check_replicas

__all__ = ["OrthogonalizedOptimizer", "NorMuon", "Muon", "NONFINITE_POLICIES", "plan_step",
           "optimizer_items", "count_nonfinite", "handle_nonfinite", "HOST_SYNCS_PER_STEP",
           "STEP_COUNTED", "step_counts"]

log = logging.getLogger("dist_ortho")


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Momentum, Newton-Schulz by a strategy, then an update rule; see the module docstring.

    rule: a name from `dist_ortho.rules.available()` ("normuon", "muon") or an UpdateRule.
    strategy: a name from `dist_ortho.strategies.available()` or a Strategy instance.
    replicas: what ranks holding copies of the same rows do with the Newton-Schulz work (the
    copies: mesh dims that place a matrix `Replicate()`, as HSDP's replicate axis or a TP axis a
    weight is not split on): "spread" the matrices between them, each orthogonalized once in the
    job, or "repeat" all of them (`dist_ortho.optim.mesh_step`). Not the strategy `replicated`,
    which chooses who orthogonalizes within one group of shards.
    momentum_dtype: dtype of the momentum buffers; None (default): float32 for 16-bit parameters,
    the parameter's dtype otherwise (see `dist_ortho.optim.precision`).
    Extra keyword arguments are the rule's own hyperparameters (NorMuon: beta2)."""

    rule_name: str | None = None  # a subclass named after its rule (NorMuon) sets it

    def __init__(self, params: Iterable, rule: str | UpdateRule = "normuon",
                 strategy: str | Strategy = "replicated", *, lr: float = 0.02,
                 momentum: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str | torch.dtype = "auto",
                 ns_coefficients: str = "jordan", nonfinite: str = "skip",
                 replicas: str = DEFAULT_REPLICAS,
                 process_group: dist.ProcessGroup | None = None, ns_form: str = "standard",
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, maximize: bool = False,
                 momentum_dtype: str | torch.dtype | None = None, **rule_hparams) -> None:
        self.rule = rule_registry.get(rule)
        unknown = sorted(set(rule_hparams) - set(self.rule.defaults))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for update rule "
                             f"{self.rule.name!r}; its own are {sorted(self.rule.defaults)}")
        if isinstance(strategy, str):
            strategy = strategy_registry.build(strategy)
        elif not isinstance(strategy, Strategy):
            raise ValueError(f"strategy must be a name from {strategy_registry.available()} or a "
                             f"dist_ortho.strategies.Strategy instance, got {type(strategy).__name__}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        defaults = dict(lr=lr, momentum=momentum, **{**self.rule.defaults, **rule_hparams},
                        weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, ns_coefficients=ns_coefficients, ns_form=ns_form,
                        foreach=foreach, fused=fused, capturable=capturable, maximize=maximize)
        self.strategy = strategy
        self.nonfinite = nonfinite
        self.replicas = check_replicas(replicas)  # copies on Replicate() dims: "spread" or "repeat"
        self.momentum_dtype = check_momentum_dtype(momentum_dtype)
        self.process_group = process_group
        self.timer: PhaseTimer = NULL_TIMER  # set_timer(); the null timer costs nothing
        self.skipped_steps = 0  # known on the host: "skip" steps
        self.last_step_skipped = False
        self.last_step_ok: torch.Tensor | None = None  # "mask": the device's verdict (0-d bool)
        self.masked_steps: torch.Tensor | None = None  # "mask": steps dropped, counted on device
        self._warned: set[str] = set()
        self._flops = FlopCount()  # NS FLOPs actually run on this rank, counted from the shapes
        self._layouts: dict[int, ParamLayout] = {}  # id(param) -> where its rows live
        self._names: dict[int, str] = {}
        # by which parameters take part: the plan and the run that steps it (optim.step_runs)
        self._plans: dict[tuple[int, ...], tuple[Plan, StepRun]] = {}
        self._full_run: StepRun | None = None  # the run of all parameters: their state layouts
        self._units: dict[int, int] = {}  # id(param) -> FSDP unit in backward order (overlap)
        self._overlap: BackwardOverlap | None = None
        self._comm_context = null_comm_context
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        self._replan()  # surfaces every planning error now, on every rank, before any collective
        warn_if_updates_round_away(self._entries(require_grad=False), self._names, self.rule)

    @property
    def executed_ns_flops(self) -> int:
        """Newton-Schulz FLOPs run on this rank so far (what the profiler records)."""
        return self._flops.total

    def set_timer(self, timer: PhaseTimer | None) -> None:
        """Report this optimizer's phases (and its strategy's) to `timer`; None: stop timing."""
        if timer is not None and not isinstance(timer, PhaseTimer):
            raise ValueError(f"timer must have a phase(name) method, got {type(timer).__name__}")
        self.timer = NULL_TIMER if timer is None else timer

    def set_comm_context(self, factory=None) -> None:
        """`factory()` gives a context manager entered around every region where this optimizer
        issues collectives (its step, after any closure, and its backward hooks); the
        interconnect emulator (`profiling.interconnect`) delays them there. None: nothing."""
        self._comm_context = null_comm_context if factory is None else factory

    def overlap_with_backward(self, model: torch.nn.Module) -> None:
        """Plan this optimizer's buckets by `model`'s FSDP2 units in backward order (strategy
        `overlapped`) and, with schedule backward, run them during the backward pass from FSDP2's
        post-reduce-scatter hooks; see `dist_ortho.optim.overlap`. Raises ValueError (on every rank,
        before the one collective it issues: creating the optimizer's own process group) if that
        cannot work."""
        if self._units:
            raise ValueError("overlap_with_backward() was already called for this optimizer")
        if not self.strategy.follows_backward:
            raise ValueError(f"strategy {self.strategy.name!r} does not order its work by the "
                             f"backward pass; use strategy 'overlapped'")
        # the same test plan() makes: HSDP with replicas="spread" takes the mesh path too
        entries = self._entries(require_grad=False)
        layouts = [self._layouts[id(p)] for _, p in entries]
        on_mesh = ([lay.name for lay in layouts if lay.on_mesh]
                   if mesh_step.needs_mesh(layouts, self.replicas) else [])
        if on_mesh and self.strategy.runs_in_backward:
            # placements are alike on every rank, so every rank raises here
            raise ValueError(f"parameter {on_mesh[0]!r} lives on a 2-D/3-D mesh (HSDP, TP or "
                             f"EP): the mesh path has no backward overlap; use the strategy "
                             f"option schedule='step', another strategy, or (HSDP) "
                             f"replicas='repeat'")
        if on_mesh:  # schedule step: the mesh path plans per row group, FSDP units unused
            return
        units = unit_positions(self._entries(require_grad=False), model, self._names)
        if self.strategy.runs_in_backward:
            self._overlap = BackwardOverlap(self, model)
        self._units = units
        self._replan()

    @property
    def overlap(self) -> BackwardOverlap | None:
        """The backward-pass hooks, when installed (`overlap_with_backward`)."""
        return self._overlap

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(rule={self.rule.name}, strategy={self.strategy.name}"
                 f"{_options_text(self.strategy.options)}, replicas={self.replicas}, "
                 f"nonfinite={self.nonfinite})"]
        for g, group in enumerate(self.param_groups):
            lines.append(f"  group {g}: {_group_text(group)}")
        return "\n".join(lines)

    # -- construction-time validation ------------------------------------------------------------
    def _validate_hparams(self, group: dict) -> None:
        # the checks of the run config too (dist_ortho.core.hparams); lr and weight_decay may be
        # 0-d tensors: read here, never in step()
        check_lr("lr", group["lr"])
        check_weight_decay("weight_decay", group["weight_decay"])
        check_beta("momentum", group["momentum"])
        self.rule.validate(group)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
        NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"],
                 form=group.get("ns_form", "standard"))
        group["ns_dtype"] = ns_dtype_name(group["ns_dtype"])  # torch.float32 -> "float32"
        for name, default in TORCH_FLAGS.items():
            group.setdefault(name, default)
        check_torch_flags(group, self.nonfinite, type(self).__name__, self._warned)

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group.get("params"), (torch.Tensor, set, type(None))):
            param_group["params"] = list(param_group["params"])  # read twice: no generators
        check_no_duplicates(param_group, self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_hparams(group)
        g = len(self.param_groups) - 1
        names = group.get("param_names") or [f"param_groups[{g}].params[{j}]"
                                             for j in range(len(group["params"]))]
        for p, name in zip(group["params"], names):
            if p.ndim < 2:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)}: {type(self).__name__} "
                    f"orthogonalizes matrices (2-D, 3-D stacks, 4-D conv) only. Give 0-D/1-D "
                    f"parameters (biases, norms) to AdamW, e.g. with dist_ortho.split_params.")
            if p.numel() == 0:
                raise ValueError(f"parameter {name!r} has no elements (shape {tuple(p.shape)})")
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; needs floating point")
            matrix_view_shape(p.shape)  # raises for 5-D and up
            # TP/EP placements (no one group) are validated by the mesh path's plan()
            self._layouts[id(p)] = param_layout(p, name, self.process_group)
            self._names[id(p)] = name
        if self._ready:
            self._replan()

    def _group_layout(self, params: Sequence[torch.Tensor]) -> Layout:
        """The one process group these parameters' rows live on (the 1-D path)."""
        layouts = [self._layouts[id(p)].one_group for p in params]
        first = layouts[0]
        for p, lay in zip(params, layouts):
            if lay.group is not first.group or lay.world_size != first.world_size:
                raise ValueError(
                    f"parameter {self._names[id(p)]!r} lives on a different process group than "
                    f"{self._names[id(params[0])]!r}; one optimizer schedules over one group. Use "
                    f"one optimizer per mesh, or pass process_group= for plain parameters.")
        return first

    # -- planning --------------------------------------------------------------------------------
    def _entries(self, require_grad: bool) -> list[tuple[dict, torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"]
                if not require_grad or p.grad is not None]

    def _ns_config(self, group: dict) -> NSConfig:
        return NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"],
                        form=group.get("ns_form", "standard"))

    def plan(self, entries: list[tuple[dict, torch.Tensor]] | None = None) -> Plan:
        """The strategy's plan for these parameters (default: all), plus the optimizer's own
        all-reduces (`plan_step`), cached by which parameters take part."""
        return self._planned(entries)[0]

    def _replan(self) -> None:
        """Forget every plan and plan all parameters again (they or their FSDP units changed)."""
        self._plans.clear()
        self._full_run = self._planned()[1]

    def _planned(self, entries: list[tuple[dict, torch.Tensor]] | None = None
                 ) -> tuple[Plan, StepRun]:
        """`plan(entries)` and the `StepRun` that steps it, made together and cached."""
        entries = self._entries(require_grad=False) if entries is None else entries
        key = tuple(id(p) for _, p in entries)
        if key not in self._plans:
            self._plans[key] = self._make_plan(entries)
        return self._plans[key]

    def _make_plan(self, entries: list[tuple[dict, torch.Tensor]]) -> tuple[Plan, StepRun]:
        if not entries:
            raise ValueError(f"{type(self).__name__} has no parameters to step")
        device = local_tensor(entries[0][1]).device
        out_dtypes = {self._ns_config(g).torch_dtype(device) for g, _ in entries}
        if len(out_dtypes) > 1:
            raise ValueError(f"param groups use different ns_dtype values {sorted(map(str, out_dtypes))}; "
                             f"results travel in one buffer dtype, so use one ns_dtype per optimizer")
        layouts = [self._layouts[id(p)] for _, p in entries]
        if mesh_step.needs_mesh(layouts, self.replicas):
            # a MeshRun whatever the strategy: overlap_with_backward refuses meshes, and the mesh
            # plan counts the non-finite all-reduce without the backward pipeline's flag
            return self._mesh_plan(entries, layouts, next(iter(out_dtypes)), device)
        layout = self._group_layout([p for _, p in entries])
        specs = []
        for i, (g, p) in enumerate(entries):
            lay = self._layouts[id(p)].one_group
            sizes = (chunk_sizes(p.shape[0], lay.world_size) if lay.sharded
                     else (p.shape[0],) * lay.world_size)
            specs.append(MatrixSpec(i, self._names[id(p)], tuple(p.shape), p.dtype, sizes,
                                    lay.sharded, g["ns_steps"], next(iter(out_dtypes)),
                                    unit=self._units.get(id(p)),
                                    ns_form=g.get("ns_form", "standard")))
        plan = plan_step(self.strategy, specs, layout.world_size, layout.rank, self.rule)
        common = dict(strategy=self.strategy, rule=self.rule, layout=layout, flops=self._flops,
                      state_layouts={id(p): self._layouts[id(p)].one_group for _, p in entries})
        if self.strategy.runs_in_backward:
            return plan, BackwardRun(plan, overlap=self._overlap, **common)
        return plan, FlatRun(plan, **common)

    def _mesh_plan(self, entries, layouts: Sequence[ParamLayout], out_dtype: torch.dtype,
                   device) -> tuple[Plan, StepRun]:
        """The mesh path's plan (`mesh_step`): validate, plan, then make the groups it needs."""
        params = [p for _, p in entries]
        gram = [self._names[id(p)] for g, p in entries if g.get("ns_form", "standard") != "standard"]
        if gram:  # alike on every rank: placements and hyperparameters are
            raise ValueError(f"parameter {gram[0]!r} lives on a 2-D/3-D mesh (HSDP, TP or EP), "
                             f"whose plans count standard Newton-Schulz only; use "
                             f"ns_form='standard' for it")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        plan = mesh_step.mesh_plan(params, layouts, self.strategy, self.rule,
                                   [g["ns_steps"] for g, _ in entries], out_dtype,
                                   self.replicas, rank)
        run = mesh_step.MeshRun(plan, strategy=self.strategy, rule=self.rule,
                                groups=mesh_step.make_groups(plan, layouts), params=params,
                                layouts=layouts, device=device, flops=self._flops)
        return plan, run

    # -- state -----------------------------------------------------------------------------------
    def init_state(self, p: torch.Tensor) -> dict:
        """`p`'s state, created as its first step creates it, if it has none yet: the one place
        state is made (the step after its non-finite check, whatever the layout or schedule, and
        checkpoints saving before the first step). The momentum buffer sharded like `p`, the step
        counter, and the rule's own state (NorMuon's v) in the layout the plan of all parameters,
        made at construction, gives it (the rows the rule sees)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = self._fresh_momentum(p)
            # "mask" steps count on the device (torch's capturable convention), else on the host
            state["step"] = torch.zeros((), dtype=torch.float32, device=(
                local_tensor(p).device if self.nonfinite == "mask" else None))
            state.update(self.rule.init_state(p, self._full_run.state_layouts[id(p)]))
        return state

    def _fresh_momentum(self, p: torch.Tensor) -> torch.Tensor:
        """The momentum of a parameter before its first step: zeros like `p` in its buffer dtype
        (backward hooks read it too, without creating state: the step that counts does)."""
        return torch.zeros_like(p, dtype=self.buffer_dtype(p))

    def buffer_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The momentum buffer's dtype for parameter `p` (`momentum_dtype`)."""
        return momentum_dtype_for(p.dtype, self.momentum_dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load, which would round the
        # rule's float32 state (NorMuon's v) and float32 momentum to bf16 for bf16 parameters;
        # keep the saved tensors and put them back afterwards in their saved dtype.
        # torch maps saved ids to parameters by position across param groups; so do we.
        keep = ("step", "momentum_buffer") + tuple(self.rule.float32_state)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        exact = {}
        for saved_id, p in zip(saved_ids, params):
            entry = state_dict["state"].get(saved_id, {})
            exact[p] = {k: entry[k] for k in keep if k in entry}
        super().load_state_dict(state_dict)
        for p, kept in exact.items():
            for key, value in kept.items():
                device = (local_tensor(p).device if key == "step" and self.nonfinite == "mask"
                          else self.state[p][key].device)  # "mask" counts on the device
                self.state[p][key] = value.to(device=device, dtype=value.dtype, copy=True)


    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, companion_grads: Sequence[torch.Tensor] = ()):
        """One step. `companion_grads`: this rank's gradient shards of other optimizers stepped
        together with this one (CombinedOptimizer's AdamW); they join the non-finite check, so
        that one all-reduce decides for all of them and `last_step_skipped` tells them."""
        loss = None
        self.last_step_skipped = False
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._comm_context():
            self._step(companion_grads)
        return loss

    def _step(self, companion_grads: Sequence[torch.Tensor]) -> None:
        entries = self._entries(require_grad=True)
        if len(entries) < sum(len(g["params"]) for g in self.param_groups):
            # FSDP2 leaves grads None on all ranks together, so skipping them keeps ranks in step.
            log.debug("%s: %d parameters have no gradient and are skipped this step",
                      type(self).__name__,
                      sum(len(g["params"]) for g in self.param_groups) - len(entries))
        if not entries:
            return
        _, run = self._planned(entries)  # what differs per layout and schedule (optim.step_runs)
        run.check(entries)
        grads = [local_tensor(p.grad) for _, p in entries]
        timer = self.timer
        with timer.phase("nonfinite_check"):
            go, ok = self._nonfinite_check(run, entries, grads, companion_grads)
        if not go:
            return
        with timer.phase("momentum"):
            step = StepInputs(entries, grads, [self.init_state(p) for _, p in entries],
                              [self._ns_config(g) for g, _ in entries], timer, ok)
            directions = run.momentum(step)  # None: backward's hooks computed it
        with timer.phase("orthogonalize"):
            results = run.orthogonalize(step, directions)
        del directions
        # the rule's own state (NorMuon's v) changes in normalize: kept unless the step is good
        masked = masked_writes(ok, [local_tensor(t) for state in step.states
                                    for k, t in state.items()
                                    if k not in ("momentum_buffer", "step")])
        with timer.phase("normalize"), masked:
            updates = run.normalize(step, results)
        del results
        with timer.phase("apply"):
            step_apply(step, updates)

    def _nonfinite_check(self, run: StepRun, entries, grads: Sequence[torch.Tensor],
                         companion_grads: Sequence[torch.Tensor]
                         ) -> tuple[bool, torch.Tensor | None]:
        """One all-reduce agrees on every rank whether any gradient is non-finite (and, for work
        started in backward, whether it is usable: `run.verdict`). Returns (whether the step goes
        on, the "mask" policy's on-device verdict or None)."""
        layout = run.layout
        checked = list(grads) + [local_tensor(g) for g in companion_grads]
        reason, flag = run.verdict(entries)
        ok = None
        if self.nonfinite == "mask":
            counts = nonfinite_counts(checked, layout.group, layout.world_size, layout.device,
                                      flag)
            ok = counts[0] == 0  # a 0-d bool every write of the step obeys
            # backward's usability decides which code runs: host_syncs_per_step's one read
            # (without hooks, on every rank alike, there is nothing to decide)
            bad, unusable = 0, (int(counts[1].item()) if run.reads_verdict else 0)
            self.last_step_ok = ok
            self.masked_steps = ((~ok).long() if self.masked_steps is None
                                 else self.masked_steps.add_(~ok))
        elif flag is not None:
            bad, unusable = count_nonfinite(checked, layout.group, layout.world_size,
                                            layout.device, flag=flag)
        else:
            bad, unusable = count_nonfinite(checked, layout.group, layout.world_size,
                                            layout.device), 0
        if bad:
            run.discard()
            handle_nonfinite(bad, self.nonfinite, type(self).__name__)
            self.skipped_steps += 1
            self.last_step_skipped = True
            return False, None
        if unusable:  # every rank drops it alike
            run.fall_back(reason)
        return True, ok


def _options_text(options) -> str:
    if options is None or not dataclasses.is_dataclass(options):
        return ""
    return "".join(f", {f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))


def _group_text(group: dict) -> str:
    """'N params, lr=..., ...': a param group's hyperparameters without its tensors."""
    hp = ", ".join(f"{k}={v}" for k, v in group.items() if k not in ("params", "param_names"))
    return f"{len(group['params'])} params, {hp}"


class Muon(OrthogonalizedOptimizer):
    """Muon: momentum, then Newton-Schulz, scaled by max(1, m/n) ** 0.5."""

    rule_name = "muon"

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: str | torch.dtype = "auto", ns_coefficients: str = "jordan",
                 strategy: str | Strategy = "replicated", nonfinite: str = "skip",
                 process_group: dist.ProcessGroup | None = None,
                 replicas: str = DEFAULT_REPLICAS, ns_form: str = "standard",
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, maximize: bool = False,
                 momentum_dtype: str | torch.dtype | None = None) -> None:
        super().__init__(params, self.rule_name, strategy, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
                         ns_dtype=ns_dtype, ns_coefficients=ns_coefficients, nonfinite=nonfinite,
                         replicas=replicas, process_group=process_group, ns_form=ns_form,
                         foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                         momentum_dtype=momentum_dtype)


class NorMuon(OrthogonalizedOptimizer):
    """NorMuon (arXiv:2510.05491): Muon plus a per-row second-moment normalization of the
    orthogonalized update, rescaled to keep Muon's update norm. See `dist_ortho.rules.normuon`
    and the reference `dist_ortho.optim.reference`."""

    rule_name = "normuon"

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95,
                 beta2: float = 0.95, weight_decay: float = 0.0, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: str | torch.dtype = "auto",
                 ns_coefficients: str = "jordan", strategy: str | Strategy = "replicated",
                 nonfinite: str = "skip", process_group: dist.ProcessGroup | None = None,
                 replicas: str = DEFAULT_REPLICAS, ns_form: str = "standard",
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, maximize: bool = False,
                 momentum_dtype: str | torch.dtype | None = None) -> None:
        super().__init__(params, self.rule_name, strategy, lr=lr, momentum=momentum, beta2=beta2,
                         weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
                         ns_dtype=ns_dtype, ns_coefficients=ns_coefficients, nonfinite=nonfinite,
                         replicas=replicas, process_group=process_group, ns_form=ns_form,
                         foreach=foreach, fused=fused, capturable=capturable, maximize=maximize,
                         momentum_dtype=momentum_dtype)
