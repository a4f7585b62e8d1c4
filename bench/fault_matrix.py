"""The fault matrix, measured: a rank killed or hung in each phase of a step or a save, the time
from the fault to the job's end, the one-line error the job runner reports, and whether the
following `--resume` continues bitwise from the newest intact checkpoint.

    python bench/fault_matrix.py                      # all phases x kill, hang -> results/bench/
    python bench/fault_matrix.py --phases ns save --modes kill --out /tmp/fm

The cases are those of tests/end_to_end/fault_cases.py (gpt-tiny, 2 gloo ranks, strategy balanced, 6
steps, a checkpoint every 2 steps, keep_last 1, collective timeout fault_cases.TIMEOUT_S): each case
is one job through `dist_ortho.studies.jobs` (as a sweep runs a point); then one torchrun runs the
uninterrupted reference and every case's `--resume`. Writes fault_matrix.md and fault_matrix.csv.
Time to exit: from the wall clock the failing rank logged just before it failed to the moment the
job runner had the job's exit status (torchrun stopping the other rank included), on whatever
machine this runs on: the load of a shared machine adds to it.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]  # the repository root, for the tests package

from tests.end_to_end import fault_cases as fc  # noqa: E402 - the root on the path first

from dist_ortho.core.io import atomic_write_text  # noqa: E402
from dist_ortho.studies.faults import PHASES  # noqa: E402

FIELDS = ["phase", "mode", "saves", "rank", "returncode", "seconds_to_exit", "within_timeout",
          "error",
          "resumed_from", "resume_bitwise", "folders_after_resume"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--modes", nargs="+", default=list(fc.MODES), choices=list(fc.MODES))
    parser.add_argument("--async-phases", nargs="*", default=["save"], choices=list(PHASES),
                        help="phases also run with checkpoint.async_save=true")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "bench"))
    args = parser.parse_args(argv)

    matrix = fc.cases(args.phases, args.modes, args.async_phases)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault_matrix_") as tmp:
        root = Path(tmp)
        for case in matrix:
            fc.run_case(root, case)
            print(f"{case.name}: {case.status}, exit {case.returncode}, "
                  f"{case.seconds_to_exit:.1f} s after the fault: {case.error}", flush=True)
        code, output = fc.run_many(2, fc.resume_jobs(root, matrix), root / "resume")
        if code != 0:
            print(output[-6000:])
            raise SystemExit(f"the resumes failed (exit {code})")
        for case in matrix:
            got = fc.resume_outcome(root, case, output)
            rows.append({
                "phase": case.phase, "mode": case.mode,
                "saves": "async" if case.async_save else "blocking", "rank": case.rank,
                "returncode": case.returncode,
                "seconds_to_exit": f"{case.seconds_to_exit:.1f}",
                "within_timeout": case.seconds_to_exit < fc.TIMEOUT_S + fc.SLACK_S,
                "error": case.error,
                "resumed_from": got["resumed_from"],
                "resume_bitwise": got["losses_equal"] and got["state_equal"],
                "folders_after_resume": " ".join(got["folders"])})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "fault_matrix.csv", table.getvalue())
    lines = [
        "# Fault matrix: a rank killed or hung in each phase",
        "",
        f"Written by `bench/fault_matrix.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPU core(s) (shared "
        f"with other work, so times include its load). gpt-tiny, 2 gloo ranks, strategy balanced, "
        f"6 steps, checkpoint every 2 steps, keep_last 1, `dist.timeout_s={fc.TIMEOUT_S:g}`; "
        f"saves blocking, or asynchronous (`checkpoint.async_save`) where the table says so. The "
        f"fault strikes at step {fc.FAIL_STEP} (save: in the save of step 4, before its commit; "
        f"retention: while rank 0 deletes step 2 after committing step 4). Time to exit: from the "
        f"fault to the job runner having the job's exit status. Resume: the following `--resume` "
        f"to step 6; bitwise = its losses and its final model and optimizer state equal the "
        f"uninterrupted run's.",
        "",
        "| phase | mode | saves | rank | exit | s to exit | error line (jobs.first_error) "
        "| resumed from | resume bitwise | folders after resume |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = r["error"].replace("|", "\\|")
        lines.append(f"| {r['phase']} | {r['mode']} | {r['saves']} | {r['rank']} "
                     f"| {r['returncode']} "
                     f"| {r['seconds_to_exit']} | {error} | {r['resumed_from']} "
                     f"| {'yes' if r['resume_bitwise'] else 'NO'} | {r['folders_after_resume']} |")
    atomic_write_text(out / "fault_matrix.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'fault_matrix.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
