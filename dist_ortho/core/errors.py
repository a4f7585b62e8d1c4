"""The one kind of exception a command reports as the user's mistake.

`UserError` (a `ValueError`) means: the input the user gave is wrong, and the message says what and
how to fix it. A command prints it as ONE line and exits 2 (`dist_ortho.core.commands`). Every
other exception, a plain `ValueError` raised deep inside the library included, is a bug: the
command prints a one-line summary, then the traceback, and exits non-zero.

`ConfigError` is the `UserError` of config files and `--set` keys (the config loader,
`dist_ortho.core.schema`, raises it naming the key); raise `UserError` for other user input (a
command-line flag, a path the user named).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["ConfigError", "UserError", "user_input"]


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a path, a config value); the message says the
    fix."""


class ConfigError(UserError):
    """A user mistake in a config; `key` is the full dotted key it is about ("" for the file)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


@contextlib.contextmanager
def user_input(what: str = "") -> Iterator[None]:
    """Inside, a `ValueError` raised while checking what the user gave becomes a `UserError`
    (prefixed with `what`, e.g. the flag's name): for library checks that raise plain ValueError,
    used around the check only, never around the work that follows it."""
    try:
        yield
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"{what}: {exc}" if what else str(exc)) from None
