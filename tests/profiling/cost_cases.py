"""Workers for the cost-model tests: step NorMuon/Muon under CommCounter and report what happened.

Two ways to run the real strategy code at a world size:
- `gloo_worker` runs on real gloo ranks (dist_ortho.testing.processes.spawn), P = 1..4;
- `python -m tests.profiling.cost_cases fake P RANK` runs one rank of P (64, 1024, ...) in this one
  process on torch's fake process group, whose collectives return at once without moving data. The
  bytes the counter sees are still the real call's arguments, and FLOPs are counted from shapes, so
  both can be compared with the model; the numbers computed are garbage and are not looked at. One
  rank per process: the fake group keeps mesh coordinates from the first rank it saw.

Every worker returns plain data (counted bytes per kind, executed NS FLOPs, state bytes) that the
tests compare with `profiling.costmodel.predict` for the same shapes and rank.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MIXED = [(16, 16), (24, 8), (8, 24), (1, 16), (5, 12), (10, 8), (3, 6, 4), (6, 2, 3, 3)]
FEW = [(7, 5), (9, 9), (3, 8)]
# llama-tiny layer matrices (GQA, non-square MLP), one layer: what real models look like
LLAMA_LAYER = [(128, 128), (64, 128), (64, 128), (128, 128), (344, 128), (344, 128), (128, 344)]
# for P = 64 / 1024: rows below, at and above P, uneven, a 3-D stack and a conv weight
FAKE = [(64, 32), (40, 16), (17, 8), (2048, 8), (8, 2048), (1030, 4), (3, 6, 4), (6, 2, 3, 3)]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cases(strategy_names: list[str], fake: bool = False) -> list[dict]:
    """Every strategy on several shape sets, dtypes and both rules."""
    out = []
    for s in strategy_names:
        small_bucket = ({"bucket_bytes": 2**17 if fake else 4096} if s == "bucketed_async"
                        else {})
        if fake:
            out += [dict(strategy=s, options=small_bucket, shapes=FAKE, param_dtype="float32",
                         ns_dtype="float32", rule="normuon"),
                    dict(strategy=s, options={}, shapes=FAKE, param_dtype="float32",
                         ns_dtype="bfloat16", rule="muon")]
            continue
        out += [
            dict(strategy=s, options=small_bucket, shapes=MIXED, param_dtype="float32",
                 ns_dtype="float32", rule="normuon"),
            dict(strategy=s, options={}, shapes=LLAMA_LAYER, param_dtype="float32",
                 ns_dtype="bfloat16", rule="normuon"),
            dict(strategy=s, options={}, shapes=FEW, param_dtype="bfloat16",
                 ns_dtype="float32", rule="normuon"),
            dict(strategy=s, options=small_bucket, shapes=FEW, param_dtype="float32",
                 ns_dtype="float32", rule="muon"),
        ]
    extra = dict(strategy="allgather_scatter", options={"assignment": "lpt"}, shapes=MIXED if
                 not fake else FAKE, param_dtype="float32", ns_dtype="float32",
                 rule="normuon")
    return out + [extra]


def plain_cases() -> list[dict]:
    """Plain (unsharded, DDP-style) tensors: owners orthogonalize and broadcast."""
    return [dict(strategy=s, options={}, shapes=FEW, param_dtype="float32", ns_dtype="float32",
                 rule="normuon", sharded=False) for s in ("replicated", "balanced")]


def _make(case: dict, mesh, rank: int, world_size: int):
    """Parameters with gradients: DTensors built from their local shards (src_data_rank=None
    semantics: every rank makes its own rows), or plain tensors."""
    from torch.distributed.tensor import DTensor, Shard

    from dist_ortho.core.sharding import chunk_sizes

    dtype = _DTYPES[case["param_dtype"]]
    gen = torch.Generator().manual_seed(1234 + rank)
    params = []
    for shape in case["shapes"]:
        shape = tuple(shape)
        if mesh is None:
            local_shape = shape
        else:
            local_shape = (chunk_sizes(shape[0], world_size)[rank],) + shape[1:]

        def local(shape=local_shape):
            return torch.randn(shape, generator=gen).to(dtype)

        if mesh is None:
            p = torch.nn.Parameter(local())
            p.grad = local()
        else:
            stride = torch.empty(shape, device="meta").stride()

            def wrap(t, shape=shape, stride=stride):
                return DTensor.from_local(t, mesh, [Shard(0)], run_check=False,
                                          shape=torch.Size(shape), stride=stride)

            p = torch.nn.Parameter(wrap(local()))
            p.grad = wrap(local())
        params.append(p)
    return params


class _FakeAllToAllInput(TorchDispatchMode):
    """Lets the fake process group run an all-to-all in which this rank sends nothing but
    receives something (a rank owning no matrix, in the return exchange). Real backends do this;
    the fake group fills outputs by repeating the input and refuses an empty one. Below the
    counter, so the counter records the real call's arguments; the fake group then gets a
    one-element input, which changes only the (meaningless) values it writes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d" and func._schema.name.endswith("alltoall_base_"):
            out, inp, pg, out_splits, in_splits = args[:5]
            if inp.numel() == 0 and out.numel() > 0:
                P = len(out_splits)
                args = (out, inp.new_zeros(1), pg, out_splits, [1] + [0] * (P - 1)) + \
                    tuple(args[5:])
        return func(*args, **kwargs)


