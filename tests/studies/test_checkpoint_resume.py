"""Sharded checkpoints resume exactly: every strategy under FSDP2 on gloo, at the same world size
(in the same processes and in fresh ones), at a different world size, and in one process.

Three spawns in all (P=2 train+save+resume, P=2 fresh resume, P=3 resume); see
tests/studies/ckpt_cases.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch

from dist_ortho import NorMuon, OptimizerConfig, build_optimizers, split_params, strategies
from dist_ortho.checkpointing import checkpoint
from dist_ortho.models import build_model
from dist_ortho.testing.processes import spawn
from tests.studies import ckpt_cases
from tests.studies.ckpt_cases import K, N

STRATEGIES = strategies.available_exact()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def p2(root):
    """Per rank, per strategy: results of train/save/continue and of the in-process resume."""
    return spawn(ckpt_cases.train_save_worker, 2, args=(STRATEGIES, root))


@pytest.fixture(scope="module")
def p2_fresh(root, p2):
    return spawn(ckpt_cases.resume_worker, 2, args=(STRATEGIES, root))


@pytest.fixture(scope="module")
def p3(root, p2):
    return spawn(ckpt_cases.resume_worker, 3, args=(STRATEGIES, root))


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b))


# -- same world size ------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_resume_in_same_processes(p2, strategy):
    for rank, per_rank in enumerate(p2):
        r = per_rank[strategy]
        assert r["fresh_differs"], "the fresh model differs before loading (else no proof)"
        assert r["step"] == K and r["latest"] == K + N
        assert r["info"]["extra"] == {"strategy": strategy} and r["info"]["world_size"] == 2
        assert r["info"]["optimizers"] == ["NorMuon", "AdamW"]
        # every parameter, momentum, v, AdamW moment and step counter, bitwise, on this rank
        assert r["state_mismatch_at_k"] == [], (rank, r["state_mismatch_at_k"])
        assert len(r["v_keys"]) == 12, r["v_keys"]  # gpt-tiny: 2 blocks x 6 matrices
        assert r["final_mismatch"] == [], (rank, r["final_mismatch"])
        assert r["losses_resumed"] == r["losses_cont"]
        assert r["losses_cont"][-1] < r["losses_before"][0]  # it is training


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_resume_in_fresh_processes(p2, p2_fresh, strategy):
    for rank, per_rank in enumerate(p2_fresh):
        r = per_rank[strategy]
        assert r["step"] == K and r["loader_step"] == K
        assert r["full_mismatch"] == [], (rank, r["full_mismatch"])
        assert r["final_mismatch"] == [], (rank, r["final_mismatch"])
        assert r["losses"] == p2[rank][strategy]["losses_cont"]
        assert r["reload_mismatch"] == [] and r["reload_loader_step"] == K + N


def test_rng_and_data_position_restored(p2):
    for rank, per_rank in enumerate(p2):
        for strategy, r in per_rank.items():
            assert r["loader_step"] == K, (rank, strategy)
            assert r["rng_fresh_differs"], "a fresh RNG differs (else this proves nothing)"
            assert r["rng_restored"], (rank, strategy)


def test_save_before_first_step_resumes_exactly(p2):
    for rank, per_rank in enumerate(p2):
        r = per_rank[STRATEGIES[0]]
        # the run that saved at steps 0, K and K+N equals one that never saved (DCP's own state
        # initialization would have taken a zero-gradient step, moving the step counters)
        assert r["unsaved_final_mismatch"] == [], (rank, r["unsaved_final_mismatch"])
        assert r["step0_loaded"] == 0
        assert r["step0_final_mismatch"] == [], (rank, r["step0_final_mismatch"])
        assert r["step0_losses"] == r["losses_before"] + r["losses_cont"]


def test_v_is_stored_sharded_like_its_parameter(root, p2):
    from torch.distributed.checkpoint import FileSystemReader

    path = checkpoint.checkpoint_path(os.path.join(root, STRATEGIES[0]), K)
    assert sorted(f for f in os.listdir(path) if f.endswith(".distcp")) == ["__0_0.distcp",
                                                                            "__1_0.distcp"]
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    v_keys = [k for k in meta if k.startswith("optimizers.0.state.") and k.endswith(".v")]
    assert len(v_keys) == 12
    for key in v_keys:
        fqn = key[len("optimizers.0.state."):-len(".v")]
        rows = lambda k: sorted((c.offsets[0], c.sizes[0]) for c in meta[k].chunks)
        assert rows(key) == rows(f"model.{fqn}"), key
        assert len(meta[key].chunks) == 2
    # AdamW state sits under its own key, by parameter name
    assert "optimizers.1.state.lm_head.weight.exp_avg" in meta


# -- different world size -------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reshard_from_two_to_three_ranks(p2, p3, strategy):
    for rank, per_rank in enumerate(p3):
        r = per_rank[strategy]
        assert r["step"] == K and r["loader_step"] == K
        # gathered model and optimizer state (v included) equal the P=2 state bitwise
        assert r["full_mismatch"] == [], (rank, r["full_mismatch"])
        # the same global batch, so the same losses up to reduction order
        assert close(r["losses"], p2[0][strategy]["losses_cont"]), (r["losses"],
                                                                    p2[0][strategy]["losses_cont"])
        assert r["reload_mismatch"] == [] and r["reload_loader_step"] == K + N
    # uneven shards at P=3: 64 rows are 22, 22, 20; v follows its parameter
    rows = p3[2][strategy]["local_rows"]
    assert rows["param/blocks.0.attn.q_proj.weight"] == 20
    assert rows["opt0/blocks.0.attn.q_proj.weight/v"] == 20


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_load_in_one_process_without_process_group(root, p2, strategy):
    assert not torch.distributed.is_initialized()
    model, opt, loader = ckpt_cases.make_run(strategy, 1, None, 0, 1)
    assert checkpoint.load(os.path.join(root, strategy), model, opt, loader, step=K) == K
    want = torch.load(os.path.join(root, f"{strategy}.full_k.pt"))
    assert ckpt_cases.mismatches(ckpt_cases.named_state(model, opt, ckpt_cases._full), want) == []
    losses = ckpt_cases.train(model, opt, loader, N, 1)
    assert close(losses, p2[0][strategy]["losses_cont"])


# -- single process, API and failure modes --------------------------------------------------------
def _batches(seed: int, n: int, batch: int = 2, seq: int = 16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 256, (batch, seq + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def _step(model, opt, x, y) -> None:
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_plain_optimizer_bf16_state_exact(tmp_path):
    """One plain NorMuon over bfloat16 matrices: v is float32 and must come back bit for bit."""
    def make(seed):
        torch.manual_seed(seed)
        model = build_model("gpt-tiny", seq_len=16, dtype=torch.bfloat16)
        matrices, _ = split_params(model.named_parameters())
        return model, NorMuon(matrices, ns_dtype="float32")

    batches = _batches(0, 4)
    model, opt = make(0)
    for x, y in batches[:2]:
        _step(model, opt, x, y)
    checkpoint.save(tmp_path, 2, model, opt)
    saved = ckpt_cases.named_state(model, opt, ckpt_cases._local)
    for x, y in batches[2:]:
        _step(model, opt, x, y)
    model2, opt2 = make(1)
    assert checkpoint.load(tmp_path, model2, opt2) == 2
    got = ckpt_cases.named_state(model2, opt2, ckpt_cases._local)
    assert got["opt0/blocks.0.attn.q_proj.weight/v"].dtype == torch.float32
    assert ckpt_cases.mismatches(got, saved) == []
    for x, y in batches[2:]:
        _step(model2, opt2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def _small(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("gpt-tiny", seq_len=16, n_layers=1)
    return model, build_optimizers(model, OptimizerConfig(ns_dtype="float32"))


def test_user_mistakes_raise_value_error(tmp_path):
    model, opt = _small()
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=str(missing)):
        checkpoint.load(missing, model, opt)
    with pytest.raises(ValueError, match="no intact checkpoint"):
        checkpoint.load(tmp_path, model, opt)
    checkpoint.save(tmp_path, 3, model, opt)
    with pytest.raises(ValueError, match="no checkpoint for step 7.*steps there: \\[3\\]"):
        checkpoint.load(tmp_path, model, opt, step=7)
    with pytest.raises(ValueError, match="holds optimizers"):
        checkpoint.load(tmp_path, model, opt.optimizers[1])
    loader = ckpt_cases.make_loader(0, 1)
    with pytest.raises(ValueError, match="without a data loader"):
        checkpoint.load(tmp_path, model, opt, loader)
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save(tmp_path, 4, model, opt, extra={"x": object()})
    with pytest.raises(ValueError, match="non-negative int"):
        checkpoint.save(tmp_path, -1, model, opt)
    with pytest.raises(ValueError, match="optimizer must be"):
        checkpoint.save(tmp_path, 4, model, "adam")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # no state before its step
    with pytest.raises(ValueError, match="Take one optimizer step"):
        checkpoint.save(tmp_path, 4, model, sgd)
    assert checkpoint.latest_step(tmp_path) == 3  # failed saves left nothing behind
    # the model alone, and a list of optimizers, are accepted
    checkpoint.save(tmp_path, 5, model, None)
    assert checkpoint.load(tmp_path, model, None) == 5
    checkpoint.save(tmp_path, 6, model, opt.optimizers)
    assert checkpoint.load(tmp_path, model, list(opt.optimizers)) == 6


def test_killed_save_never_looks_complete(tmp_path, monkeypatch):
    model, opt = _small()
    x, y = _batches(1, 1)[0]
    _step(model, opt, x, y)
    checkpoint.save(tmp_path, 1, model, opt)
    _step(model, opt, x, y)

    rename = os.rename

    def killed(src, dst):  # the process dies at the commit rename, after DCP's own renames
        if str(src).endswith(".partial"):
            raise OSError("killed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(RuntimeError, match="killed"):
        checkpoint.save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert (tmp_path / ".step_00000002.partial").is_dir()  # written, but not a checkpoint
    assert not (tmp_path / "step_00000002").exists()
    assert checkpoint.latest_step(tmp_path) == 1
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    model2, opt2 = _small(1)
    assert checkpoint.load(tmp_path, model2, opt2) == 1

    # the next save of that step clears the leftover and commits
    checkpoint.save(tmp_path, 2, model, opt, extra={"note": "retry"})
    assert not (tmp_path / ".step_00000002.partial").exists()
    assert checkpoint.latest_step(tmp_path) == 2
    assert checkpoint.checkpoint_info(tmp_path)["extra"] == {"note": "retry"}
    assert json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())["meta"]["step"] == 2

    # saving a step again replaces it; a pointer to a removed folder falls back to the newest
    checkpoint.save(tmp_path, 2, model, opt, extra={"note": "again"})
    assert checkpoint.checkpoint_info(tmp_path, 2)["extra"] == {"note": "again"}
    checkpoint.save(tmp_path, 1, model, opt)  # resumed from 1 and saved it again: latest is 1
    assert checkpoint.latest_step(tmp_path) == 1
    import shutil

    shutil.rmtree(tmp_path / "step_00000001")
    assert checkpoint.latest_step(tmp_path) == 2


# -- integrity, retention, disk full -------------------------------------------------------------
def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_keep_last_holds_folder_count_and_size_through_a_long_run(tmp_path):
    keep_last, keep_every = 2, 5
    model, opt = _small()
    batches = _batches(2, 12)
    sizes = []
    for step, (x, y) in enumerate(batches, start=1):
        _step(model, opt, x, y)
        path = checkpoint.save(tmp_path, step, model, opt, keep_last=keep_last,
                               keep_every=keep_every)
        sizes.append(_folder_bytes(path))
        milestones = [s for s in range(keep_every, step - keep_last + 1, keep_every)]
        want = milestones + list(range(max(1, step - keep_last + 1), step + 1))
        assert checkpoint.complete_steps(tmp_path) == want, step
        # nothing else: no partial or half-deleted folder, `latest` names the newest
        assert sorted(p.name for p in tmp_path.iterdir()) == \
            ["latest", *(f"step_{s:08d}" for s in want)], step
        assert checkpoint.latest_step(tmp_path) == step
        kept = sum(_folder_bytes(checkpoint.checkpoint_path(tmp_path, s)) for s in want
                   if s not in milestones)
        assert kept <= keep_last * max(sizes), step
    assert checkpoint.load(tmp_path, *_small(1)) == 12


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (retention catches OSError only)."""


