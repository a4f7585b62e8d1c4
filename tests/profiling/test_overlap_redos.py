"""Steps on which `overlapped` redid its backward work after backward (global-norm clipping):
counted per step by the profiler (`overlap_redos`, checked in tests/strategies/test_backward_overlap_matches_the_reference.py), summed per
run by the summary, listed by the report."""

from __future__ import annotations

import os

import pandas as pd

from dist_ortho import build_optimizers, strategies
from dist_ortho.models import build_model
from dist_ortho.profiling.summary import summarize_runs
from dist_ortho.reporting.report import Results, redo_lines


def _run(root, name: str, redos: list[int]) -> None:
    rows = []
    for step, redo in enumerate(redos):
        for rank in range(2):
            warm = step == 0
            rows += [dict(rank=rank, step=step, warmup=warm, phase="step", metric="time_s",
                          value=1.0),
                     dict(rank=rank, step=step, warmup=warm, phase="step",
                          metric="overlap_redos", value=redo)]
    os.makedirs(os.path.join(root, name))
    pd.DataFrame([{**r, "strategy": "overlapped", "world_size": 2, "model": "m"} for r in rows]
                 ).to_csv(os.path.join(root, name, "metrics.csv"), index=False)


def test_redos_are_summed_per_run_and_listed_by_the_report(tmp_path):
    _run(tmp_path, "clipped", [1, 1, 0, 1])  # the warm-up step is left out: 2 of 3
    _run(tmp_path, "unclipped", [0, 0, 0, 0])
    df = summarize_runs(tmp_path).set_index("run")
    assert df.loc["clipped", "overlap_redos"] == 2 and df.loc["unclipped", "overlap_redos"] == 0
    summary = df.reset_index().assign(label=lambda d: d["run"])
    lines = redo_lines(Results(tmp_path, tmp_path, summary))
    assert any("clipped, P=2: 2 of 3 steps" in line for line in lines), lines
    assert not any("unclipped" in line for line in lines)
    assert redo_lines(Results(tmp_path, tmp_path, summary.assign(overlap_redos=0.0))) == []


def test_describe_says_clipping_makes_overlapped_redo_its_work():
    model = build_model("gpt-tiny", n_layers=1, d_model=16, n_heads=2, seq_len=8)
    assert "clipping" in build_optimizers(model, strategy="overlapped").describe()
    step_time = strategies.build("overlapped", schedule="step")
    for strategy in ("balanced", step_time):
        assert "clipping" not in build_optimizers(model, strategy=strategy).describe()
