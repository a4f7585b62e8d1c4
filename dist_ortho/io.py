"""Atomic file writes: a reader sees the old file or the new one, never half of one.

    atomic_write_text(path, text)
    atomic_write_bytes(path, data)

Both write a temporary file in the target's own folder (so the final rename never crosses file
systems), flush and fsync it, then `os.replace` it onto `path`. A process killed midway leaves at
most a stray `.<name>.tmp<pid>` file beside the target, never a truncated target.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_write_bytes"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; see `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))