def run_case(case: dict, mesh, rank: int, world_size: int, fake: bool = False) -> dict:
    from dist_ortho import Muon, NorMuon, strategies
    from dist_ortho.core.sharding import local_tensor
    from dist_ortho.profiling.comm import CommCounter

    params = _make(case, mesh, rank, world_size)
    cls = NorMuon if case["rule"] == "normuon" else Muon
    opt = cls([(f"w{i}", p) for i, p in enumerate(params)], ns_dtype=case["ns_dtype"],
              strategy=strategies.build(case["strategy"], **case["options"]))
    with _FakeAllToAllInput() if fake else contextlib.nullcontext():
        with CommCounter() as counter:  # innermost mode: sees every call first, unchanged
            opt.step()
    state = sum(local_tensor(t).numel() * local_tensor(t).element_size()
                for st in opt.state.values() for t in st.values())
    return dict(counted={k: list(v) for k, v in counter.totals().items()},
                executed_flops=opt.executed_ns_flops, state_bytes=state,
                unparsed=list(counter.unparsed))


def gloo_worker(rank: int, world_size: int, sharded_cases: list[dict],
                unsharded_cases: list[dict], with_calibration: bool = False) -> dict:
    """Every case on this process group; with_calibration also runs a quick `calibrate` (tiny
    sizes: it checks the plumbing, not the speed) so the test needs no spawn of its own."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_ortho.profiling.costmodel import calibrate

    mesh = init_device_mesh("cpu", (world_size,))
    out = dict(sharded=[run_case(c, mesh, rank, world_size) for c in sharded_cases],
               plain=[run_case(c, None, rank, world_size) for c in unsharded_cases])
    if with_calibration:
        out["calibration"] = calibrate(
            sizes_bytes=(2**10, 2**14), repeats=2, ns_shapes=((32, 32), (64, 96)),
            elementwise_sets=([(16, 16)] * 8, [(64, 64)] * 2)).to_dict()
    return out


def fake_main(world_size: int, rank: int) -> dict:
    """One rank of a fake process group of `world_size`: every case, counted."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dist_ortho import strategies

    warnings.filterwarnings("ignore")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        if mesh.get_local_rank() != rank:
            raise RuntimeError(f"fake mesh says rank {mesh.get_local_rank()}, expected {rank}")
        all_cases = cases(strategies.available_exact(), fake=True)
        return dict(results=[run_case(c, mesh, rank, world_size, fake=True) for c in all_cases])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "fake":
        raise SystemExit("usage: python -m tests.profiling.cost_cases fake WORLD_SIZE RANK")
    torch.set_num_threads(1)
    print(json.dumps(fake_main(int(sys.argv[2]), int(sys.argv[3]))))
