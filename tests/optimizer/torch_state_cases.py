"""Workers for tests/optimizer/test_torch_optimizer_state.py: `build_optimizers`' CombinedOptimizer through
torch's own state-dict API (`torch.distributed.checkpoint.state_dict`) and DCP.

- roundtrip_worker (2 ranks, FSDP2): after 2 steps, `get_optimizer_state_dict(model, opt)` (nested
  and flattened) is set into a fresh model + optimizer with `set_optimizer_state_dict`; reading it
  back gives the same keys and bitwise the same tensors, and one more step on both gives bitwise
  the same weights.
- save_worker / reshard_worker: DCP saves model + flattened optimizer state after 2 steps under
  FSDP on 2 ranks; 4 ranks load it under FSDP x TP 2 x 2 (a mesh unflattened from the world, as
  torchtitan builds it), take step 3 and save; FSDP on 4 ranks loads that and takes step 4. The
  uninterrupted run (FSDP on 2 ranks, 4 steps) is the comparison after steps 3 and 4: both runs
  stay within the bound tp_train_worker derives for a whole run against the single-process
  model (tests/meshes/mesh_cases.py), so their distance is within twice it (triangle inequality).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests import tolerances
from tests.meshes import mesh_cases
from tests.strategies import dist_cases

GLOBAL_BATCH, SEQ = 4, 16


def _opt(model, strategy="balanced"):
    from dist_ortho import OptimizerConfig, build_optimizers

    return build_optimizers(model, OptimizerConfig(ns_dtype="float32", adamw_lr=1e-3),
                            strategy=strategy)


def _fsdp(mesh):
    from torch.distributed.fsdp import fully_shard

    model = dist_cases._tiny_gpt(0)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _step(model, opt, step: int, part: int, parts: int) -> float:
    x, y = dist_cases._batch(step, GLOBAL_BATCH, SEQ)
    rows = slice(part * GLOBAL_BATCH // parts, (part + 1) * GLOBAL_BATCH // parts)
    _, loss = model(x[rows], y[rows])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _flat(sd: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import _flatten_optim_state_dict

    return sd if "state" not in sd else _flatten_optim_state_dict(sd)


def _same(a, b) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(a, DTensor):
        return isinstance(b, DTensor) and a.placements == b.placements and \
            torch.equal(a.to_local(), b.to_local())
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def roundtrip_worker(rank: int, world_size: int, strategies: list[str]) -> dict:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._pytree import tree_map_only

    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name in strategies:
        for flatten in (False, True):
            options = StateDictOptions(flatten_optimizer_state_dict=flatten)
            model = _fsdp(mesh)
            opt = _opt(model, mesh_cases._step_time(name))
            for s in range(2):
                _step(model, opt, s, rank, world_size)
            saved = get_optimizer_state_dict(model, opt, options=options)
            other = _fsdp(mesh)
            other.load_state_dict(model.state_dict())
            other_opt = _opt(other, mesh_cases._step_time(name))
            # a copy, as a load from storage gives: torch's load_state_dict keeps the tensors it
            # is given, which here are the first optimizer's live state
            set_optimizer_state_dict(other, other_opt, tree_map_only(torch.Tensor, torch.clone,
                                                                     saved), options=options)
            back = _flat(get_optimizer_state_dict(other, other_opt, options=options))
            saved = _flat(saved)
            # compared before stepping on: both hold references to live optimizer state
            res = dict(keys=sorted(saved), same_keys=sorted(saved) == sorted(back),
                       bitwise_state=all(_same(saved[k], back[k]) for k in saved if k in back),
                       differ=[k for k in saved if k in back and not _same(saved[k], back[k])][:5])
            _step(model, opt, 2, rank, world_size)
            _step(other, other_opt, 2, rank, world_size)
            out[(name, flatten)] = dict(
                **res,
                bitwise_next_step=all(torch.equal(a.to_local(), b.to_local()) for a, b in
                                      zip(model.parameters(), other.parameters())),
                names=any(".blocks.0." in k or k.startswith("state.blocks.0.") for k in saved))
    return out


def _dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(
                model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))}


def save_worker(rank: int, world_size: int, root: str) -> dict:
    """FSDP on 2 ranks: 2 steps, DCP save, 2 more (the uninterrupted run: weights after 3, 4)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    dist_cases.set_threads()
    model = _fsdp(init_device_mesh("cpu", (world_size,)))
    opt = _opt(model)
    for s in range(2):
        _step(model, opt, s, rank, world_size)
    dcp.save(_dcp_state(model, opt), checkpoint_id=f"{root}/fsdp2")
    out = {}
    for s in (2, 3):
        _step(model, opt, s, rank, world_size)
        out[s + 1] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return out


def _load(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"],
                             options=StateDictOptions(flatten_optimizer_state_dict=True))


def reshard_worker(rank: int, world_size: int, root: str) -> dict:
    """4 ranks, a chain: FSDP x TP 2 x 2 loads the FSDP(2) checkpoint, takes step 3 and saves;
    FSDP on 4 ranks loads that and takes step 4."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    dist_cases.set_threads()
    world = init_device_mesh("cpu", (world_size,), mesh_dim_names=("world",))
    tp_model = mesh_cases._tp_gpt(world._unflatten(0, (2, 2), ("dp", "tp")))
    tp_opt = _opt(tp_model)
    _load(tp_model, tp_opt, f"{root}/fsdp2")
    _step(tp_model, tp_opt, 2, rank // 2, 2)
    dcp.save(_dcp_state(tp_model, tp_opt), checkpoint_id=f"{root}/tp")
    out = {"fsdp_x_tp": {n: p.full_tensor().detach() for n, p in tp_model.named_parameters()}}
    model = _fsdp(world)
    opt = _opt(model)
    _load(model, opt, f"{root}/tp")
    _step(model, opt, 3, rank, world_size)
    out["fsdp4"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return out


def reference_bounds(steps: int = 3) -> dict:
    """The single-process run and, per parameter, the bound of a distributed run's distance from
    it after `steps` steps (tp_train_worker's model: NS / AdamW update error plus twice the
    gradient error per step, carried along the trajectory)."""
    config_opt = _opt
    reference = dist_cases._tiny_gpt(0)
    ref_opt = config_opt(reference, "replicated")
    n_layers, d_model, vocab = 2, 48, 256
    eps_grad, _ = dist_cases.training_errors(n_layers, d_model, SEQ, GLOBAL_BATCH * SEQ, vocab)
    orthogonalized = {id(p) for g in ref_opt.optimizers[0].param_groups for p in g["params"]}
    named = list(reference.named_parameters())
    eps = {n: (tolerances.update_error(p.shape, "normuon", "float32")
               if id(p) in orthogonalized else tolerances.update_error(p.shape, "adamw"))
           + 2 * eps_grad for n, p in named}
    trajectory = tolerances.Trajectory([p for _, p in named], lr=1.0)
    for s in range(steps):
        _step(reference, ref_opt, s, 0, 1)
        trajectory.record([p for _, p in named])
    bounds = dict(zip([n for n, _ in named], trajectory.bounds([eps[n] for n, _ in named])))
    return dict(params={n: p.detach().clone() for n, p in named}, bounds=bounds)
