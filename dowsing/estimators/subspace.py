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

import math
import time

import torch

from ..kernels.alignment import padded_block_batch, tail_model
from ..kernels.solvers import conjugate_gradient, damped, dense_solve, lissa
from ..kernels.subspace import Encoded, make_batches, per_fact_losses
from ..kernels.subspace_terms import DomainTerms, all_domain_terms, train_hessian
from ..costs import (CALIBRATION_DOMAINS, LINE_CHUNK, Cost, chunked, gradients_s, hessian_s, line_work, matmul_s,
                     predicted_tokens, solve_s)
from .registry import Estimator, EstimatorScore, get, register, register_family

PAPER = "paper"  # the Data Dowsing paper's estimator: the analysis' own quantities
MEAN_LOSS = "mean_loss"  # the baseline every estimator is compared with

register(Estimator(PAPER, "Paper: concept-subspace influence", "subspace",
                   "the Data Dowsing paper's method, concept-subspace influence ḡᵀ(H+λI)⁻¹ḡ",
                   in_analysis=True))
register(Estimator("influence_ggn", "Influence in S_k, Gauss-Newton", "subspace",
                   "the paper's quantity with the Gauss-Newton matrix"))
# CG and LiSSA stay off the benchmark by default: on the exact Hessian of a
# pretrained model they fail where it is indefinite (the validation shows
# it), and at 27 domains they would cost minutes for no information.
register(Estimator("influence_cg", "Influence in S_k, CG inverse-HVP", "subspace",
                   "the paper's system solved by conjugate gradient", in_benchmark=False))
register(Estimator("influence_lissa", "Influence in S_k, LiSSA inverse-HVP", "subspace",
                   "the paper's system solved by LiSSA", in_benchmark=False))
register(Estimator("heldout_influence", "Held-out influence in S_k, exact Hessian", "subspace",
                   "influence of a held-out half on the other in S_k", needs={"held_out"}))
register(Estimator("heldout_influence_ggn", "Held-out influence in S_k, Gauss-Newton", "subspace",
                   "the same with the Gauss-Newton matrix", needs={"held_out"}))
register(Estimator("tracin", "Gradient dot product in S_k (TracIn-style, z = ḡ)", "subspace",
                   "ḡᵀḡ in S_k, no curvature"))
register(Estimator(MEAN_LOSS, "Mean loss (log perplexity)", "subspace",
                   "the domain's mean next-token loss", in_analysis=True))
register(Estimator("grad_norm", "Norm of the domain gradient (fine-tuned parameters)", "subspace",
                   "the norm of the domain's mean-loss gradient"))


