"""The exact-or-not report claims a loss gap only where the interval over seeds excludes zero,
compares step times by paired ratios against the fastest exact strategy, and labels every
inexact schedule as such in its tables and plots (synthetic study output, no training)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dist_ortho.studies.convergence.exact_or_not_report import t_interval, write


def test_t_interval_of_three_seeds_uses_students_quantile():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(t_interval([1.0])[1])


def _csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _study(tmp_path, gaps_p2, gaps_p4):
    runs, curves, times, nbytes, dev = [], [], [], [], []
    for P, gaps in ((2, gaps_p2), (4, gaps_p4)):
        for seed in range(3):
            for label, gap in (("balanced", 0.0), ("blockwise", gaps[seed]),
                               ("local_norms", 0.001 * (seed - 1))):
                loss = 2.0 + 0.01 * seed + gap
                runs.append(dict(world_size=P, schedule=label, seed=seed, final_val_loss=loss,
                                 wall_s=1.0))
                curves += [dict(world_size=P, schedule=label, seed=seed, step=s,
                                val_loss=loss + (100 - s) / 100) for s in (0, 50, 100)]
                dev.append(dict(world_size=P, schedule=label, seed=seed, step=0, matrix="w",
                                rel_frobenius=0.5 if label == "blockwise" else 1e-3,
                                cosine=0.9))
        for r in range(12):
            for label, t in (("balanced", 1.0), ("replicated", 2.0), ("blockwise", 0.5),
                             ("local_norms", 1.0 + 0.01 * (r % 3 - 1))):
                times.append(dict(world_size=P, strategy=label, round=r, seconds_per_step=t))
        for label, b, exact in (("balanced", 1000, True), ("replicated", 3000, True),
                                ("blockwise", 0, False), ("local_norms", 990, False)):
            nbytes.append(dict(world_size=P, strategy=label, exact=exact, send_bytes_per_step=b))
    for name, rows in (("runs", runs), ("curves", curves), ("times", times),
                       ("bytes", nbytes), ("deviation", dev)):
        _csv(tmp_path / f"{name}.csv", rows)
    (tmp_path / "study.json").write_text(json.dumps(dict(
        command="python -m x", wall_s=12.0, cpus=2, loadavg_before=[1, 1, 1],
        loadavg_after=[1, 1, 1], torch="2")))
    return (tmp_path / write(tmp_path, "balanced").name).read_text()


def _row(text, start, P):
    section = text.split(f"### P = {P}")[1]
    return next(line for line in section.splitlines() if line.startswith(f"| {start}"))


def test_gap_separated_from_seed_noise_is_claimed_and_noise_is_a_tie(tmp_path):
    text = _study(tmp_path, gaps_p2=[0.05, 0.051, 0.049], gaps_p4=[0.10, 0.101, 0.099])
    assert "| worse |" in _row(text, "blockwise (inexact)", 2)
    assert "| tie |" in _row(text, "local_norms (inexact)", 2)
    # blockwise: half the step time of the fastest exact (balanced), every round
    assert "| faster |" in _row(text, "blockwise (inexact)", 2)
    assert "+100%" in _row(text, "blockwise (inexact)", 2)  # no bytes at all
    moves = text.split("How it moves with P")[1]
    assert "gap grows with P" in next(l for l in moves.splitlines() if "blockwise" in l)
    for name in ("deviation.png", "val_gap.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_every_inexact_schedule_is_labelled_in_every_table_row(tmp_path):
    text = _study(tmp_path, gaps_p2=[0.0, 0.01, -0.01], gaps_p4=[0.0, 0.01, -0.01])
    for line in text.splitlines():
        if line.startswith("| blockwise") or line.startswith("| local_norms"):
            assert "(inexact)" in line, line
    assert "| tie |" in _row(text, "blockwise (inexact)", 4)


def test_launch_config_names_an_exact_reference_and_only_inexact_schedules():
    from pathlib import Path

    from dist_ortho import strategies
    from dist_ortho.studies.convergence.exact_or_not import load

    root = Path(__file__).resolve().parents[2]
    study = load(root / "launch" / "configs" / "exact_or_not.yaml")
    assert strategies.build(study.study.exact.name).exact
    assert all(not strategies.build(s.name).exact for s in study.study.schedules)
    assert study.study.world_sizes == [2, 4] and len(study.study.seeds) >= 3
    assert study.run.model.preset == "gpt-tiny"
