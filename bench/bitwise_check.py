"""Record a short training run bit for bit, to show that a refactor changed no number.

    python bench/bitwise_check.py --out /tmp/new.json              # this checkout
    python bench/bitwise_check.py --compare /tmp/old.json /tmp/new.json

An older commit, without its own install: export it and make its strategies/ and profiling/
folders importable under dist_ortho (what the editable install's package-dir mapping does):

    git archive OLD | tar -x -C /tmp/old
    ln -s ../strategies /tmp/old/dist_ortho/strategies; ln -s ../profiling /tmp/old/dist_ortho/profiling
    cp bench/bitwise_check.py /tmp/old/bench/
    cd /tmp/old && PYTHONPATH=/tmp/old python bench/bitwise_check.py --out /tmp/old.json

For every strategy (and bucketed_async with small buckets, and Muon under `balanced`), P gloo
ranks train an FSDP2-sharded GPT preset for a few steps from the same seed and batches, and record
every step's global loss (as float.hex) and a SHA-256 of every parameter's full tensor and of the
optimizers' state. `--layout hsdp` trains on a 2 x 2 (replicate, shard) mesh and `--layout
fsdp_tp` on a 2 x 2 (dp, tp) mesh with tensor-parallel MLPs (4 ranks each). Two records of the same config from two versions of the code must be equal.
Only the public API is used (`build_model`, `build_optimizers`, `strategies.build`,
`dist_ortho.testing.spawn`), so the script runs on older versions too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dist_ortho import OptimizerConfig, build_optimizers, strategies  # noqa: E402
from dist_ortho.models import build_model  # noqa: E402
from dist_ortho.testing import spawn  # noqa: E402

RUNS = {  # label: (optimizer name, strategy name, strategy options)
    "replicated": ("normuon", "replicated", {}),
    "round_robin": ("normuon", "round_robin", {}),
    "allgather_scatter": ("normuon", "allgather_scatter", {}),
    "allgather_scatter_lpt": ("normuon", "allgather_scatter", {"assignment": "lpt"}),
    "bucketed_async": ("normuon", "bucketed_async", {}),
    "bucketed_async_small": ("normuon", "bucketed_async", {"bucket_bytes": 64 * 1024}),
    "balanced": ("normuon", "balanced", {}),
    "balanced_muon": ("muon", "balanced", {}),
    "megabatch": ("normuon", "megabatch", {}),
    "split_ns": ("normuon", "split_ns", {}),
    "overlapped": ("normuon", "overlapped", {}),
    "overlapped_step": ("normuon", "overlapped", {"schedule": "step"}),
    "split_ns_all": ("normuon", "split_ns", {"split": "all"}),
    "balanced_two_level": ("normuon", "balanced", {"exchange": "two_level", "ranks_per_node": 1}),
    # the inexact schedules, each against its own earlier self
    "blockwise": ("normuon", "blockwise", {}),
    "local_norms": ("normuon", "local_norms", {}),
    "periodic": ("normuon", "periodic", {"k": 2}),
}
# the mesh path schedules at step time: backward overlap is refused there with one line, and
# local_norms / periodic refuse meshes (their statistics or step count belong to one row group)
MESH_RUNS = [label for label in RUNS if label not in ("overlapped", "local_norms", "periodic")]
LAYOUTS = ("fsdp", "hsdp", "fsdp_tp")


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sharded_model(preset: str, layout: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    torch.manual_seed(0)
    model = build_model(preset)
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,))
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    else:  # fsdp_tp: torchtitan's order, tensor parallel first, then FSDP2 on "dp"
        tp_mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        for block in model.blocks:
            parallelize_module(block.mlp, tp_mesh["tp"], {"fc_in": ColwiseParallel(),
                                                          "fc_out": RowwiseParallel()})
        mesh = tp_mesh["dp"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def worker(rank: int, world_size: int, preset: str, steps: int, labels: list[str],
           layout: str = "fsdp") -> dict:
    out = {}
    for label in labels:
        rule, name, options = RUNS[label]
        model = _sharded_model(preset, layout, world_size)
        config = OptimizerConfig(name=rule, ns_dtype="float32", adamw_lr=1e-3)
        opt = build_optimizers(model, config, strategy=strategies.build(name, **options))
        seq, batch = model.config.seq_len, 2 * world_size
        losses = []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 + step)
            tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
            # tensor-parallel peers see the same rows; data-parallel ranks each their own
            data_rank = rank // 2 if layout == "fsdp_tp" else rank
            rows = slice(data_rank * 2, data_rank * 2 + 2)
            _, loss = model(tokens[rows, :-1], tokens[rows, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total.item()).hex())
        params = {n: _digest(_full(p)) for n, p in model.named_parameters()}
        state = {}
        for k, o in enumerate(opt.optimizers):
            for j, (p, s) in enumerate(o.state.items()):
                for key, v in sorted(s.items()):
                    if isinstance(v, torch.Tensor):
                        state[f"{k}.{j}.{key}"] = _digest(_full(v))
        out[label] = dict(losses=losses, params=params, state=state)
    return out


def _merge_ranks(results: list[dict]) -> dict:
    """One record for all ranks: each field (losses, parameters, optimizer state) once where every
    rank recorded the same, else per rank as `rank<r>/<key>` (the mesh path keeps row-group state
    as plain tensors; ranks that each compute a matrix whole (every rank of a group, as `repeat`
    replicas or the strategy `replicated` do) may round it differently)."""
    merged = {}
    for label, first in results[0].items():
        merged[label] = {"losses": first["losses"]}
        for r in results[1:]:
            assert r[label]["losses"] == first["losses"], f"{label}: ranks disagree on losses"
        for field in ("params", "state"):
            per_rank = [r[label][field] for r in results]
            merged[label][field] = (per_rank[0] if all(x == per_rank[0] for x in per_rank) else
                                    {f"rank{rank}/{k}": v for rank, x in enumerate(per_rank)
                                     for k, v in x.items()})
    return merged


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    bad = 0
    for label in sorted(set(a) | set(b)):
        if a.get(label) == b.get(label):
            print(f"{label:24s} identical ({len(a[label]['losses'])} losses, "
                  f"{len(a[label]['params'])} parameters, {len(a[label]['state'])} state tensors)")
        else:
            bad += 1
            print(f"{label:24s} DIFFERS")
    print("bitwise identical" if not bad else f"{bad} run(s) differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--runs", help="comma-separated labels (default: every run the layout "
                        "takes)")
    parser.add_argument("--layout", choices=LAYOUTS, default="fsdp",
                        help="fsdp: 1-D over --world-size ranks; hsdp, fsdp_tp: 2 x 2 meshes")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.layout != "fsdp" and args.world_size != 4:
        parser.error(f"--layout {args.layout} builds a 2 x 2 mesh: pass --world-size 4")
    runs = args.runs.split(",") if args.runs else list(RUNS if args.layout == "fsdp" else MESH_RUNS)
    results = spawn(worker, args.world_size, (args.preset, args.steps, runs, args.layout))
    text = json.dumps(_merge_ranks(results), indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