def _largest_eigenvalue(matvec, dim: int, iterations: int = 40, seed: int = 0) -> float:
    """|largest eigenvalue| of a symmetric operator by power iteration."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(dim, generator=gen, dtype=torch.float64)
    p /= p.norm()
    value = 0.0
    for _ in range(iterations):
        q = matvec(p)
        value = float(q.norm())
        if value == 0.0:
            break
        p = q / value
    return value


def lissa_solve(split, terms: DomainTerms, g_bar: torch.Tensor, damping: float, depth: int,
                batch_facts: int, seed: int):
    """LiSSA on (H + lambda I) z = g_bar with minibatch HVPs over training facts.

    A_j p = (M_train / |B_j|) sum_{i in B_j} H_i p + lambda p, B_j a seeded
    random minibatch of training facts, H_i = sum_{t in i} w_t c_t x_t x_t^T.
    scale = 1.5 x the largest eigenvalue of H + lambda I (power iteration).
    """
    tokens = split.tokens
    x64 = tokens.x.to(torch.float64)
    wc = terms.train_weights * terms.c
    train = [r for rows in split.train_rows for r in rows]
    fact_tokens = {r: (tokens.token_fact == r).nonzero().flatten() for r in train}
    gen = torch.Generator().manual_seed(seed)
    n_train = len(train)
    size = min(batch_facts, n_train)

    def full(p):
        return x64.T @ (wc * (x64 @ p)) + damping * p

    def minibatch(p, step):
        pick = torch.randperm(n_train, generator=gen)[:size].tolist()
        idx = torch.cat([fact_tokens[train[i]] for i in pick])
        xb = x64[idx]
        return (n_train / size) * (xb.T @ (wc[idx] * (xb @ p))) + damping * p

    scale = 1.5 * _largest_eigenvalue(full, x64.shape[1], seed=seed)
    report = lissa(minibatch, g_bar, scale=scale, depth=depth, rtol=1e-4, full_matvec=full)
    return report, scale


def domain_grad_norm(loaded, ids: list, batch_size: int = 16) -> float:
    """||grad_theta (mean_i l_i)|| over every parameter of the model, for
    facts given as token ids."""
    net = loaded.model
    encoded = Encoded(list(ids), [])
    device = next(net.parameters()).device
    params = list(net.parameters())
    flags = [p.requires_grad for p in params]
    total = None
    try:
        for p in params:
            p.requires_grad_(True)
        for input_ids, mask, rows in make_batches(encoded, batch_size, device):
            logits = net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            loss = per_fact_losses(logits, input_ids, mask).sum() / len(encoded.ids)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
            del logits, loss
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return float(math.sqrt(sum(float((g.to(torch.float64) ** 2).sum()) for g in total)))


def trainable_parameters(work) -> list:
    """The parameters fine-tuning trains: all but the embeddings and the LM
    head (tied to the embeddings in most small models). Switches grads on for
    them and off for the rest."""
    chosen = [p for name, p in work.named_parameters()
              if not any(key in name for key in ("wte", "wpe", "embed_tokens", "lm_head"))]
    for p in work.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def domain_grad_norm_trained(work, embed, split, rows, batch_size: int = 16) -> float:
    """||grad (mean_i l_i)|| over the fine-tuned parameters (the last blocks
    and the final norm), from the cached block inputs."""
    params = [p for p in work.parameters() if p.requires_grad]
    device = params[0].device
    total = None
    for i in range(0, len(rows), batch_size):
        part = rows[i: i + batch_size]
        input_ids, mask, hidden = padded_block_batch([split.ids[r] for r in part],
                                                     [split.block_inputs[r] for r in part], device)
        logits = work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits
        loss = per_fact_losses(logits, input_ids, mask).sum() / len(rows)
        grads = torch.autograd.grad(loss, params)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
    return float(math.sqrt(sum(float((g.to(torch.float64) ** 2).sum()) for g in total)))




class _Domain:
    """Domain k's rows, and its training gradients in S_k and the solves its
    estimators share, each computed once when first asked (mean loss asks
    for none of them)."""

    def __init__(self, ctx, k: int):
        self.ctx, self.k = ctx, k
        split = ctx.split
        self.rows = list(split.train_rows[k])
        self.example_rows = self.rows + (list(split.held_rows[k]) if ctx.settings.all_facts else [])
        self._cache: dict = {}

    def once(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def t(self) -> DomainTerms:
        return domain_terms_of(self.ctx)[self.k]

    @property
    def g_bar(self) -> torch.Tensor:
        return self.once("g_bar", lambda: self.t.grads[self.rows].mean(dim=0))

    @property
    def g_examples(self) -> torch.Tensor:
        return self.once("g_examples", lambda: self.t.grads[self.example_rows])

    def base(self):
        return self.once("base", lambda: damped(self.t.hessian, self.ctx.settings.damping))

    def exact(self):
        return self.once("exact", lambda: dense_solve(self.base(), self.g_bar))

    def ggn_base(self):
        tokens = self.ctx.split.tokens
        return self.once("ggn", lambda: damped(train_hessian(tokens.x, self.t.train_weights, self.t.c_ggn),
                                               self.ctx.settings.damping))


def _paper(d: _Domain):
    exact = d.exact()
    return exact.x, {"method": "dense", "nonpositive_curvature": exact.nonpositive_curvature}


def _influence_ggn(d: _Domain):
    return dense_solve(d.ggn_base(), d.g_bar).x, {"method": "dense (Gauss-Newton)"}


def _influence_cg(d: _Domain):
    tokens = d.ctx.split.tokens
    x64 = tokens.x.to(torch.float64)
    wc = d.t.train_weights * d.t.c
    damping = d.ctx.settings.damping
    cg = conjugate_gradient(lambda p: x64.T @ (wc * (x64 @ p)) + damping * p, d.g_bar, rtol=1e-6)
    return cg.x, {"method": "cg", "hvps": cg.iterations + 1, "rel_residual": cg.rel_residual,
                  "converged": cg.converged, "nonpositive_curvature": cg.nonpositive_curvature}


def _influence_lissa(d: _Domain):
    s = d.ctx.settings
    ls, scale = lissa_solve(d.ctx.split, d.t, d.g_bar, s.damping, s.lissa_depth, s.lissa_batch_facts, s.seed + d.k)
    z = ls.x if torch.isfinite(ls.x).all() else torch.full_like(ls.x, float("nan"))
    return z, {"method": "lissa", "hvps": ls.iterations, "scale": scale, "rel_residual": ls.rel_residual,
               "converged": ls.converged}


def _tracin(d: _Domain):
    return d.g_bar.clone(), {"method": "z = g_bar"}


def _solved(solve):
    """An estimator that solves for a z with g_bar: priority g_bar^T z, per
    fact g_i^T z, and how far z is from the exact dense solve."""
    def score(d: _Domain):
        z, info = solve(d)
        exact = d.exact().x
        info["rel_error_vs_exact"] = float((z - exact).norm() / exact.norm().clamp_min(1e-300))
        return float(d.g_bar @ z), (d.g_examples @ z).tolist(), info

    return score


def _heldout(gauss_newton: bool):
    """grad L_Q^T (H + lambda I)^-1 g_i: H is symmetric, so one solve with the
    held-out gradient serves every fact."""
    def score(d: _Domain):
        g_held = d.t.grads[d.ctx.split.held_rows[d.k]].mean(dim=0)
        w = dense_solve(d.ggn_base() if gauss_newton else d.base(), g_held)
        return (float(d.g_bar @ w.x), (d.g_examples @ w.x).tolist(),
                {"method": "dense", "nonpositive_curvature": w.nonpositive_curvature})

    return score


def _mean_loss(d: _Domain):
    losses = d.ctx.split.tokens.fact_losses
    return float(losses[d.rows].mean()), losses[d.example_rows].tolist(), None


# name -> fn(_Domain) -> (priority, per-example values, details or None): one
# entry per estimator of this family that is computed domain by domain.
DOMAIN_SCORES = {
    PAPER: _solved(_paper), "influence_ggn": _solved(_influence_ggn), "influence_cg": _solved(_influence_cg),
    "influence_lissa": _solved(_influence_lissa), "tracin": _solved(_tracin),
    "heldout_influence": _heldout(False), "heldout_influence_ggn": _heldout(True), MEAN_LOSS: _mean_loss,
}
# Estimators that need no per-domain terms in S_k.
WITHOUT_TERMS = (MEAN_LOSS, "grad_norm")


def _grad_norms(ctx) -> list:
    """||grad L_k|| per domain over the fine-tuned parameters (from the cached
    block inputs), or over every parameter when none were cached."""
    split = ctx.split
    if split.block_inputs is None:
        return [domain_grad_norm(ctx.loaded, [split.ids[r] for r in rows]) for rows in split.train_rows]
    work, embed = tail_model(ctx.loaded.model, split.capture_block)
    trainable_parameters(work)
    try:
        return [domain_grad_norm_trained(work, embed, split, rows) for rows in split.train_rows]
    finally:
        del work


def domain_terms_of(ctx) -> list:
    """Every domain's DomainTerms, computed once per split pass."""
    if ctx.split.terms is None:
        ctx.split.terms = all_domain_terms(ctx.split)
    return ctx.split.terms


