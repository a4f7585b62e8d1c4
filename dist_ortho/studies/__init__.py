"""Layer 7: runs, sweeps, interleaved studies, projections and the convergence study."""
