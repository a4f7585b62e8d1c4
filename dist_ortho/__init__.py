"""dist_ortho: NorMuon and Muon under PyTorch FSDP2, with interchangeable orthogonalization
strategies (see the `strategies` package) and a profiler (`profiling`).

The names below are loaded on first use (module `__getattr__`), so that importing a low layer
such as `dist_ortho.strategies` or `dist_ortho.core.newton_schulz` does not pull in the optimizer;
see ARCHITECTURE.md for the layers.
"""

from __future__ import annotations

import importlib

# eager: a core module with no dist_ortho imports
from dist_ortho.core.newton_schulz import NSConfig, newton_schulz, ns_flops

# public name -> the module that defines it
_EXPORTS = {
    "NorMuon": "dist_ortho.optim.optimizer",
    "Muon": "dist_ortho.optim.optimizer",
    "OrthogonalizedOptimizer": "dist_ortho.optim.optimizer",
    "split_params": "dist_ortho.optim.param_groups",
    "split_model_params": "dist_ortho.optim.param_groups",
    "SplitConfig": "dist_ortho.optim.param_groups",
    "CombinedOptimizer": "dist_ortho.optim.param_groups",
    "OptimizerConfig": "dist_ortho.optim.param_groups",
    "build_optimizers": "dist_ortho.optim.param_groups",
    "ReferenceHParams": "dist_ortho.optim.reference",
    "reference_step": "dist_ortho.optim.reference",
}

__all__ = ["newton_schulz", "ns_flops", "NSConfig", *_EXPORTS]
__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy re-export (PEP 562): the import runs once, then the name is a module global
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_ortho' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
