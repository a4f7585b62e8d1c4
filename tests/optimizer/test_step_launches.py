"""ATen ops of one optimizer step grow with the number of shapes, not of matrices.

Counted with a TorchDispatchMode (`dist_ortho.testing.op_count`) around `opt.step()` on a
Llama-like stack of 112 matrices in 3 shapes, FSDP2-sharded on 1 and 2 gloo ranks (and as plain
tensors in one process), for every registered strategy and both rules. Every op counts, views included: on a GPU each is host
dispatch time and most are kernel launches. Per matrix the step issues at most `MAX_OPS_PER_MATRIX`
(a per-matrix loop anywhere in momentum, Newton-Schulz, normalization or apply costs 5 to 90).
"""

from __future__ import annotations

import pytest

from dist_ortho import strategies
from dist_ortho.testing import spawn
from dist_ortho.testing.op_count import ops_per_matrix

MAX_OPS_PER_MATRIX = 15


@pytest.mark.parametrize("world_size", [1, 2])
def test_step_issues_at_most_15_aten_ops_per_matrix_for_every_strategy(world_size):
    names = strategies.available()
    per_rank = spawn(ops_per_matrix, world_size, (names,))
    over = {}
    for rank, result in enumerate(per_rank):
        assert set(result) == {(rule, n) for rule in ("normuon", "muon") for n in names}
        for key, (per_matrix, phases) in result.items():
            if per_matrix > MAX_OPS_PER_MATRIX:
                over[(rank,) + key] = (round(per_matrix, 1), phases)
    assert not over, f"more than {MAX_OPS_PER_MATRIX} ATen ops per matrix: {over}"


def test_plain_parameters_in_one_process_stay_within_the_same_budget():
    names = strategies.available()
    result = ops_per_matrix(0, 1, names, sharded=False)
    over = {k: v for k, v in result.items() if v[0] > MAX_OPS_PER_MATRIX}
    assert not over, f"more than {MAX_OPS_PER_MATRIX} ATen ops per matrix: {over}"
