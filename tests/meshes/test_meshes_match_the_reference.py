"""2-D meshes on real gloo groups, 4 ranks: HSDP replicas share the Newton-Schulz work
(`replicas="spread"`) or repeat it, tensor parallel (parallelize_module + fully_shard) and expert
parallel stacks. Every strategy equals the single-process reference within the derived float32
bound (tests/meshes/mesh_cases.py says why no new term enters it), the bytes counted at the
collectives equal the plan's per (kind, mesh axis), the FLOPs run equal the plan's. One spawn runs
it all.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from dist_ortho import strategies
from dist_ortho.core.plan import all_reduce_bytes
from dist_ortho.core.sharding import MatrixSpec
from dist_ortho.testing.processes import spawn
from tests import tolerances
from tests.meshes import mesh_cases

STRATEGIES = strategies.available_exact()
_CKPT = tempfile.TemporaryDirectory(prefix="dist_ortho_mesh_ckpt_")  # removed at exit
JOBS = [("hsdp", mesh_cases.hsdp_worker, (STRATEGIES,)), ("tp", mesh_cases.tp_worker, (STRATEGIES,)),
        ("ep", mesh_cases.ep_worker, (STRATEGIES,)), ("bad", mesh_cases.bad_mesh_input_worker, ()),
        ("tp_train", mesh_cases.tp_train_worker, (STRATEGIES,)),
        ("ep_train", mesh_cases.ep_train_worker, (STRATEGIES,)),
        ("tp_ckpt", mesh_cases.tp_checkpoint_worker, (_CKPT.name,))]


@functools.lru_cache(maxsize=None)
def suite() -> list[dict]:
    return spawn(mesh_cases.suite_worker, 4, args=(JOBS,))


def check_run(res: dict, context) -> None:
    tolerances.report("mesh vs reference, float32", res["ratios"])
    assert max(res["ratios"]) <= 1.0, (context, res["ratios"])
    for counted in res["counted"]:  # every step, per (kind, axis), exactly
        assert counted.keys() == res["planned"].keys(), (context, counted, res["planned"])
        for key, (send, recv) in counted.items():
            assert send == pytest.approx(res["planned"][key][0], rel=1e-12, abs=1e-9), (context, key)
            assert recv == pytest.approx(res["planned"][key][1], rel=1e-12, abs=1e-9), (context, key)
    assert res["executed_flops"] == res["planned_flops"], context
    assert not res["unparsed"], (context, res["unparsed"])


def runs(job: str):
    """{case key: [result on rank 0..3]}"""
    per_rank = [rank[job] for rank in suite()]
    return {key: [r[key] for r in per_rank] for key in per_rank[0]
            if isinstance(per_rank[0][key], dict) and "ratios" in per_rank[0][key]}


@pytest.mark.exactness
def test_hsdp_every_strategy_spread_and_repeat_matches_reference_and_plan():
    cases = runs("hsdp")
    assert len(cases) == 2 * 2 * len(STRATEGIES) + 2 * len(STRATEGIES) + 1
    for key, per_rank in cases.items():
        mesh, replicas, name, shapes = key
        for rank, res in enumerate(per_rank):
            check_run(res, (key, rank))
            assert res["replicas"] == replicas
            axes = {axis for _, axis in res["counted"][0]}
            # spread on a real replicate axis: results cross it (one all-to-all); repeat: never
            crosses = ("all_to_all", "replicate") in res["counted"][0]
            assert crosses == (replicas == "spread" and mesh in ("2x2", "4x1")), (key, axes)
            # R = 1 (1x4): nothing to spread, the plain FSDP path and its plan
            assert res["mesh_path"] == (replicas == "spread" and mesh != "1x4"), key
        assert all(r["all_planned_flops"] == per_rank[0]["all_planned_flops"] for r in per_rank)


def test_hsdp_spread_quarters_the_busiest_rank_ns_flops():
    """2x2, each matrix once in the job: the busiest rank runs 1/4 of the job's NS FLOPs with
    equal-cost matrices (1/2 under repeat), and at most 1/4 + the largest matrix (LPT's bound)
    on MIXED. `replicated` duplicates NS inside the shard group by design: spread halves it
    (with equal-cost matrices; MIXED's largest matrix is half of the job)."""
    cases = runs("hsdp")
    for name in STRATEGIES:
        for shapes in ("even", "mixed"):
            spread = cases[("2x2", "spread", name, shapes)][0]
            repeat = cases[("2x2", "repeat", name, shapes)][0]
            job = spread["job_flops"]
            assert repeat["job_flops"] == job
            per_rank_spread = spread["all_planned_flops"]
            if name == "replicated":  # every rank of a shard group runs its replica's share
                if shapes == "even":
                    assert max(per_rank_spread) == job / 2
                    assert max(repeat["all_planned_flops"]) == job
                assert max(per_rank_spread) <= max(repeat["all_planned_flops"])
                continue
            if name == "megabatch":  # pads each shape group with zero matrices, by design:
                # more NS than the job; spreading still lightens the busiest rank
                assert sum(per_rank_spread) >= job
                assert max(per_rank_spread) < max(repeat["all_planned_flops"]), per_rank_spread
                continue
            assert sum(per_rank_spread) == job  # once in the whole job
            assert sum(repeat["all_planned_flops"]) == job  # per replica group
            if shapes == "even":
                assert max(per_rank_spread) == job / 4, (name, per_rank_spread)
                assert max(repeat["all_planned_flops"]) == job / 2, name
            else:
                biggest = max(m.flops for m in _mixed_specs())
                assert max(per_rank_spread) <= job / 4 + biggest, (name, per_rank_spread)


def _mixed_specs():
    return [MatrixSpec(i, f"w{i}", s, torch.float32, (s[0],)) for i, s in
            enumerate(mesh_cases.dist_cases.MIXED)]


@pytest.mark.exactness
def test_tensor_parallel_every_strategy_matches_reference_and_plan():
    out = [rank["tp"] for rank in suite()]
    # the layouts torch made: column-parallel under FSDP2 is _StridedShard, row-parallel Shard(1)
    assert "_StridedShard(dim=0, sf=2)" in out[0]["placements"][0]
    assert "Shard(dim=1)" in out[0]["placements"][1]
    for key, per_rank in runs("tp").items():
        for rank, res in enumerate(per_rank):
            check_run(res, (key, rank))
            assert res["mesh_path"]
            # column blocks trade for rows on the tp axis; whole matrices are assembled over dp+tp
            assert ("all_to_all", "tp") in res["counted"][0], key


@pytest.mark.exactness
def test_expert_parallel_stacks_local_and_split():
    for (name, which), per_rank in runs("ep").items():
        for rank, res in enumerate(per_rank):
            check_run(res, (name, which, rank))
            if which == "local":  # whole experts: orthogonalized where they live, no traffic
                assert res["counted"][0] == {("all_reduce", "ep+dp"):
                                             (all_reduce_bytes(4, 4), all_reduce_bytes(4, 4))}
        if which == "local":  # 4 + 4 + 3 experts over 4 ranks: one rank holds two stacks only
            flops = per_rank[0]["all_planned_flops"]
            assert sum(flops) == per_rank[0]["job_flops"] and min(flops) < max(flops)


def test_unschedulable_placements_raise_on_every_rank_before_any_collective():
    out = [rank["bad"] for rank in suite()]
    for key, message in out[0].items():
        assert message is not None, f"{key} did not raise ValueError"
        assert all(o[key] == message for o in out), key
    assert "'tp.partial'" in out[0]["partial"] and "Partial" in out[0]["partial"]
    assert "'w.cols'" in out[0]["two_column_axes"]
    assert "'w.order'" in out[0]["columns_before_rows"] and "last" in out[0]["columns_before_rows"]
    assert "'conv'" in out[0]["conv_columns"]
    assert "replicas" in out[0]["bad_replicas"] and "spread" in out[0]["bad_replicas"]


@pytest.mark.exactness
def test_fsdp_tp_2x2_training_matches_single_process():
    out = [rank["tp_train"] for rank in suite()]
    res = out[0]
    assert sorted(res["runs"]) == sorted(STRATEGIES)
    for name, run in res["runs"].items():
        assert run["on_mesh"], name
        placements = run["placements"]
        assert "_StridedShard" in placements["blocks.0.mlp.fc_in.weight"]
        assert "Shard(dim=1)" in placements["blocks.0.mlp.fc_out.weight"]
        tolerances.report("FSDP2+TP training losses", run["loss_ratios"])
        assert max(run["loss_ratios"]) <= 1.0, (name, run["loss_ratios"])
        tolerances.report("FSDP2+TP training weights", list(run["param_ratios"].values()))
        assert max(run["param_ratios"].values()) <= 1.0, (name, run["param_ratios"])
    assert all(o["runs"][n]["losses"] == res["runs"][n]["losses"] for o in out for n in res["runs"])


@pytest.mark.exactness
def test_moe_with_expert_stacks_on_an_ep_axis_trains_like_single_process():
    out = [rank["ep_train"] for rank in suite()]
    res = out[0]
    assert sorted(res["runs"]) == sorted(STRATEGIES)
    for name, run in res["runs"].items():
        assert run["on_mesh"], name
        assert all(v == "(Shard(dim=0), Replicate())" for v in run["stacks"].values()), run
        tolerances.report("EP MoE training losses", run["loss_ratios"])
        assert max(run["loss_ratios"]) <= 1.0, (name, run["loss_ratios"])
        tolerances.report("EP MoE training weights", list(run["param_ratios"].values()))
        assert max(run["param_ratios"].values()) <= 1.0, (name, run["param_ratios"])
    assert all(o["runs"][n]["losses"] == res["runs"][n]["losses"] for o in out for n in res["runs"])


def test_checkpoint_of_a_tensor_parallel_model_resumes_bitwise():
    for res in [rank["tp_ckpt"] for rank in suite()]:
        assert res == dict(loaded=2, bitwise=True), res
