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
from ..analysis import forward_pass
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
class SplitPass:
    """One forward pass over every domain's training then held-out facts.

    Fact rows 0..M_train-1 are the training facts (domain by domain), the
    rest the held-out facts. directions[k] is v_k from domain k's training
    facts only, so nothing of the held-out half leaks into S_k.
    """

    anatomy: object
    directions: torch.Tensor  # (K, d_model), unit
    tokens: object  # FactTokens over all facts
    train_rows: list  # list[list[int]]
    held_rows: list  # list[list[int]]
    n_facts: int
    forward_s: float
    line: LogitLine | None = None
    ids: list | None = None  # token ids per fact
    block_inputs: list | None = None  # per fact (T_i, d): input of block `capture_block`
    capture_block: int | None = None

    @property
    def n_train(self) -> int:
        return sum(len(r) for r in self.train_rows)


def split_pass(loaded, train, held, batch_size: int = 16, capture_block: int | None = None) -> SplitPass:
    """Run the model once over train + held-out facts (lists of Domain).

    capture_block: also keep each fact's input to that transformer block
    (for fine-tuning only the blocks after it without re-running the rest).
    """
    t0 = time.perf_counter()
    net = loaded.model
    anatomy = find_anatomy(net)
    facts, groups = [], []
    for k, d in enumerate(train):
        facts += list(d.facts)
        groups += [k] * len(d.facts)
    for k, d in enumerate(held):
        facts += list(d.facts)
        groups += [len(train) + k] * len(d.facts)
    encoded = encode_facts(loaded.tokenizer, facts, anatomy.max_positions)
    device = next(net.parameters()).device
    batches = make_batches(encoded, batch_size, device)
    captured = []
    handle = None
    if capture_block is not None:
        from ..subspace import _BLOCK_PATHS, _get

        blocks = next(b for p in _BLOCK_PATHS if (b := _get(net, p)) is not None)

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = blocks[capture_block].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        directions, _, tokens = forward_pass(net, anatomy, batches, groups, 2 * len(train))
    finally:
        if handle is not None:
            handle.remove()
    block_inputs = None
    if capture_block is not None:
        block_inputs = [None] * len(facts)
        for (_, mask, rows), hidden in zip(batches, captured):
            for j, row in enumerate(rows):
                block_inputs[row] = hidden[j, : int(mask[j].sum())]
    rows = [[i for i, g in enumerate(groups) if g == k] for k in range(2 * len(train))]
    line = LogitLine(anatomy, tokens.h)
    return SplitPass(anatomy, directions[: len(train)], tokens, rows[: len(train)], rows[len(train):], len(facts),
                     time.perf_counter() - t0, line, encoded.ids, block_inputs, capture_block)


@dataclass
class DomainTerms:
    """Domain k's first and second derivatives in S_k, all float64."""

    grads: torch.Tensor  # (M, d_ff): g_i for every fact, training and held-out
    a: torch.Tensor  # (N,) d ce_t / d s_t
    c: torch.Tensor  # (N,) d^2 ce_t / d s_t^2 (exact Hessian)
    c_ggn: torch.Tensor  # (N,) its Gauss-Newton part
    hessian: torch.Tensor  # (d_ff, d_ff): Hessian of the mean training loss
    train_weights: torch.Tensor  # (N,) w_t of the mean training loss (0 on held-out tokens)
    seconds: float


def domain_terms(split: SplitPass, k: int) -> DomainTerms:
    t0 = time.perf_counter()
    tokens = split.tokens
    v = split.directions[k].to(tokens.h.dtype)
    idx = torch.arange(tokens.h.shape[0], device=tokens.h.device)
    _, a, c, c_ggn = split.line.derivatives(v, idx, tokens.targets)
    grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a, split.n_facts)
    weights = token_weights(split, [r for rows in split.train_rows for r in rows])
    hessian = structured_hessian(tokens.x, weights, c)
    return DomainTerms(grads, a, c, c_ggn, hessian, weights, time.perf_counter() - t0)


