"""`balanced` with the node-aware exchange (`exchange="two_level"`): on real gloo groups at
P = 2..4 with nodes of 2 and 3 ranks (last nodes smaller), the update equals the single-process
reference within the derived bound and the bytes and messages counted per link class
(intra-node, inter-node) equal the plan's; the plan itself equals a brute-force walk of every
piece's two hops, at sizes where nodes are full, partial and single."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from dist_ortho import strategies
from dist_ortho.models import matrix_shapes
from dist_ortho.profiling import costmodel as cm
from dist_ortho.strategies import two_level
from dist_ortho.strategies.owner_exchange import owner_pairs
from dist_ortho.testing.processes import spawn
from tests import tolerances
from tests.strategies import two_level_cases

CASES = two_level_cases.cases()


@functools.lru_cache(maxsize=None)
def results(world_size: int) -> list[list[dict]]:
    return spawn(two_level_cases.two_level_worker, world_size, args=(CASES,))


# not marked `exactness`: the pieces and their order are those of the flat exchange, so the
# update's arithmetic is balanced's, which the exactness suite repeats under every MKL path
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_two_level_exchange_matches_reference_and_plan_per_link_class(world_size):
    crossed = 0
    for k, case in enumerate(CASES):
        for rank, res in enumerate(r[k] for r in results(world_size)):
            tolerances.report("balanced two-level exchange vs reference, float32", res["ratios"])
            assert max(res["ratios"]) <= 1.0, (case, rank, res["ratios"])
            for counted, planned in zip(res["counted"], res["planned"]):  # per kind, each step
                assert counted.keys() == planned.keys(), (case, rank, counted, planned)
                for kind in counted:
                    assert counted[kind] == pytest.approx(planned[kind], rel=1e-12), (case, kind)
            assert res["links_counted"] == res["links_planned"], (case, rank)
            assert res["executed_flops"] == res["planned_flops"]
            crossed += sum(m for (_, link), (_, m) in res["links_counted"].items()
                           if link == "inter_node")
    assert crossed or world_size == 2  # P = 2: one node of either size


def _brute(src, dst, n, P, G):
    """Every piece's hops one by one: {(stage, link, rank): [send, recv, sent msgs, got msgs]}."""
    msgs: dict = {}
    for s, d, k in zip(src, dst, n):
        r = two_level.hop(int(s), int(d), G, P)
        for stage, (a, b) in enumerate(((s, r), (r, d))):
            if a != b:
                msgs.setdefault((stage, int(a), int(b)), 0)
                msgs[(stage, int(a), int(b))] += k
    out: dict = {}
    for (stage, a, b), k in msgs.items():
        link = "intra_node" if a // G == b // G else "inter_node"
        out.setdefault((stage, link, a), [0, 0, 0, 0])
        out.setdefault((stage, link, b), [0, 0, 0, 0])
        out[(stage, link, a)][0] += k
        out[(stage, link, a)][2] += 1
        out[(stage, link, b)][1] += k
        out[(stage, link, b)][3] += 1
    return out


@pytest.mark.parametrize("P, G", [(8, 4), (10, 4), (9, 3), (5, 8), (7, 1)])
def test_two_level_plan_equals_each_piece_walked(P, G):
    specs = cm.matrix_specs([(16, 16), (3, 40), (40, 3), (7, 5), (64, 8)], P)
    plan = strategies.build("balanced").plan(specs, P, 0)
    src, dst, n = owner_pairs(specs, list(plan.owner), P)
    stages = two_level.link_traffic(src, dst, n, P, G)
    brute = _brute(src, dst, n, P, G)
    for stage, per_link in enumerate(stages):
        for link, a in per_link.items():
            for r in range(P):
                want = brute.get((stage, link, r), [0, 0, 0, 0])
                assert a[:, r].tolist() == want, (stage, link, r)
    # stage 1 stays inside nodes, stage 2 only crosses them
    assert not stages[0]["inter_node"].any() and not stages[1]["intra_node"].any()


def test_two_level_cuts_inter_node_messages_at_scale():
    """llama-8b at P = 256 on nodes of 8: a rank's inter-node messages per exchange fall from
    one per owner on another node (224 matrices: up to 224) to at most N - 1 = 31, with the same
    inter-node bytes in total."""
    P, G = 256, 8
    specs = cm.matrix_specs(matrix_shapes("llama-8b"), P)
    owners = list(strategies.build("balanced").plan(specs, P, 0).owner)
    src, dst, n = owner_pairs(specs, owners, P)
    flat = two_level.flat_link_traffic(src, dst, n, P, G)[0]["inter_node"]
    two = two_level.link_traffic(src, dst, n, P, G)[1]["inter_node"]
    assert flat[2].max() >= 200 and two[2].max() <= P // G - 1
    assert two[0].sum() == pytest.approx(flat[0].sum())


@pytest.mark.parametrize("options, word", [
    (dict(exchange="ring"), "exchange"), (dict(exchange="two_level"), "ranks_per_node"),
    (dict(exchange="two_level", ranks_per_node=0), "ranks_per_node")])
def test_two_level_bad_options_name_themselves(options, word):
    with pytest.raises(ValueError, match=word):
        strategies.build("balanced", **options)


def test_flat_is_unchanged_without_the_option():
    specs = cm.matrix_specs([(16, 16), (3, 40)], 4)
    plan = strategies.build("balanced").plan(specs, 4, 0)
    assert [c.kind for c in plan.ranks[0].comm if c.phase in ("forward", "return")] == [
        "all_to_all", "all_to_all"]


def test_cost_model_prices_each_stage_on_its_link():
    """h100 preset, P = 64 on 8-GPU nodes: the two-level step's forward and return are the
    stages' link times (alpha per message + beta per byte, sends and receives at once), one
    stage inside the node and one across."""
    P = 64
    from dist_ortho.profiling.hardware import HARDWARE_PRESETS

    consts = HARDWARE_PRESETS["h100"].constants(P)
    shapes = matrix_shapes("llama-1b")
    pred = cm.predict(shapes, P, "balanced", {"exchange": "two_level", "ranks_per_node": 8},
                      constants=consts)
    comm = consts.comm
    want = 0.0
    for phase in ("forward", "return"):
        for link in two_level.LINKS:
            items = [[c for c in r.comm if c.phase == phase and c.link == link]
                     for r in pred.plan.ranks]
            want += max(max(comm.link_time(link, s.send_bytes, s.messages),
                            comm.link_time(link, g.recv_bytes, g.messages)) for s, g in items)
    stages = sum(v for k, v in pred.time.comm_by_kind_s.items() if k in two_level.LINKS)
    assert stages == pytest.approx(want, rel=1e-12) and want > 0