class _KillAtDelete:
    def phase(self, name: str):
        if name == "delete":
            raise _Killed()
        return contextlib.nullcontext()


def test_kill_during_retention_cleanup_leaves_only_intact_or_clearly_partial(tmp_path):
    model, opt = _small()
    x, y = _batches(3, 1)[0]
    for step in (1, 2):
        _step(model, opt, x, y)
        checkpoint.save(tmp_path, step, model, opt, keep_last=2)
    _step(model, opt, x, y)
    with pytest.raises(_Killed):  # killed after the rename of step 1, before its deletion
        checkpoint.save(tmp_path, 3, model, opt, keep_last=2, timer=_KillAtDelete())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_00000001.deleting", "latest",
                                                          "step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    for step in checkpoint.complete_steps(tmp_path):
        assert checkpoint.verify(checkpoint.checkpoint_path(tmp_path, step)) == []
    assert checkpoint.load(tmp_path, *_small(1)) == 3
    # the next save's retention clears the leftover: k folders again
    _step(model, opt, x, y)
    checkpoint.save(tmp_path, 4, model, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003",
                                                          "step_00000004"]


def test_disk_full_in_a_save_leaves_earlier_checkpoints_intact_and_usable(tmp_path):
    # rank 1 alone runs out of space while DCP writes its shard: every rank fails the save (no
    # hang), nothing named step_2 appears, step 1 verifies and loads; with room, step 2 commits.
    # Regression: DCP reports a writer's error as CheckpointException, a BaseException, which
    # went past save's `except Exception` as a many-line traceback dump instead of one RuntimeError
    # naming the rank that failed.
    results = spawn(ckpt_cases.disk_full_worker, 2, args=(str(tmp_path), 1), timeout_s=30)
    for rank, r in enumerate(results):
        assert r["error"] is not None and "No space left on device" in r["error"], (rank, r)
        assert "rank(s) [1]" in r["error"], r["error"]
        assert r["steps"] == [1] and r["latest"] == 1 and r["verify_1"] == []
        assert ".step_00000002.partial" in r["names"] and "step_00000002" not in r["names"]
        assert r["loaded"] == 1 and r["load_mismatch"] == [], (rank, r["load_mismatch"])
        assert r["after_retry"] == ["latest", "step_00000001", "step_00000002"]


def test_nothing_is_unpickled_from_checkpoint_folders():
    """DCP's .metadata is the one pickle a load reads (docs/checkpoints.md: trusted folders
    only); every torch.load in the package passes weights_only=True, and pickle.load appears only
    where dist_ortho.testing.processes reads back the results its own ranks wrote."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = []
    for folder in ("dist_ortho", "strategies", "profiling"):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for name in (n for n in names if n.endswith(".py")):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                for i, line in enumerate(open(path).read().splitlines(), start=1):
                    if "torch.load(" in line and "weights_only=True" not in line:
                        found.append(f"{rel}:{i}: {line.strip()}")
                    if ("pickle.load" in line or "pickle.Unpickler" in line) \
                            and rel != os.path.join("dist_ortho", "testing", "processes.py"):
                        found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []
    page = open(os.path.join(root, "docs", "checkpoints.md")).read()
    assert "Load checkpoints only from folders you trust" in page and ".metadata" in page
