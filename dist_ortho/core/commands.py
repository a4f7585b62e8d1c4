"""How every command ends, the same for all of them (`run_command`).

A user mistake (`UserError`, `ConfigError` among them: a config key, a flag, an output path that
cannot be written) is ONE line on stderr, `dist-ortho <command>: error: <what and the fix>`, exit
status 2, no traceback. Anything else is a bug: one line, `dist-ortho <command>: internal error:
<type>: <message> (a bug; the traceback follows)`, then the traceback, exit status 1. SIGINT and
SIGTERM end a command with one line and exit status 130 / 143; the job runner first stops the
running point's whole process tree and leaves it incomplete. Set DIST_ORTHO_TRACEBACK=1 to get the
traceback of a user mistake too.

`add_grammar` gives every command the same arguments: `CMD [CONFIG] [--set KEY=VALUE]... [-o OUT]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from dist_ortho.core.errors import UserError

__all__ = ["Interrupted", "UserError", "add_grammar", "bug_line", "error_line", "run_command"]


def _key_value(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _config_path(text: str) -> Path:
    path = Path(text)
    if "=" in text and not path.exists():
        raise argparse.ArgumentTypeError(
            f"{text!r} looks like a KEY=VALUE override, not a config file: give each override "
            f"its own --set")
    return path


def add_grammar(parser: argparse.ArgumentParser, *, config: str | None, overrides: str | None,
                out: str, config_default: Path | None = None,
                config_required: bool = False) -> None:
    """The arguments every command spells alike: `CMD [CONFIG] [--set KEY=VALUE]... [-o OUT]`.

    `config` (its help; None: the command reads no config) is the positional `config`;
    `overrides` (the help of `--set`; None: no `--set`) collects `--set` values into
    `args.overrides`, one KEY=VALUE each, repeatable, so a `--set` never swallows the positional;
    `out` is the help of `-o/--out` (`args.out`, default None)."""
    if config is not None:
        parser.add_argument("config", type=_config_path, metavar="CONFIG",
                            nargs=None if config_required else "?", default=config_default,
                            help=config)
    if overrides is not None:
        parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=_key_value,
                            action="append", default=[], help=overrides + " (repeatable: "
                            "--set KEY=VALUE --set KEY=VALUE ...; values are read as YAML)")
    parser.add_argument("-o", "--out", type=Path, default=None, metavar="OUT", help=out)


def error_line(command: str, exc: BaseException | str, rank: int | None = None) -> str:
    """The one line a command prints for an error: `dist-ortho <command>: error: ...`. A job's
    entry prints it (rank given for errors of one rank), and `first_error` finds it in the log."""
    text = exc if isinstance(exc, str) else (
        str(exc) if isinstance(exc, UserError) and rank is None
        else f"{type(exc).__name__}: {exc}")
    text = " ".join(str(text).split()) or type(exc).__name__
    return f"dist-ortho {command}: error: {'' if rank is None else f'rank {rank}: '}{text}"


def bug_line(command: str, exc: BaseException) -> str:
    """The one line printed before the traceback of an error that is not the user's mistake."""
    text = " ".join(str(exc).split())
    return (f"dist-ortho {command}: internal error: {type(exc).__name__}"
            f"{': ' + text if text else ''} (a bug; the traceback follows)")


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
                args: argparse.Namespace, sigterm: bool = True) -> int:
    """Run one command's main with the common error and signal handling (module docstring).
    `sigterm=False` leaves SIGTERM's default for a command that is a rank of a job: torchrun and
    the job runner stop ranks with it and read the signal from the exit status."""
    main_thread = threading.current_thread() is threading.main_thread() and sigterm
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        return int(main_fn(args) or 0)
    except UserError as exc:  # ConfigError is one
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
    except Exception as exc:
        print(bug_line(name, exc), file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
