"""Mistakes that can be known before any rank starts are found in the parent process and said in
ONE line, `dist-ortho <command>: error: <key>: <fix>`, exit status 2, no traceback and no launch;
a failure inside ranks is one line too (the first failing rank's error). Each test is named after
the bug it pins."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dist_ortho.cli import main as cli_main
from dist_ortho.studies.config import load_config
from dist_ortho.studies.jobs import first_error
from dist_ortho.studies.phase_marker import PhaseMarker, where_ranks_were
from dist_ortho.studies.preflight import cpu_cores
from dist_ortho.studies.sweep import load_study, run_sweep

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"


def one_error_line(capsys, command: str, key: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"dist-ortho {command}: error: {key}: "), err
    assert "Traceback" not in err[0]
    return err[0]


def write_study(tmp_path: Path, strategies: list, world_sizes: list[int], **extra) -> Path:
    study = {"name": "s", "base": str(TINY), "output_dir": str(tmp_path / "results"),
             "grid": {"strategies": strategies, "world_sizes": world_sizes}, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def launched(tmp_path: Path) -> bool:
    """Whether anything was launched: the job runner writes configs/ and logs/ per launch."""
    return any((tmp_path / "results").rglob("*.log")) or any((tmp_path / "results").rglob("DONE"))


def test_bucket_bytes_too_small_is_one_line_before_any_rank_starts(tmp_path, capsys):
    broken = {"name": "bucketed_async", "label": "tiny_bucket", "options": {"bucket_bytes": 64}}
    study = write_study(tmp_path, ["replicated", broken], [1, 2])
    assert cli_main(["sweep", str(study)]) == 2
    line = one_error_line(capsys, "sweep", "strategy.options")
    assert "raise bucket_bytes to at least" in line and "grid point llama-tiny--tiny_bucket--p1" \
        in line
    assert not launched(tmp_path)


def test_bucket_bytes_too_small_in_a_single_run_is_one_line(capsys, tmp_path):
    assert cli_main(["run", str(TINY), "--set", "strategy.name=bucketed_async",
                     "--set", "strategy.options.bucket_bytes=64", "-o", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "run", "strategy.options")
    assert not (tmp_path / "out").exists()  # found before anything was created


def test_eval_batch_not_divisible_by_world_size_fails_before_launch(tmp_path, capsys):
    conv = tmp_path / "c.yaml"
    conv.write_text(yaml.safe_dump({"run": {"model": {"preset": "gpt-tiny"}},
                                    "convergence": {"out_dir": str(tmp_path / "results"),
                                                    "nproc_per_node": 4, "eval_batch_size": 6}}))
    assert cli_main(["convergence", str(conv)]) == 2
    line = one_error_line(capsys, "convergence", "convergence.eval_batch_size")
    assert "pick a multiple of 4" in line
    assert not launched(tmp_path)


@pytest.mark.parametrize("argv,command,key", [
    (["run", str(TINY), "--set", "output.dir=/proc/nope"], "run", "output.dir"),
    (["run", str(TINY), "-o", "README.md/out"], "run", "output.dir"),
    (["run", str(TINY), "--set", "checkpoint.dir=/proc/nope"], "run",
     "checkpoint.dir"),
    (["project", "--out", "/proc/nope"], "project", "--out"),
])
def test_unwritable_output_path_is_one_line_not_a_chained_traceback(argv, command, key, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(ROOT)  # README.md is a file there
    assert cli_main(argv) == 2
    one_error_line(capsys, command, key)


def test_sweep_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    study = write_study(tmp_path, ["replicated"], [1])
    (tmp_path / "README.md").write_text("a file, not a folder\n")
    assert cli_main(["sweep", str(study), "-o", str(tmp_path / "README.md" / "out")]) == 2
    line = one_error_line(capsys, "sweep", "--out")
    assert "Not a directory" in line


def test_study_output_dir_unwritable_is_one_line(tmp_path, capsys):
    study = write_study(tmp_path, ["replicated"], [1])
    assert cli_main(["study", str(study), "-o", "/proc/nope"]) == 2
    one_error_line(capsys, "study", "--out")


def test_convergence_out_dir_unwritable_is_one_line(tmp_path, capsys):
    conv = tmp_path / "c.yaml"
    conv.write_text(yaml.safe_dump({"run": {"model": {"preset": "gpt-tiny"}},
                                    "convergence": {"out_dir": "/proc/nope"}}))
    assert cli_main(["convergence", str(conv)]) == 2
    one_error_line(capsys, "convergence", "convergence.out_dir")


@pytest.mark.parametrize("argv,command,key", [
    (["run", str(TINY), "--set", "train.steps=0"], "run", "train.steps"),
    (["run", str(TINY), "--set", "optimizer.lrr=1"], "run", "optimizer.lrr"),
    (["run", "nope.yaml"], "run", None),
    (["report", "/nonexistent/study"], "report", None),
    (["project", "--world-sizes", "8,x"], "project", "--world-sizes must be"),
    (["project", "--model", "llama-9b"], "project", "--model/--num-layers"),
])
def test_every_command_reports_user_errors_in_one_line(argv, command, key, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dist-ortho {command}: error: "), err
    if key:
        assert err[0].startswith(f"dist-ortho {command}: error: {key}"), err


def test_more_ranks_than_cores_is_a_warning(tmp_path):
    study = write_study(tmp_path, ["replicated"], [cpu_cores() + 1])
    stream = io.StringIO()
    run_sweep(load_study(study), dry_run=True, stream=stream)
    assert f"warning: world size {cpu_cores() + 1} = {cpu_cores() + 1} ranks on {cpu_cores()} " \
        f"CPU core(s)" in stream.getvalue()


def test_error_is_one_line_at_the_process_level_too(tmp_path):
    """The installed command, not just cli.main: one stderr line, exit 2, no traceback."""
    study = write_study(tmp_path, ["replicated"], [0])
    proc = subprocess.run([sys.executable, "-m", "dist_ortho", "sweep", str(study)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-ortho sweep: error: grid.world_sizes[0]: must be an integer >= 1, got 0"]


# -- asserts on user input become ValueErrors (regressions) ---------------------------------------

@pytest.fixture
def one_process():
    import torch.distributed as dist

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_train_with_negative_steps_is_a_value_error_not_an_assert(one_process, tmp_path):
    from dist_ortho.studies.run import build_run, close, train

    state = build_run(load_config(TINY, [f"output.dir={tmp_path}"]))
    try:
        with pytest.raises(ValueError, match=r"steps is the number of steps to take, an integer "
                                             r">= 0, got -1"):
            train(state, steps=-1)
    finally:
        close(state)


def test_model_without_blocks_is_a_value_error_not_an_assert():
    from dist_ortho.studies.run import _blocks

    with pytest.raises(ValueError, match="Linear has no `blocks` or `layers` ModuleList"):
        _blocks(torch.nn.Linear(2, 2))


# -- the first error of a failed job
# ----------------------------------------------------------------

ROOT_CAUSE = """\
Root Cause (first observed failure):
[1]:
  time      : 2026-11-29_23:28:52
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 6153)
  error_file: <N/A>
  traceback : {tb}
