"""The AirRep family: a small encoder over the final hidden states with
attention pooling, trained on counterfactual fine-tunes of other domains."""
from __future__ import annotations

from .registry import Estimator, register

register(Estimator("airrep", "AirRep: trained encoder, cross-validated by domain", "airrep",
                   "an encoder trained to rank counterfactual fine-tunes, cross-validated by domain",
                   needs={"counterfactuals"}, cost=4.2, in_validation=False))
