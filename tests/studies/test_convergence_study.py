"""The convergence study: fixed validation batches, a real loss decrease per optimizer, the same
loss curve under two strategies at P=2 (real gloo), the analysis arithmetic, and the command
end to end on a toy scale (subprocess runs, plot, tables, LR sweep)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics

import pandas as pd
import pytest
import torch

from dist_ortho.core.schema import build
from dist_ortho.studies.convergence import (ConvergenceConfig, add_arguments, evaluate, load_study,
                                            lr_scale, main, steps_to_reach, train_with_curve,
                                            validation_batches)
from dist_ortho.studies.convergence.analysis import compare_curves
from dist_ortho.studies.data import ByteCorpus, CorpusConfig
from dist_ortho.testing.processes import spawn
from tests.studies import conv_cases

# --- validation batches -------------------------------------------------------------------------

def test_validation_batches_are_fixed_from_val_files_and_world_size_free():
    a = validation_batches("stdlib", 8, 32, 3, seed=7, rank=0, world_size=1)
    b = validation_batches("stdlib", 8, 32, 3, seed=7, rank=0, world_size=1)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # next-byte targets
    assert not torch.equal(a[0][0], a[1][0])  # distinct batches, not one repeated
    other = validation_batches("stdlib", 8, 32, 1, seed=8, rank=0, world_size=1)
    assert not torch.equal(a[0][0], other[0][0])
    # two ranks' shards are exactly the one-rank global batch, so the score ignores world size
    shards = [validation_batches("stdlib", 8, 32, 3, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for i in range(3):
        assert torch.equal(torch.cat([shards[0][i][0], shards[1][i][0]]), a[i][0])
    # every window comes from the validation files
    val = bytes(ByteCorpus(CorpusConfig()).val.numpy())
    for x, y in a:
        for row, target in zip(x, y):
            window = bytes(row.to(torch.uint8).tolist()) + bytes([int(target[-1])])
            assert val.find(window) >= 0
    with pytest.raises(ValueError, match="convergence.eval_batch_size"):
        validation_batches("stdlib", 6, 32, 1, seed=7, rank=0, world_size=4)


def test_evaluate_is_deterministic_and_leaves_the_model_alone():
    from dist_ortho.models import build_model

    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = validation_batches("stdlib", 4, 64, 2, seed=1, rank=0, world_size=1)
    first, second = evaluate(model, batches, 1), evaluate(model, batches, 1)
    assert first == second
    assert abs(first - math.log(256)) < 0.1  # an untrained byte model is near uniform
    expected = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    assert first == pytest.approx(expected, rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


# --- schedule and analysis arithmetic -----------------------------------------------------------

def test_lr_scale_warmup_stable_decay():
    scales = [lr_scale(s, 10, 0.2, 0.3) for s in range(10)]
    assert scales == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert [lr_scale(s, 4, 0.0, 0.0) for s in range(4)] == [1.0] * 4


def test_steps_to_reach_interpolates_and_says_not_reached():
    steps, losses = [0, 10, 20, 30], [5.0, 3.0, 2.0, 1.5]
    assert steps_to_reach(steps, losses, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(steps, losses, 2.0) == pytest.approx(20.0)
    assert steps_to_reach(steps, losses, 1.75) == pytest.approx(25.0)
    assert steps_to_reach(steps, losses, 6.0) == 0.0
    assert steps_to_reach(steps, losses, 1.4) is None
    # the first crossing counts, even if the curve goes back up afterwards
    assert steps_to_reach([0, 10, 20], [3.0, 1.0, 2.0], 2.0) == pytest.approx(5.0)


def test_config_mistakes_name_the_key(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("run:\n  model: {preset: gpt-tiny}\nconvergence:\n  seeds: [0, 1]\n")
    assert load_study(path).convergence.seeds == [0, 1]
    cases = {
        "convergence.seeds": ["convergence.seeds=[0, 0]"],
        "convergence.optimizers.sgd": ["convergence.optimizers={sgd: {}}"],
        "convergence.optimizers.muon.lrr": ["convergence.optimizers={muon: {lrr: 0.1}}"],
        "convergence.eval_every": ["convergence.eval_every=0"],
        "convergence.lr_decay_frac": ["convergence.lr_decay_frac=1.5"],
        "convergence.sweep.lrs.adamw[1]": ["convergence.sweep.lrs={adamw: [0.001, -1]}"],
        # known before launch: the global validation batch is split over the ranks of a run
        "convergence.eval_batch_size": ["convergence.nproc_per_node=4",
                                        "convergence.eval_batch_size=6"],
        "run.model.preset": ["model.preset=llama-tiny"],  # shape-only: no loss to follow
        "convergence.evalevery": ["convergence.evalevery=3"],
        "train.stepz": ["train.stepz=3"],
        "optimizer.lr": ["optimizer.lr=-1"],
        # the distributed check repeats runs of the study: its P = 1 run must exist
        "convergence.distributed.seeds[0]": ["convergence.distributed={optimizers: [normuon], "
                                             "seeds: [5]}"],
        "convergence.distributed.nproc_per_node": ["convergence.distributed={optimizers: "
                                                   "[normuon], nproc_per_node: 1}"],
        "convergence.distributed.optimizers[0]": ["convergence.optimizers={adamw: {}}",
                                                  "convergence.distributed={optimizers: "
                                                  "[normuon]}"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_study(path, overrides)
    path.write_text("run: {}\nconvergance: {}\n")
    with pytest.raises(ValueError, match="convergance"):
        load_study(path)


def test_distributed_check_compares_curves_and_keeps_the_global_batch(tmp_path):
    a = pd.DataFrame({"step": [0, 1, 2], "train_loss": [math.nan, 2.0, 1.5],
                      "val_loss": [3.0, math.nan, 1.4]})
    b = a.assign(train_loss=[math.nan, 2.0 + 1e-6, 1.5 - 3e-6], val_loss=[3.0, math.nan, 1.4002])
    diff = compare_curves(a, b)
    assert diff["steps_compared"] == 2 and diff["evals_compared"] == 2
    assert diff["max_abs_train_diff"] == pytest.approx(3e-6)
    assert diff["max_abs_val_diff"] == pytest.approx(2e-4)
    assert diff["agree_until_step"] == 2  # both differences are below the rounding threshold
    late = b.assign(train_loss=[math.nan, 2.0 + 1e-6, 1.6])
    assert compare_curves(a, late)["agree_until_step"] == 1
    path = tmp_path / "study.yaml"
    path.write_text("run:\n  model: {preset: gpt-tiny}\n  train: {batch_size: 16}\n"
                    "convergence:\n  seeds: [0, 1]\n  distributed: {optimizers: [normuon]}\n")
    ((name, seed, config),) = load_study(path).check_configs()
    assert (name, seed, config.train.batch_size, config.strategy.name) == \
        ("normuon", 0, 8, "balanced")  # 2 ranks x 8 rows = the P = 1 run's 16


# --- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["normuon", "muon", "adamw"])
def test_few_steps_reduce_the_loss(optimizer, tmp_path):
    config = conv_cases.tiny_run_config(str(tmp_path), optimizer, "replicated", batch_size=16,
                                        steps=20, name=optimizer)
    conv = build(ConvergenceConfig, dict(eval_every=10, eval_batches=2, eval_batch_size=8,
                                         lr_decay_frac=0.0), "convergence")
    curve = train_with_curve(config, conv, write=False)
    assert len(curve.train) == 20 and [s for s, _ in curve.val] == [0, 10, 20]
    first, last = statistics.mean(curve.train[:4]), statistics.mean(curve.train[-4:])
    # from ~ln(256) = 5.5 a working optimizer gets well below 4.5 in 20 steps on bytes
    assert last < first - 1.0, (first, last, curve.train)
    assert curve.val[-1][1] < curve.val[0][1] - 1.0, curve.val
    assert not torch.distributed.is_initialized()  # the one-rank group it made is torn down


def test_normuon_loss_curve_is_the_same_under_two_strategies_at_p2(tmp_path):
    steps = 8
    ranks = spawn(conv_cases.strategy_worker, 2,
                  args=(str(tmp_path), ["replicated", "balanced"], 8, steps))
    assert ranks[0] == ranks[1]  # every rank reports the rank-averaged losses
    runs = ranks[0]
    one = conv_cases.strategy_worker(0, 1, str(tmp_path), ["replicated"], 8, steps)["replicated"]
    ref = runs["replicated"]
    assert len(ref["train"]) == steps and [s for s, _ in ref["val"]] == [0, 4, 8]
    assert ref["train"][-1] < ref["train"][0] - 0.5  # the curve being compared really moves
    for other in (runs["balanced"], one):
        assert other["train"] == pytest.approx(ref["train"], rel=1e-5)
        assert [v for _, v in other["val"]] == pytest.approx([v for _, v in ref["val"]], rel=1e-5)


# --- the command, end to end on a toy scale -----------------------------------------------------

def _run_main(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return main(parser.parse_args(argv))


STUDY = """\
run:
  model: {preset: gpt-tiny}
  optimizer: {ns_dtype: float32, adamw_lr: 0.003}
  train: {steps: 6, warmup_steps: 0, batch_size: 8, seq_len: 32, log_every: 100}
  profiling: {enabled: false}
