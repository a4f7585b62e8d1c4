"""Workers on real gloo ranks for tests/optimizer/test_nonfinite_mask.py and tests/optimizer/test_optimizer_streams.py
(spawned by name with dist_ortho.testing.processes.spawn).

`mask_worker`: FSDP2-style Shard(0) parameters, one optimizer with nonfinite="skip" and one with
"mask" per strategy, stepped on the same gradients; step 1 holds a NaN on the last rank only.
`stream_worker`: an FSDP2 GPT with strategy `overlapped` (schedule backward), stepped under the CPU
stream race checker (tests/optimizer/stream_checker.py), and once more with backward called from another
thread than step().
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from dist_ortho import NorMuon, OptimizerConfig, build_optimizers, strategies
from dist_ortho.core.sharding import local_tensor
from tests.optimizer import gpu_cases
from tests.optimizer.stream_checker import StreamRaceChecker
from tests.strategies import dist_cases, overlap_cases

NAN_STEP = 1
STEPS = 3


def _sharded_params(mesh, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)],
                                                 src_data_rank=None))
            for s in gpu_cases.SHAPES]


def _state_bits(opt, params) -> list[torch.Tensor]:
    return [local_tensor(t).clone() for p in params for _, t in sorted(opt.state[p].items())]


def mask_worker(rank: int, world_size: int, names: list[str]) -> dict:
    """{strategy: {"equal": params and state bitwise equal between skip and mask, "syncs": host
    syncs of each mask step, "masked": masked_steps, "ok": last_step_ok per step}}."""
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name in names:
        runs = {}
        for policy in ("skip", "mask"):
            params = _sharded_params(mesh, seed=3)
            opt = NorMuon(params, strategy=name, nonfinite=policy, ns_dtype="float32",
                          weight_decay=0.1)
            gen = torch.Generator().manual_seed(4)
            syncs, oks = [], []
            for step in range(STEPS):
                for p in params:
                    p.grad = gpu_cases._like(p, gen)
                if step == NAN_STEP and rank == world_size - 1:
                    local_tensor(params[1].grad)[0, 0] = float("nan")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    with gpu_cases.HostSyncCounter() as counter:
                        opt.step()
                syncs.append(counter.events)
                oks.append(None if opt.last_step_ok is None else bool(opt.last_step_ok))
            runs[policy] = (opt, params, syncs, oks)
        skip, mask = runs["skip"], runs["mask"]
        out[name] = dict(
            equal=[bool(torch.equal(local_tensor(a), local_tensor(b)))
                   for a, b in zip(skip[1], mask[1])]
            + [bool(torch.equal(a, b)) for a, b in zip(_state_bits(skip[0], skip[1]),
                                                          _state_bits(mask[0], mask[1]))],
            syncs=mask[2], skip_syncs=skip[2], ok=mask[3], masked=int(mask[0].masked_steps),
            skipped=skip[0].skipped_steps)
    return out


def _train(mesh, rank: int, world_size: int, threaded: bool, check: bool) -> dict:
    model = overlap_cases._model(mesh, "gpt-tiny")
    opt = build_optimizers(model, OptimizerConfig(ns_dtype="float32"),
                           strategy=strategies.build("overlapped"))
    inner = opt.optimizers[0]
    streams = inner.overlap.streams
    streams.log = []
    checker = StreamRaceChecker(streams) if check else None
    per_rank = overlap_cases.GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    main = threading.get_ident()
    for step in range(2):
        batches = overlap_cases._micro_batches(step, rows, 1)

        def backward():
            if checker is not None:
                with checker:
                    overlap_cases._backward(model, batches, True, True)
            else:
                overlap_cases._backward(model, batches, True, True)

        if threaded:
            errors = []
            worker = threading.Thread(target=lambda: _catching(backward, errors))
            worker.start()
            worker.join()
            if errors:
                raise errors[0]
        else:
            backward()
        if checker is not None:
            with checker:
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    hook_threads = {c.thread for c in streams.log if c.what == "enter"}
    return dict(params=[p.full_tensor().detach() for p in model.parameters()],
                log=[(c.what, c.stream, c.source, c.thread == main) for c in streams.log],
                problems=checker.problems if checker is not None else [],
                ops=dict(checker.ops) if checker is not None else {},
                hook_threads_are_main=sorted({t == main for t in hook_threads}),
                fallbacks=inner.overlap.fallbacks)


def _catching(fn, errors: list) -> None:
    try:
        fn()
    except BaseException as exc:  # handed to the calling thread
        errors.append(exc)


def stream_worker(rank: int, world_size: int) -> dict:
    dist_cases.set_threads()
    mesh = init_device_mesh("cpu", (world_size,))
    checked = _train(mesh, rank, world_size, threaded=False, check=True)
    threaded = _train(mesh, rank, world_size, threaded=True, check=False)
    plain = _train(mesh, rank, world_size, threaded=False, check=False)
    return dict(checked={k: v for k, v in checked.items() if k != "params"},
                threaded={k: v for k, v in threaded.items() if k != "params"},
                threaded_equal=[bool(torch.equal(a, b))
                                for a, b in zip(threaded["params"], plain["params"])],
                checked_equal=[bool(torch.equal(a, b))
                               for a, b in zip(checked["params"], plain["params"])])