def subspace_scores(ctx, names) -> list:
    """The named subspace estimators on every domain of ctx.split (see the
    module docstring). Each score's time is the forward pass, the subspace
    terms where it needs them, and its own work."""
    split = ctx.split
    n_domains = len(split.train_rows)
    needs_terms = [n for n in names if n not in WITHOUT_TERMS]
    terms_s = sum(t.seconds for t in domain_terms_of(ctx)) if needs_terms else 0.0
    own = {n: 0.0 for n in names}
    values = {n: ([], [], []) for n in names}  # priority, per-example, per-domain details
    for k in range(n_domains):
        ctx.progress(k / n_domains, f"estimators in S_k, domain {k + 1} of {n_domains}")
        d = _Domain(ctx, k)
        for n in names:
            if n == "grad_norm":
                continue
            t0 = time.perf_counter()
            priority, per_example, info = DOMAIN_SCORES[n](d)
            own[n] += time.perf_counter() - t0
            values[n][0].append(priority)
            values[n][1].append(per_example)
            if info is not None:
                values[n][2].append({"domain": split.names[k] if split.names else k, **info})
    if "grad_norm" in names:
        t0 = time.perf_counter()
        values["grad_norm"] = (_grad_norms(ctx), None, [])
        own["grad_norm"] = time.perf_counter() - t0
    return [EstimatorScore(n, get(n).label, values[n][0], values[n][1],
                           split.forward_s + (terms_s if n in needs_terms else 0.0) + own[n],
                           {"per_domain": values[n][2]} if values[n][2] else {})
            for n in names]


