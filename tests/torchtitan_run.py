"""torchrun entry of the torchtitan tests: the CPU shim, then torchtitan's own `train.main`.

Each rank also appends, to $DIST_ORTHO_TT_OUT/rank<r>.jsonl, what the test checks: every logged
step's global loss and gradient norm (from torchtitan's MetricsProcessor.log) and, at the end, the
optimizer container's facts (inner optimizers, strategy, skipped steps, overlap redos,
parameter placements). Data: each rank reads its rows of every global batch (below).
"""

import json
import os

import torchtitan_shim

torchtitan_shim.apply()

import torch  # noqa: E402
from torchtitan.components.metrics import MetricsProcessor  # noqa: E402
from torchtitan.hf_datasets import text_datasets  # noqa: E402
from torchtitan.train import main  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402


def _write(record: dict) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(os.path.join(os.environ["DIST_ORTHO_TT_OUT"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


_log = MetricsProcessor.log


def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
    _write({"step": step, "loss": float(global_avg_loss), "grad_norm": float(grad_norm)})
    return _log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)


_close = Trainer.close


def close(self):
    opts = getattr(self, "optimizers", None)
    if opts is not None:
        leader = next((o for o in opts.optimizers if hasattr(o, "strategy")), None)
        overlap = getattr(leader, "overlap", None)
        _write({"final": True, "optimizers": [type(o).__name__ for o in opts.optimizers],
                "strategy": leader.strategy.name if leader is not None else None,
                "skipped_steps": opts.skipped_steps,
                "overlap_fallbacks": overlap.fallbacks if overlap is not None else None,
                "step": self.step,
                "placements": {n: str(getattr(p, "placements", "plain"))
                               for n, p in self.model_parts[0].named_parameters()},
                "assignment": getattr(opts, "assignment", {}),
                "params": {n: float(p.detach().double().norm()) if not hasattr(p, "full_tensor")
                           else float(p.full_tensor().detach().double().norm())
                           for n, p in self.model_parts[0].named_parameters()}})
    _close(self)


def split_dataset_by_node(dataset, rank: int, world_size: int):
    """Rank r of a data-parallel degree D reads rows i with (i // b) % D == r, b the local batch:
    step s's global batch is rows [s * D * b, (s + 1) * D * b) for every D (a line is one sample),
    so 1 rank and N ranks train on the same batches. (torchtitan's own split gives each rank a
    contiguous block of the rows, a different batch per world size.)"""
    block = int(os.environ["DIST_ORTHO_TT_GLOBAL_BATCH"]) // world_size
    return dataset.filter(lambda _, i: (i // block) % world_size == rank, with_indices=True)


MetricsProcessor.log = log
Trainer.close = close
text_datasets.split_dataset_by_node = split_dataset_by_node

if __name__ == "__main__":
    main()
