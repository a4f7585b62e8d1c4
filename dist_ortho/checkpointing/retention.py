"""Checkpoint retention: keep the newest `keep_last` checkpoints (and every `keep_every`-th step as
a milestone), delete the rest, and never leave a folder that looks like a checkpoint but is not.

What is deleted (`plan_deletions`): after the checkpoint of step s is complete (committed and
verified, see `dist_ortho.checkpointing.checkpoint`), among the complete folders of steps <= s all
but the newest `keep_last` (s included) and the milestones (step % keep_every == 0). Folders of
steps > s (left by an earlier run that went further, then fell back to an older checkpoint) are
neither counted nor deleted here; the run overwrites them when it gets there.

Why a kill at any moment is safe (`remove_checkpoint`):
1. A folder named `step_<k>` is complete by construction: it only ever comes from renaming a
   finished `.step_<k>.partial` whose manifest was written and fsynced first.
2. Deleting one is first an atomic rename to `.step_<k>.deleting` (then the parent folder is
   fsynced), and only then a recursive delete. A kill before the rename leaves the intact
   checkpoint; after it, a folder whose name no reader takes for a checkpoint. Leftovers
   (`.deleting`, `.replaced`, and `.partial` of earlier killed saves) are removed by the next
   retention pass (`remove_leftovers`).
3. Deletion starts only after the newer checkpoint is complete, verified and `latest` names it,
   and never touches the newest one, so `latest` never names a deleted folder. (Readers do not
   depend on `latest` anyway: resume takes the newest intact `step_*` folder.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from dist_ortho.core.timing import NULL_TIMER, PhaseTimer

__all__ = ["plan_deletions", "remove_checkpoint", "remove_leftovers", "LEFTOVER_RE",
           "fsync_dir"]

log = logging.getLogger("dist_ortho")

LEFTOVER_RE = re.compile(r"^\.step_(\d{8,})\.(deleting|replaced|partial)$")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_deletions(steps: Sequence[int], newest: int, keep_last: int,
                   keep_every: int = 0) -> list[int]:
    """The complete steps to delete once `newest` is complete; keep_last 0 keeps everything."""
    if keep_last <= 0:
        return []
    older = sorted(s for s in set(steps) if s <= newest)
    keep = set(older[-keep_last:]) | {newest}
    if keep_every > 0:
        keep |= {s for s in older if s % keep_every == 0}
    return [s for s in older if s not in keep]


def remove_checkpoint(root: Path, name: str, timer: PhaseTimer = NULL_TIMER) -> None:
    """Delete the checkpoint folder `root/name` crash-safely: rename it to `.<name>.deleting`
    (atomic; then fsync the parent), then delete that. Timer phase: "delete" (after the rename)."""
    doomed = root / f".{name}.deleting"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(root / name, doomed)
    fsync_dir(root)
    with timer.phase("delete"):
        shutil.rmtree(doomed)


def remove_leftovers(root: Path, in_flight: Sequence[str] = ()) -> list[str]:
    """Remove what killed saves and deletions left (`.step_*.deleting|replaced|partial`), except
    the folders named in `in_flight`. Returns the names removed."""
    removed = []
    for entry in sorted(root.iterdir()):
        if LEFTOVER_RE.match(entry.name) and entry.name not in in_flight and entry.is_dir():
            try:
                shutil.rmtree(entry)
                removed.append(entry.name)
            except OSError as exc:
                log.warning("checkpoint retention: could not remove %s: %s", entry, exc)
    return removed
