"""Workers for tests/studies/test_convergence_study.py that run on real gloo ranks
(dist_ortho.testing.processes.spawn).

`tiny_run_config` is also used in-process by the tests, so the single-process and multi-rank runs
are built from the same settings.
"""

from __future__ import annotations

from dist_ortho.core.schema import build
from dist_ortho.studies.config import config_from_dict
from dist_ortho.studies.convergence import ConvergenceConfig, train_with_curve


def tiny_run_config(out_dir: str, optimizer: str, strategy: str, batch_size: int, steps: int,
                    name: str, lr: float | None = None):
    """gpt-tiny on the stdlib corpus, float32 Newton-Schulz, no profiler."""
    optimizer_section = {"name": optimizer, "ns_dtype": "float32", "adamw_lr": 3e-3}
    if lr is not None:
        optimizer_section["lr"] = lr
    return config_from_dict({
        "model": {"preset": "gpt-tiny"},
        "optimizer": optimizer_section,
        "strategy": {"name": strategy},
        "train": {"steps": steps, "warmup_steps": 0, "batch_size": batch_size, "seq_len": 64,
                  "seed": 0, "data": "stdlib", "log_every": 1000},
        "profiling": {"enabled": False},
        "output": {"dir": out_dir, "name": name},
    })


TINY_EVAL = dict(eval_every=4, eval_batches=2, eval_batch_size=8, lr_decay_frac=0.25)


def strategy_worker(rank: int, world_size: int, out_dir: str, strategies: list[str],
                    global_batch: int, steps: int) -> dict:
    """Train the same NorMuon run under each strategy; return each curve (train and val)."""
    conv = build(ConvergenceConfig, TINY_EVAL, "convergence")
    out = {}
    for name in strategies:
        config = tiny_run_config(out_dir, "normuon", name, global_batch // world_size, steps,
                                 f"{name}-p{world_size}")
        curve = train_with_curve(config, conv, write=False)
        out[name] = {"train": curve.train, "val": curve.val}
    return out
