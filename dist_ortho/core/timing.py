"""Phase timers: one protocol, one null object, one cheap implementation. Core module.

Whatever times an optimizer step (the profiler, a benchmark, nothing at all) is a `PhaseTimer`: an
object whose `phase(name)` returns a context manager around a named part of the step. The optimizer
marks its phases (nonfinite_check, momentum, orthogonalize, normalize, apply) and hands the same
timer to its strategy through `ExecContext`, which marks comm_wait and ns. `NULL_TIMER` times
nothing and costs one attribute lookup; it is the default everywhere, so no code checks for None.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol, runtime_checkable

__all__ = ["PhaseTimer", "NullTimer", "NULL_TIMER", "SecondsTimer"]

_NULL_CONTEXT = nullcontext()


@runtime_checkable
class PhaseTimer(Protocol):
    def phase(self, name: str) -> AbstractContextManager:
        """A context manager around the part of the step called `name` (names nest)."""


class NullTimer:
    """Times nothing."""

    __slots__ = ()

    def phase(self, name: str) -> AbstractContextManager:
        return _NULL_CONTEXT

    def __repr__(self) -> str:
        return "NULL_TIMER"


NULL_TIMER = NullTimer()


class SecondsTimer:
    """Wall seconds per phase name, summed over entries (names are not nested into paths): the
    cheapest real timer, for benchmarks and calibration. `sync`: called at both ends of every
    phase, for devices that queue work (e.g. `lambda: torch.cuda.synchronize()`), so that a phase
    is charged for its kernels rather than their launches; it serializes the step, so it is for
    timing local work, not overlap."""

    def __init__(self, sync: Callable[[], object] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync

    @contextmanager
    def phase(self, name: str):
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.seconds[name] += time.perf_counter() - start
