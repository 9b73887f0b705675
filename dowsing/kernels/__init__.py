"""The numerical kernels the estimators and the runs are built from.

The concept subspace and its solve, curvature, solvers, gradient alignment, the plain
forward pass, training of the last blocks, pilot fine-tunes, the paper's metrics,
saturation, uncertainty, learning curves, the seeded split and the diagnosis sentence."""
