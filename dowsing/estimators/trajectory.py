"""The trajectory family: scores read off a trajectory of checkpoints (the
user's training checkpoints, or a recorded fine-tune)."""
from __future__ import annotations

from .registry import Estimator, register

_TRAJ = {"block_inputs", "held_out", "trajectory"}
register(Estimator("diffin", "Diff-In over checkpoints (second order)", "trajectory",
                   "held-out influence accumulated over checkpoints, with its second-order term",
                   needs=_TRAJ, cost=10.3, in_analysis=True))
register(Estimator("tracin_ckpt", "TracIn over checkpoints (held-out)", "trajectory",
                   "held-out gradient alignment summed over checkpoints", needs=_TRAJ, cost=5.6, in_analysis=True))
register(Estimator("vog", "Variance of gradients over checkpoints (VoG)", "trajectory",
                   "variance of input gradients over checkpoints", needs=_TRAJ, cost=3.7, in_analysis=True))
register(Estimator("ckpt_confidence", "Low confidence over checkpoints (cartography)", "trajectory",
                   "1 - mean confidence over checkpoints", needs=_TRAJ, cost=3.7, in_analysis=True))
register(Estimator("ckpt_variability", "Variability over checkpoints (cartography)", "trajectory",
                   "variability of confidence over checkpoints", needs=_TRAJ, cost=3.7, in_analysis=True))
register(Estimator("el2n", "EL2N error norm over checkpoints", "trajectory",
                   "mean error norm over checkpoints", needs=_TRAJ, cost=3.7, in_analysis=True))
