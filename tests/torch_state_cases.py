"""Workers for tests/test_torch_optimizer_state.py: `build_optimizers`' CombinedOptimizer through
torch's own state-dict API (`torch.distributed.checkpoint.state_dict`) and DCP.

- roundtrip_worker (2 ranks, FSDP2): after 2 steps, `get_optimizer_state_dict(model, opt)` (nested
  and flattened) is set into a fresh model + optimizer with `set_optimizer_state_dict`; reading it
  back gives the same keys and bitwise the same tensors, and one more step on both gives bitwise
  the same weights.
- save_worker / reshard_worker: DCP saves model + flattened optimizer state after 2 steps under
  FSDP on 2 ranks; 4 ranks load it under FSDP x TP 2 x 2 (a mesh unflattened from the world, as
  torchtitan builds it) and under FSDP on 4 ranks and train one more step. The uninterrupted run
  (FSDP on 2 ranks, 3 steps) is the comparison; the resumed runs differ from it only by the
  layouts of the third step, so they stay within the bound tp_train_worker derives for a whole
  run against the single-process model (tests/mesh_cases.py), applied here to both runs'
  distance from the single-process model (triangle inequality: twice that bound).
"""

from __future__ import annotations

import dist_cases
import mesh_cases
import tolerances
import torch
import torch.distributed as dist

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
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict,
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
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(
                model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))}


def save_worker(rank: int, world_size: int, root: str) -> dict:
    """FSDP on 2 ranks: 2 steps, DCP save, a third step (the uninterrupted run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    dist_cases.set_threads()
    model = _fsdp(init_device_mesh("cpu", (world_size,)))
    opt = _opt(model)
    losses = [_step(model, opt, s, rank, world_size) for s in range(2)]
    dcp.save(_dcp_state(model, opt), checkpoint_id=root)
    losses.append(_step(model, opt, 2, rank, world_size))
    return dict(losses=losses, params={n: p.full_tensor() for n, p in model.named_parameters()})


def reshard_worker(rank: int, world_size: int, root: str) -> dict:
    """4 ranks: load under FSDP x TP 2 x 2 and under FSDP on 4, one more step each."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    dist_cases.set_threads()
    world = init_device_mesh("cpu", (world_size,), mesh_dim_names=("world",))
    out = {}
    for label, build in (("fsdp_x_tp", lambda: mesh_cases._tp_gpt(
                             world._unflatten(0, (2, 2), ("dp", "tp")))),
                         ("fsdp4", lambda: _fsdp(world))):
        model = build()
        opt = _opt(model)
        state = _dcp_state(model, opt)
        dcp.load(state, checkpoint_id=root)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"],
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
        if label == "fsdp_x_tp":
            dp = rank // 2
            loss = _step(model, opt, 2, dp, 2)
        else:
            loss = _step(model, opt, 2, rank, world_size)
        total = torch.tensor(loss)
        dist.all_reduce(total)
        out[label] = dict(loss=total.item() / world_size,
                          params={n: p.full_tensor() for n, p in model.named_parameters()},
                          steps=[int(s) for k, s in state["optim"].items()
                                 if k.endswith(".step") and isinstance(s, torch.Tensor)][:1])
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
