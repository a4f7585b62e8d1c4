"""torchtitan's own trainer (0.3.0, its llama3 debug model cut to 2 layers, gloo on CPU) trains
with `dist_ortho.integrations.torchtitan`'s container, as set by the documented example config
(launch/torchtitan/llama3_normuon.py, made small in tests/torchtitan/torchtitan_cases.py):

- 2 ranks FSDP, every strategy; 4 ranks FSDP x TP 2 x 2 and HSDP 2 x 2 (meshes torchtitan
  unflattens from its world mesh) with `balanced`: every step's loss equals the 1-rank run's
  (same initial weights from a seed checkpoint, same global batches) within the float bound
  below, and the loss falls;
- torchtitan's checkpointer saves the optimizers' state at step 2 and a fresh trainer resumed
  from it reproduces steps 3 and 4 bitwise (losses and every parameter);
- `overlapped` under torchtitan's default clipping (max_norm = 1) redoes its work after backward
  on every clipped step, and the container counts it.

Float bound on a loss (the model of tests/tolerances.py, as dist_cases.fsdp_train_worker applies
it): the loss of step k is computed from weights that took k - 1 steps; the N-rank run differs
from the 1-rank run by its own rounding of this step's loss, 2 C eps_loss |L|, plus, to first
order, sum over parameters of ||grad|| x the bound on that parameter's distance after k - 1
steps (tolerances.param_bound from the 1-rank run's trajectory, update error of NorMuon or AdamW
plus twice the gradient's error; the gradient's error includes the clipping factor's, a norm
over all P parameters: sqrt(P) u).

Runs only with torchtitan installed (the `torchtitan` extra) and `-m torchtitan`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import pytest

# the first test starts every torchrun (about 6 minutes on 2 idle cores): room for a loaded box
pytestmark = [pytest.mark.torchtitan, pytest.mark.timeout(1800)]
pytest.importorskip("torchtitan", reason="needs the extra: pip install -e '.[torchtitan]'")

import torch  # noqa: E402

from dist_ortho import strategies  # noqa: E402
from tests import tolerances  # noqa: E402
from tests.strategies import dist_cases  # noqa: E402
from tests.torchtitan import torchtitan_cases  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
STRATEGIES = strategies.available_exact()
GLOBAL_BATCH = 4
_TMP = tempfile.TemporaryDirectory(prefix="dist_ortho_torchtitan_")  # removed at exit


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(label: str, ranks: int, strategies_: list[str], *args: str,
              trajectory: bool = False) -> dict:
    """One torchrun of tests/torchtitan/torchtitan_run.py; {strategy: {"losses", "final", "trajectory"}}
    of rank 0."""
    root = pathlib.Path(_TMP.name)
    out = root / "out" / label
    out.mkdir(parents=True)
    env = dict(os.environ, DIST_ORTHO_TT_ASSETS=str(root), DIST_ORTHO_TT_OUT=str(out),
               DIST_ORTHO_TT_GLOBAL_BATCH=str(GLOBAL_BATCH),
               DIST_ORTHO_TT_STRATEGIES=",".join(strategies_), OMP_NUM_THREADS="1")
    if trajectory:
        env["DIST_ORTHO_TT_TRAJECTORY"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={_port()}", "torchtitan_run.py", "--module", "tests.torchtitan.torchtitan_cases",
           "--config", "cpu_llama3", "--checkpoint.enable", *args]
    proc = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (label, proc.stdout[-3000:], proc.stderr[-6000:])
    runs: dict = {}
    records = out / "rank0.jsonl"  # absent after a seed checkpoint (no step taken)
    for line in (records.read_text().splitlines() if records.exists() else []):
        record = json.loads(line)
        run = runs.setdefault(record.pop("strategy"), {"losses": [], "trajectory": []})
        if record.get("final"):
            run["final"] = record
        elif record.get("trajectory"):
            run["trajectory"].append(record)
        else:
            run["losses"].append(record["loss"])
    return runs


@functools.lru_cache(maxsize=None)
def runs() -> dict:
    torchtitan_cases.make_assets(_TMP.name)
    seed = pathlib.Path(_TMP.name) / "outputs" / "seed_balanced" / "step-0"
    _torchrun("seed", 1, ["balanced"], "--checkpoint.create_seed_checkpoint",
              "--checkpoint.folder", "seed")
    load = ("--checkpoint.initial_load_path", str(seed))
    return {
        "one": _torchrun("one", 1, ["balanced"], *load, "--checkpoint.folder", "one",
                         trajectory=True)["balanced"],
        "fsdp": _torchrun("fsdp", 2, STRATEGIES, *load, "--checkpoint.folder", "fsdp",
                          "--checkpoint.interval", "2"),
        "resumed": _torchrun("resumed", 2, ["balanced", "overlapped"], "--checkpoint.folder",
                             "fsdp", "--checkpoint.load_step", "2"),
        "fsdp_x_tp": _torchrun("fsdp_x_tp", 4, ["balanced"], *load, "--checkpoint.folder", "tp",
                               "--parallelism.tensor_parallel_degree=2")["balanced"],
        "hsdp": _torchrun("hsdp", 4, ["balanced"], *load, "--checkpoint.folder", "hsdp",
                          "--parallelism.data_parallel_replicate_degree=2",
                          "--parallelism.data_parallel_shard_degree=2")["balanced"],
    }


def loss_bounds(reference: dict) -> list[float]:
    """Per step, the bound on |loss(N ranks) - loss(1 rank)| (the module docstring's model)."""
    final = reference["final"]
    shapes = final["shapes"]
    n_params = sum(math.prod(s) for s in shapes.values())
    eps_grad, eps_loss = dist_cases.training_errors(
        n_layers=2, d_model=256, seq=64, tokens=GLOBAL_BATCH * 64, vocab=2048)
    eps_grad += math.sqrt(n_params) * tolerances.unit_roundoff(torch.float32)
    eps = {n: tolerances.update_error(shapes[n], {"NorMuon": "normuon", "Muon": "muon"}.get(
        dest, "adamw")) + 2 * eps_grad for n, dest in final["assignment"].items()}
    steps = reference["trajectory"]
    out = []
    for k, loss in enumerate(reference["losses"]):
        first_order = sum(
            steps[k]["grad"][n] * tolerances.param_bound(
                eps[n], [steps[0]["w_before"][n]] + [steps[j]["w_after"][n] for j in range(k)],
                [steps[j]["delta"][n] for j in range(k)])
            for n in eps)
        out.append(2 * tolerances.C * eps_loss * abs(loss) + first_order)
    return out


def _check_losses(run: dict, context) -> None:
    reference = runs()["one"]
    bounds = loss_bounds(reference)
    ratios = [abs(a - b) / c for a, b, c in zip(run["losses"], reference["losses"], bounds)]
    tolerances.report("torchtitan trainer losses vs 1 rank, float32", ratios)
    assert len(run["losses"]) == len(reference["losses"]) == 4, context
    assert max(ratios) <= 1.0, (context, run["losses"], reference["losses"], bounds)
    assert run["losses"][-1] < run["losses"][0] - 0.5, (context, run["losses"])  # it learns
    assert run["final"]["skipped_steps"] == 0, context


def test_fsdp_on_2_ranks_trains_like_1_rank_with_every_strategy():
    fsdp = runs()["fsdp"]
    assert sorted(fsdp) == sorted(STRATEGIES)
    for name, run in fsdp.items():
        _check_losses(run, name)
        final = run["final"]
        assert final["container"] == "DistOrthoOptimizers" and final["leader_strategy"] == name
        assert final["optimizers"] == ["NorMuon", "AdamW"]
        # hidden matrices on NorMuon as FSDP's Shard(0); embeddings, head and norms on AdamW
        assert all(p == "(Shard(dim=0),)" for p in final["placements"].values()), name
        assert final["assignment"]["layers.0.attention.wo.weight"] == "NorMuon"
        for n in ("tok_embeddings.weight", "lm_head.weight", "norm.weight",
                  "layers.1.ffn_norm.weight"):
            assert final["assignment"][n] == "AdamW", n
        # names without activation checkpointing's wrapper segment
        assert not [n for n in final["assignment"] if "_checkpoint_wrapped_module" in n]


def test_fsdp_x_tp_and_hsdp_on_4_ranks_train_like_1_rank():
    for label, mesh_placements in (("fsdp_x_tp", "Shard(dim=1)"), ("hsdp", "Replicate()")):
        run = runs()[label]
        _check_losses(run, label)
        placements = run["final"]["placements"]
        # the meshes torchtitan unflattened: a TP weight is column-sharded on tp, HSDP's weights
        # replicated on dp_replicate
        assert any(mesh_placements in p for p in placements.values()), (label, placements)


def test_a_torchtitan_checkpoint_resumes_bitwise():
    for name in ("balanced", "overlapped"):
        straight, resumed = runs()["fsdp"][name], runs()["resumed"][name]
        assert resumed["losses"] == straight["losses"][2:], name
        assert resumed["final"]["step"] == 4
        assert resumed["final"]["hash"] == straight["final"]["hash"], name


def test_overlapped_under_clipping_redoes_every_clipped_step_and_counts_it():
    run = runs()["fsdp"]["overlapped"]
    assert run["final"]["overlap_fallbacks"] == 4  # grad norm ~1.8 > max_norm 1 on every step
    assert "clipping" in run["final"]["describe"]
    assert runs()["fsdp"]["balanced"]["final"]["overlap_fallbacks"] is None
