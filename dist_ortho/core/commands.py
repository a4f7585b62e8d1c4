"""How every command ends, the same for all of them (`run_command`).

A user mistake (a `ValueError`, `ConfigError` among them, or an `OSError` such as an output path
that cannot be written) is ONE line on stderr, `dist-ortho <command>: error: <what and the fix>`,
exit status 2, no traceback. SIGINT and SIGTERM end a command with one line and exit status
130 / 143; the job runner first stops the running point's whole process tree and leaves it
incomplete. Set DIST_ORTHO_TRACEBACK=1 to get the full traceback of an error instead of its line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = ["Interrupted", "error_line", "run_command"]


def error_line(command: str, exc: BaseException | str, rank: int | None = None) -> str:
    """The one line a command prints for an error: `dist-ortho <command>: error: ...`. A job's
    entry prints it (rank given for errors of one rank), and `first_error` finds it in the log."""
    text = exc if isinstance(exc, str) else (
        str(exc) if isinstance(exc, (ValueError, OSError)) and rank is None
        else f"{type(exc).__name__}: {exc}")
    text = " ".join(str(text).split()) or type(exc).__name__
    return f"dist-ortho {command}: error: {'' if rank is None else f'rank {rank}: '}{text}"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while jobs ran; they were stopped and left incomplete."""

    def __init__(self, signum: int, stopped: Sequence[str] = ()) -> None:
        self.signum, self.stopped = signum, list(stopped)
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        what = (f"stopped {', '.join(self.stopped)} (left incomplete; run again to redo it)"
                if self.stopped else "no job was running")
        return f"interrupted by {signal.Signals(self.signum).name}: {what}"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_command(name: str, main_fn: Callable[[argparse.Namespace], int],
                args: argparse.Namespace) -> int:
    """Run one command's main with the common error and signal handling (module docstring)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        return int(main_fn(args) or 0)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        if os.environ.get("DIST_ORTHO_TRACEBACK"):
            raise
        print(error_line(name, exc), file=sys.stderr, flush=True)
        return 2
    except Interrupted as exc:
        print(f"dist-ortho {name}: {exc.describe()}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dist-ortho {name}: {Interrupted(signal.SIGINT).describe()}", file=sys.stderr,
              flush=True)
        return 128 + signal.SIGINT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
