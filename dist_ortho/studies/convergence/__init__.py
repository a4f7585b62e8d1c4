"""Convergence study: NorMuon vs Muon vs AdamW on the stdlib byte corpus, over several seeds.

    dist-ortho convergence launch/configs/convergence.yaml             # the study (3 x 3 runs)
    dist-ortho convergence launch/configs/convergence.yaml --sweep     # the learning-rate sweep
    dist-ortho convergence launch/configs/convergence.yaml --analyze   # redo tables and plot only

Modules: `config` (the study file: `run` + `convergence` sections, typed), `training` (one run:
schedule, validation, loss curve, the worker process), `analysis` (tables, plot, summary) and
`cli` (the runs as `dist_ortho.studies.jobs` jobs, the LR sweep, the command).
"""

from dist_ortho.studies.convergence.analysis import analyze, steps_to_reach
from dist_ortho.studies.convergence.cli import add_arguments, main, study_jobs, sweep
from dist_ortho.studies.convergence.config import (OPTIMIZERS, ConvergenceConfig,
                                                   ConvergenceStudy, SweepConfig, load_study,
                                                   lr_key)
from dist_ortho.studies.convergence.training import (Curve, evaluate, lr_scale, train_with_curve,
                                                     validation_batches)

__all__ = ["OPTIMIZERS", "lr_key", "SweepConfig", "ConvergenceConfig", "ConvergenceStudy",
           "load_study", "lr_scale", "validation_batches", "evaluate", "Curve",
           "train_with_curve", "steps_to_reach", "analyze", "study_jobs", "sweep",
           "add_arguments", "main"]
