"""The subspace family: estimators in each domain's concept subspace S_k
(B = 1), plus the loss and gradient-norm baselines, all from the forward
pass's per-token quantities and the per-domain terms of `subspace_terms`.

With g_i = grad_u l_i at u = 0 in S_k, g_bar_k the mean over the domain's
training facts, H_k the curvature of the mean training loss in S_k and
lambda the damping:

* ``paper`` (the Data Dowsing paper's method): Mean_k = g_bar_k^T (H_k + lambda I)^-1 g_bar_k,
  exact Hessian, dense solve;
* ``influence_ggn``: the same with the Gauss-Newton matrix;
* ``influence_cg``: the same system solved by conjugate gradient;
* ``influence_lissa``: the same system solved by LiSSA on minibatch
  Hessian-vector products (a stochastic Neumann series);
* ``tracin``: z = g_bar, i.e. g_bar^T g_bar;
* ``heldout_influence`` / ``heldout_influence_ggn``: grad L_Q,k^T (H_k + lambda I)^-1 g_bar_k
  with Q_k the held-out facts (exact Hessian / Gauss-Newton);
* ``mean_loss``: the domain's mean next-token loss (log perplexity);
* ``grad_norm``: ||grad_theta L_k|| over the parameters fine-tuning trains.
"""
from __future__ import annotations

from .registry import Estimator, register

register(Estimator("paper", "Paper: concept-subspace influence", "subspace",
                   "the Data Dowsing paper's method, concept-subspace influence ḡᵀ(H+λI)⁻¹ḡ", cost=1.02,
                   in_analysis=True))
register(Estimator("influence_ggn", "Influence in S_k, Gauss-Newton", "subspace",
                   "the paper's quantity with the Gauss-Newton matrix", cost=1.54))
register(Estimator("influence_cg", "Influence in S_k, CG inverse-HVP", "subspace",
                   "the paper's system solved by conjugate gradient", cost=1.1, in_benchmark=False))
register(Estimator("influence_lissa", "Influence in S_k, LiSSA inverse-HVP", "subspace",
                   "the paper's system solved by LiSSA", cost=3.0, in_benchmark=False))
register(Estimator("heldout_influence", "Held-out influence in S_k, exact Hessian", "subspace",
                   "influence of a held-out half on the other in S_k", needs={"held_out"}, cost=1.02))
register(Estimator("heldout_influence_ggn", "Held-out influence in S_k, Gauss-Newton", "subspace",
                   "the same with the Gauss-Newton matrix", needs={"held_out"}, cost=1.01))
register(Estimator("tracin", "Gradient dot product in S_k (TracIn-style, z = ḡ)", "subspace",
                   "ḡᵀḡ in S_k, no curvature", cost=1.33))
register(Estimator("mean_loss", "Mean loss (log perplexity)", "subspace",
                   "the domain's mean next-token loss", cost=1.0, in_analysis=True))
register(Estimator("grad_norm", "Norm of the domain gradient (fine-tuned parameters)", "subspace",
                   "the norm of the domain's mean-loss gradient", needs={"block_inputs"}, cost=1.3))
