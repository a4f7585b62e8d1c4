"""What a run ran on, recorded beside its metrics so numbers can be traced back and compared.

    env = environment(backend="gloo", device=torch.device("cpu"), world_size=4)
    write_run_metadata(out_dir, config_dict, env)   # -> config.yaml, environment.json

`environment` collects versions (python, torch, CUDA/cuDNN, NCCL), the backend, the device and its
name, the world size, thread counts, the host, and the git commit of the source tree (with a dirty
flag) when git is available; anything that cannot be found is None rather than an error, because a
missing git binary must never fail a finished run. Only read-only git commands are used, and
`--no-optional-locks` keeps even `git status` from touching the index.

`write_run_metadata` writes both files atomically (temp file + os.replace), so a sweep reading a
results folder sees either a complete file or none.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dist_ortho.core.io import atomic_write_text

__all__ = ["environment", "git_info", "write_run_metadata", "busy_cpu_s", "CONFIG_FILE", "ENV_FILE"]

CONFIG_FILE = "config.yaml"
ENV_FILE = "environment.json"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux /proc/stat), or None: with
    the process's own CPU time over a wall interval, how many cores other processes took."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def git_info(root: str | Path | None = None) -> dict:
    """{"git_commit": sha or None, "git_dirty": bool or None} of the source tree."""
    root = Path(root) if root is not None else _SOURCE_ROOT
    commit = _git("rev-parse", "HEAD", cwd=root)
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def environment(backend: str | None = None, device=None, world_size: int | None = None) -> dict:
    """The run's environment as a flat dict of plain values. backend / world_size default to the
    initialized process group's (None without one); device to None."""
    initialized = dist.is_available() and dist.is_initialized()
    if backend is None and initialized:
        backend = dist.get_backend()
    if world_size is None and initialized:
        world_size = dist.get_world_size()
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                   or world_size < 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    device_name = None
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            device_name = torch.cuda.get_device_name(device)
        elif device.type == "cpu":
            device_name = platform.processor() or platform.machine()
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": (".".join(map(str, torch.cuda.nccl.version()))
                 if torch.cuda.is_available() and hasattr(torch.cuda, "nccl") else None),
        "backend": backend,
        "device": None if device is None else str(device),
        "device_type": None if device is None else device.type,
        "device_name": device_name,
        "world_size": world_size,
        "rank": dist.get_rank() if initialized else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    env.update(git_info())
    return env


def _plain(value):
    """Config values as YAML/JSON-safe plain data (tuples -> lists, paths/dtypes -> strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_run_metadata(out_dir, config_dict: Mapping, env_dict: Mapping) -> tuple[Path, Path]:
    """Write the resolved config as config.yaml and the environment as environment.json into
    out_dir (created if needed), each atomically; returns both paths."""
    if not isinstance(config_dict, Mapping):
        raise ValueError(f"config_dict must be a mapping, got {type(config_dict).__name__}")
    if not isinstance(env_dict, Mapping):
        raise ValueError(f"env_dict must be a mapping, got {type(env_dict).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = atomic_write_text(
        out_dir / CONFIG_FILE, yaml.safe_dump(_plain(config_dict), sort_keys=False))
    env_path = atomic_write_text(
        out_dir / ENV_FILE, json.dumps(_plain(env_dict), indent=2, sort_keys=True) + "\n")
    return config_path, env_path
