"""Atomic file writes: readers never see half a file; output folders checked before work starts.
Core module (standard library only).

Each helper writes a temporary file in the destination's folder, flushes and fsyncs it, then
`os.replace`s it over the destination (atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from dist_ortho.core.errors import ConfigError

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_writer", "atomic_path",
           "writable_dir"]


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """Create `path` (with parents) and check a file can be written there; a ConfigError naming
    `key` (the config key or flag the user gave it with) otherwise. Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(key, f"cannot write to {str(path)!r} ({reason}); choose a folder that "
                               f"can be created and written to") from None
    return path


class atomic_writer:
    """`with atomic_writer(path, "w") as f:` writes through a temp file that replaces `path` on a
    clean exit and is removed on an exception. For writers that need a file object (csv)."""

    def __init__(self, path, mode: str = "w", newline: str | None = "") -> None:
        if mode not in ("w", "wb"):
            raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.newline = newline if mode == "w" else None
        self._file = None
        self._tmp = None

    def __enter__(self):
        # a unique name beside the destination, created with the umask's permissions (mkstemp
        # would make it 0600)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        self._tmp = str(tmp)
        self._file = (os.fdopen(fd, self.mode, newline=self.newline, encoding="utf-8")
                      if self.mode == "w" else os.fdopen(fd, self.mode))
        return self._file

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        return False


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (no newline translation); returns the path."""
    with atomic_writer(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


class atomic_path:
    """`with atomic_path(path) as tmp:` gives a temporary path beside `path` for writers that take
    a file name (torch's trace export, pandas); it replaces `path` on a clean exit and is removed
    on an exception."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False
