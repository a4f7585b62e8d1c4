"""Every layout steps through the same five phases in the same order (non-finite check, momentum,
orthogonalize, normalize, apply), whichever `StepRun` its plan comes with: the flat run of one
process group, the backward pipeline's run (its momentum committed inside orthogonalize, where
the pipeline drains), the mesh run. And a parameter's state made before any step (as a checkpoint
saved before the first step makes it) is laid out exactly like the state the first step makes.
The 4-rank cases share one spawn; the single-process ones run in this process."""

from __future__ import annotations

import functools

import pytest
import torch

from dist_ortho import NorMuon, strategies
from dist_ortho.testing.processes import spawn
from tests.optimizer import one_path_cases
from tests.optimizer.one_path_cases import STEP_PHASES, PhaseLog, describe_state

CASES = {"fsdp_backward": "BackwardRun", "hsdp_spread": "MeshRun", "fsdp_tp": "MeshRun"}


@functools.lru_cache(maxsize=None)
def results() -> list[dict]:
    return spawn(one_path_cases.one_path_worker, 4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_four_ranks_step_through_the_same_phases(case):
    for rank, res in enumerate(results()):
        got = res[case]
        assert got["run"] == CASES[case], (rank, got["run"])
        assert got["top"] == STEP_PHASES, (rank, got["top"])


def test_the_backward_pipeline_is_drained_and_its_momentum_committed_in_orthogonalize():
    for rank, res in enumerate(results()):
        got = res["fsdp_backward"]
        assert got["started"] and got["fallbacks"] == 0, (rank, got)
        assert "momentum" in got["in_orthogonalize"], (rank, got["in_orthogonalize"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_made_before_the_first_step_is_laid_out_like_the_steps(case):
    for rank, res in enumerate(results()):
        assert res[case]["before"] == res[case]["stepped"], (rank, case)


@pytest.mark.parametrize("strategy, run", [("balanced", "FlatRun"), ("local_norms", "FlatRun"),
                                           ("periodic", "FlatRun"), ("overlapped", "BackwardRun")])
@pytest.mark.parametrize("nonfinite", ["skip", "mask"])
def test_one_process_steps_through_the_same_phases(strategy, run, nonfinite):
    shapes = [(6, 4), (4, 6), (3, 5, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i),
                                             dtype=torch.bfloat16))
              for i, s in enumerate(shapes)]
    before = NorMuon(params, strategy=strategies.build(strategy), nonfinite=nonfinite)
    for p in params:
        before.init_state(p)
    opt = NorMuon(params, strategy=strategies.build(strategy), nonfinite=nonfinite)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i),
                             dtype=p.dtype)
    log = PhaseLog()
    opt.set_timer(log)
    opt.step()
    assert type(opt._planned()[1]).__name__ == run
    assert log.top() == STEP_PHASES
    assert describe_state(before, params) == describe_state(opt, params)