"""


@pytest.mark.parametrize("log,expected", [
    ("dist-ortho run: error: rank 0: RuntimeError: gloo closed\n"
     "dist-ortho run: error: rank 1: ValueError: boom\n"
     + ROOT_CAUSE.format(code=1, tb="Traceback ..."), "rank 1: ValueError: boom"),
    ("dist-ortho run: error: rank 0: RuntimeError: Connection closed by peer\n"
     + ROOT_CAUSE.format(code=-9, tb="Signal 9 (SIGKILL) received by PID 6153"),
     "rank 1 was killed by SIGKILL (signal 9)"),
    ("dist-ortho run: error: train.steps: must be >= 1, got 0\n", "train.steps: must be >= 1, "
                                                                  "got 0"),
    # torchrun's report may name the rank it stopped itself (SIGTERM) as the first failure
    ("Failures:\n[0]:\n  time      : 2026-11-30_01:09:29\n  rank      : 1 (local_rank: 1)\n"
     "  exitcode  : -9 (pid: 22077)  (SIGKILL)\n"
     + ROOT_CAUSE.format(code=-15, tb="Signal 15 (SIGTERM) received by PID 22076")
     .replace("rank      : 1", "rank      : 0"), "rank 1 was killed by SIGKILL (signal 9)"),
    ("Traceback (most recent call last):\nValueError: x\n", "ValueError: x"),
])
def test_a_failed_job_says_its_first_ranks_error_in_one_line(tmp_path, log, expected):
    path = tmp_path / "log"
    path.write_text(log)
    assert first_error(path, 1) == expected


def test_run_main_prints_one_line_for_an_error_inside_the_run(capsys, tmp_path):
    from dist_ortho.studies.run import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(TINY), "-o", str(tmp_path),
                              "--fault", "fail_step=0", "--fault", "fail_mode=raise"])
    with pytest.raises(RuntimeError):
        main(args)
    assert capsys.readouterr().err.strip().splitlines() == [
        "dist-ortho run: error: rank 0: RuntimeError: testing aid: rank 0 failed on purpose at "
        "step 0"]
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_failed_job_says_where_each_rank_was(tmp_path):
    """The phase markers (dist_ortho.studies.phase_marker) outlive a SIGKILL'd rank: the error line
    ends with where each rank was, the first failing rank first, telling the optimizer's exchange
    before Newton-Schulz from the one after it."""
    markers = [PhaseMarker(tmp_path, r) for r in range(3)]
    with contextlib.ExitStack() as held:  # phases never left, as in a rank that died there
        for m in markers:
            m.step = 3
        for name in ("optimizer", "orthogonalize", "comm_wait"):
            held.enter_context(markers[0].phase(name))
        for name in ("optimizer", "orthogonalize"):
            held.enter_context(markers[1].phase(name))
        with markers[1].phase("ns"):
            pass
        held.enter_context(markers[1].phase("comm_wait"))
        with markers[2].phase("forward_backward"):  # between phases: the step still shows
            pass
        with pytest.raises(RuntimeError), markers[2].phase("optimizer"):
            raise RuntimeError("x")  # an error leaves its phase in the file
        assert markers[2].where() == "optimizer"
        log = tmp_path / "log"
        log.write_text(ROOT_CAUSE.format(code=-9, tb="Signal 9 (SIGKILL) received by PID 6153"))
        assert first_error(log, 1, tmp_path) == (
            "rank 1 was killed by SIGKILL (signal 9) [rank 1 at step 3, "
            "optimizer/orthogonalize/comm_wait(return); rank 0 at step 3, "
            "optimizer/orthogonalize/comm_wait(forward); rank 2 at step 3, optimizer]")
    for m in markers:
        m.close()
    assert where_ranks_were(tmp_path / "nowhere") == ""
