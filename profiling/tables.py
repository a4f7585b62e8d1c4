"""The profiler's output helpers: rows as dicts, CSV/Parquet files written atomically, and the
bytes of a set of tensors' storages."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from dist_ortho.core.io import atomic_path, atomic_writer

__all__ = ["as_dicts", "write_csv", "write_parquet", "storage_bytes"]


def as_dicts(rows: list[tuple], columns, run_info: dict) -> list[dict]:
    return [{**dict(zip(columns, r)), **run_info} for r in rows]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with atomic_writer(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, columns: list[str], rows: list[dict]) -> Path | None:
    """Parquet twin of a table when pyarrow is installed (optional), else None."""
    # pandas and pyarrow are heavy and optional here: import them only when a table is written
    try:
        import pyarrow  # noqa: F401  (pandas needs it for parquet)
    except ImportError:
        return None
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_parquet(tmp, index=False)
    return path


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (DTensors: their local shards)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type == "meta":
            continue
        st = local.untyped_storage()
        key = (st.data_ptr(), st.nbytes()) if st.data_ptr() else id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