def tail_derivatives(anatomy, h: torch.Tensor, targets: torch.Tensor, direction: torch.Tensor,
                     s: torch.Tensor | None = None, order: int = 2, chunk: int = 512):
    """Per token t, along the residual h_t + s_t v (s = 0 when not given):
    ce_t, a_t = d ce_t/d s_t, c_t = d^2 ce_t/d s_t^2 and its Gauss-Newton part,
    by the engine's double backprop (`tail_coefficients`) at the shifted
    residual. The slow, general twin of `LogitLine.derivatives`. order = 0
    gives ce only, 1 adds a, 2 adds c and c_ggn; float64 (None where not asked).
    """
    if s is not None:
        h = h + s.to(h.dtype).unsqueeze(-1) * direction
    tail = tail_function(anatomy)
    with torch.no_grad():
        ce = torch.cat([F.cross_entropy(tail(h[i: i + chunk]), targets[i: i + chunk], reduction="none")
                        for i in range(0, h.shape[0], chunk)]).to(torch.float64)
    if order == 0:
        return ce, None, None, None
    a, c = tail_coefficients(anatomy, h, targets, direction, "hessian", chunk)
    if order == 1:
        return ce, a, None, None
    _, c_ggn = tail_coefficients(anatomy, h, targets, direction, "ggn", chunk)
    return ce, a, c, c_ggn


class LogitLine:
    """The logits along h_t + s v without the LM head in the loop.

    For a final norm n(x) = g * (P x) / sqrt(mean((P x)^2) + e) + beta, with P
    centring (LayerNorm) or the identity (RMSNorm), and a linear head W:
        z_t(s) = (A_t + s B) / r_t(s) + C,
        A_t = W (g * P h_t), B = W (g * P v), C = W beta + bias,
        r_t(s) = sqrt(q0_t + 2 s q1_t + s^2 q2 + e),
    with q0 = mean((P h)^2), q1 = mean(P h * P v), q2 = mean((P v)^2). A is one
    head product per token, shared by every direction; after that each
    derivative or loss along any v and s costs elementwise work over the
    vocabulary. The form is checked against the real norm and head when
    built; where it does not hold (another norm), `ok` is False and
    `derivatives` falls back to `tail_derivatives`.
    """

    def __init__(self, anatomy, h: torch.Tensor, chunk: int = 256):
        self.anatomy, self.h, self.chunk = anatomy, h, chunk
        norm, head = anatomy.final_norm, anatomy.lm_head
        self.ok = False
        if isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine:
            self.center, self.eps = True, float(norm.eps)
            self.beta = norm.bias
        elif "RMSNorm" in type(norm).__name__ and hasattr(norm, "weight"):
            self.center = False
            self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
            self.beta = None
        else:
            return
        with torch.no_grad():
            self.g, self.w = norm.weight, head.weight
            hc = self._p(h)
            self.a_base = torch.cat([(self.g * hc[i: i + chunk]) @ self.w.T for i in range(0, h.shape[0], chunk)])
            self.q0 = (hc.to(torch.float64) ** 2).mean(-1)
            c = torch.zeros(self.w.shape[0], dtype=h.dtype, device=h.device)
            if self.beta is not None:
                c = c + self.w @ self.beta
            if getattr(head, "bias", None) is not None:
                c = c + head.bias
            self.c_const = c
            probe = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0)).to(h)
            probe = probe / probe.norm()
            n = min(4, h.shape[0])
            s = torch.full((n,), 0.7, dtype=torch.float64, device=h.device)
            want = head(norm(h[:n] + 0.7 * probe))
            got = self._logits(self._direction(probe), torch.arange(n, device=h.device), s)[0]
            self.ok = bool(((got - want).abs().max() / want.abs().max().clamp_min(1.0)) < 1e-4)

    def _p(self, x):
        return x - x.mean(-1, keepdim=True) if self.center else x

    def _direction(self, v):
        vc = self._p(v)
        return {"b": self.w @ (self.g * vc), "vc": vc.to(torch.float64), "q2": float((vc.to(torch.float64) ** 2).mean())}

    def _logits(self, d, idx, s):
        hc = self._p(self.h[idx]).to(torch.float64)
        q1 = (hc * d["vc"]).mean(-1)
        r = torch.sqrt(self.q0[idx] + 2 * s * q1 + s * s * d["q2"] + self.eps)
        num = self.a_base[idx].to(torch.float64) + s[:, None] * d["b"].to(torch.float64)
        # vocabulary-sized arrays in the model's dtype (float32: half the time of float64)
        num = num.to(self.h.dtype)
        return num / r[:, None].to(num.dtype) + self.c_const, num, r, q1

    def derivatives(self, v, idx, targets, s=None, order: int = 2):
        """(ce, a, c, c_ggn) over tokens idx along h + s v, as tail_derivatives."""
        if s is None:
            s = torch.zeros(len(idx), dtype=torch.float64, device=self.h.device)
        if not self.ok:
            return tail_derivatives(self.anatomy, self.h[idx], targets, v.to(self.h.dtype), s, order)
        d = self._direction(v.to(self.h.dtype))
        b = d["b"]
        outs = {"ce": [], "a": [], "c": [], "c_ggn": []}
        with torch.no_grad():
            for start in range(0, len(idx), self.chunk):
                part, sc, yc = idx[start: start + self.chunk], s[start: start + self.chunk], targets[start: start + self.chunk]
                z, num, r, q1 = self._logits(d, part, sc)
                logp = torch.log_softmax(z, dim=-1)
                outs["ce"].append(-logp.gather(1, yc[:, None])[:, 0].to(torch.float64))
                r, r_dt = r.to(z.dtype), r
                if order == 0:
                    continue
                r1 = ((q1 + sc * d["q2"]) / r_dt).to(z.dtype)
                z1 = b / r[:, None] - num * (r1 / r ** 2)[:, None]
                p = logp.exp()
                m1 = (p * z1).sum(-1)
                outs["a"].append((m1 - z1.gather(1, yc[:, None])[:, 0]).to(torch.float64))
                if order == 1:
                    continue
                r2 = (d["q2"] - r1 ** 2) / r
                z2 = -2 * b * (r1 / r ** 2)[:, None] - num * (r2 / r ** 2 - 2 * r1 ** 2 / r ** 3)[:, None]
                c_ggn = (p * z1 * z1).sum(-1) - m1 * m1
                outs["c_ggn"].append(c_ggn.to(torch.float64))
                outs["c"].append((c_ggn + (p * z2).sum(-1) - z2.gather(1, yc[:, None])[:, 0]).to(torch.float64))
        return tuple(torch.cat(outs[key]) if outs[key] else None for key in ("ce", "a", "c", "c_ggn"))


