"""Checkpoint integrity: what a checkpoint must contain, recorded as it is written, checked before
anything of it is loaded.

Every checkpoint folder holds `manifest.json`, written last (by rank 0, fsynced, before the folder
is renamed complete):

    {"format": 2,
     "meta":   {"step": 8, "world_size": 2, "optimizers": [...], "has_loader": true, ...},
     "files":  {"__0_0.distcp": {"size": 871234, "sha256": "9f2c..."}, ".metadata": {...},
                "rank_00000.pt": {...}, ...},
     "digest": "<sha256 of the canonical JSON of format, meta and files>"}

`files` lists every file the checkpoint consists of: DCP's shard files and its `.metadata`, and
each rank's `rank_*.pt`. `digest` covers the manifest itself, so a damaged manifest is found too.

Where the checksums come from: while writing. `HashingWriter` is DCP's `FileSystemWriter` with a
file system whose streams hash the bytes as they go out (one pass, no re-read; SHA-256 runs at
~1.3 GB/s per core with SHA-NI and releases the GIL). A stream that seeks and overwrites, or a file
the hashing file system did not see (another torch version's writer), is hashed from disk right
after it is written instead, before the checkpoint is marked complete. Either way the manifest
records the bytes that were handed to the file system when the checkpoint was made, so any later
change to a file (truncation, a lost file, a flipped bit, a half-copied folder) no longer matches:
`verify_folder` compares every file's size (a stat) and its SHA-256 (a read) with the manifest.

Verification is split for speed and agreed for safety (see
`dist_ortho.checkpointing.checkpoint.verify`): every rank checks the manifest and every file's size,
each rank re-hashes every P-th file, and the ranks' findings are gathered, so all ranks reach the
same verdict and load the same checkpoint.

Trust: the manifest detects damage, not tampering (whoever can write the folder can rewrite the
manifest). DCP's `.metadata` is a pickle; load checkpoints only from folders you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from dist_ortho.core.io import atomic_write_bytes

__all__ = ["MANIFEST_FILE", "FORMAT_VERSION", "HashingWriter", "hash_file", "hash_bytes",
           "write_manifest", "read_manifest", "verify_folder", "Damaged", "rank_files",
           "describe_problems"]

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2
_CHUNK = 8 << 20


class Damaged(ValueError):
    """A checkpoint folder that cannot be trusted; the message says what is wrong with it."""


# -- hashing -------------------------------------------------------------------------------------
def hash_bytes(data) -> dict:
    return {"size": len(memoryview(data).cast("B")), "sha256": hashlib.sha256(data).hexdigest()}


def hash_file(path: str | os.PathLike) -> dict:
    """{"size", "sha256"} of a file, read in 8 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


class _HashingStream:
    """A binary file that hashes what is written through it. A write anywhere but at the end of
    what was hashed (after a seek) marks the hash unusable; the file is then hashed from disk."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.linear = True

    def write(self, data) -> int:
        if self.linear and self.raw.tell() != self.size:
            self.linear = False
        n = self.raw.write(data)
        if self.linear:
            view = memoryview(data).cast("B")[:n]
            self.sha.update(view)
            self.size += n
        return n

    def entry(self) -> dict | None:
        return {"size": self.size, "sha256": self.sha.hexdigest()} if self.linear else None

    def __getattr__(self, name):  # tell, seek, flush, fileno, close, writable, ...
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.raw.close()
        return False


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording {file name: size and sha256} of what it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, dict] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        path = Path(path)
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw)
            yield stream
        entry = stream.entry() or hash_file(path)
        with self._lock:
            self.written[path.name] = entry

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path).name in self.written:
                self.written[Path(new_path).name] = self.written.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """torch DCP's FileSystemWriter (fsync on, one file per rank) that checksums as it writes."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()

    def written(self) -> dict[str, dict]:
        return dict(self.fs.written)


def rank_files(folder: Path, rank: int) -> list[str]:
    """The DCP files rank `rank` writes (`__<rank>_<i>.distcp`), plus `.metadata` on rank 0."""
    names = [p.name for p in folder.iterdir()
             if p.name.startswith(f"__{rank}_") and p.name.endswith(".distcp")]
    if rank == 0 and (folder / ".metadata").is_file():
        names.append(".metadata")
    return sorted(names)


# -- the manifest --------------------------------------------------------------------------------
def _digest(body: Mapping) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: Path, meta: Mapping, files: Mapping[str, Mapping]) -> Path:
    """Write manifest.json atomically (fsynced) into `folder`."""
    body = {"format": FORMAT_VERSION, "meta": dict(meta),
            "files": {name: dict(files[name]) for name in sorted(files)}}
    manifest = {**body, "digest": _digest(body)}
    return atomic_write_bytes(folder / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder` (format, meta, files), or Damaged saying why it is unusable."""
    path = Path(folder) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        if (Path(folder) / "meta.json").is_file():
            raise Damaged(f"{MANIFEST_FILE} is missing: a format-1 checkpoint (written before "
                          f"checkpoints had manifests) cannot be verified") from None
        raise Damaged(f"{MANIFEST_FILE} is missing") from None
    except OSError as exc:
        raise Damaged(f"{MANIFEST_FILE} cannot be read ({exc.strerror or exc})") from None
    try:
        manifest = json.loads(text)
        body = {k: manifest[k] for k in ("format", "meta", "files")}
        digest = manifest["digest"]
    except (ValueError, KeyError, TypeError):
        raise Damaged(f"{MANIFEST_FILE} is damaged (not the JSON a save writes)") from None
    if _digest(body) != digest:
        raise Damaged(f"{MANIFEST_FILE} is damaged (its digest does not match its content)")
    if body["format"] != FORMAT_VERSION:
        raise Damaged(f"{MANIFEST_FILE} has format {body['format']!r}; this version reads format "
                      f"{FORMAT_VERSION}")
    return body


def verify_folder(folder: Path, rank: int = 0, world_size: int = 1,
                  manifest: dict | None = None) -> list[str]:
    """What is wrong with checkpoint `folder` as seen from rank `rank` of `world_size` (empty:
    nothing). The manifest and every file's presence and size are checked on every rank; rank r
    re-hashes the files at positions r, r + P, ... of the sorted file list."""
    try:
        manifest = manifest if manifest is not None else read_manifest(folder)
    except Damaged as exc:
        return [str(exc)]
    problems = []
    for i, (name, entry) in enumerate(sorted(manifest["files"].items())):
        path = Path(folder) / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc.strerror or exc})")
            continue
        if size != entry["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {entry['size']}")
        elif i % world_size == rank:
            try:
                if hash_file(path)["sha256"] != entry["sha256"]:
                    problems.append(f"{name} is corrupted (its SHA-256 differs from the manifest)")
            except OSError as exc:
                problems.append(f"{name} cannot be read ({exc.strerror or exc})")
    return problems


def describe_problems(problems: list[str], limit: int = 3) -> str:
    """`a; b; c (and 2 more)`: the first few problems of a folder, one line."""
    unique = list(dict.fromkeys(problems))
    text = "; ".join(unique[:limit])
    return text + (f" (and {len(unique) - limit} more)" if len(unique) > limit else "")
