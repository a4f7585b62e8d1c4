"""Every strategy equals the single-process reference on real gloo process groups at P = 1..4,
and moves exactly the bytes its plan() predicts. One spawn per world size runs every case of that
world size (the exactness cases, HSDP, plain tensors, FSDP2 training, bad input, NaN).

"Equals" means: within the float32 rounding bound derived in tests/tolerances.py, which holds on
every BLAS kernel path (.ci/run repeats the `exactness` tests under each MKL instruction set and
1 and 2 threads per rank); workers return distance / bound ("ratios").
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from dist_ortho import strategies
from dist_ortho.testing.processes import spawn
from tests import tolerances
from tests.optimizer import gpu_cases
from tests.strategies import dist_cases

STRATEGIES = strategies.available_exact()
CASES = dist_cases.exactness_cases(STRATEGIES)
WORLD_SIZES = [1, 2, 3, 4]
HSDP_CASES = [c for c in CASES if c["shapes"] is dist_cases.MIXED and c["rule"] == "normuon"
              and c["nesterov"] and c["strategy"] in ("balanced", "round_robin", "bucketed_async")]
PLAIN_CASES = [c for c in CASES if c["shapes"] is dist_cases.MIXED and c["rule"] == "normuon"
               and c["nesterov"] and not c["options"]]


def jobs(world_size: int) -> list[tuple[str, Callable, tuple]]:
    """Everything one spawn at this world size runs (dist_cases.suite_worker)."""
    out = [("exactness", dist_cases.exactness_worker, (CASES,))]
    if world_size == 2:
        out += [("fsdp_train", dist_cases.fsdp_train_worker, (STRATEGIES,)),
                ("bad_input", dist_cases.bad_input_worker, ()),
                ("host_syncs", gpu_cases.sync_count_worker, (STRATEGIES,))]
    if world_size == 3:
        out += [("fsdp_train", dist_cases.fsdp_train_worker, (STRATEGIES,)),
                ("plain", dist_cases.plain_worker, (PLAIN_CASES,)),
                ("nonfinite", dist_cases.nonfinite_worker, ())]
    if world_size == 4:
        out += [("hsdp", dist_cases.hsdp_worker, (HSDP_CASES,))]
    return out


@functools.lru_cache(maxsize=None)
def suite(world_size: int) -> list[dict]:
    return spawn(dist_cases.suite_worker, world_size, args=(jobs(world_size),))


def results(world_size: int) -> list[list[dict]]:
    return [rank["exactness"] for rank in suite(world_size)]


def assert_ratios(ratios, family: str, context=None) -> None:
    tolerances.report(family, ratios)
    assert max(ratios) <= 1.0, (f"{max(ratios):.2f} x the derived bound", ratios, context)


def assert_bytes_equal(counted: dict, planned: dict, context=None) -> None:
    """Counted bytes per kind equal the plan's (all_reduce's 2(P-1)/P factor is fractional)."""
    assert counted.keys() == planned.keys(), (context, counted, planned)
    for kind in counted:
        assert counted[kind] == pytest.approx(planned[kind], rel=1e-12, abs=1e-9), \
            (context, kind, counted[kind], planned[kind])


def case_id(case):
    opts = ",".join(f"{k}={v}" for k, v in case["options"].items())
    shapes = {id(dist_cases.MIXED): "mixed", id(dist_cases.SINGLE): "single",
              id(dist_cases.FEW): "few", id(dist_cases.SMALL_BF16): "small"}[id(case["shapes"])]
    return (f"{case['strategy']}[{opts}]-{shapes}-{case['rule']}-{case['ns_dtype']}"
            f"-nesterov={case['nesterov']}-wd={case['weight_decay']}")


@pytest.mark.exactness
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("k", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_matches_reference_and_plan(world_size, k):
    case = CASES[k]
    per_rank = [r[k] for r in results(world_size)]
    for rank, res in enumerate(per_rank):
        assert_ratios(res["ratios"], f"strategies vs reference, {case['ns_dtype']}", rank)
        # bytes counted at the collectives equal the plan, per rank, per kind, every step
        for counted, planned in zip(res["counted"], res["planned"]):
            assert_bytes_equal(counted, planned, rank)
        assert res["executed_flops"] == res["planned_flops"], rank
        assert not res["unparsed"], res["unparsed"]
    if world_size == 1:
        assert all(not c for res in per_rank for c in res["counted"]), "P=1 must not communicate"
    # the plan is the same on every rank
    assert all(r["owners"] == per_rank[0]["owners"] for r in per_rank)
    assert all(r["all_planned_flops"] == per_rank[0]["all_planned_flops"] for r in per_rank)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_replicated_does_p_times_the_work(world_size):
    by_name = {}
    for k, case in enumerate(CASES):
        if case["shapes"] is dist_cases.MIXED and case["rule"] == "normuon" and not case["options"] \
                and case["nesterov"]:
            by_name[case["strategy"]] = sum(results(world_size)[0][k]["all_planned_flops"])
    total = by_name["round_robin"]
    assert by_name["replicated"] == world_size * total
    for name in ("allgather_scatter", "balanced"):
        assert by_name[name] == total


@pytest.mark.exactness
def test_hsdp_mesh_schedules_across_shard_axis():
    for rank in suite(4):
        for res in rank["hsdp"]:
            assert_ratios(res["ratios"], "HSDP vs reference, float32")
            for counted, planned in zip(res["counted"], res["planned"]):
                assert_bytes_equal(counted, planned)


@pytest.mark.exactness
def test_plain_replicated_params_owner_broadcast():
    for rank in suite(3):
        for case, res in zip(PLAIN_CASES, rank["plain"]):
            assert_ratios(res["ratios"], "plain tensors vs reference, float32", case["strategy"])
            for counted, planned in zip(res["counted"], res["planned"]):
                assert_bytes_equal(counted, planned)
            if case["strategy"] != "replicated":
                assert "broadcast" in res["counted"][0]


def test_bad_input_raises_on_every_rank_before_any_collective():
    out = [rank["bad_input"] for rank in suite(2)]
    for key, message in out[0].items():
        assert message is not None, f"{key} did not raise ValueError"
        assert out[1][key] == message, "every rank must raise the same error"
    assert "tp.weight" in out[0]["partial"] and "Partial" in out[0]["partial"]
    assert "norm.weight" in out[0]["vector"] and "AdamW" in out[0]["vector"]
    assert "'big'" in out[0]["bucket_too_small"] and "16384" in out[0]["bucket_too_small"]
    assert "ring_of_fire" in out[0]["unknown_strategy"]
    assert "max_in_flight" in out[0]["bad_option"]
    assert "bucket_bytes" in out[0]["unknown_option"]
    assert "mixed parameter dtypes" in out[0]["mixed_dtypes"]
    assert "lr" in out[0]["nan_lr"] and "beta2" in out[0]["beta_one"]


def test_nonfinite_gradient_skips_step_on_every_rank():
    for res in [rank["nonfinite"] for rank in suite(3)]:
        assert res == dict(unchanged=True, state_untouched=True, skipped=1, warned=True,
                           finite_after=True), res


@pytest.mark.exactness
@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_transformer_training_matches_single_process(world_size):
    """Losses and weights of FSDP2 training equal single-process training within the derived bound
    (dist_cases.fsdp_train_worker): FSDP2 reduce-scatters gradients summed in another order, and
    that rounding, not only the optimizer's, goes through 4 steps; nothing else may differ."""
    out = [rank["fsdp_train"] for rank in suite(world_size)]
    res = out[0]
    for name, run in res["runs"].items():
        # the gradient model itself, at step 0 where the weights are still the same
        assert_ratios(list(run["grad_ratios"].values()), "FSDP2 gradients (step 0)", name)
        assert_ratios(run["loss_ratios"], "FSDP2 training losses", name)
        assert_ratios(list(run["param_ratios"].values()), "FSDP2 training weights", name)
    # every rank saw the same numbers
    assert all(o["runs"][n]["losses"] == res["runs"][n]["losses"] for o in out for n in res["runs"])


def test_host_syncs_per_step_p2_gloo():
    """On 2 gloo ranks with FSDP2-style DTensor shards, every strategy's NorMuon step makes exactly
    the documented host syncs (dist_ortho.optim.optimizer.HOST_SYNCS_PER_STEP; P = 1 and CUDA in
    tests/optimizer/test_gpu_readiness.py)."""
    for rank, result in enumerate(rank["host_syncs"] for rank in suite(2)):
        assert sorted(result) == sorted(STRATEGIES)
        for name, events in result.items():
            gpu_cases.assert_one_sync_per_step(events, (rank, name))
