"""Worker for tests/optimizer/test_bf16_training.py on spawned gloo ranks."""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dist_ortho import NorMuon

DIM, STD, LR = 1024, 0.02, 2e-3


def mixed_precision_step(rank: int, world_size: int) -> dict:
    """One NorMuon step on a float32 1024x1024 weight that FSDP2 computes with in bf16; returns
    the fraction of this rank's entries that changed, the dtypes seen, and the warnings."""
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, bias=False)
    torch.nn.init.normal_(model.weight, std=STD)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = NorMuon(model.parameters(), lr=LR, ns_dtype="float32")
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.float().square().mean().backward()
    before = model.weight.to_local().detach().clone()
    opt.step()
    after = model.weight.to_local().detach()
    return {"changed": (after != before).float().mean().item(), "param": str(after.dtype),
            "compute": str(out.dtype), "grad": str(model.weight.grad.dtype),
            "warnings": [str(w.message) for w in caught]}
