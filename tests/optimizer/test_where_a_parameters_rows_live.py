"""`param_layout` reads where a parameter's rows live once, at construction: the one group of an
FSDP/HSDP or plain parameter, none for a TP weight (the mesh scheduler cuts it), whether copies of
it live on `Replicate()` dims, and a custom uneven row split refused in one line naming it.

Each case runs as rank 1 of 4 on torch's fake process group (no data moves; meshes and groups are
real objects), in a subprocess of its own: the fake group keeps the mesh coordinates of the first
rank it saw, and a process group cannot be initialized twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from dist_ortho.core.param_layout import param_layout

dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "inner"))

def placed(local_rows, placements, shape=(10, 6), cols=6):
    local = torch.zeros(local_rows, cols)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))

def describe(lay):
    g = lay.one_group
    return {"on_mesh": lay.on_mesh, "replicate_dim": lay.replicate_dim,
            "one_group": None if g is None else [g.world_size, g.rank, g.sharded],
            "root": None if lay.root is None else list(lay.root.names)}

case = sys.argv[1]
if case == "hsdp":  # rank 1 is inner coordinate 1: rows 5..9 of 10
    out = describe(param_layout(placed(5, (Replicate(), Shard(0))), "w"))
elif case == "fsdp_x_tp":  # rows over outer, columns over inner
    out = describe(param_layout(placed(5, (Shard(0), Shard(1)), cols=3), "w"))
elif case == "plain":
    out = describe(param_layout(torch.zeros(10, 6), "w"))
elif case == "uneven":
    try:
        param_layout(placed(4, (Replicate(), Shard(0))), "blocks.0.w")
        out = "no error"
    except ValueError as e:
        out = str(e)
print(json.dumps(out))
"""


def _run(case: str):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, want", [
    # HSDP: one group (the shard dim's 2 ranks), copies on the Replicate() dim
    ("hsdp", {"on_mesh": True, "replicate_dim": True, "one_group": [2, 1, True],
              "root": ["outer", "inner"]}),
    # FSDP x TP: no single group holds the rows; only the mesh scheduler can cut them
    ("fsdp_x_tp", {"on_mesh": True, "replicate_dim": False, "one_group": None,
                   "root": ["outer", "inner"]}),
    # a plain tensor: whole on every rank of the world group
    ("plain", {"on_mesh": False, "replicate_dim": False, "one_group": [4, 1, False],
               "root": None}),
])
def test_param_layout_says_which_group_holds_the_rows(case, want):
    assert _run(case) == want


def test_rows_not_split_as_torch_chunk_raise_one_line_naming_the_parameter():
    msg = _run("uneven")
    assert msg == ("parameter 'blocks.0.w' holds 4 rows on rank 1, but FSDP2's torch.chunk "
                   "layout gives 5; custom uneven shardings are not supported.")
