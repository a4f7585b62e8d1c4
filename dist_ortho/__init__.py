"""dist_ortho: NorMuon and Muon under PyTorch FSDP2, with interchangeable orthogonalization
strategies (see the `strategies` package) and a profiler (`profiling`)."""

from dist_ortho.newton_schulz import NSConfig, newton_schulz, ns_flops
from dist_ortho.optimizer import Muon, NorMuon
from dist_ortho.param_groups import (CombinedOptimizer, OptimizerConfig, SplitConfig,
                                     build_optimizers, split_params)
from dist_ortho.reference import ReferenceHParams, reference_step

__all__ = ["NorMuon", "Muon", "newton_schulz", "ns_flops", "NSConfig", "split_params",
           "SplitConfig", "CombinedOptimizer", "OptimizerConfig", "build_optimizers",
           "ReferenceHParams", "reference_step"]
__version__ = "0.1.0"
