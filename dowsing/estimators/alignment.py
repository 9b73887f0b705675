"""The alignment family: gradient alignment over the parameters fine-tuning
changes (the last blocks and the final norm; `dowsing.alignment`), with the
identity or Adam's preconditioner P.

* ``alignment`` / ``alignment_adam``: between a domain's own facts,
  1/(N(N-1)) sum_{i != j} g_i^T P g_j;
* ``alignment_heldout`` / ``alignment_heldout_adam``: between its training
  and held-out halves, g_bar_A^T P g_bar_B.
"""
from __future__ import annotations

from .registry import Estimator, register

register(Estimator("alignment_adam", "Gradient alignment between facts, Adam-preconditioned", "alignment",
                   "gradient alignment between a domain's facts over the last blocks, Adam's preconditioner",
                   needs={"block_inputs"}, cost=5.2, in_analysis=True))
register(Estimator("alignment", "Gradient alignment between facts", "alignment",
                   "the same without a preconditioner", needs={"block_inputs"}, cost=5.2, in_analysis=True))
register(Estimator("alignment_heldout_adam", "Gradient alignment between two halves, Adam-preconditioned",
                   "alignment", "gradient alignment between two seeded halves of each domain's facts, Adam's "
                                "preconditioner", needs={"block_inputs", "held_out"}, cost=5.2, in_analysis=True))
register(Estimator("alignment_heldout", "Gradient alignment between two halves", "alignment",
                   "the same without a preconditioner", needs={"block_inputs", "held_out"}, cost=5.2,
                   in_analysis=True))
