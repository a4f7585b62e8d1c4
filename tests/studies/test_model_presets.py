"""Tests for dist_ortho.models: GPT presets, shape-only models, synthetic grads."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_ortho.models import (GPT, GPT_PRESETS, SHAPE_PRESETS, ShapeOnlyModel, available,
                               build_model, count_parameters, is_shape_only, matrix_shapes,
                               synthetic_grads)
from tests.devices import cpu_ranks_only

# --------------------------------------------------------------------- GPT


@pytest.mark.parametrize("name", sorted(GPT_PRESETS))
def test_gpt_preset_configs_are_valid(name: str) -> None:
    config = GPT_PRESETS[name]
    config.validate()
    model = build_model(name, device="meta")
    assert isinstance(model, GPT)
    assert len(model.blocks) == config.n_layers
    assert model.lm_head.weight is not model.tok_emb.weight


def test_gpt_preset_sizes() -> None:
    assert 4.5e6 < count_parameters(build_model("gpt-small", device="meta")) < 5.5e6
    c = GPT_PRESETS["gpt-125m"]
    assert (c.vocab_size, c.seq_len, c.d_model, c.n_layers, c.n_heads) == (50304, 1024, 768, 12, 12)
    for name in ("gpt-tiny", "gpt-mini", "gpt-small"):
        assert GPT_PRESETS[name].vocab_size == 256


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-mini"])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_gpt_forward_backward(name: str, fused_qkv: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, fused_qkv=fused_qkv)
    T = model.config.seq_len
    idx = torch.randint(0, 256, (2, T))
    logits, loss = model(idx, idx.roll(-1, dims=1))
    assert logits.shape == (2, T, 256)
    assert torch.isfinite(loss)
    # Small init => nearly uniform predictions => loss close to ln(vocab).
    assert abs(loss.item() - math.log(256)) < 0.15
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert torch.equal(model(idx), logits.detach())


def test_fused_and_separate_qkv_structure() -> None:
    sep = build_model("gpt-tiny", fused_qkv=False)
    fused = build_model("gpt-tiny", fused_qkv=True)
    d = sep.config.d_model
    attn_sep, attn_fused = sep.blocks[0].attn, fused.blocks[0].attn
    assert attn_fused.qkv_proj.weight.shape == (3 * d, d)
    assert not hasattr(attn_fused, "q_proj") and not hasattr(attn_sep, "qkv_proj")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(attn_sep, proj).weight.shape == (d, d)
    assert count_parameters(sep) == count_parameters(fused)


def test_fused_qkv_matches_separate_with_same_weights() -> None:
    torch.manual_seed(0)
    sep = build_model("gpt-tiny", fused_qkv=False)
    fused = build_model("gpt-tiny", fused_qkv=True)
    state = dict(sep.state_dict())
    for i in range(sep.config.n_layers):
        pre = f"blocks.{i}.attn."
        state[pre + "qkv_proj.weight"] = torch.cat(
            [state.pop(pre + f"{p}_proj.weight") for p in "qkv"], dim=0
        )
    fused.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(fused(idx), sep(idx))


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    idx = torch.randint(0, 256, (1, 32))
    changed = idx.clone()
    changed[0, 20] = (idx[0, 20] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_gpt_init_is_deterministic_and_scaled() -> None:
    torch.manual_seed(123)
    a = build_model("gpt-mini")
    torch.manual_seed(123)
    b = build_model("gpt-mini")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    n_layers = a.config.n_layers
    blk = a.blocks[0]
    assert blk.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    expected_out = 0.02 / math.sqrt(2 * n_layers)
    assert blk.attn.o_proj.weight.std().item() == pytest.approx(expected_out, rel=0.1)
    assert blk.mlp.fc_out.weight.std().item() == pytest.approx(expected_out, rel=0.1)
    assert torch.equal(blk.attn_norm.weight, torch.ones_like(blk.attn_norm.weight))


def test_gpt_meta_build_to_empty_then_init_matches_eager() -> None:
    torch.manual_seed(7)
    eager = build_model("gpt-tiny")
    meta = build_model("gpt-tiny", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.reset_parameters()
    for (n, p), (_, q) in zip(eager.named_parameters(), meta.named_parameters()):
        assert torch.equal(p, q), n
    idx = torch.randint(0, 256, (2, 8))
    assert torch.equal(eager(idx), meta(idx))


def test_gpt_tied_embeddings_and_dtype() -> None:
    tied = build_model("gpt-tiny", tie_embeddings=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    tied_meta = build_model("gpt-tiny", device="meta", tie_embeddings=True)
    tied_meta.to_empty(device="cpu")
    tied_meta.reset_parameters()
    assert tied_meta.lm_head.weight is tied_meta.tok_emb.weight
    untied = build_model("gpt-tiny")
    assert count_parameters(untied) - count_parameters(tied) == 256 * 64
    bf16 = build_model("gpt-tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    _, loss = bf16(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gpt_user_errors() -> None:
    model = build_model("gpt-tiny")
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, model.config.seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads"):
        build_model("gpt-tiny", n_heads=5)
    with pytest.raises(ValueError, match="'d_modle'"):
        build_model("gpt-tiny", d_modle=32)


# ----------------------------------------------------------- registry names


def test_registry_names() -> None:
    names = available()
    assert set(GPT_PRESETS) | set(SHAPE_PRESETS) == set(names)
    for n in ("gpt-tiny", "gpt-mini", "gpt-small", "gpt-125m"):
        assert n in names and not is_shape_only(n)
    for n in ("llama-1b", "llama-8b", "llama-70b", "llama-tiny", "transformer-bench"):
        assert n in names and is_shape_only(n)
    with pytest.raises(ValueError, match="'gpt-huge'.*gpt-tiny"):
        build_model("gpt-huge")
    with pytest.raises(ValueError, match="'llama-9b'"):
        is_shape_only("llama-9b")
    with pytest.raises(ValueError, match="'llama-9b'"):
        matrix_shapes("llama-9b")
    with pytest.raises(ValueError, match="'fused_qkv'"):
        build_model("llama-tiny", fused_qkv=True)


# --------------------------------------------------------------- shape-only


def _dims(preset: str) -> dict[str, tuple[int, ...]]:
    return {n.split(".", 2)[2]: s for n, s in matrix_shapes(preset) if n.startswith("layers.0.")}


@pytest.mark.parametrize(
    "preset, hidden, inter, heads, kv_heads, head_dim, layers",
    [
        ("llama-1b", 2048, 8192, 32, 8, 64, 16),
        ("llama-8b", 4096, 14336, 32, 8, 128, 32),
        ("llama-70b", 8192, 28672, 64, 8, 128, 80),
    ],
)
def test_llama_shapes_match_published_dims(
    preset: str, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, layers: int
) -> None:
    shapes = matrix_shapes(preset)
    assert len(shapes) == 7 * layers
    assert shapes[-1][0] == f"layers.{layers - 1}.mlp.down_proj.weight"
    assert _dims(preset) == {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def test_llama_parameter_totals() -> None:
    # Layer matrices only; the published totals add ~1.05B of embeddings.
    total_8b = sum(math.prod(s) for _, s in matrix_shapes("llama-8b"))
    total_70b = sum(math.prod(s) for _, s in matrix_shapes("llama-70b"))
    assert total_8b == 6_979_321_856
    assert total_70b == 68_451_041_280


def test_matrix_shapes_num_layers_and_structure() -> None:
    assert len(matrix_shapes("llama-70b", num_layers=2)) == 14
    tiny = _dims("llama-tiny")
    assert tiny["self_attn.k_proj.weight"][0] < tiny["self_attn.q_proj.weight"][0]  # GQA
    assert tiny["mlp.gate_proj.weight"] == tiny["mlp.down_proj.weight"][::-1]
    bench = _dims("transformer-bench")
    assert bench["self_attn.q_proj.weight"] == (512, 512)
    assert bench["mlp.up_proj.weight"] == (1376, 512)
    with pytest.raises(ValueError, match="num_layers"):
        matrix_shapes("llama-tiny", num_layers=0)


def test_shape_only_model_matches_matrix_shapes() -> None:
    model = build_model("llama-tiny", num_layers=3)
    assert isinstance(model, ShapeOnlyModel) and len(model.layers) == 3
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == matrix_shapes("llama-tiny", num_layers=3)
    assert count_parameters(model) == sum(math.prod(s) for _, s in got)
    with pytest.raises(RuntimeError, match="optimizer"):
        model(torch.zeros(1))
    with pytest.raises(RuntimeError, match="no forward"):
        model.layers[0](torch.zeros(1))


def test_shape_only_init_by_seed() -> None:
    a = build_model("llama-tiny", seed=1)
    torch.manual_seed(999)  # the global RNG must not matter
    b = build_model("llama-tiny", seed=1)
    c = build_model("llama-tiny", seed=2, dtype=torch.bfloat16)
    for (n, p), (_, q), (_, r) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters()
    ):
        assert torch.equal(p, q), n
        assert r.dtype == torch.bfloat16 and not torch.equal(p.to(r.dtype), r), n
        assert p.std().item() == pytest.approx(0.02, rel=0.1)


def test_shape_only_meta_build_then_init() -> None:
    meta = build_model("llama-70b", device="meta", num_layers=80)
    assert count_parameters(meta) == 68_451_041_280
    small = ShapeOnlyModel("llama-tiny", device="meta", seed=3)
    small.to_empty(device="cpu")
    small.reset_parameters()
    eager = ShapeOnlyModel("llama-tiny", seed=3)
    for (n, p), (_, q) in zip(small.named_parameters(), eager.named_parameters()):
        assert torch.equal(p, q), n


def test_synthetic_grads_deterministic_and_varied() -> None:
    a, b = build_model("llama-tiny"), build_model("llama-tiny")
    synthetic_grads(a, step=5, seed=0)
    torch.manual_seed(1234)
    synthetic_grads(b, step=5, seed=0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.grad is not None and p.grad.shape == p.shape, n
        assert torch.equal(p.grad, q.grad), n
    first = {n: p.grad.clone() for n, p in a.named_parameters()}
    synthetic_grads(a, step=6, seed=0)
    synthetic_grads(b, step=5, seed=1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert not torch.equal(p.grad, first[n]), n
        assert not torch.equal(q.grad, first[n]), n
    # k_proj and v_proj have the same shape; the name must change the values.
    layer = a.layers[0].self_attn
    assert not torch.equal(layer.k_proj.weight.grad, layer.v_proj.weight.grad)


def test_synthetic_grads_follow_param_dtype() -> None:
    model = build_model("llama-tiny", dtype=torch.bfloat16)
    ref = build_model("llama-tiny")
    synthetic_grads(model, 0, 0)
    synthetic_grads(ref, 0, 0)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.bfloat16 and p.grad.device == p.device
        assert torch.equal(p.grad, q.grad.to(torch.bfloat16))


# -------------------------------------------------- FSDP2 sharded parameters


def _fsdp_worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        # hidden=131 rows do not split evenly over 2 ranks: exercises uneven shards.
        model = build_model("llama-tiny", hidden=131, seed=4)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        synthetic_grads(model, step=3, seed=9)
        out = {}
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
            assert p.grad.placements == p.placements, name
            assert p.grad.to_local().shape == p.to_local().shape, name
            out[name] = (p.to_local().clone(), p.grad.to_local().clone())
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@cpu_ranks_only
def test_synthetic_grads_and_init_on_fsdp2_shards(tmp_path) -> None:
    world_size = 2
    mp.spawn(
        _fsdp_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    ref = build_model("llama-tiny", hidden=131, seed=4)
    synthetic_grads(ref, step=3, seed=9)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, p in ref.named_parameters():
        # The union of rank shards (dim 0, in rank order) is the unsharded value.
        assert torch.equal(torch.cat([s[name][0] for s in shards]), p.detach()), name
        assert torch.equal(torch.cat([s[name][1] for s in shards]), p.grad), name
