"""torchrun entry of the torchtitan tests: the CPU shim, then torchtitan's own trainer, once per
strategy in $DIST_ORTHO_TT_STRATEGIES (comma-separated; one process group, one fresh trainer per
strategy, each with its own checkpoint folder `<checkpoint.folder>_<strategy>`).

Each rank appends to $DIST_ORTHO_TT_OUT/rank<r>.jsonl what the test checks: every logged step's
global loss and gradient norm (from torchtitan's MetricsProcessor.log); with
$DIST_ORTHO_TT_TRAJECTORY set, per step the norms of every parameter and its gradient (what the
float bound needs, tests/torchtitan/test_torchtitan_trainer.py); at the end, the optimizer container's facts
(inner optimizers, strategy, skipped steps, overlap redos, placements, a hash of every
parameter). Data: each rank reads its rows of every global batch (`split_dataset_by_node`).
"""

import hashlib
import json
import os

from tests.torchtitan import torchtitan_shim

torchtitan_shim.apply()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchtitan.components.checkpointer.utils import canonical_fqn  # noqa: E402
from torchtitan.components.metrics import MetricsProcessor  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.hf_datasets import text_datasets  # noqa: E402
from torchtitan.tools.logging import init_logger  # noqa: E402

STRATEGY = "DIST_ORTHO_TT_STRATEGY"


def _write(record: dict) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    record["strategy"] = os.environ.get(STRATEGY)
    with open(os.path.join(os.environ["DIST_ORTHO_TT_OUT"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


_log = MetricsProcessor.log


def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
    _write({"step": step, "loss": float(global_avg_loss), "grad_norm": float(grad_norm)})
    return _log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)


def split_dataset_by_node(dataset, rank: int, world_size: int):
    """Rank r of a data-parallel degree D reads rows i with (i // b) % D == r, b the local batch:
    step s's global batch is rows [s * D * b, (s + 1) * D * b) for every D (a line is one sample),
    so 1 rank and N ranks train on the same batches. (torchtitan's own split gives each rank a
    contiguous block of the rows, a different batch per world size.)"""
    block = int(os.environ["DIST_ORTHO_TT_GLOBAL_BATCH"]) // world_size
    return dataset.filter(lambda _, i: (i // block) % world_size == rank, with_indices=True)


def _named(container):
    return [(canonical_fqn(n), p) for n, p in container.model_parts[0].named_parameters()]


def _record_trajectory(container) -> None:
    """Norms of every parameter before each step and of its gradient (applied, i.e. clipped)."""
    state = {}

    def pre(opt, args, kwargs):
        state["before"] = {n: _full(p).double() for n, p in _named(opt)}
        state["grad"] = {n: float(_full(p.grad).double().norm()) for n, p in _named(opt)
                         if p.grad is not None}

    def post(opt, args, kwargs):
        after = {n: _full(p).double() for n, p in _named(opt)}
        _write({"trajectory": True, "grad": state["grad"],
                "w_before": {n: float(w.norm()) for n, w in state["before"].items()},
                "w_after": {n: float(w.norm()) for n, w in after.items()},
                "delta": {n: float((after[n] - state["before"][n]).norm()) for n in after}})

    container.register_step_pre_hook(pre)
    container.register_step_post_hook(post)


def _final(trainer) -> None:
    opts = trainer.optimizers
    leader = next((o for o in opts.optimizers if hasattr(o, "strategy")), None)
    overlap = getattr(leader, "overlap", None)
    named = _named(opts)
    _write({"final": True, "optimizers": [type(o).__name__ for o in opts.optimizers],
            "container": type(opts).__name__,
            "leader_strategy": leader.strategy.name if leader is not None else None,
            "skipped_steps": opts.skipped_steps,
            "overlap_fallbacks": overlap.fallbacks if overlap is not None else None,
            "describe": opts.describe(), "step": trainer.step,
            "placements": {n: str(getattr(p, "placements", "plain")) for n, p in named},
            "shapes": {n: list(p.shape) for n, p in named},
            "assignment": opts.assignment,
            "hash": {n: hashlib.sha256(_full(p).cpu().numpy().tobytes()).hexdigest()
                     for n, p in named}})


def run() -> None:
    init_logger()
    MetricsProcessor.log = log
    text_datasets.split_dataset_by_node = split_dataset_by_node
    for name in os.environ.get("DIST_ORTHO_TT_STRATEGIES", "balanced").split(","):
        os.environ[STRATEGY] = name
        config = ConfigManager().parse_args()
        config.checkpoint.folder = f"{config.checkpoint.folder}_{name}"
        trainer = config.build()
        try:
            if config.checkpoint.create_seed_checkpoint:
                trainer.checkpointer.save(curr_step=0, last_step=True)
                continue
            if os.environ.get("DIST_ORTHO_TT_TRAJECTORY"):
                _record_trajectory(trainer.optimizers)
            trainer.train()
            _final(trainer)
        finally:
            trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run()
