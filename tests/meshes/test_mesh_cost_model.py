"""The mesh cost model and `dist-ortho project --mesh`, from shapes alone (no process
group): bytes per mesh axis, inter-node bytes, the HSDP spread/repeat trade, the MoE presets."""

from __future__ import annotations

import math

import pytest
import torch

from dist_ortho import NorMuon
from dist_ortho.models.moe import MOE_SHAPE_PRESETS, TinyMoE, moe_matrix_shapes
from dist_ortho.models.shapes import matrix_shapes
from dist_ortho.profiling.hardware import get_preset
from dist_ortho.profiling.mesh_cost import mesh_cost, mesh_layouts, parse_mesh
from dist_ortho.studies.mesh_project import mesh_table, project_mesh

H100 = get_preset("h100")


def test_spread_moves_ns_flops_off_the_busiest_rank_and_bytes_onto_the_replicate_axis():
    shapes = matrix_shapes("llama-tiny")
    spread = mesh_cost(shapes, "replicate=2,shard=4", "balanced", H100, "spread")
    repeat = mesh_cost(shapes, "replicate=2,shard=4", "balanced", H100, "repeat")
    assert spread.total_ns_flops == repeat.total_ns_flops
    assert spread.max_ns_flops < repeat.max_ns_flops
    assert spread.bytes_by_axis["replicate"] > 0 and "replicate" not in repeat.bytes_by_axis
    # 8 ranks on one 8-GPU node: nothing leaves the node
    assert spread.inter_node_bytes == 0 and repeat.inter_node_bytes == 0


def test_inter_node_bytes_follow_the_mesh_axes_that_span_nodes():
    shapes = matrix_shapes("llama-tiny")
    # 2 nodes of 8: the replicate axis (outermost) crosses nodes, shard and tp stay inside
    spread = mesh_cost(shapes, "replicate=2,shard=4,tp=2", "balanced", H100, "spread")
    repeat = mesh_cost(shapes, "replicate=2,shard=4,tp=2", "balanced", H100, "repeat")
    nonfinite = spread.bytes_by_axis["replicate+shard+tp"]  # the one world-wide all-reduce
    assert spread.inter_node_bytes == pytest.approx(spread.bytes_by_axis["replicate"] + nonfinite)
    assert repeat.inter_node_bytes == pytest.approx(nonfinite)
    assert spread.bytes_by_axis["tp"] == repeat.bytes_by_axis["tp"] > 0  # the column exchange
    # TP inside a node, FSDP across nodes (dp=2 x tp=8): the tp axis costs no NIC bytes
    both = mesh_cost(shapes, "dp=2,tp=8", "balanced", H100, "spread")
    off_tp = sum(v for k, v in both.bytes_by_axis.items() if k != "tp")
    assert both.bytes_by_axis["tp"] > 0 and 0 < both.inter_node_bytes <= off_tp


def test_placements_of_a_torchtitan_style_model():
    layouts = {lay.name: lay for lay in mesh_layouts(matrix_shapes("llama-tiny"),
                                                     parse_mesh("dp=2,tp=2"))}
    q = layouts["layers.0.self_attn.q_proj.weight"]
    o = layouts["layers.0.self_attn.o_proj.weight"]
    assert "_StridedShard" in repr(q.placements[0]) and q.col_pdim is None
    assert o.col_pdim == 1  # row-parallel: columns over tp, traded for rows
    moe = {lay.name: lay for lay in mesh_layouts(moe_matrix_shapes("moe-tiny"),
                                                 parse_mesh("ep=2,dp=2"))}
    stack = moe["layers.0.mlp.experts.gate_up_proj"]
    assert stack.expert_dims == (0,) and stack.group_dims == (1,)


def test_moe_presets_store_fused_expert_stacks():
    shapes = dict(moe_matrix_shapes("moe-large"))
    c = MOE_SHAPE_PRESETS["moe-large"]
    assert shapes["layers.0.mlp.experts.gate_up_proj"] == (c.n_experts, 2 * c.expert_intermediate,
                                                           c.hidden)
    assert shapes["layers.0.mlp.experts.down_proj"] == (c.n_experts, c.hidden,
                                                        c.expert_intermediate)
    with pytest.raises(ValueError, match="moe-large"):
        moe_matrix_shapes("moe-huge")


def test_tiny_moe_trains_under_normuon():
    torch.manual_seed(0)
    model = TinyMoE()
    stacks = [p for n, p in model.named_parameters() if p.ndim == 3]
    assert {tuple(p.shape) for p in stacks} == {(4, 32, 32), (4, 32, 16)}
    opt = NorMuon(stacks + [model.lm_head.weight], lr=0.02, ns_dtype="float32")
    adam = torch.optim.AdamW([p for p in model.parameters() if p.ndim < 3 and
                              p is not model.lm_head.weight], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (4, 17), generator=g)
    losses = []
    for _ in range(8):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        adam.step()
        opt.zero_grad()
        adam.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_project_mesh_rows_and_table():
    rows = project_mesh("llama-tiny", "replicate=2,shard=2,tp=2", strategy_names=["balanced",
                                                                                   "round_robin"])
    assert [(r["strategy"], r["replicas"]) for r in rows] == [
        ("balanced", "spread"), ("balanced", "repeat"), ("round_robin", "spread"),
        ("round_robin", "repeat")]
    assert all(math.isfinite(r["step_s"]) and r["world_size"] == 8 for r in rows)
    table = mesh_table(rows)
    assert "inter-node GB/rank" in table and "GB replicate" in table
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("dp:4")