convergence:
  out_dir: OUT
  optimizers: {adamw: {adamw_lr: 0.003}, normuon: {lr: 0.02}}
  seeds: [0, 1]
  eval_every: 3
  eval_batches: 1
  eval_batch_size: 8
  processes: 2
  sweep:
    steps: 4
    lrs: {adamw: [0.001, 0.01], normuon: [0.02]}
"""


def test_study_and_sweep_commands_end_to_end(tmp_path):
    out = tmp_path / "conv"
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.replace("OUT", str(out)))
    assert _run_main([str(path)]) == 0
    for name in ("loss_curves.png", "final_val_loss.csv", "summary.md", "study.json"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["optimizer"]: r for r in csv.DictReader(open(out / "final_val_loss.csv"))}
    assert set(rows) == {"adamw", "normuon"}
    for name, row in rows.items():
        finals = [json.loads((out / "runs" / f"{name}-s{s}" / "result.json").read_text())
                  ["final_val_loss"] for s in (0, 1)]
        assert float(row["final_val_mean"]) == pytest.approx(statistics.mean(finals), rel=1e-4)
        assert float(row["final_val_std"]) == pytest.approx(statistics.stdev(finals), rel=1e-3)
    curve = list(csv.DictReader(open(out / "runs" / "normuon-s0" / "curve.csv")))
    assert [int(r["step"]) for r in curve] == list(range(7))
    assert [r["step"] for r in curve if r["val_loss"] != "nan"] == ["0", "3", "6"]
    summary = json.loads((out / "study.json").read_text())
    assert summary["study_wall_s"] > 0 and len(summary["runs"]) == 4

    # a second invocation reuses the finished runs instead of training again
    stamp = (out / "runs" / "adamw-s0" / "result.json").stat().st_mtime_ns
    assert _run_main([str(path), "--analyze"]) == 0
    assert _run_main([str(path)]) == 0
    assert (out / "runs" / "adamw-s0" / "result.json").stat().st_mtime_ns == stamp

    assert _run_main([str(path), "--sweep"]) == 0
    sweep = list(csv.DictReader(open(out / "lr_sweep.csv")))
    assert [(r["optimizer"], r["swept_key"]) for r in sweep] == [
        ("adamw", "optimizer.adamw_lr"), ("adamw", "optimizer.adamw_lr"),
        ("normuon", "optimizer.lr")]
    adam = [r for r in sweep if r["optimizer"] == "adamw"]
    best = min(adam, key=lambda r: float(r["final_val_loss"]))
    assert best["best"] == "True" and sum(r["best"] == "True" for r in adam) == 1
    # the NorMuon sweep run's AdamW part used the best AdamW LR
    assert float(sweep[2]["adamw_lr"]) == float(best["adamw_lr"])
