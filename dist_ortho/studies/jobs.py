"""The one job runner: a torchrun (or one process) per job, bounded, logged, resumable, stoppable.

Sweeps, the default study and the convergence study all describe their work as `Job`s and hand
them to `run_jobs`:

    job = Job(name="llama-tiny--balanced--p2", config=resolved_config, world_size=2,
              entry=["-m", "dist_ortho", "run", "{config}"])
    results = run_jobs([job, ...], workdir=study_dir, timeout_s=300, force=False,
                       slots=1, progress=Progress("study", n))

What happens to a job:
- Resume: a job is complete when its run directory (`config.output.dir/output.name`) holds a DONE
  marker with the job's config hash and world size, a `job.json` whose `settings` equal the job's,
  and every file named in `outputs`. Complete jobs are skipped unless `force`.
- Launch: `<workdir>/configs/<name>.yaml` gets the resolved config, the run directory `job.json`
  (DONE is removed first, so a job killed midway never reads as complete), and the command is
  `python -m torch.distributed.run --standalone --nproc_per_node=P <entry>` (a plain `python
  <entry>` at P = 1), stdout+stderr to `<workdir>/logs/<name>.log`, in a session of its own.
  `{config}` and `{run_dir}` in `entry` are replaced by the paths.
- Bounds: a job running longer than `timeout_s` is stopped and recorded as `timeout`.
- Failure: a non-zero exit is `failed`, with one line: the first failing rank's error (the line
  `dist-ortho <cmd>: error: ...` its entry printed, or the signal that killed it, from torchrun's
  root cause), never torchrun's dump; the log path goes with it.
- Stopping: torchrun starts each worker in a session of its own, so stopping a job signals the
  whole tree: SIGTERM to the job's group, then SIGKILL to every process of the tree that is still
  there (pids checked against their start time, so a reused pid is never hit).
- Signals: while `run_jobs` runs, SIGINT and SIGTERM stop every running job that way, leave them
  incomplete, and raise `Interrupted` (exit code 130 / 143 for the caller to return).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from dist_ortho.core.io import atomic_write_text
from dist_ortho.studies.config import Config, ConfigError, config_hash, dump_config
from dist_ortho.core.commands import Interrupted, error_line
from dist_ortho.core.errors import UserError
from dist_ortho.studies.phase_marker import MARKER_DIR, where_ranks_were

__all__ = ["Job", "JobResult", "Progress", "run_jobs", "is_complete", "read_done",
           "write_done", "run_as_rank", "launch_command", "first_error",
           "write_failures",
           "stop_tree", "clock", "DONE_FILE", "JOB_FILE", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DONE_FILE = "DONE"
JOB_FILE = "job.json"
FAILED = ("failed", "timeout", "unrunnable")


# --- what a run leaves ----------------------------------------------------------------------------

def read_done(run_dir: str | Path) -> dict | None:
    """The DONE marker's content, or None when the run is not complete."""
    try:
        return json.loads((Path(run_dir) / DONE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_done(run_dir: str | Path, info: Mapping) -> Path:
    """Write the DONE marker (atomically; the last file a run writes)."""
    return atomic_write_text(Path(run_dir) / DONE_FILE, json.dumps(dict(info)) + "\n")


def run_as_rank(command: str, fn: Callable[[], int]) -> int:
    """Run a job entry's work on one rank with the errors a job runner can read: a ConfigError
    (raised alike on every rank, before any collective) is one line from rank 0 and exit 2; another
    UserError one line from this rank and exit 2; anything else is a bug: one line naming the rank
    and the exception, then the traceback (torchrun records it) and a non-zero exit."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return int(fn() or 0)
    except ConfigError as exc:
        if rank == 0:
            print(error_line(command, exc), file=sys.stderr, flush=True)
        return 2
    except UserError as exc:
        print(error_line(command, exc, rank if world > 1 else None), file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        print(error_line(command, exc, rank), file=sys.stderr, flush=True)
        raise


# --- jobs -----------------------------------------------------------------------------------------

@dataclass
class Job:
    """One launch. `config` is resolved for this machine with output.dir/output.name set to the
    run directory; `settings` is whatever else defines the job (it must match for the job to count
    as complete); `labels` become columns of failures.csv; `env` is added to the environment."""

    name: str
    config: Config
    world_size: int
    entry: list[str]
    settings: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    note: Callable[[Job], str] | None = None  # a line about a finished job ("final loss 1.23")

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir) / str(self.config.output.name)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def is_complete(job: Job) -> bool:
    done = read_done(job.run_dir)
    if done is None or done.get("config_hash") != job.config_hash \
            or done.get("world_size") != job.world_size:
        return False
    try:
        spec = json.loads((job.run_dir / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return spec.get("settings") == json.loads(json.dumps(job.settings)) and \
        all((job.run_dir / name).is_file() for name in job.outputs)


@dataclass
class JobResult:
    job: Job
    status: str  # ok | skipped | failed | timeout | unrunnable
    seconds: float = 0.0
    returncode: int | None = None
    log: Path | None = None
    error: str = ""


# --- processes ------------------------------------------------------------------------------------

def launch_command(job: Job, config_path: Path) -> list[str]:
    tail = [a.format(config=config_path, run_dir=job.run_dir) for a in job.entry]
    if job.world_size == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={job.world_size}", *tail]


def child_env(extra: Mapping[str, str] = ()) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank; also silences torchrun's note
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, start time) of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every process below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        stat = _proc_stat(entry)
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def stop_tree(proc: subprocess.Popen, known: Sequence[tuple[int, int]] = (),
              grace_s: float = 10.0) -> None:
    """End a job: SIGTERM to its process group (torchrun then stops its workers), then SIGKILL to
    the group and to every process of its tree (as seen now, plus `known`) still alive after
    `grace_s`. A pid is only signalled while its start time still matches."""
    tree = {pid: started for pid, started in [*known, *descendants(proc.pid)]}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + grace_s
    alive = dict(tree)
    while alive:
        alive = {pid: t for pid, t in alive.items() if (_proc_stat(pid) or (0, None))[1] == t}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in alive:  # workers in sessions of their own that did not follow torchrun
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# --- the first error of a failed job --------------------------------------------------------------

_ERROR = re.compile(r"^(?:\[rank\d+\]:\s*)?dist-ortho [\w-]+: error: (?:rank (\d+): )?(.*)$")
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_EXCEPTION = re.compile(
    r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b:?.*)")


def _torchrun_failures(lines: Sequence[str]) -> list[tuple[str, int, bool]]:
    """(rank, exit code, is torchrun's root cause) of each failed worker torchrun lists."""
    out, section, rank = [], None, None
    for ln in lines:
        if ln.startswith("Failures:"):
            section = "failures"
        elif ln.startswith("Root Cause"):
            section = "root"
        elif section and (m := _ROOT_RANK.match(ln)):
            rank = m.group(1)
        elif section and rank is not None and (m := _ROOT_EXIT.match(ln)):
            out.append((rank, int(m.group(1)), section == "root"))
            rank = None
    return out


def first_error(log: Path, returncode: int | None = None, run_dir: Path | None = None) -> str:
    """One line saying why a job failed: the first failing rank's own error line, or the signal
    that killed it; else the first error line any rank printed; else the last exception line of
    the log; else its last line. Ranks torchrun stopped with SIGTERM after another one failed
    are consequences, whatever order torchrun's report puts them in. With `run_dir`, where each
    rank was (its last phase, `dist_ortho.studies.phase_marker`) follows in brackets, that rank
    first."""
    rank, text = _first_error(log, returncode)
    where = where_ranks_were(run_dir, None if rank is None else int(rank)) if run_dir else ""
    return f"{text} [{where}]" if where else text


def _first_error(log: Path, returncode: int | None) -> tuple[str | None, str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None, f"exited {returncode}" if returncode is not None else ""
    errors = [(m.group(1), m.group(2).strip()) for m in map(_ERROR.match, lines) if m]
    failures = _torchrun_failures(lines)
    causes = [f for f in failures if f[1] != -signal.SIGTERM] or failures
    if causes:
        rank, code, _ = max(causes, key=lambda f: f[2])  # torchrun's root cause when it is one
        if code < 0:
            return rank, f"rank {rank} was killed by {_signal_name(-code)}"
        for r, text in errors:
            if r == rank:
                return r, f"rank {r}: {text}"[:300]
    if errors:
        rank, text = errors[0]
        return rank, (f"rank {rank}: {text}" if rank is not None else text)[:300]
    if returncode is not None and returncode < 0:
        return None, f"killed by {_signal_name(-returncode)}"
    found = [m.group(1) for m in map(_EXCEPTION.match, (ln.strip() for ln in lines)) if m]
    if found:
        return None, found[-1].strip()[:300]
    return None, next((ln.strip()[:300] for ln in reversed(lines) if ln.strip()),
                      f"exited {returncode}")


def _signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} (signal {signum})"
    except ValueError:
        return f"signal {signum}"


# --- progress -------------------------------------------------------------------------------------

def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One plain line per job on a stream, with elapsed time and an ETA for the rest."""

    def __init__(self, study: str, total: int, stream=None, slots: int = 1) -> None:
        self.study, self.total, self.stream, self.slots = study, total, stream or sys.stderr, slots
        self.start = time.perf_counter()
        self.durations: dict[int, list[float]] = {}

    def estimate(self, world_size: int) -> float | None:
        same = self.durations.get(world_size)
        if same:
            return sum(same) / len(same)
        every = [d for ds in self.durations.values() for d in ds]
        return sum(every) / len(every) if every else None

    def begin(self, index: int, job: Job, pending: Sequence[Job], skipped: bool = False) -> None:
        """`pending`: the jobs still to launch, this one included."""
        head = f"[{self.study} {index}/{self.total}] {job.name}"
        if skipped:
            self.print(f"{head} | already complete, skipped")
            return
        guesses = [self.estimate(j.world_size) for j in pending]
        eta = "?" if any(g is None for g in guesses) else clock(sum(guesses) / self.slots)
        self.print(f"{head} | elapsed {clock(time.perf_counter() - self.start)} | ETA {eta}")

    def end(self, result: JobResult) -> None:
        if result.status in ("ok", "failed", "timeout"):
            self.durations.setdefault(result.job.world_size, []).append(result.seconds)
        if result.status == "ok":
            note = result.job.note(result.job) if result.job.note else ""
            self.print(f"    {result.job.name}: ok in {result.seconds:.1f} s"
                       + (f"; {note}" if note else ""))
        elif result.status != "skipped":
            self.print(f"    {result.job.name}: {result.status.upper()} after "
                       f"{result.seconds:.1f} s: {result.error}; log: {result.log}")

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


# --- running --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _signals_noted(noted: list[int]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM are only noted (appended to `noted`); the loop
    checks at safe points, so a job is never left started but unrecorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log: Path
    log_file: object
    started: float
    tree: dict = field(default_factory=dict)
    seen: float = 0.0


def _launch(job: Job, workdir: Path, env: Mapping[str, str]) -> _Running:
    for sub in ("configs", "logs"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / DONE_FILE).unlink(missing_ok=True)
    shutil.rmtree(job.run_dir / MARKER_DIR, ignore_errors=True)  # where an earlier launch was
    atomic_write_text(job.run_dir / JOB_FILE, json.dumps(
        {"name": job.name, "config_hash": job.config_hash, "world_size": job.world_size,
         "settings": job.settings}, indent=2) + "\n")
    config_path = workdir / "configs" / f"{job.name}.yaml"
    dump_config(job.config, config_path)
    log_path = workdir / "logs" / f"{job.name}.log"
    cmd = launch_command(job, config_path)
    log_file = open(log_path, "w")
    log_file.write("$ " + " ".join(cmd) + "\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                            env=child_env({**env, **job.env}), cwd=os.getcwd(),
                            start_new_session=True, stdin=subprocess.DEVNULL)
    return _Running(job, proc, log_path, log_file, time.perf_counter())


def _finish(run: _Running, returncode: int) -> JobResult:
    run.log_file.close()
    seconds = time.perf_counter() - run.started
    if returncode != 0:
        return JobResult(run.job, "failed", seconds, returncode, run.log,
                         first_error(run.log, returncode, run.job.run_dir))
    if not is_complete(run.job):
        missing = [n for n in (DONE_FILE, *run.job.outputs) if not (run.job.run_dir / n).is_file()]
        return JobResult(run.job, "failed", seconds, returncode, run.log,
                         f"exited 0 but left no complete run in {run.job.run_dir} (missing or "
                         f"stale: {', '.join(missing) or 'DONE marker'})")
    return JobResult(run.job, "ok", seconds, returncode, run.log)


def run_jobs(jobs: Sequence[Job], workdir: str | Path, *, force: bool = False,
             timeout_s: float | None = None, slots: int | Sequence[Mapping[str, str]] = 1,
             progress: Progress | None = None, poll_s: float = 0.1) -> list[JobResult]:
    """Run every incomplete job (all with `force`), `slots` at a time (an int, or one environment
    per slot, e.g. CUDA_VISIBLE_DEVICES groups); results in the order of `jobs`. Raises
    `Interrupted` on SIGINT/SIGTERM after stopping the running jobs."""
    workdir = Path(workdir)
    slot_envs = [{} for _ in range(slots)] if isinstance(slots, int) else [dict(s) for s in slots]
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    progress = progress or Progress(workdir.name, len(jobs), slots=len(slot_envs))
    results: dict[str, JobResult] = {}
    todo = []
    for job in jobs:
        if not force and is_complete(job):
            results[job.name] = JobResult(job, "skipped")
        else:
            todo.append(job)
    index = {j.name: i + 1 for i, j in enumerate(jobs)}
    for job in jobs:  # report skipped jobs up front, in order
        if job.name in results:
            progress.begin(index[job.name], job, [], skipped=True)
    free = list(range(len(slot_envs)))
    running: dict[int, _Running] = {}
    noted: list[int] = []
    with _signals_noted(noted):
        try:
            while todo or running:
                while todo and free and not noted:
                    job, slot = todo[0], free.pop(0)
                    progress.begin(index[job.name], job, todo)
                    todo.pop(0)
                    running[slot] = _launch(job, workdir, slot_envs[slot])
                if noted:
                    raise Interrupted(noted[0])
                time.sleep(poll_s)
                for slot, run in list(running.items()):
                    now = time.perf_counter()
                    if now - run.seen > 1.0:  # keep the tree: workers leave torchrun's group
                        run.tree.update(dict(descendants(run.proc.pid)))
                        run.seen = now
                    rc = run.proc.poll()
                    if rc is None and timeout_s is not None and now - run.started > timeout_s:
                        stop_tree(run.proc, list(run.tree.items()))
                        run.log_file.close()
                        result = JobResult(run.job, "timeout", now - run.started,
                                           run.proc.returncode, run.log,
                                           f"stopped after the {timeout_s:g} s job timeout")
                    elif rc is None:
                        continue
                    else:
                        result = _finish(run, rc)
                    del running[slot]
                    free.append(slot)
                    results[run.job.name] = result
                    progress.end(result)
        except Interrupted as exc:
            exc.stopped = [run.job.name for run in running.values()]
            raise
        finally:  # interrupted or failed here: stop what this call started
            for run in running.values():
                if run.proc.poll() is None:
                    stop_tree(run.proc, list(run.tree.items()), grace_s=5.0)
                run.log_file.close()
    return [results[j.name] for j in jobs]


def write_failures(path: str | Path, results: Sequence[JobResult]) -> Path:
    """failures.csv: the failed jobs of `results` (header only when none failed), with their
    labels as columns."""
    labels = list(dict.fromkeys(k for r in results for k in r.job.labels))
    fields_ = ["point", *labels, "status", "returncode", "seconds", "log", "error"]
    rows = []
    for r in results:
        if r.status in FAILED:
            rows.append({"point": r.job.name, **r.job.labels, "status": r.status,
                         "returncode": r.returncode, "seconds": f"{r.seconds:.1f}",
                         "log": r.log or "", "error": r.error})
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields_)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
