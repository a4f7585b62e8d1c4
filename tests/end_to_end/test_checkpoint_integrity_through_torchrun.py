"""Checkpoint integrity, end to end through torchrun on 2 gloo ranks.

- Damage: the newest checkpoint truncated, deleted or with corrupted bytes, for a `.distcp`
  shard, DCP's `.metadata` and the manifest itself: `--resume` names what it skipped in one line,
  continues from the previous intact checkpoint, and ends with the uninterrupted run's losses and
  model and optimizer state, bit for bit. With nothing intact it fails in one line.
- Async saves write the same checkpoints as blocking ones, bit for bit.
- The fault matrix (tests/end_to_end/fault_cases.py): a rank killed or hung in a phase of a step or
  a save ends the job within the collective timeout, with the failing rank and phase in the job's
  one error line; its `--resume` continues bitwise. By default two cases run side by side (the
  matrix costs ~35 s of two CPU cores per case); DIST_ORTHO_FAULT_MATRIX=full runs every phase
  killed and hung. Times to exit are printed; with DIST_ORTHO_FAULT_TIMES=<file> they are also
  appended there (bench/fault_matrix.py writes the committed table).

Launches: one torchrun for the reference and async runs, the fault cases side by side, one
torchrun for every resume (tests/end_to_end/rel_cases.py puts several runs in one launch).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest
import torch

from dist_ortho.checkpointing import checkpoint
from dist_ortho.studies.config import ConfigError, load_config
from dist_ortho.studies.run_checkpoint import precheck_resume
from tests.end_to_end import fault_cases as fc

# real torchrun jobs (damage x resume, fault matrix): excluded from the README's test command, run
# by .ci/run
pytestmark = pytest.mark.slow

DAMAGE = ("truncate", "delete", "corrupt")
FILES = ("__1_0.distcp", ".metadata", "manifest.json")
DAMAGED_STEP, INTACT_STEP = 6, 4  # the resumes take the last 2 steps again
# what `--resume` says about the damaged folder, per damage and file
SAYS = {("truncate", "manifest.json"): "manifest.json is damaged",
        ("corrupt", "manifest.json"): "manifest.json is damaged",
        ("delete", "manifest.json"): "manifest.json is missing",
        **{("truncate", f): f"{f} has " for f in FILES[:2]},
        **{("delete", f): f"{f} is missing" for f in FILES[:2]},
        **{("corrupt", f): f"{f} is corrupted" for f in FILES[:2]}}
# the fault cases run by default (tests/end_to_end/test_resume_and_faults_through_torchrun.py kills
# and hangs a rank mid-step too): a hang in the optimizer, ended by the timeout, and a kill in the
# middle of retention's deletion
DEFAULT_CASES = (("normalize", "hang"), ("retention", "kill"))


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "delete":
        path.unlink()
    else:  # corrupt: flip the bits of a few bytes in the middle, size unchanged
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
        path.write_bytes(bytes(data))


def damage_name(how: str, name: str) -> str:
    return f"damage-{how}-{name.strip('.').replace('.', '_')}"


def fault_matrix() -> list[fc.Case]:
    if os.environ.get("DIST_ORTHO_FAULT_MATRIX") == "full":
        return fc.cases(async_phases=("save",))
    return [c for c in fc.cases() if (c.phase, c.mode) in DEFAULT_CASES]


# -- the shared launches ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckfault")


@pytest.fixture(scope="module")
def reference(root) -> str:
    """P=2: the uninterrupted run (saves at 2, 4, 6, all kept) and the same run saving
    asynchronously."""
    keep, asy = "checkpoint.keep_last=0", "checkpoint.async_save=true"
    code, output = fc.run_many(2, [fc.run_args(root, "reference", extra=(keep,)),
                                   fc.run_args(root, "async", extra=(keep, asy))], root / "launch")
    assert code == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def faults(root, reference) -> list[fc.Case]:
    """Every fault case of the matrix, side by side through the job runner."""
    matrix = fault_matrix()
    fc.run_cases(root, matrix, slots=len(matrix) if len(matrix) <= 3 else 2)
    log = os.environ.get("DIST_ORTHO_FAULT_TIMES")
    lines = [f"{c.name}: exit {c.returncode}, {c.seconds_to_exit:.1f} s after the fault "
             f"(timeout {fc.TIMEOUT_S:g} s): {c.error}" for c in matrix]
    print("\n".join(lines))
    if log:  # outside the repository, where the caller says
        with open(log, "a") as f:
            f.write("\n".join(lines) + "\n")
    return matrix


@pytest.fixture(scope="module")
def resumed(root, reference, faults) -> str:
    """P=2, one torchrun: a copy of the reference's checkpoints 4 and 6 with checkpoint 6
    damaged, per damage and file, resumed (from 4) to step 6; then every fault case's
    --resume."""
    ref = root / "ck" / "reference"
    jobs = []
    for how in DAMAGE:
        for name in FILES:
            case = damage_name(how, name)
            for step in (INTACT_STEP, DAMAGED_STEP):
                src = checkpoint.checkpoint_path(ref, step)
                shutil.copytree(src, root / "ck" / case / src.name)
            damage(checkpoint.checkpoint_path(root / "ck" / case, DAMAGED_STEP) / name, how)
            jobs.append(fc.run_args(root, case, resume=True, extra=("checkpoint.keep_last=0",)))
    jobs += [fc.run_args(root, c.name, resume=True, extra=c.sets) for c in faults]
    code, output = fc.run_many(2, jobs, root / "launch")
    assert code == 0, output[-6000:]
    return output


# -- damage ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_newest_checkpoint_resumes_from_previous_bitwise(root, resumed, how, name):
    case = damage_name(how, name)
    ck = root / "ck" / case
    damaged = checkpoint.checkpoint_path(ck, DAMAGED_STEP)
    # one line names the damaged folder and what is wrong with it, and where the run goes on
    (line,) = [ln for ln in resumed.splitlines() if f"skipped damaged {damaged} " in ln]
    assert SAYS[how, name] in line and line.endswith(f"resuming from step_{INTACT_STEP:08d}")
    assert f"resumed from {checkpoint.checkpoint_path(ck, INTACT_STEP)}: step {INTACT_STEP}" \
        in resumed
    # the steps after it equal the uninterrupted run's: losses and every tensor, bitwise
    assert fc.losses(root, case) == fc.losses(root, "reference")
    assert fc.state_hashes(ck, fc.STEPS) == fc.state_hashes(root / "ck" / "reference", fc.STEPS)
    # the damaged step was saved again, intact
    assert checkpoint.verify(damaged) == []


def test_none_intact_fails_in_one_line_before_launch(root, reference):
    """Every manifest unreadable: refused before any process group, naming each folder."""
    ck = root / "ck" / "no-manifest"
    shutil.copytree(root / "ck" / "reference", ck)
    for step in checkpoint.complete_steps(ck):
        (checkpoint.checkpoint_path(ck, step) / "manifest.json").unlink()
    config = load_config(fc.TINY, [*fc.SETS, f"checkpoint.dir={ck}", "checkpoint.resume=true"])
    with pytest.raises(ConfigError) as info:
        precheck_resume(config, 2)
    text = str(info.value)
    assert info.value.key == "checkpoint.dir" and "\n" not in text
    assert f"no intact checkpoint in {str(ck)!r}" in text
    assert all(f"step_{s:08d}: manifest.json is missing" in text for s in (2, 4, 6))


@pytest.fixture
def one_process():
    """In-process runs start a one-rank group and set one thread; undo both."""
    import torch.distributed as dist

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    assert not dist.is_initialized(), "a failed run left its process group behind"


def test_none_intact_resume_is_one_error_line_and_loads_nothing(root, reference, one_process,
                                                                capsys):
    """Manifests fine, shards damaged: found by the verification after the group started; the
    command prints one line naming the folder and the damage and exits 2."""
    from dist_ortho.studies.run import add_arguments, main

    ck = root / "ck" / "all-damaged"
    for step in (2, 4):
        src = checkpoint.checkpoint_path(root / "ck" / "reference", step)
        shutil.copytree(src, ck / src.name)
        damage(ck / src.name / "__0_0.distcp", "corrupt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # one rank, the same global batch (12) as the 2-rank run that saved
    args = [str(fc.TINY), *fc.set_args([*fc.SETS, "train.batch_size=12",
                                         f"output.dir={root / 'out'}", "output.name=all-damaged",
                                         f"checkpoint.dir={ck}"]), "--resume"]
    assert main(parser.parse_args(args)) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert f"checkpoint.dir: no intact checkpoint in {str(ck)!r}" in line
    assert "step_00000004: __0_0.distcp is corrupted" in line
    assert "step_00000002: __0_0.distcp is corrupted" in line
    assert not (root / "out" / "all-damaged" / "DONE").exists()


# -- async saves -----------------------------------------------------------------------------------
def test_async_saves_write_the_blocking_checkpoints_bitwise(root, reference):
    ref, asy = root / "ck" / "reference", root / "ck" / "async"
    assert checkpoint.complete_steps(asy) == checkpoint.complete_steps(ref) == [2, 4, 6]
    for step in (2, 4, 6):
        assert checkpoint.verify(checkpoint.checkpoint_path(asy, step)) == []
        assert fc.state_hashes(asy, step) == fc.state_hashes(ref, step)
    assert fc.losses(root, "async") == fc.losses(root, "reference")
    assert not [p for p in asy.iterdir() if p.name.startswith(".")]  # nothing partial left


# -- the fault matrix ------------------------------------------------------------------------------
def test_faults_end_the_job_within_the_timeout_naming_rank_and_phase(faults):
    for case in faults:
        assert case.status == "failed" and case.returncode != 0, (case.name, case.error)
        assert case.seconds_to_exit is not None, (case.name, case.log.read_text()[-3000:])
        assert case.seconds_to_exit < fc.TIMEOUT_S + fc.SLACK_S, (case.name,
                                                                   case.seconds_to_exit)
        if case.mode == "hang":  # ended by the other rank's collective timeout
            assert case.seconds_to_exit > fc.TIMEOUT_S - 1, (case.name, case.seconds_to_exit)
        assert "\n" not in case.error
        # (an async save's phase follows the main thread's: `rank 1 at step 5, ... and
        # checkpoint of step 4, checkpoint/commit`)
        at = f"rank {case.rank} at " + ("" if case.async_save else fc.WHERE[case.phase])
        assert at in case.error and fc.WHERE[case.phase] in case.error, (case.name, case.error)


def test_faults_leave_only_intact_or_clearly_partial_folders(faults):
    for case in faults:
        left = case.left  # as the failed job left it, before any resume
        # every folder named step_* verifies, and `latest` names the newest of them
        assert all(p == [] for p in left["problems"].values()), (case.name, left)
        assert max(left["problems"]) == case.resume_from, (case.name, left)
        assert left["latest"] == f"step_{case.resume_from:08d}", (case.name, left)
        if case.phase == "retention":  # killed mid-deletion: one checkpoint (keep_last 1) and
            # a folder no reader takes for one
            assert left["folders"] == [".step_00000002.deleting", "step_00000004"], left


def test_resume_after_each_fault_continues_bitwise(root, faults, resumed):
    for case in faults:
        got = fc.resume_outcome(root, case, resumed)
        assert got["resumed_from"] == case.resume_from, (case.name, got)
        assert got["losses_equal"] and got["state_equal"], (case.name, got)
        # keep_last 1 holds after the resume: the final checkpoint, no leftovers
        assert got["folders"] == [f"step_{fc.STEPS:08d}"], (case.name, got)
