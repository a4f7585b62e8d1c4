"""Every strategy equals the single-process reference on real gloo process groups at P = 1..4,
and moves exactly the bytes its plan() predicts. One spawn per world size runs all cases."""

from __future__ import annotations

import functools

import pytest

import dist_cases
from dist_ortho import strategies
from dist_ortho.testing import spawn

STRATEGIES = strategies.available()
CASES = dist_cases.exactness_cases(STRATEGIES)
WORLD_SIZES = [1, 2, 3, 4]


def assert_bytes_equal(counted: dict, planned: dict, context=None) -> None:
    """Counted bytes per kind equal the plan's (all_reduce's 2(P-1)/P factor is fractional)."""
    assert counted.keys() == planned.keys(), (context, counted, planned)
    for kind in counted:
        assert counted[kind] == pytest.approx(planned[kind], rel=1e-12, abs=1e-9), \
            (context, kind, counted[kind], planned[kind])


@functools.lru_cache(maxsize=None)
def results(world_size: int):
    return spawn(dist_cases.exactness_worker, world_size, args=(CASES,))


def case_id(case):
    opts = ",".join(f"{k}={v}" for k, v in case["options"].items())
    shapes = {id(dist_cases.MIXED): "mixed", id(dist_cases.SINGLE): "single",
              id(dist_cases.FEW): "few", id(dist_cases.SMALL_BF16): "small"}[id(case["shapes"])]
    return (f"{case['strategy']}[{opts}]-{shapes}-{case['algo']}-{case['ns_dtype']}"
            f"-nesterov={case['nesterov']}-wd={case['weight_decay']}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("k", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_matches_reference_and_plan(world_size, k):
    case = CASES[k]
    per_rank = [r[k] for r in results(world_size)]
    tolerance = 1e-5 if case["ns_dtype"] == "float32" else 2e-3
    for rank, res in enumerate(per_rank):
        assert max(res["errors"]) <= tolerance, (rank, res["errors"])
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
        if case["shapes"] is dist_cases.MIXED and case["algo"] == "normuon" and not case["options"] \
                and case["nesterov"]:
            by_name[case["strategy"]] = sum(results(world_size)[0][k]["all_planned_flops"])
    total = by_name["round_robin"]
    assert by_name["replicated"] == world_size * total
    for name in ("allgather_scatter", "balanced"):
        assert by_name[name] == total


def test_hsdp_mesh_schedules_across_shard_axis():
    cases = [c for c in CASES if c["shapes"] is dist_cases.MIXED and c["algo"] == "normuon"
             and c["nesterov"] and c["strategy"] in ("balanced", "round_robin", "bucketed_async")]
    out = spawn(dist_cases.hsdp_worker, 4, args=(cases,))
    for rank_results in out:
        for res in rank_results:
            assert max(res["errors"]) <= 1e-5, res["errors"]
            for counted, planned in zip(res["counted"], res["planned"]):
                assert_bytes_equal(counted, planned)


def test_plain_replicated_params_owner_broadcast():
    cases = [c for c in CASES if c["shapes"] is dist_cases.MIXED and c["algo"] == "normuon"
             and c["nesterov"] and not c["options"]]
    out = spawn(dist_cases.plain_worker, 3, args=(cases,))
    for rank_results in out:
        for case, res in zip(cases, rank_results):
            assert max(res["errors"]) <= 1e-5, (case["strategy"], res["errors"])
            for counted, planned in zip(res["counted"], res["planned"]):
                assert_bytes_equal(counted, planned)
            if case["strategy"] != "replicated":
                assert "broadcast" in res["counted"][0]


def test_bad_input_raises_on_every_rank_before_any_collective():
    out = spawn(dist_cases.bad_input_worker, 2)
    for key, message in out[0].items():
        assert message is not None, f"{key} did not raise ValueError"
        assert out[1][key] == message, "every rank must raise the same error"
    assert "tp.weight" in out[0]["shard1"] and "Shard(0)" in out[0]["shard1"]
    assert "norm.weight" in out[0]["vector"] and "AdamW" in out[0]["vector"]
    assert "'big'" in out[0]["bucket_too_small"] and "16384" in out[0]["bucket_too_small"]
    assert "ring_of_fire" in out[0]["unknown_strategy"]
    assert "max_in_flight" in out[0]["bad_option"]
    assert "bucket_bytes" in out[0]["unknown_option"]
    assert "mixed parameter dtypes" in out[0]["mixed_dtypes"]
    assert "lr" in out[0]["nan_lr"] and "beta2" in out[0]["beta_one"]


def test_nonfinite_gradient_skips_step_on_every_rank():
    out = spawn(dist_cases.nonfinite_worker, 3)
    for res in out:
        assert res == dict(unchanged=True, state_untouched=True, skipped=1, warned=True,
                           finite_after=True), res


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_transformer_training_matches_single_process(world_size):
    out = spawn(dist_cases.fsdp_train_worker, world_size, args=(STRATEGIES,))
    res = out[0]
    for name, run in res["runs"].items():
        assert run["losses"] == pytest.approx(res["reference_losses"], rel=1e-5), name
        worst = max(run["param_errors"], key=run["param_errors"].get)
        # relative to the whole parameter: float32 reduction order differs (reduce-scatter vs
        # one full-batch backward), nothing else may
        assert run["param_errors"][worst] < 1e-5, (name, worst, run["param_errors"][worst])
    # every rank saw the same numbers
    assert all(o["runs"][n]["losses"] == res["runs"][n]["losses"] for o in out for n in res["runs"])