def derivatives_at_zero(line: LogitLine, directions: torch.Tensor, targets: torch.Tensor, chunk: int = 256):
    """(a, c, c_ggn), each (N, K): the per-token derivatives of ce_t along
    every direction v_k at s = 0, for all tokens of `line` at once.

    At s = 0 the softmax p_t is the same for every direction, so each
    derivative is a handful of products of p_t with vocabulary vectors:
    with b_k = W (g * P v_k), A_t the cached head product, r_t = r_t(0),
    r1 = q1 / r, r2 = (q2 - r1^2) / r,
        z1 = b / r - A r1 / r^2,    z2 = -2 b r1 / r^2 - A (r2 / r^2 - 2 r1^2 / r^3),
        a = p.z1 - z1[y],   c_ggn = p.z1^2 - (p.z1)^2,   c = c_ggn + p.z2 - z2[y],
    and p.z1, p.z1^2, p.z2 expand into p B, p B^2, (p * A) B, p.A, p.A^2
    (B the V x K matrix of the b_k): matrix products over all directions, one
    pass over the tokens instead of one per direction. `LogitLine.derivatives`
    is the per-direction twin (tested equal)."""
    h = line.h
    if not line.ok:
        outs = [line.derivatives(directions[k], torch.arange(h.shape[0], device=h.device), targets)
                for k in range(directions.shape[0])]
        return tuple(torch.stack([o[i] for o in outs], dim=1) for i in (1, 2, 3))
    dirs = directions.to(h.dtype)
    vc = line._p(dirs)  # (K, d)
    big_b = (line.w @ (line.g * vc).T)  # (V, K)
    vc64 = vc.to(torch.float64)
    q2 = (vc64 ** 2).mean(-1)  # (K,)
    out_a, out_c, out_g = [], [], []
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            y = targets[sl]
            hc = line._p(h[sl]).to(torch.float64)
            r = torch.sqrt(line.q0[sl] + line.eps)[:, None]  # (C, 1)
            q1 = hc @ vc64.T / hc.shape[-1]  # (C, K)
            r1 = q1 / r
            r2 = (q2[None, :] - r1 ** 2) / r
            a_tok = line.a_base[sl]  # (C, V)
            z = a_tok / r.to(a_tok.dtype) + line.c_const
            p = torch.softmax(z, dim=-1)
            pb = (p @ big_b).to(torch.float64)  # (C, K)
            pbb = (p @ (big_b * big_b)).to(torch.float64)
            pab = ((p * a_tok) @ big_b).to(torch.float64)
            pa = (p * a_tok).sum(-1, dtype=torch.float64)[:, None]  # (C, 1)
            paa = (p * a_tok * a_tok).sum(-1, dtype=torch.float64)[:, None]
            by = big_b[y].to(torch.float64)  # (C, K)
            ay = a_tok.gather(1, y[:, None]).to(torch.float64)  # (C, 1)
            m1 = pb / r - pa * r1 / r ** 2
            z1y = by / r - ay * r1 / r ** 2
            pz1sq = pbb / r ** 2 - 2 * (r1 / r ** 3) * pab + (r1 ** 2 / r ** 4) * paa
            c_ggn = pz1sq - m1 ** 2
            k2 = r2 / r ** 2 - 2 * r1 ** 2 / r ** 3
            pz2 = -2 * (r1 / r ** 2) * pb - k2 * pa
            z2y = -2 * (r1 / r ** 2) * by - k2 * ay
            out_a.append(m1 - z1y)
            out_g.append(c_ggn)
            out_c.append(c_ggn + pz2 - z2y)
    return torch.cat(out_a), torch.cat(out_c), torch.cat(out_g)


