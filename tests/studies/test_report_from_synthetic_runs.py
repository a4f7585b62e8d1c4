"""The report from synthetic profiler output (no processes launched): table, ratios, bound,
plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from dist_ortho.reporting import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = 1_000_000  # matrix elements of the fake model


def fake_run(runs: Path, model: str, strategy: str, p: int, step_s: float, ns_share: list[float],
             bytes_per_rank: float, steps: int = 3) -> str:
    """A run directory in the profiler's long format: step/phase times, NS FLOPs, bytes, memory."""
    name = f"{model}--{strategy}--p{p}"
    d = runs / name
    d.mkdir(parents=True)
    rows = []
    for step in range(steps + 1):
        for rank in range(p):
            def add(phase, metric, value):
                rows.append({"rank": rank, "step": step, "warmup": step == 0, "phase": phase,
                             "metric": metric, "value": value, "strategy": strategy,
                             "world_size": p, "model": model, "config_hash": f"h{strategy}",
                             "run": name})
            ns = step_s * 0.6 * ns_share[rank] * p
            add("step", "time_s", step_s)
            add("grads", "time_s", step_s * 0.1)
            add("optimizer", "time_s", step_s * 0.85)
            add("optimizer/momentum", "time_s", step_s * 0.05)
            add("optimizer/orthogonalize", "time_s", step_s * 0.7)
            add("optimizer/orthogonalize/ns", "time_s", ns)
            add("optimizer/orthogonalize/comm_wait", "time_s", step_s * 0.05)
            add("optimizer/orthogonalize/ns", "ns_flops", 1e9 * ns_share[rank])
            add("optimizer/orthogonalize", "comm_send_bytes", bytes_per_rank)
            add("optimizer/orthogonalize", "comm_recv_bytes", bytes_per_rank)
            add("step", "mem_peak_bytes", 50 * 2**20 / p)
    with open(d / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (d / "run.json").write_text(json.dumps({"matrix_numel": N, "matrix_itemsize": 4,
                                            "ns_itemsize": 4}))
    (d / "environment.json").write_text(json.dumps({"device_type": "cpu", "cpu_count": 2,
                                                    "torch": "2.x", "backend": "gloo"}))
    return name


def make_study(root: Path, models=("bench",)) -> Path:
    runs = root / "runs"
    for model in models:
        for p in (1, 2, 4):
            bound = report.owner_bound_bytes(p, N, 4)
            fake_run(runs, model, "replicated", p, 0.2 * p, [1.0 / p] * p, (p - 1) / p * N * 4)
            share = [0.7, 0.3] if p == 2 else [0.4, 0.2, 0.2, 0.2] if p == 4 else [1.0]
            fake_run(runs, model, "balanced", p, 0.1 * p, share, bound)
    return root


def test_owner_bound_formula():
    assert report.owner_bound_bytes(1, N, 4) == 0
    assert report.owner_bound_bytes(2, N, 4) == pytest.approx(2 * 1 / 4 * N * 4)
    assert report.owner_bound_bytes(8, N, 2) == pytest.approx(2 * 7 / 64 * N * 2)
    # forward in float32, results back in bfloat16
    assert report.owner_bound_bytes(4, N, 4, 2) == pytest.approx(3 / 16 * N * 6)


def test_report_from_runs(tmp_path):
    root = make_study(tmp_path / "study")
    (root / "failures.csv").write_text("point,status,error,log\nbench--x--p2,failed,"
                                       "ValueError: boom,logs/x.log\n")
    path = report.write_report(root)
    assert path == root / "report.md"
    results = report.load_results(root)
    s = results.summary.set_index(["label", "world_size"])
    # separately run points: the ratio is bounded by interval arithmetic, here exact (no noise)
    assert s.loc[("balanced", 4), "ratio_to_baseline"] == pytest.approx(0.5)
    assert s.loc[("replicated", 2), "ratio_to_baseline"] == pytest.approx(1.0)
    assert s.loc[("balanced", 4), "step_time_s_low"] == pytest.approx(0.4)
    assert s.loc[("balanced", 4), "step_time_s_n"] == 3
    assert s.loc[("balanced", 4), "bound_bytes_per_rank"] == pytest.approx(3 / 16 * N * 8)
    assert results.labels[0] == "replicated"
    for name in report.PLOTS:
        data = (root / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    md = path.read_text()
    assert "| balanced | 4 | 400.0 [400.0, 400.0] | 0.50 [0.50, 0.50] |" in md
    assert "ValueError: boom" in md and "## Environment" in md
    assert "ranks share cores" in md  # P=4 on 2 cores is flagged
    # per-rank NS work and time as the imbalance plot draws them
    flops, secs = report.report_plots.per_rank(results, "bench--balanced--p4")
    assert flops == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert secs[0] == pytest.approx(2 * secs[1])
    phases = report.report_plots.phase_times(results, "bench--balanced--p4")
    # mean over ranks of 0.4 s * 0.6 * share * 4: (0.384 + 3 * 0.192) / 4
    assert phases["NS (Newton-Schulz)"] == pytest.approx(0.24)
    assert sum(phases.values()) == pytest.approx(0.4, rel=1e-6)  # the stack adds up to the step


def test_several_models_become_panels(tmp_path):
    root = make_study(tmp_path / "study", models=("bench", "other"))
    path = report.write_report(root)
    md = path.read_text()
    assert "| model | strategy |" in md and "| other | balanced | 2 |" in md


def test_spans_decades_switches_to_log():
    assert report.report_plots.spans_decades([1, 50])
    assert not report.report_plots.spans_decades([1, 5, 9])
    assert not report.report_plots.spans_decades([0, 5, math.nan])


def test_cli_errors_are_messages(tmp_path, capsys):
    from dist_ortho.cli import main as cli_main

    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dist-ortho report: error: ") and "not a directory" in line
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dist-ortho report: error: ") and "no complete runs" in line
