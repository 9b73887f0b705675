"""Each domain's first and second derivatives in its concept subspace S_k
(B = 1), from the forward pass's per-token quantities: the logits along
h_t + s v_k in closed form (`LogitLine`), all directions at once
(`derivatives_at_zero`), and the per-domain terms the subspace estimators,
the subspace ground truth and the predicted learning curves use."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .curvature import structured_fact_gradients, structured_hessian, tail_coefficients, tail_function
from .forward import SplitPass


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
    _, a, c, c_ggn = logit_line(split).derivatives(v, idx, tokens.targets)
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

    keep: hold A for every token (a vocabulary-sized row each, reused by
    every later call) or recompute each chunk's rows when asked (memory of
    one chunk, for a single pass over the tokens as `derivatives_at_zero`).
    """

    def __init__(self, anatomy, h: torch.Tensor, chunk: int = 256, keep: bool = True):
        self.anatomy, self.h, self.chunk = anatomy, h, chunk
        self.a_base = None
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
            if keep:
                self.a_base = torch.cat([self.head(slice(i, i + chunk)) for i in range(0, h.shape[0], chunk)])
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

    def head(self, rows) -> torch.Tensor:
        """A_t = W (g * P h_t) for the tokens `rows` (an index or a slice)."""
        if self.a_base is not None:
            return self.a_base[rows]
        with torch.no_grad():
            return (self.g * self._p(self.h[rows])) @ self.w.T

    def _direction(self, v):
        vc = self._p(v)
        return {"b": self.w @ (self.g * vc), "vc": vc.to(torch.float64), "q2": float((vc.to(torch.float64) ** 2).mean())}

    def _logits(self, d, idx, s):
        hc = self._p(self.h[idx]).to(torch.float64)
        q1 = (hc * d["vc"]).mean(-1)
        r = torch.sqrt(self.q0[idx] + 2 * s * q1 + s * s * d["q2"] + self.eps)
        num = self.head(idx).to(torch.float64) + s[:, None] * d["b"].to(torch.float64)
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
    n_dirs = big_b.shape[1]
    # p B and p B^2 in one product: every vocabulary-sized pass over a chunk is a trip through memory
    b_and_bb = torch.cat([big_b, big_b * big_b], dim=1)  # (V, 2K)
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
            a_tok = line.head(sl)  # (C, V)
            p = torch.softmax(torch.addcdiv(line.c_const, a_tok, r.to(a_tok.dtype)), dim=-1)
            both = (p @ b_and_bb).to(torch.float64)  # (C, 2K)
            pb, pbb = both[:, :n_dirs], both[:, n_dirs:]
            p_a = p.mul_(a_tok)  # p * A in place: p itself is not needed again
            pab = (p_a @ big_b).to(torch.float64)
            # Summed in the model's dtype, as p B, p B^2 and (p * A) B are: torch's blocked sums keep
            # them to a few 1e-9 of sum |p A|, below the rounding of p * A itself, at a third of the
            # time of a float64 sum; the row-wise dot reads A without writing p A^2.
            pa = p_a.sum(-1).to(torch.float64)[:, None]  # (C, 1)
            paa = torch.linalg.vecdot(p_a, a_tok).to(torch.float64)[:, None]
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
    a_all, c_all, g_all = derivatives_at_zero(logit_line(split), split.directions, tokens.targets)
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


def train_hessian(x, weights, c) -> torch.Tensor:
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


def logit_line(split: SplitPass) -> LogitLine:
    """The split pass's LogitLine, built once (one head product per token)."""
    if split.line is None:
        split.line = LogitLine(split.anatomy, split.tokens.h)
    return split.line
