"""Workers for tests/optimizer/test_every_layout_steps_through_one_path.py, run on 4 gloo ranks.

For each layout (1-D FSDP2 with `overlapped`'s backward hooks, HSDP 2x2 with replicas spread,
FSDP2 x TP 2x2), one optimizer takes a step while a `PhaseLog` records the phases it marks, and
another one on the same parameters creates their state before any step (what a checkpoint saved
before the first step does); `describe_state` says what each made.
"""

from __future__ import annotations

import contextlib

import torch

from dist_ortho import NorMuon
from dist_ortho.core.sharding import local_tensor
from tests.meshes import mesh_cases
from tests.strategies import dist_cases, overlap_cases

STEP_PHASES = ["nonfinite_check", "momentum", "orthogonalize", "normalize", "apply"]


class PhaseLog:
    """A PhaseTimer that records (depth, name) of every phase entered."""

    def __init__(self) -> None:
        self.entered: list[tuple[int, str]] = []
        self._depth = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        self.entered.append((self._depth, name))
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def top(self) -> list[str]:
        return [name for depth, name in self.entered if depth == 0]

    def nested(self, parent: str) -> list[str]:
        """Names entered directly inside the top-level phase `parent`."""
        out, inside = [], False
        for depth, name in self.entered:
            if depth == 0:
                inside = name == parent
            elif depth == 1 and inside:
                out.append(name)
        return out


def describe_state(opt, params) -> list[dict]:
    """Per parameter: each state tensor's dtype, shape, local shape, placements and device."""
    out = []
    for p in params:
        out.append({key: (str(t.dtype), tuple(t.shape), tuple(local_tensor(t).shape),
                          str(getattr(t, "placements", None)), str(local_tensor(t).device))
                    for key, t in sorted(opt.state[p].items())})
    return out


def _placed_case(layouts, replicas: str) -> dict:
    params = [torch.nn.Parameter(mesh_cases._place(dist_cases.full_tensor(s, 300 + i), m, pl))
              for i, (s, m, pl) in enumerate(layouts)]
    named = [(f"w{i}", p) for i, p in enumerate(params)]
    before = NorMuon(named, strategy="balanced", ns_dtype="float32", replicas=replicas)
    for p in params:  # a checkpoint saved before the first step creates the state this way
        before.init_state(p)
    opt = NorMuon(named, strategy="balanced", ns_dtype="float32", replicas=replicas)
    for i, (p, (s, m, pl)) in enumerate(zip(params, layouts)):
        p.grad = mesh_cases._place(dist_cases.full_tensor(s, 400 + i), m, pl)
    log = PhaseLog()
    opt.set_timer(log)
    opt.step()
    return dict(run=type(opt._planned()[1]).__name__, top=log.top(),
                before=describe_state(before, params), stepped=describe_state(opt, params))


def _backward_case(mesh) -> dict:
    from dist_ortho import split_model_params

    model = overlap_cases._model(mesh, "gpt-tiny")
    named, _ = split_model_params(model)
    matrices = [p for _, p in named]
    before = NorMuon(named, strategy="overlapped", ns_dtype="float32")
    for p in matrices:
        before.init_state(p)
    opt = NorMuon(named, strategy="overlapped", ns_dtype="float32")
    opt.overlap_with_backward(model)
    share = overlap_cases.GLOBAL_BATCH // mesh.size()
    rows = slice(mesh.get_local_rank() * share, (mesh.get_local_rank() + 1) * share)
    overlap_cases._backward(model, overlap_cases._micro_batches(0, rows, 1), True, True)
    started = opt.overlap.started
    log = PhaseLog()
    opt.set_timer(log)
    opt.step()
    return dict(run=type(opt._planned()[1]).__name__, top=log.top(), started=started,
                fallbacks=opt.overlap.fallbacks, in_orthogonalize=log.nested("orthogonalize"),
                before=describe_state(before, matrices), stepped=describe_state(opt, matrices))


def one_path_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    out = {"fsdp_backward": _backward_case(init_device_mesh("cpu", (world_size,)))}
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out["hsdp_spread"] = _placed_case([(s, hsdp, [Replicate(), Shard(0)])
                                       for s in dist_cases.MIXED], "spread")
    tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out["fsdp_tp"] = _placed_case(mesh_cases._tp_layouts(tp), "spread")
    return out
