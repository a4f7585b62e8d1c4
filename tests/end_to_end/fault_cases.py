"""The fault matrix: a rank killed or hung in each phase of a step or a save, through the job runner
(`dist_ortho.studies.jobs`, as a sweep runs a point), then `--resume` of every case in one torchrun.

Used by tests/end_to_end/test_checkpoint_integrity_through_torchrun.py (which asserts the behaviour)
and bench/fault_matrix.py (which writes the table of times to exit to
results/bench/fault_matrix.md). One run: gpt-tiny on 2 gloo ranks, synthetic data, strategy balanced
(it has a forward exchange, Newton-Schulz and a return exchange), NorMuon + AdamW, 6 steps, a
checkpoint every 2 steps, keep_last 1, collective timeout TIMEOUT_S.

The fault strikes at step FAIL_STEP (0-based) on FAIL_RANK, as the rank enters the phase
(`dist_ortho.studies.faults.PHASES`); "save" strikes in the save after that step (the checkpoint of
step 4) once the rank's files are written, "retention" on rank 0 while it deletes the checkpoint of
step 2 after committing step 4. So every case leaves the checkpoint of step 2 (or 4 for
retention) as the newest intact one, and the resume must end where the uninterrupted run ends.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dist_ortho.checkpointing import checkpoint
from dist_ortho.checkpointing.manifest import read_manifest
from dist_ortho.studies.config import load_config, resolve
from dist_ortho.studies.faults import PHASES
from dist_ortho.studies.jobs import Job, Progress, run_jobs, stop_tree

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
TIMEOUT_S = 15.0  # dist.timeout_s of the fault runs: a hang ends within it
# what a job may take beyond the timeout to end: torchrun noticing the failed rank and stopping
# the other one (SIGTERM, then its grace period), on a loaded 2-core machine
SLACK_S = 25.0
STEPS, EVERY, FAIL_STEP = 6, 2, 3
MODES = ("kill", "hang")
SETS = ["model.preset=gpt-tiny", "train.data=synthetic", "train.seq_len=32", "train.batch_size=6",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.log_every=1",
        "strategy.name=balanced", "profiling.memory=false", "profiling.instrument_every=100",
        f"dist.timeout_s={TIMEOUT_S}", f"checkpoint.every={EVERY}", "checkpoint.keep_last=1"]
# where the failing rank's marker says it was (dist_ortho.studies.phase_marker paths)
WHERE = {"forward": "step 3, forward_backward/forward",
         "backward": "step 3, forward_backward/backward",
         "exchange": "step 3, optimizer/orthogonalize/comm_wait(forward)",
         "ns": "step 3, optimizer/orthogonalize/ns",
         "return": "step 3, optimizer/orthogonalize/comm_wait(return)",
         "normalize": "step 3, optimizer/normalize",
         "save": "checkpoint of step 4, checkpoint/commit",
         "retention": "checkpoint of step 4, checkpoint/retention/delete"}


@dataclass
class Case:
    phase: str
    mode: str
    rank: int
    returncode: int | None = None
    status: str = ""
    error: str = ""
    seconds_to_exit: float | None = None  # from the fault (logged by the rank) to the job's end
    log: Path | None = None
    left: dict | None = None  # what the failed job left in its checkpoint folder (`left_behind`)
    async_save: bool = False  # saves on the background thread (dist_ortho.checkpointing.async_save)

    @property
    def name(self) -> str:
        return f"{self.phase}-{self.mode}" + ("-async" if self.async_save else "")

    @property
    def sets(self) -> tuple:
        return ("checkpoint.async_save=true",) if self.async_save else ()

    @property
    def resume_from(self) -> int:
        return 4 if self.phase == "retention" else 2


def cases(phases=tuple(PHASES), modes=MODES, async_phases=()) -> list[Case]:
    """Each phase x mode with blocking saves, then each of `async_phases` x mode with
    asynchronous ones (the save's phases then run on the background thread)."""
    return [Case(p, m, 0 if p == "retention" else 1, async_save=a)
            for a, ps in ((False, phases), (True, async_phases)) for p in ps for m in modes]


def set_args(overrides) -> list[str]:
    """`--set KEY=VALUE` for each override."""
    return [arg for kv in overrides for arg in ("--set", kv)]


def run_sets(root: Path, name: str, extra: tuple = ()) -> list[str]:
    """The overrides of one case's run (or the reference's)."""
    return [*SETS, f"output.dir={root / 'out'}", f"output.name={name}",
            f"checkpoint.dir={root / 'ck' / name}", *extra]


def run_args(root: Path, name: str, resume: bool = False, extra: tuple = ()) -> list[str]:
    """`dist-ortho run` arguments of one case's run (or the reference's)."""
    return [str(TINY), *set_args(run_sets(root, name, extra))] + (["--resume"] if resume else [])


def _job(root: Path, case: Case) -> Job:
    config = resolve(load_config(TINY, run_sets(root, case.name, extra=case.sets)))
    faults = f"fail_step={FAIL_STEP} fail_rank={case.rank} fail_phase={case.phase} " \
             f"fail_mode={case.mode}"
    return Job(name=case.name, config=config, world_size=2,
               entry=["-m", "dist_ortho", "run", "{config}"],
               env={"DIST_ORTHO_FAULTS": faults})


def _fault_time(log: Path) -> float | None:
    m = re.search(r"testing aid: rank \d+ will .* \(time (\d+\.\d+)\)",
                  log.read_text(errors="replace"))
    return float(m.group(1)) if m else None


def run_case(root: Path, case: Case, job_timeout_s: float = 300) -> Case:
    """Launch one case through the job runner; fill in its outcome and time to exit."""
    return run_cases(root, [case], job_timeout_s)[0]


def run_cases(root: Path, matrix: list[Case], job_timeout_s: float = 300, slots: int = 1
              ) -> list[Case]:
    """Launch the cases through the job runner, `slots` at a time; fill in each one's outcome and
    time to exit (its end: when the runner had its exit status, noted by the progress hook)."""
    ended: dict[str, float] = {}

    class _Noting(Progress):
        def end(self, result, *args, **kwargs):
            ended[result.job.name] = time.time()
            return super().end(result, *args, **kwargs)

    results = run_jobs([_job(root, c) for c in matrix], root / "jobs", force=True,
                       timeout_s=job_timeout_s, slots=slots,
                       progress=_Noting("faults", len(matrix), slots=slots,
                                        stream=io.StringIO()))
    for case, result in zip(matrix, results):
        case.status, case.returncode, case.error, case.log = (result.status, result.returncode,
                                                              result.error, result.log)
        fault = _fault_time(result.log)
        case.seconds_to_exit = None if fault is None else ended[case.name] - fault
        case.left = left_behind(root / "ck" / case.name)
    return matrix


def left_behind(ckpt_dir: Path) -> dict:
    """The checkpoint folder as a failed job left it: its step folders (complete and partial),
    what `latest` names, and what is wrong with each complete one ([] when intact)."""
    latest = ckpt_dir / checkpoint.LATEST_FILE
    return {"folders": step_folders(ckpt_dir),
            "latest": latest.read_text().strip() if latest.is_file() else None,
            "problems": {s: checkpoint.verify(checkpoint.checkpoint_path(ckpt_dir, s))
                         for s in checkpoint.complete_steps(ckpt_dir)}}


def resume_jobs(root: Path, matrix: list[Case]) -> list[list[str]]:
    """The reference run and every case's --resume, for tests/end_to_end/rel_cases.py (one
    torchrun)."""
    return [run_args(root, "reference")] + [run_args(root, c.name, resume=True, extra=c.sets)
                                            for c in matrix]


def losses(root: Path, name: str) -> list:
    return json.loads((root / "out" / name / "run.json").read_text())["losses"]


def state_hashes(ckpt_dir: Path, step: int) -> dict[str, str]:
    """SHA-256 of each DCP shard file of a checkpoint, from its manifest: equal model and
    optimizer state (every tensor, bit for bit) writes equal shard files."""
    files = read_manifest(checkpoint.checkpoint_path(ckpt_dir, step))["files"]
    return {name: e["sha256"] for name, e in files.items() if name.endswith(".distcp")}


def step_folders(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(("step_", ".step_")))


def run_many(nproc: int, jobs: list[list[str]], folder: Path, timeout_s: float = 600
             ) -> tuple[int, str]:
    """Several `dist-ortho run` command lines in one torchrun (tests/end_to_end/rel_cases.py):
    (exit code, output). On timeout the process tree is stopped and the exit code is None."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / f"jobs_{len(list(folder.glob('jobs_*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "DIST_ORTHO_FAULTS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(TESTS / "rel_cases.py"), str(jobs_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        return None, f"still running after {timeout_s} s"
    return proc.returncode, output


def resume_outcome(root: Path, case: Case, output: str) -> dict:
    """What the case's --resume did: the step it resumed from (per its log line), whether its
    losses and final state equal the reference's bitwise, and its checkpoint folder's names."""
    ck = root / "ck" / case.name
    m = re.search(rf"resumed from {re.escape(str(ck))}/step_(\d+)", output)
    return {"resumed_from": int(m.group(1)) if m else None,
            "losses_equal": losses(root, case.name) == losses(root, "reference"),
            "state_equal": state_hashes(ck, STEPS) == state_hashes(root / "ck" / "reference",
                                                                   STEPS),
            "folders": step_folders(ck)}
