"""Backward overlap on a parameter the mesh path schedules is refused with one line on every
rank, before backward: HSDP with replicas="spread" takes the mesh path as TP does."""

from __future__ import annotations

import torch

from dist_ortho.testing import spawn


def hsdp_overlapped_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_ortho import OptimizerConfig, build_optimizers, strategies
    from dist_ortho.models import build_model

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for replicas in ("spread", "repeat"):
        torch.manual_seed(0)
        model = build_model("gpt-tiny", n_layers=2, d_model=48, n_heads=4, seq_len=16)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        config = OptimizerConfig(ns_dtype="float32", replicas=replicas)
        try:
            opt = build_optimizers(model, config, strategy=strategies.build("overlapped"))
        except ValueError as exc:
            out[replicas] = str(exc)
            continue
        tokens = torch.randint(0, model.config.vocab_size, (2, 17),
                               generator=torch.Generator().manual_seed(rank))
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        out[replicas] = None
    return out


def test_regression_overlapped_on_hsdp_spread_is_refused_not_a_typeerror_in_backward():
    results = spawn(hsdp_overlapped_worker, 4)
    for r in results:
        assert r["spread"] is not None and "schedule='step'" in r["spread"], r
        assert "replicas='repeat'" in r["spread"]
        assert r["repeat"] is None  # the 1-D path per replica group overlaps as on plain FSDP2
