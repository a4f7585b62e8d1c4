"""The step's element-wise functions (`dist_ortho.optim.step_ops`) and the rules' batched updates:
an `ok` mask that changes no bit when False and nothing at all when True, tensor hyperparameters
that are never read on the host, and batching that keeps every bit of the per-matrix result."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_ortho import rules
from dist_ortho.core.sharding import Layout, MatrixSpec
from dist_ortho.optim.step_ops import apply_updates, momentum_directions, nonfinite_count
from dist_ortho.testing.op_count import OpCounter

SHAPES = [(8, 6), (8, 6), (6, 8), (8, 6), (4, 3, 5)]  # two batches of a shape, a lone one, a stack


def _state(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    states = [{"momentum_buffer": torch.randn(s, generator=gen),
               "step": torch.tensor(3.0),
               "v": torch.rand(s[:-1], generator=gen)} for s in SHAPES]
    results = [torch.randn(s, generator=gen) for s in SHAPES]
    return params, grads, states, results


def _specs():
    return [MatrixSpec(i, f"m{i}", s, torch.float32, (s[0],), False, 5, torch.float32)
            for i, s in enumerate(SHAPES)]


LAYOUT = Layout(None, 0, 1, False, torch.device("cpu"))


def _step(params, grads, states, results, hp, ok=None, rule="normuon"):
    """momentum, the rule's updates (on given NS results), apply: one param group."""
    dirs = momentum_directions([s["momentum_buffer"] for s in states], grads,
                               [s["step"] for s in states], hp["momentum"], True, ok=ok)
    ups = rules.get(rule).updates([hp] * len(params), states, _specs(), results, LAYOUT, ok=ok)
    apply_updates(params, ups, hp["lr"], hp["weight_decay"], ok=ok)
    return dirs, ups


def _bits(tensors):
    return [t.clone() for t in tensors]


def _flat(params, states):
    return params + [t for s in states for t in s.values()]


HP = {"momentum": 0.95, "beta2": 0.9, "lr": 0.02, "weight_decay": 0.1}


@pytest.mark.parametrize("rule", ["normuon", "muon"])
def test_ok_true_is_bitwise_the_step_without_ok(rule):
    a = _state(0)
    b = copy.deepcopy(a)
    _step(*a, HP, rule=rule)
    _step(*b, HP, ok=torch.tensor(True), rule=rule)
    for x, y in zip(_flat(a[0], a[2]), _flat(b[0], b[2])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rule", ["normuon", "muon"])
def test_ok_false_with_nan_gradients_changes_no_bit_of_weights_or_state(rule):
    params, grads, states, results = _state(1)
    grads[1][2, 3] = float("nan")
    grads[4][0, 0, 0] = float("inf")
    results[1][0, 0] = float("nan")  # what NS makes of a NaN direction
    before = _bits(_flat(params, states))
    _step(params, grads, states, results, HP, ok=torch.tensor(False), rule=rule)
    for x, y in zip(before, _flat(params, states)):
        assert torch.equal(x, y)


def test_tensor_hyperparameters_are_never_read_on_the_host():
    params, grads, states, results = _state(2)
    ref = copy.deepcopy((params, grads, states, results))
    hp = {k: torch.tensor(v) for k, v in HP.items()}
    with OpCounter() as counter:
        _step(params, grads, states, results, hp, ok=torch.tensor(True))
    assert counter.ops["_local_scalar_dense"] == 0, counter.ops
    _step(*ref, HP)
    # the same math; a tensor lr rounds lr * u before the add (no fused multiply-add)
    for x, y in zip(_flat(params, states), _flat(ref[0], ref[2])):
        torch.testing.assert_close(x, y, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


@pytest.mark.parametrize("rule", ["normuon", "muon"])
def test_batched_updates_equal_each_matrix_updated_alone_bit_for_bit(rule):
    _, _, states, results = _state(3)
    alone_states = copy.deepcopy(states)
    batched = rules.get(rule).updates([HP] * len(SHAPES), states, _specs(), results, LAYOUT)
    for i, spec in enumerate(_specs()):
        spec = MatrixSpec(0, spec.name, spec.shape, spec.dtype, spec.dim0_sizes, False, 5,
                          torch.float32)
        alone = rules.get(rule).updates([HP], [alone_states[i]], [spec], [results[i]], LAYOUT)[0]
        assert torch.equal(alone, batched[i])
        if rule == "normuon":
            assert torch.equal(alone_states[i]["v"], states[i]["v"])


def test_step_ops_issue_a_fixed_number_of_ops_whatever_the_number_of_matrices():
    counts = []
    for n in (4, 40):
        params = [torch.randn(8, 6) for _ in range(n)]
        bufs = [torch.zeros(8, 6) for _ in range(n)]
        steps = [torch.tensor(0.0) for _ in range(n)]
        grads = [torch.randn(8, 6) for _ in range(n)]
        with OpCounter() as counter:
            dirs = momentum_directions(bufs, grads, steps, 0.95, True)
            apply_updates(params, dirs, 0.02, 0.1)
            nonfinite_count(grads, torch.device("cpu"))
        counts.append(counter.total)
    assert counts[0] == counts[1], counts


def test_nonfinite_count_counts_tensors_with_nan_or_inf_and_takes_empty_shards():
    ts = [torch.zeros(0, 4), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]),
          torch.ones(3, dtype=torch.bfloat16)]
    assert nonfinite_count(ts, torch.device("cpu")).tolist() == [2.0]
    assert nonfinite_count([], torch.device("cpu")).tolist() == [0.0]
