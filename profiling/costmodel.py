"""Cost model: predict what one NorMuon/Muon step costs each rank under each strategy, from shapes.

One import point for its three parts:
- `profiling.prediction`: plans, bytes, FLOPs, memory and lower bounds from shapes (`predict`);
- `profiling.timemodel`: the alpha-beta communication model, the compute model and the step time
  (`profiling.simulator` walks the schedule every strategy declares);
- `profiling.calibration`: measure and fit the constants on a process group (`calibrate`).
`profiling.hardware` has data-sheet constants for GPU projections.
"""

from __future__ import annotations

from dist_ortho.profiling.calibration import (CALIBRATED_KINDS, NS_CALIBRATION_SHAPES,
                                              CommSample, ElementwiseSample, NSSample, calibrate,
                                              fit_comm_model, fit_elementwise, fit_ns_rate,
                                              measure_collectives, measure_elementwise,
                                              measure_ns)
from dist_ortho.profiling.prediction import (LowerBounds, Prediction, RankPrediction,
                                             lower_bounds, matrix_specs, persistent_bytes,
                                             predict, predict_plan, torch_dtype,
                                             whole_matrix_makespan_bound)
from dist_ortho.profiling.timemodel import (KINDS, CommModel, ComputeModel, CostConstants,
                                            StepTime, latency_steps, load_constants,
                                            shape_key, shared_makespan, step_time)


__all__ = [
    "KINDS", "latency_steps", "CommModel", "ComputeModel", "CostConstants", "RankPrediction",
    "StepTime", "LowerBounds", "Prediction", "matrix_specs", "predict_plan", "predict",
    "lower_bounds", "whole_matrix_makespan_bound", "persistent_bytes", "CommSample", "NSSample",
    "ElementwiseSample", "fit_comm_model", "fit_ns_rate", "fit_elementwise", "measure_collectives",
    "measure_ns", "measure_elementwise", "calibrate", "load_constants", "shared_makespan",
    "shape_key", "step_time", "CALIBRATED_KINDS", "NS_CALIBRATION_SHAPES", "torch_dtype",
]