def all_domain_terms(split: SplitPass) -> list:
    """DomainTerms for every domain from one pass over the tokens
    (`derivatives_at_zero`). Per-fact gradients are kept for the training
    facts and the held-out facts of each domain's own held-out half; the
    Hessians use the training tokens only (the other weights are zero)."""
    t0 = time.perf_counter()
    tokens = split.tokens
    a_all, c_all, g_all = derivatives_at_zero(split.line, split.directions, tokens.targets)
    train = [r for rows in split.train_rows for r in rows]
    weights = token_weights(split, train)
    on_train = (weights > 0).nonzero().flatten()
    shared = time.perf_counter() - t0
    out = []
    for k in range(len(split.train_rows)):
        t1 = time.perf_counter()
        grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a_all[:, k], split.n_facts)
        hessian = structured_hessian(tokens.x[on_train], weights[on_train], c_all[on_train, k])
        out.append(DomainTerms(grads, a_all[:, k], c_all[:, k], g_all[:, k], hessian, weights,
                               time.perf_counter() - t1 + shared / len(split.train_rows)))
    return out


def _train_hessian(x, weights, c) -> torch.Tensor:
    """structured_hessian over the tokens with non-zero weight only (the
    others add nothing)."""
    on = (weights != 0).nonzero().flatten()
    return structured_hessian(x[on], weights[on], c[on])


def token_weights(split: SplitPass, rows) -> torch.Tensor:
    """w_t such that sum_t w_t ce_t = mean over the given facts of l_i."""
    tokens = split.tokens
    member = torch.zeros(split.n_facts, dtype=torch.float64, device=tokens.token_scale.device)
    member[list(rows)] = 1.0 / len(rows)
    return tokens.token_scale * member[tokens.token_fact]


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
