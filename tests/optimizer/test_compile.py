"""The optimizer step under torch.compile (inductor, on the CPU): a nonfinite="mask" step with
0-d tensor hyperparameters has no host read to break the graph on, compiles, stays within the
derived float32 bound of eager (tests/tolerances.py) and compiles a bounded number of graphs:
one for the step that creates the state, one for every later step, whatever lr becomes.

`slow`: inductor's C++ compile of the step takes about a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from dist_ortho import NorMuon
from tests import tolerances

SHAPES = ((8, 6), (6, 10), (8, 6))  # one shape repeats
LR = 0.02


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


@pytest.mark.slow
def test_compiled_mask_step_stays_within_the_float_bound_with_two_graphs():
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _params(), _params()
    lrs = torch.tensor(LR), torch.tensor(LR)
    opts = [NorMuon(ps, lr=lr, nonfinite="mask", ns_dtype="float32", weight_decay=0.1)
            for ps, lr in zip((eager, compiled), lrs)]
    step = torch.compile(opts[1].step, backend="inductor")
    trajectory = tolerances.Trajectory(eager, lr=LR, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for t in range(4):
        if t == 2:  # a scheduler's change, in place: no recompile
            for lr in lrs:
                lr.fill_(LR / 2)
            trajectory.lr = [LR / 2] * len(SHAPES)
        grads = [torch.randn(p.shape, generator=gen) for p in eager]
        for ps in (eager, compiled):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opts[0].step()
        step()
        trajectory.record(eager)
        bounds = trajectory.bounds([tolerances.update_error(s, "normuon", "float32")
                                    for s in SHAPES])
        tolerances.assert_within(compiled, eager, bounds, context=t, family="compiled step")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [float(opts[1].state[p]["step"]) for p in compiled] == [4.0] * len(SHAPES)
