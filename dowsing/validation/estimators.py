"""Rival per-domain priority scores, computed on the same facts and the same
concept subspaces, so the validation can put them side by side.

Every estimator turns a domain's *training* facts into one number per domain:
the larger, the more that domain's data is predicted to help. With
g_i = grad_u l_i at u = 0 in S_k (B = 1), g_bar_k = mean_i g_ki over the
domain's training facts, H_k the curvature of the training loss in S_k and
lambda the damping:

* ``paper`` (the Data Dowsing paper's method): Mean_k = g_bar_k^T (H_k + lambda I)^-1 g_bar_k,
  exact Hessian, dense solve;
* ``influence_ggn``: the same with the Gauss-Newton matrix;
* ``influence_cg``: the same system solved by conjugate gradient on
  Hessian-vector products;
* ``influence_lissa``: the same system solved by LiSSA on minibatch
  Hessian-vector products (a stochastic Neumann series);
* ``tracin``: gradient dot product without curvature, z = g_bar: g_bar^T g_bar;
* ``mean_loss``: the domain's mean next-token loss (log perplexity);
* ``grad_norm``: ||grad_theta L_k||, the norm of the domain's mean-loss
  gradient over the parameters the fine-tuning ground truth trains (the last
  blocks and the final norm; all parameters when no block inputs are cached);
* ``heldout_influence`` / ``heldout_influence_ggn``: influence of the held-out
  facts Q_k on the training facts in S_k,
  grad L_Q,k^T (H_k + lambda I)^-1 g_bar_k (exact Hessian / Gauss-Newton);
* ``alignment``, ``alignment_adam``, ``alignment_heldout``,
  ``alignment_heldout_adam``: gradient alignment over the parameters the
  fine-tuning trains (`dowsing.alignment`): between a domain's own training
  facts (i != j), or between its training and held-out facts; with the
  identity or Adam's preconditioner;
* ``ekfac``: grad L_Q,k^T (G + lambda I)^-1 g_bar_k over the same parameters,
  G the EK-FAC curvature of kronfluence (`ekfac.py`);
* ``diffin``, ``tracin_ckpt``, ``vog``, ``ckpt_confidence``,
  ``ckpt_variability``, ``el2n``: scores over the checkpoints of a
  fine-tune (`trajectory.py`, which gives their formulas);
* ``airrep``: a small encoder over the final hidden states with attention
  pooling, trained to rank counterfactual fine-tunes of other domains
  (`airrep.py`).

One forward pass over all facts (training and held-out) serves every
estimator and the subspace ground truth; its time is reported as shared.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..alignment import padded_block_batch, tail_model
from ..forward import SplitPass
from ..subspace_terms import DomainTerms, all_domain_terms, _train_hessian
from ..curvature import structured_fact_gradients, structured_hessian, tail_coefficients, tail_function
from ..solvers import conjugate_gradient, damped, dense_solve, lissa
from ..subspace import encode_facts, find_anatomy, make_batches, per_fact_losses

# Estimators in the concept subspaces S_k, plus the loss and gradient-norm baselines.
SUBSPACE_ESTIMATORS = ("paper", "influence_ggn", "influence_cg", "influence_lissa", "heldout_influence",
                       "heldout_influence_ggn", "tracin", "mean_loss", "grad_norm")
# Estimators in the space of the parameters fine-tuning changes (`alignment_scores`).
ALIGNMENT_ESTIMATORS = ("alignment", "alignment_adam", "alignment_heldout", "alignment_heldout_adam")
# EK-FAC influence through kronfluence (`ekfac_scores`).
EKFAC_ESTIMATORS = ("ekfac",)
# Estimators over a trajectory of fine-tuning checkpoints (`trajectory.trajectory_scores`).
TRAJECTORY_ESTIMATORS = ("diffin", "tracin_ckpt", "vog", "ckpt_confidence", "ckpt_variability", "el2n")
# A trained representation model over counterfactual fine-tunes (`airrep.airrep_scores`).
AIRREP_ESTIMATORS = ("airrep",)
ESTIMATORS = SUBSPACE_ESTIMATORS + ALIGNMENT_ESTIMATORS + EKFAC_ESTIMATORS + TRAJECTORY_ESTIMATORS + AIRREP_ESTIMATORS
PAPER = "paper"
LABELS = {
    "paper": "Paper: concept-subspace influence, exact Hessian",
    "influence_ggn": "Influence, Gauss-Newton",
    "influence_cg": "Influence, CG inverse-HVP",
    "influence_lissa": "Influence, LiSSA inverse-HVP",
    "tracin": "Gradient dot product (TracIn-style, z = ḡ)",
    "mean_loss": "Mean loss (log perplexity)",
    "grad_norm": "Norm of the domain gradient (fine-tuned parameters)",
    "heldout_influence": "Held-out influence in S_k, exact Hessian",
    "heldout_influence_ggn": "Held-out influence in S_k, Gauss-Newton",
    "alignment": "Gradient alignment between facts (fine-tuned parameters)",
    "alignment_adam": "Gradient alignment between facts, Adam-preconditioned",
    "alignment_heldout": "Gradient alignment, training vs held-out facts",
    "alignment_heldout_adam": "Gradient alignment, training vs held-out, Adam-preconditioned",
    "ekfac": "Held-out influence, EK-FAC (kronfluence)",
    "diffin": "Diff-In: held-out influence accumulated over checkpoints, second order",
    "tracin_ckpt": "TracIn over checkpoints (held-out)",
    "vog": "Variance of input gradients over checkpoints (VoG)",
    "ckpt_confidence": "1 - confidence over checkpoints (cartography)",
    "ckpt_variability": "Variability of confidence over checkpoints (cartography)",
    "el2n": "EL2N error norm over checkpoints",
    "airrep": "AirRep: trained encoder + attention pooling, cross-validated by domain",
}


@dataclass
class EstimatorScore:
    name: str
    label: str
    priority: list  # one number per domain; larger = collect first
    per_example: list | None  # per domain, per training fact: numbers whose mean is the priority
    time_s: float  # own time plus the shared forward pass
    details: dict = field(default_factory=dict)  # solver cost and agreement with the exact solve

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "priority": self.priority,
                "per_example": self.per_example, "time_s": self.time_s, "details": self.details}


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


def lissa_solve(split: SplitPass, terms: DomainTerms, g_bar: torch.Tensor, damping: float, depth: int,
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


def domain_grad_norm(loaded, facts, batch_size: int = 16) -> float:
    """||grad_theta (mean_i l_i)|| over every parameter of the model."""
    net = loaded.model
    anatomy = find_anatomy(net)
    encoded = encode_facts(loaded.tokenizer, list(facts), anatomy.max_positions)
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


def score_estimators(loaded, train, split: SplitPass, names=ESTIMATORS, damping: float = 1e-3,
                     lissa_depth: int = 2000, lissa_batch_facts: int = 8, seed: int = 0,
                     terms: list | None = None, progress=None) -> tuple[list[EstimatorScore], list[DomainTerms]]:
    """Every named estimator's per-domain priority on the training facts.

    terms: DomainTerms per domain, computed here when not given (the subspace
    ground truth reuses them).
    """
    unknown = [n for n in names if n not in SUBSPACE_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s): {', '.join(unknown)}; choose from {', '.join(SUBSPACE_ESTIMATORS)}")
    report = progress or (lambda fraction, message: None)
    n_domains = len(train)
    if terms is None:
        report(0.0, "derivatives in every S_k")
        terms = all_domain_terms(split)
    shared_s = split.forward_s + sum(t.seconds for t in terms)
    tokens = split.tokens
    own = {n: 0.0 for n in names}
    priority = {n: [] for n in names}
    per_example = {n: [] for n in names}
    details = {n: {"per_domain": []} for n in names}
    exact_z = []
    for k in range(n_domains):
        report(0.5 + 0.5 * k / n_domains, f"estimators for {train[k].name}")
        rows = split.train_rows[k]
        t = terms[k]
        g_train = t.grads[rows]
        g_bar = g_train.mean(dim=0)
        t0 = time.perf_counter()
        base = damped(t.hessian, damping)
        exact = dense_solve(base, g_bar)
        exact_s = time.perf_counter() - t0
        exact_z.append(exact.x)

        def record(name, z, seconds, info):
            own[name] += seconds
            priority[name].append(float(g_bar @ z))
            per_example[name].append((g_train @ z).tolist())
            rel_err = float((z - exact.x).norm() / exact.x.norm().clamp_min(1e-300))
            details[name]["per_domain"].append({"domain": train[k].name, "rel_error_vs_exact": rel_err, **info})

        if "paper" in names:
            record("paper", exact.x, exact_s, {"method": "dense", "nonpositive_curvature":
                                                          exact.nonpositive_curvature})
        ggn_base = None
        if "influence_ggn" in names or "heldout_influence_ggn" in names:
            t0 = time.perf_counter()
            ggn_base = damped(_train_hessian(tokens.x, t.train_weights, t.c_ggn), damping)
            ggn_s = time.perf_counter() - t0
        if "influence_ggn" in names:
            t0 = time.perf_counter() - ggn_s
            ggn = dense_solve(ggn_base, g_bar)
            record("influence_ggn", ggn.x, time.perf_counter() - t0, {"method": "dense (Gauss-Newton)"})
        if "influence_cg" in names:
            t0 = time.perf_counter()
            x64 = tokens.x.to(torch.float64)
            wc = t.train_weights * t.c
            cg = conjugate_gradient(lambda p: x64.T @ (wc * (x64 @ p)) + damping * p, g_bar, rtol=1e-6)
            record("influence_cg", cg.x, time.perf_counter() - t0,
                   {"method": "cg", "hvps": cg.iterations + 1, "rel_residual": cg.rel_residual,
                    "converged": cg.converged, "nonpositive_curvature": cg.nonpositive_curvature})
        if "influence_lissa" in names:
            t0 = time.perf_counter()
            ls, scale = lissa_solve(split, t, g_bar, damping, lissa_depth, lissa_batch_facts, seed + k)
            z = ls.x if torch.isfinite(ls.x).all() else torch.full_like(ls.x, float("nan"))
            record("influence_lissa", z, time.perf_counter() - t0,
                   {"method": "lissa", "hvps": ls.iterations, "scale": scale, "rel_residual": ls.rel_residual,
                    "converged": ls.converged})
        if "tracin" in names:
            t0 = time.perf_counter()
            record("tracin", g_bar.clone(), time.perf_counter() - t0, {"method": "z = g_bar"})
        for name in ("heldout_influence", "heldout_influence_ggn"):
            if name not in names:
                continue
            t0 = time.perf_counter()
            g_held = t.grads[split.held_rows[k]].mean(dim=0)
            system = base if name == "heldout_influence" else ggn_base
            # H is symmetric: grad L_Q^T H^-1 g_i = g_i^T (H^-1 grad L_Q), one solve for every i
            w = dense_solve(system, g_held)
            own[name] += time.perf_counter() - t0
            priority[name].append(float(g_bar @ w.x))
            per_example[name].append((g_train @ w.x).tolist())
            details[name]["per_domain"].append({"domain": train[k].name, "method": "dense",
                                                "nonpositive_curvature": w.nonpositive_curvature})
        if "mean_loss" in names:
            own["mean_loss"] += 0.0
            losses = tokens.fact_losses[rows]
            priority["mean_loss"].append(float(losses.mean()))
            per_example["mean_loss"].append(losses.tolist())
        if "grad_norm" in names:
            t0 = time.perf_counter()
            if split.block_inputs is not None:
                if k == 0:
                    work, embed = tail_model(loaded.model, split.capture_block)
                    trainable_parameters(work)
                priority["grad_norm"].append(domain_grad_norm_trained(work, embed, split, rows))
                if k == n_domains - 1:
                    del work
            else:
                priority["grad_norm"].append(domain_grad_norm(loaded, train[k].facts))
            per_example["grad_norm"] = None
            own["grad_norm"] += time.perf_counter() - t0
    scores = []
    for n in names:
        info = details[n]
        if not info["per_domain"]:
            info = {}
        # tracin / grad_norm / mean_loss need no curvature: only the forward pass is shared
        shared = shared_s if n.startswith("influence") or n == "tracin" else split.forward_s
        scores.append(EstimatorScore(n, LABELS[n], priority[n], per_example[n], shared + own[n], info))
    return scores, terms


def alignment_scores(loaded, split: SplitPass, names=ALIGNMENT_ESTIMATORS, blocks: int = 4, adam_batch: int = 8,
                     adam_batches: int = 8, seed: int = 0, progress=None) -> list[EstimatorScore]:
    """The gradient-alignment estimators (`dowsing.alignment`) over the last
    `blocks` transformer blocks and the final norm, from the block inputs
    cached by the forward pass. Adam's second moment comes from `adam_batches`
    seeded minibatches of `adam_batch` facts of the whole training pool, as a
    fine-tune on the mixture would see them."""
    from ..alignment import adam_preconditioner, domain_alignment, tail_grad_fn, tail_parameters

    unknown = [n for n in names if n not in ALIGNMENT_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown alignment estimator(s): {', '.join(unknown)}")
    if split.block_inputs is None:
        raise ValueError("the alignment estimators need the block inputs cached by the forward pass")
    report = progress or (lambda fraction, message: None)
    t0 = time.perf_counter()
    work, embed = tail_model(loaded.model, split.capture_block)
    work.eval()
    params = tail_parameters(work, blocks)
    grad_of = tail_grad_fn(work, embed, split.ids, split.block_inputs, params)
    pool = [r for rows in split.train_rows for r in rows]
    adam_needed = any(n.endswith("_adam") for n in names)
    preconditioners = {"plain": None}
    if adam_needed:
        preconditioners["adam"] = adam_preconditioner(grad_of, pool, adam_batch, adam_batches, seed)
    held_needed = any("heldout" in n for n in names)
    values = {n: ([], []) for n in names}
    for k, rows in enumerate(split.train_rows):
        report(k / len(split.train_rows), f"gradient alignment, domain {k + 1} of {len(split.train_rows)}")
        result = domain_alignment(grad_of, list(rows), preconditioners,
                                  query_rows=list(split.held_rows[k]) if held_needed else None)
        for n in names:
            a = result["adam" if n.endswith("_adam") else "plain"]
            if "heldout" in n:
                values[n][0].append(a.query)
                values[n][1].append(a.per_fact_query)
            else:
                values[n][0].append(a.pairs)
                values[n][1].append(a.per_fact_pairs)
    del work
    seconds = time.perf_counter() - t0
    # every alignment estimator shares the same backward passes: each is charged the whole time
    return [EstimatorScore(n, LABELS[n], values[n][0], values[n][1], split.forward_s + seconds,
                           {"blocks": blocks, "parameters": sum(p.numel() for p in params)})
            for n in names]


def ekfac_scores(loaded, split: SplitPass, blocks: int = 4, damping: float | None = None,
                 fit_max_examples: int | None = 256, seed: int = 0, progress=None) -> EstimatorScore:
    """EK-FAC influence of each domain's held-out facts on its training
    facts over the last `blocks` blocks (their Linear layers; kronfluence):
    per training fact t of k, mean_{q in Q_k} grad l_q^T (G + lambda I)^-1 grad l_t;
    priority_k their mean."""
    from ..alignment import tail_parameters
    from .ekfac import ekfac_domain_scores

    t0 = time.perf_counter()
    work, embed = tail_model(loaded.model, split.capture_block)
    work.eval()
    tail_parameters(work, blocks)
    item = lambda r: (split.ids[r], split.block_inputs[r])  # noqa: E731
    per_example = ekfac_domain_scores(work, embed, [[item(r) for r in rows] for rows in split.train_rows],
                                      [[item(r) for r in rows] for rows in split.held_rows], damping,
                                      fit_max_examples=fit_max_examples, seed=seed, progress=progress)
    del work
    priority = [sum(v) / len(v) for v in per_example]
    return EstimatorScore("ekfac", LABELS["ekfac"], priority, per_example,
                          split.forward_s + time.perf_counter() - t0,
                          {"blocks": blocks, "damping": damping, "fit_max_examples": fit_max_examples})
