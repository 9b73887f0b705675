"""The EK-FAC family: held-out influence over the last blocks' Linear
layers with kronfluence's EK-FAC curvature."""
from __future__ import annotations

from .registry import Estimator, register

register(Estimator("ekfac", "Held-out influence, EK-FAC (kronfluence)", "ekfac",
                   "held-out influence over the last blocks with EK-FAC curvature (kronfluence)",
                   needs={"block_inputs", "held_out"}, cost=2.4, in_validation=False))
