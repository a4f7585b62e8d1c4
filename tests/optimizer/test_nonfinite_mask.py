"""nonfinite="mask": the skip decided and applied on the device.

A "mask" step reads nothing on the host (no aten::_local_scalar_dense, no other host sync, at
P = 1 and on 2 gloo ranks, every strategy), writes exactly what a "skip" step writes on finite
gradients (bitwise: weights, momentum, NorMuon's v, step counters), and leaves every bit as it was
on every rank when one rank's gradient holds a NaN, while the non-finite all-reduce still runs.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from dist_ortho import CombinedOptimizer, Muon, NorMuon, strategies
from dist_ortho.optim.nonfinite import HOST_SYNCS_PER_STEP, host_syncs_per_step
from dist_ortho.testing.processes import spawn
from tests.optimizer import gpu_cases, gpu_step_cases

STRATEGIES = strategies.available()


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in gpu_cases.SHAPES]


def _train(optimizer, policy: str, nan_step: int | None, steps: int = 3, **kwargs):
    params = _params()
    opt = optimizer(params, nonfinite=policy, ns_dtype="float32", weight_decay=0.1, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if step == nan_step:
            params[2].grad[1, 0, 2, 2] = float("inf")
            params[0].grad[3, 1] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    return opt, params


def _bits(opt, params):
    return [p.detach().clone() for p in params] + [
        t.clone() for p in params for _, t in sorted(opt.state[p].items())]


def test_host_syncs_per_step_by_policy():
    assert HOST_SYNCS_PER_STEP == {"skip": 1, "raise": 1, "mask": 0}
    assert host_syncs_per_step("mask") == 0
    assert host_syncs_per_step("mask", runs_in_backward=True) == 1
    assert host_syncs_per_step("skip", runs_in_backward=True) == 1


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
def test_mask_step_makes_no_host_sync_with_tensor_hyperparameters(optimizer):
    for name in STRATEGIES:
        events = gpu_cases.step_syncs(_params(), lambda ps, n=name: optimizer(
            ps, strategy=n, nonfinite="mask", lr=torch.tensor(0.02),
            weight_decay=torch.tensor(0.01)))
        assert events == [[]] * len(events), (name, events)


@pytest.mark.parametrize("optimizer", [NorMuon, Muon])
@pytest.mark.parametrize("nan_step", [None, 1])
def test_mask_writes_the_bits_skip_writes(optimizer, nan_step):
    skip = _train(optimizer, "skip", nan_step)
    mask = _train(optimizer, "mask", nan_step)
    for a, b in zip(_bits(*skip), _bits(*mask), strict=True):
        assert torch.equal(a, b)
    assert int(mask[0].masked_steps) == skip[0].skipped_steps == (nan_step is not None)
    assert bool(mask[0].last_step_ok) and mask[0].skipped_steps == 0


def test_mask_keeps_every_bit_of_a_nan_first_step():
    opt, params = _train(NorMuon, "mask", nan_step=0, steps=1)
    for p, fresh in zip(params, _params()):
        assert torch.equal(p.detach(), fresh)
    for p in params:  # state made, and still what a fresh optimizer holds
        state = opt.state[p]
        assert not bool(opt.last_step_ok) and float(state["step"]) == 0
        assert all(not t.any() for t in state.values())


def test_mask_skips_a_nan_on_one_rank_on_every_rank_without_a_host_sync_p2():
    results = _mask_run()
    for rank, result in enumerate(results):
        for name in STRATEGIES:
            r = result[name]
            assert all(r["equal"]), (rank, name, r["equal"])
            assert r["syncs"] == [[]] * gpu_step_cases.STEPS, (rank, name, r["syncs"])
            assert [len(e) for e in r["skip_syncs"]] == [1] * gpu_step_cases.STEPS
            ok = [True] * gpu_step_cases.STEPS
            ok[gpu_step_cases.NAN_STEP] = False
            assert r["ok"] == ok and r["masked"] == r["skipped"] == 1, (rank, name)


@functools.lru_cache(maxsize=None)
def _mask_run() -> list[dict]:
    return spawn(gpu_step_cases.mask_worker, 2, args=(STRATEGIES,))


def test_combined_optimizer_refuses_mask_in_one_line():
    opt = NorMuon(_params(), nonfinite="mask")
    with pytest.raises(ValueError, match="nonfinite='mask' is for a NorMuon/Muon stepped alone"):
        CombinedOptimizer([opt], nonfinite="mask")