def subspace_cost(cal, run, names) -> Cost:
    """The concept-subspace estimators: the LM-head derivatives of every
    token along every domain's direction, each domain's training-loss
    Hessian, and per estimator its solves (Gauss-Newton a second Hessian; CG
    counted at d_ff iterations, LiSSA at its depth: upper bounds); grad_norm
    one gradient of the last blocks per chunk of training facts. Memory: the
    head product of every token (vocabulary wide, built chunk by chunk and
    concatenated, so held twice while it is built) and a chunk's
    derivatives. In an analysis the ranking by mean loss or the paper's
    reuses its forward pass and solves: nothing more."""
    if run.pipeline == "analysis":
        return Cost(0.0, 0.0)
    train, held, keep = run.train, run.held, run.keep
    n_tokens = predicted_tokens(run.flat)
    n_train = predicted_tokens([n for d in train for n in d])
    k, d = len(train), cal.d_ff
    seconds = n_tokens * cal.line_s_per_token * line_work(cal, k) / line_work(cal, CALIBRATION_DOMAINS)
    seconds += k * hessian_s(cal, n_train)
    names = set(names)
    solves = len(names & {PAPER, "heldout_influence", "influence_ggn", "heldout_influence_ggn"})
    seconds += k * solves * solve_s(cal, d)
    if names & {"influence_ggn", "heldout_influence_ggn"}:
        seconds += k * hessian_s(cal, n_train)
    if "influence_cg" in names:
        seconds += k * d * matmul_s(cal, 4.0 * n_train * d)
    if "influence_lissa" in names:
        batch_tokens = n_train / max(sum(len(t) for t in train), 1) * run.lissa_batch
        # power iteration (40 full products), then a full product every 50 steps for the residual
        full = 40 + run.lissa_depth / 50 + 1
        seconds += k * (run.lissa_depth * matmul_s(cal, 4.0 * batch_tokens * d)
                        + full * matmul_s(cal, 4.0 * n_train * d))
    if "grad_norm" in names:
        seconds += cal.copy_s
        for rows in train:
            calls, padded = chunked(rows)
            seconds += gradients_s(cal, calls, padded, keep, keep)
    line = n_tokens * cal.vocab * cal.dtype_bytes
    return Cost(seconds, line + cal.coef_bytes_per_token * min(LINE_CHUNK, n_tokens))


register_family("subspace", subspace_scores, subspace_cost)
