"""SIGINT and SIGTERM to `sweep`, `study` and `convergence` stop the running point's whole process
tree (torchrun starts its workers in sessions of their own), leave the point incomplete, print one
line and exit 130 / 143: no KeyboardInterrupt traceback, and no torchrun or rank left running as
an orphan that keeps writing results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_ortho.studies.jobs import descendants

# a sweep/study/convergence under torchrun per signal: excluded from the README's test command, run
# by .ci/run
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
FOREVER = 100_000  # steps: far more than the test waits, so a point can only end by being stopped


def alive(pid: int, started: int) -> bool:
    """Whether that process (same pid and start time) still runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == started and fields[0] != "Z"


def sweep_setup(tmp_path: Path, command: str) -> tuple[list[str], Path, str]:
    study = {"name": "sig", "base": str(TINY), "output_dir": str(tmp_path / "results"),
             "set": {"train.steps": FOREVER, "train.log_every": 1, "profiling.memory": False},
             "grid": {"strategies": ["replicated"], "world_sizes": [2]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    argv = ["sweep", str(path)] if command == "sweep" else ["study", str(path)]
    point = "llama-tiny--replicated--p2"
    return argv, tmp_path / "results" / "sig", point


def convergence_setup(tmp_path: Path) -> tuple[list[str], Path, str]:
    out = tmp_path / "conv"
    study = {"run": {"model": {"preset": "gpt-tiny"}, "optimizer": {"ns_dtype": "float32"},
                     "train": {"steps": FOREVER, "warmup_steps": 0, "batch_size": 4,
                               "seq_len": 32, "log_every": 1},
                     "profiling": {"enabled": False}},
             "convergence": {"out_dir": str(out), "optimizers": {"adamw": {}}, "seeds": [0],
                             "eval_every": 1000, "eval_batches": 1, "eval_batch_size": 8,
                             "processes": 1, "nproc_per_node": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(study))
    return ["convergence", str(path)], out, "adamw-s0"


@pytest.mark.parametrize("command,signum", [("sweep", signal.SIGINT), ("sweep", signal.SIGTERM),
                                            ("study", signal.SIGINT), ("study", signal.SIGTERM),
                                            ("convergence", signal.SIGINT),
                                            ("convergence", signal.SIGTERM)])
def test_signal_stops_the_points_process_tree_and_leaves_no_orphans(tmp_path, command, signum):
    argv, workdir, point = (convergence_setup(tmp_path) if command == "convergence"
                            else sweep_setup(tmp_path, command))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "dist_ortho", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = workdir / "logs" / f"{point}.log"
    tree: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 240
        # until the point's ranks are training: torchrun and both workers exist
        while time.monotonic() < deadline and proc.poll() is None:
            tree = descendants(proc.pid)
            if len(tree) >= 3 and log.is_file() and "step 2/" in log.read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None and len(tree) >= 3, (tree, proc.poll())
        tree = descendants(proc.pid)
        os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: do not leave its processes behind either
            os.killpg(proc.pid, signal.SIGKILL)
            for pid, _ in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"dist-ortho {command}: interrupted by {name}: stopped "
                                            f"{point} (left incomplete; run again to redo it)")
    assert "Traceback" not in err
    time.sleep(1.0)
    survivors = [pid for pid, started in tree if alive(pid, started)]
    assert survivors == [], f"orphans left running: {survivors}"
    run_dir = workdir / "runs" / point
    assert not (run_dir / "DONE").exists()  # incomplete: a resume runs it again
