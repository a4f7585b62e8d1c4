"""Where each rank is: the phase it is in, kept in a file that outlives the process.

When a job fails, the job runner says which rank failed first; this says where it (and every
other rank) was: `rank 1 at step 3, optimizer/orthogonalize/ns`. Each rank of a run keeps a
`PhaseMarker` (a `PhaseTimer`) that writes its current phase path into a small memory-mapped file,
`<run dir>/.phases/rank_<r:05d>`, on every phase entry and exit: a copy into shared memory, no
system call, so it costs about a microsecond per phase. The kernel keeps what was written even
when the process is killed by SIGKILL, so the runner reads it afterwards (`where_ranks_were`).

Two slots per rank: the main thread's phase and the checkpoint thread's (an asynchronous save runs
on a background thread; see `dist_ortho.checkpointing.async_save`). `Tee` sends one phase to several
timers (the profiler, the marker, a testing aid).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from dist_ortho.core.timing import PhaseTimer

__all__ = ["PhaseMarker", "Tee", "MARKER_DIR", "read_markers", "where_ranks_were"]

MARKER_DIR = ".phases"
_SLOT = 160  # bytes per slot: "<label>: <phase path>"
_SLOTS = 2  # main thread, checkpoint thread
_FILE_RE = re.compile(r"^rank_(\d{5,})$")


class PhaseMarker:
    """This rank's current phase, in `<folder>/.phases/rank_<r:05d>`. `step` labels the main
    thread's phases; `for_checkpoint(step)` gives a timer for a save's phases."""

    def __init__(self, folder: str | os.PathLike, rank: int) -> None:
        directory = Path(folder) / MARKER_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank_{rank:05d}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SLOT * _SLOTS)
            self._map = mmap.mmap(fd, _SLOT * _SLOTS)
        finally:
            os.close(fd)
        self.step: int | None = None
        self.failed_in: str | None = None
        self._local = threading.local()
        self._main = threading.main_thread()

    def _write(self, label: str, stack: list[str]) -> None:
        if self._map is None:
            return
        slot = 0 if threading.current_thread() is self._main else 1
        path = "/".join(stack)
        if stack[-1:] == ["comm_wait"] and "orthogonalize" in stack:
            # the strategy's exchanges: before Newton-Schulz (forward) or after it (return)
            path += "(return)" if getattr(self._local, "after_ns", False) else "(forward)"
        # between phases the main thread still says which step (or save) it is in; the
        # checkpoint thread's slot empties when its save is done
        text = f"{label}: {path}" if stack else (label if slot == 0 else "")
        data = text.encode("utf-8", "replace")[:_SLOT - 1]
        self._map[slot * _SLOT:(slot + 1) * _SLOT] = data.ljust(_SLOT, b"\0")

    @contextlib.contextmanager
    def _phase(self, name: str, label) -> Iterator[None]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(name)
        if name == "orthogonalize":
            self._local.after_ns = False
        self._write(label(), stack)
        try:
            yield
        except BaseException:
            # the file keeps the innermost phase an error left, and where() says it
            if self.failed_in is None:
                self.failed_in = "/".join(stack)
            stack.pop()
            raise
        if name == "ns":
            self._local.after_ns = True
        stack.pop()
        self._write(label(), stack)

    def phase(self, name: str):
        return self._phase(name, lambda: f"step {self.step}")

    def for_checkpoint(self, step: int) -> PhaseTimer:
        """A timer for the phases of the save of the checkpoint of `step`."""
        marker = self

        class _Save:
            def phase(self, name: str):
                return marker._phase(name, lambda: f"checkpoint of step {step}")

        return _Save()

    def where(self) -> str:
        """The phase path an error left first, else the calling thread's current one ("" outside
        any phase)."""
        return self.failed_in or "/".join(getattr(self._local, "stack", None) or [])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class Tee:
    """One PhaseTimer that enters the same phase on each of `timers` (in order)."""

    def __init__(self, *timers: PhaseTimer) -> None:
        self.timers = [t for t in timers if t is not None]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for timer in self.timers:
                stack.enter_context(timer.phase(name))
            yield


def read_markers(run_dir: str | os.PathLike) -> dict[int, list[str]]:
    """{rank: [main thread's "<label>: <phase>", checkpoint thread's, ...]} (non-empty slots)."""
    out: dict[int, list[str]] = {}
    directory = Path(run_dir) / MARKER_DIR
    if not directory.is_dir():
        return out
    for entry in directory.iterdir():
        m = _FILE_RE.match(entry.name)
        if not m:
            continue
        try:
            data = entry.read_bytes()
        except OSError:
            continue
        slots = [data[i:i + _SLOT].split(b"\0", 1)[0].decode("utf-8", "replace")
                 for i in range(0, len(data), _SLOT)]
        out[int(m.group(1))] = [s for s in slots if s]
    return out


def _ranks_text(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def where_ranks_were(run_dir: str | os.PathLike | None, first: int | None = None) -> str:
    """One line: where each rank was when the job ended, rank `first` first, the others grouped
    by place (`rank 1 at step 3, optimizer/orthogonalize/ns; ranks 0,2-3 at step 3,
    optimizer/orthogonalize/comm_wait`); "" when no marker is there."""
    if run_dir is None:
        return ""
    markers = read_markers(run_dir)
    places: dict[str, list[int]] = {}
    for rank in sorted(markers):
        place = " and ".join(s.replace(": ", ", ", 1) for s in markers[rank]) or "outside any phase"
        places.setdefault(place, []).append(rank)
    order = sorted(places.items(), key=lambda kv: (first not in kv[1], kv[1][0]))
    parts = []
    for place, ranks in order:
        if first in ranks and len(ranks) > 1:
            parts.append(f"rank {first} at {place}")
            ranks = [r for r in ranks if r != first]
        parts.append(f"{_ranks_text(ranks)} at {place}")
    return "; ".join(parts)
