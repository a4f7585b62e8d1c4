"""End to end through real torchrun subprocesses: a 2 x 2 sweep, its report, resume, a crashing
point, a fresh `study`, and a single run without torchrun. Kept small (llama-tiny, 3 steps) for a
2-core machine."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ortho.cli import main as cli_main
from dist_ortho.studies.sweep import load_study, run_sweep

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_study(path: Path, name: str, strategies: list, world_sizes: list[int]) -> Path:
    study = {"name": name, "base": str(TINY), "output_dir": str(path.parent / "results"),
             "point_timeout_s": 120, "set": {"train.steps": 3, "train.warmup_steps": 1},
             "grid": {"strategies": strategies, "world_sizes": world_sizes}}
    path.write_text(yaml.safe_dump(study))
    return path


def test_sweep_report_and_resume(tmp_path, capsys):
    study_file = write_study(tmp_path / "s.yaml", "two_by_two", ["replicated", "round_robin"],
                             [1, 2])
    assert cli_main(["sweep", str(study_file)]) == 0
    study_dir = tmp_path / "results" / "two_by_two"
    progress = capsys.readouterr().err
    assert "[two_by_two 4/4]" in progress and "ETA" in progress

    with open(study_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["strategy"], int(r["world_size"])) for r in rows) == [
        ("replicated", 1), ("replicated", 2), ("round_robin", 1), ("round_robin", 2)]
    assert all(r["model"] == "llama-tiny" for r in rows)
    with open(study_dir / "failures.csv") as f:
        assert list(csv.DictReader(f)) == []
    run_dir = study_dir / "runs" / "llama-tiny--round_robin--p2"
    for name in ("metrics.csv", "run.json", "DONE", "trace.json", "gantt.png"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load(next(p for p in (study_dir / "configs").glob("*round_robin--p2*"))
                              .read_text())
    assert resolved["optimizer"]["ns_dtype"] == "float32"  # "auto" recorded as what ran on CPU

    assert cli_main(["report", str(study_dir)]) == 0
    pngs = sorted((study_dir / "plots").glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png
    md = (study_dir / "report.md").read_text()
    assert "| round_robin |" in md and "ratio to replicated" in md
    for png in pngs:
        assert f"plots/{png.name}" in md
    # every run's Gantt chart, with what its collectives ran on
    assert "## Timelines" in md and "plots/gantt_llama-tiny--round_robin--p2.png" in md
    assert "| llama-tiny--round_robin--p2 | real |" in md

    # resume: everything is complete, nothing is launched or rewritten
    stamps = {p: p.stat().st_mtime_ns for p in study_dir.rglob("DONE")}
    logs = {p: p.stat().st_mtime_ns for p in (study_dir / "logs").iterdir()}
    result = run_sweep(load_study(study_file), stream=io.StringIO())
    assert [r.status for r in result.results] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("DONE")} == stamps
    assert {p: p.stat().st_mtime_ns for p in (study_dir / "logs").iterdir()} == logs

    # a changed config is not complete any more: only the changed points would run
    changed = run_sweep(load_study(study_file, ["optimizer.lr=0.01"]), dry_run=True,
                        stream=(out := io.StringIO()))
    assert changed.results == [] and out.getvalue().count("run ") == 4


def test_study_runs_fresh_every_time_unless_resumed(tmp_path, capsys):
    study_file = write_study(tmp_path / "s.yaml", "fresh", ["replicated"], [1])
    report_md = tmp_path / "results" / "fresh" / "report.md"
    for argv, skipped in ((["study", str(study_file)], False),
                          (["study", str(study_file)], False),
                          (["study", str(study_file), "--resume"], True)):
        assert cli_main(argv) == 0
        captured = capsys.readouterr()
        assert ("already complete, skipped" in captured.err) == skipped, captured.err
        assert ("1 ran" in captured.err) != skipped
        assert captured.out.strip().splitlines()[-1] == f"report: {report_md}"
        assert report_md.is_file()


def test_crashing_point_is_recorded_as_its_first_ranks_error_and_the_sweep_goes_on(
        tmp_path, capsys, monkeypatch):
    # a testing aid makes rank 1 of one point raise mid-run (dist_ortho.studies.faults, matched by
    # name)
    monkeypatch.setenv("DIST_ORTHO_FAULTS", "fail_step=1 fail_rank=1 fail_mode=raise runs='*broken*'")
    broken = {"name": "replicated", "label": "broken"}
    study_file = write_study(tmp_path / "s.yaml", "crash", [broken, "round_robin"], [2])
    assert cli_main(["sweep", str(study_file)]) == 1  # a failed point: non-zero exit, after all
    progress = capsys.readouterr().err
    assert "FAILED" in progress and "[crash 2/2]" in progress and "1 ran" in progress
    # one line, the first failing rank's own message and the log; no torchrun report, no traceback
    (line,) = [ln for ln in progress.splitlines() if "FAILED" in ln]
    assert line.endswith(".log") and "rank 1: RuntimeError: testing aid: rank 1 failed on " \
        "purpose at step 1 [rank 1 at step 1" in line and "; log: " in line
    assert "Root Cause" not in progress and "Traceback" not in progress
    study_dir = tmp_path / "results" / "crash"
    with open(study_dir / "failures.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["point"] == "llama-tiny--broken--p2" and row["status"] == "failed"
    # then where each rank was (dist_ortho.studies.phase_marker): rank 1 raised between phases
    assert row["error"].startswith("rank 1: RuntimeError: testing aid: rank 1 failed on purpose "
                                   "at step 1 [rank 1 at step 1"), row["error"]
    log = Path(row["log"]).read_text()
    assert "Root Cause" in log  # everything torchrun said is still in the log
    with open(study_dir / "summary.csv") as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["round_robin"]


def test_point_timeout_kills_the_point(tmp_path):
    study_file = write_study(tmp_path / "s.yaml", "slow", ["replicated"], [2])
    # far more steps than fit in the timeout, so the point can only end by being killed
    study = load_study(study_file, ["train.steps=100000", "train.log_every=1"])
    result = run_sweep(study, timeout_s=5.0, stream=io.StringIO())
    (r,) = result.results
    assert r.status == "timeout" and "timeout" in r.error
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    alive = [ln for ln in ps.splitlines() if str(tmp_path) in ln and not ln.startswith("Z")]
    assert alive == []  # torchrun and its workers are gone
    with open(result.failures) as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["timeout"]


def test_single_process_run_without_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dist_ortho", "run", str(TINY), "-o", str(out),
         "--set", "model.preset=gpt-tiny", "--set", "train.data=synthetic",
         "--set", "train.grad_clip=1.0", "--set", "profiling.memory=false"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = out / "gpt-tiny-replicated-p1"
    assert "loss" in proc.stdout
    done = json.loads((run_dir / "DONE").read_text())
    facts = json.loads((run_dir / "run.json").read_text())
    assert done["world_size"] == 1 and done["steps"] == 3
    assert facts["matrix_count"] == 2 * 6 and facts["final_loss"] > 0


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["sweep", "--help"],
                                  ["report", "--help"], ["study", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 0 and "usage: dist-ortho" in capsys.readouterr().out


@pytest.mark.parametrize("change,key", [
    ({"grid": {"strategies": ["replicated"], "world_sizes": [0]}}, "grid.world_sizes[0]"),
    ({"grid": {"strategies": ["nope"], "world_sizes": [1]}}, "grid.strategies[0].name"),
    ({"grid": {"strategies": ["replicated", "replicated"], "world_sizes": [1]}},
     "grid.strategies"),
    ({"grid": {"strategies": ["replicated"], "world_sizes": [1], "sizes": [2]}}, "grid.sizes"),
    ({"set": {"optimizer.lrr": 1}}, "optimizer.lrr"),
    ({"point_timeout_s": -1}, "point_timeout_s"),
    ({"base": "missing.yaml"}, "base"),
    ({"schedule": {"mode": "interleaved", "repeats": 0}}, "schedule.repeats"),
    ({"schedule": {"mode": "sideways"}}, "schedule.mode"),
    ({"schedule": {"claim_margin": 1.5}}, "schedule.claim_margin"),
    ({"grid": {"strategies": ["replicated"], "world_sizes": [1],
               "models": [{"preset": "llama-tiny", "set": {"model.depth": 2}}]}},
     "model.depth"),
])
def test_study_file_errors_name_their_key(tmp_path, change, key):
    from dist_ortho.studies.config import ConfigError
    from dist_ortho.studies.sweep import expand

    path = write_study(tmp_path / "s.yaml", "bad", ["replicated"], [1])
    data = yaml.safe_load(path.read_text())
    data.update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        expand(load_study(path), "cpu")
    assert info.value.key == key


def test_a_missing_subcommand_module_says_so(monkeypatch, capsys):
    from dist_ortho import cli

    monkeypatch.setitem(cli.SUBCOMMANDS, "project", ("dist_ortho.no_such_module", "cost model"))
    assert cli_main(["project", "--anything"]) == 2
    assert "dist_ortho.no_such_module could not be imported" in capsys.readouterr().err
    # the other subcommands are unaffected
    assert cli_main(["run", str(TINY), "--print-config"]) == 0
    assert "preset: llama-tiny" in capsys.readouterr().out
