"""Uncertainty in every result: a bootstrap over each
domain's facts.

For domain k with per-fact gradients g_i (in the domain's subspace S_k) and
curvature A_k(n) = H_k(n) + lambda I, the engine caches the kernels
K_k[g]_ij = g_i^T A_k(n_g)^-1 g_j on the saturation grid n_g. A bootstrap
resample of the facts is a count vector m (length N_k, sum N_k, drawn with
replacement); its mean gradient is g(m) = sum_i m_i g_i / N_k and its curve is

    mu_m(n_g) = g(m)^T A_k(n_g)^-1 g(m) = m^T K_k[g] m / N_k^2,

so mu_m(N_k) is the resampled Mean_k. Nothing is recomputed on the model.

The curvature is held fixed: the bootstrap is conditional on H_k (and on the
other domains' curvature inside H_k(n)); it measures how much the results
depend on which facts were sampled for each domain's gradient, not on the
noise in the curvature estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .saturation import TARGET_FRACTION

# A domain's rank is called stable when its most likely rank has at least
# this bootstrap probability.
RANK_STABLE_PROBABILITY = 0.8
# Δn@10% gets an interval only when at least this fraction of the resamples
# has one (Mean > 0 and a positive, decreasing curve); otherwise it is None.
MIN_DELTA_N_FRACTION = 0.5
# Same "does not decrease" tolerance as dowsing.kernels.saturation.saturation.
_INCREASE_RTOL = 1e-9


@dataclass
class DomainKernels:
    """The cached per-fact quantities of one domain.

    kernels[g, i, j] = g_i^T (H_k(grid[g]) + lambda I)^-1 g_j; grid is
    ascending and contains n_k exactly."""

    name: str
    n_k: int
    grid: np.ndarray
    kernels: np.ndarray


@dataclass
class DomainUncertainty:
    """Bootstrap intervals of one domain; intervals are (low, high) at the
    result's level, None where there is no interval."""

    name: str
    n_k: int
    mean_interval: tuple[float, float]
    share_pct_interval: tuple[float, float]
    delta_n_10pct_interval: tuple[float, float] | None
    delta_n_fraction: float
    rank_probabilities: list[float]
    most_likely_rank: int
    rank_stable: bool
    curve_band: list[tuple[float, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n_k": int(self.n_k),
            "mean_interval": _pair(self.mean_interval),
            "share_pct_interval": _pair(self.share_pct_interval),
            "delta_n_10pct_interval": _pair(self.delta_n_10pct_interval),
            "delta_n_fraction": float(self.delta_n_fraction),
            "rank_probabilities": [float(p) for p in self.rank_probabilities],
            "most_likely_rank": int(self.most_likely_rank),
            "rank_stable": bool(self.rank_stable),
            "curve_band": [[float(n), float(lo), float(hi)] for n, lo, hi in self.curve_band],
        }


@dataclass
class BootstrapResult:
    n_resamples: int
    level: float
    seed: int
    domains: list[DomainUncertainty]
    rank_stable_probability: float = RANK_STABLE_PROBABILITY

    def to_dict(self) -> dict:
        return {
            "n_resamples": int(self.n_resamples),
            "level": float(self.level),
            "seed": int(self.seed),
            "rank_stable_probability": float(self.rank_stable_probability),
            "conditional_on_curvature": True,
            "domains": [d.to_dict() for d in self.domains],
        }


def _pair(interval) -> list[float] | None:
    if interval is None:
        return None
    return [float(interval[0]), float(interval[1])]


def resampled_curves(kernels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mu_m(n_g) = m^T K[g] m / N^2 for each count vector m.

    kernels: (G, N, N); counts: (R, N). Returns (R, G). With m = ones this is
    the full-sample curve (at n_g = N_k, the domain's Mean)."""
    kernels = np.asarray(kernels, dtype=float)
    counts = np.asarray(counts, dtype=float)
    n = kernels.shape[-1]
    km = np.einsum("gij,rj->rgi", kernels, counts)
    return np.einsum("rgi,ri->rg", km, counts) / float(n * n)


def percentile_interval(samples: np.ndarray, level: float, axis: int = 0) -> np.ndarray:
    """Percentile bootstrap interval: the (1-level)/2 and (1+level)/2
    quantiles (linear interpolation) along axis; shape (2, ...)."""
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    return np.quantile(samples, [lo, hi], axis=axis)


def magnitude_interval(low: float, high: float) -> tuple[float, float]:
    """The image of [low, high] under |x|: [0, max(|low|, |high|)] when it
    spans 0, else the two magnitudes in order.

    Shares are magnitudes. A percentile interval taken on |x| itself cannot
    reach 0, so for a domain whose signed influence straddles 0 it sits
    entirely above the point estimate; mapping the signed interval keeps the
    point estimate inside whenever the signed interval holds it."""
    if low <= 0.0 <= high:
        return 0.0, max(-low, high)
    a, b = abs(low), abs(high)
    return min(a, b), max(a, b)


def _power_law_candidates(ns: np.ndarray) -> np.ndarray:
    # The same N0 start grid as dowsing.kernels.saturation.fit_power_law.
    return np.concatenate([[0.0], np.geomspace(ns.min() * 1e-3, ns.max() * 10, 60)])


def _profile(log_n_shift: np.ndarray, log_mu: np.ndarray):
    """For fixed N0 (per curve): the closed-form regression log mu = lc - a x,
    x = log(n + N0). Both arguments (R, G); returns lc, a, residuals (R, G)."""
    x_mean = log_n_shift.mean(axis=1, keepdims=True)
    y_mean = log_mu.mean(axis=1, keepdims=True)
    xc = log_n_shift - x_mean
    sxy = (xc * (log_mu - y_mean)).sum(axis=1)
    sxx = (xc * xc).sum(axis=1)
    slope = sxy / sxx
    intercept = y_mean[:, 0] - slope * x_mean[:, 0]
    residuals = intercept[:, None] + slope[:, None] * log_n_shift - log_mu
    return intercept, -slope, residuals


def _profile_gradient(ns, n0, log_mu):
    """S(N0) = min over (lc, a) of the sum of squared log residuals, and its
    exact derivative dS/dN0 = sum 2 r (-a / (n + N0)) (envelope theorem)."""
    shifted = ns[None, :] + n0[:, None]
    lc, a, r = _profile(np.log(shifted), log_mu)
    s = (r * r).sum(axis=1)
    ds = (2.0 * r * (-a[:, None] / shifted)).sum(axis=1)
    return s, ds, lc, a


def fit_power_law_batch(ns: np.ndarray, mus: np.ndarray, iterations: int = 100):
    """Vectorised fit_power_law for many curves on one grid.

    Minimises sum_g (log c - alpha log(n_g + N0) - log mu_g)^2 over N0 >= 0,
    with (log c, alpha) eliminated in closed form for each N0. Start: the same
    N0 grid as fit_power_law; refinement: safeguarded Newton on dS/dN0 = 0
    (exact derivative, finite-difference second derivative), projected onto
    N0 >= 0, with step halving so S never increases. Gives the same optimum as
    fit_power_law (scipy's least_squares from that start) to ~1e-9.

    ns: (G,), mus: (R, G), all positive and finite. Returns arrays alpha, n0,
    c, r2, each (R,)."""
    ns = np.asarray(ns, dtype=float)
    mus = np.atleast_2d(np.asarray(mus, dtype=float))
    if np.any(mus <= 0) or not np.all(np.isfinite(mus)):
        raise ValueError("mu(n) must be positive and finite to fit a power law")
    log_mu = np.log(mus)
    n_curves = log_mu.shape[0]

    # Start: best N0 of the candidate grid, all curves at once.
    candidates = _power_law_candidates(ns)
    x = np.log(ns[None, :] + candidates[:, None])  # (C, G)
    xc = x - x.mean(axis=1, keepdims=True)
    yc = log_mu - log_mu.mean(axis=1, keepdims=True)
    sxx = (xc * xc).sum(axis=1)  # (C,)
    sxy = yc @ xc.T  # (R, C)
    sse = (yc * yc).sum(axis=1)[:, None] - sxy * sxy / sxx[None, :]
    n0 = candidates[np.argmin(sse, axis=1)]

    scale = float(ns.max())
    s, ds, _, _ = _profile_gradient(ns, n0, log_mu)
    active = np.ones(n_curves, dtype=bool)
    for _ in range(iterations):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        t, s_t, g_t = n0[idx], s[idx], ds[idx]
        h = 1e-5 * (t + 1e-3 * scale)
        _, g_plus, _, _ = _profile_gradient(ns, t + h, log_mu[idx])
        curvature = (g_plus - g_t) / h
        # Newton where S is locally convex, otherwise a gradient step of one
        # unit of the current scale of N0 (the halving below sizes it).
        newton = curvature > 0
        step = np.where(newton, -g_t / np.where(newton, curvature, 1.0),
                        -np.sign(g_t) * (t + 1e-3 * scale))
        # At the bound with the gradient pointing outward: converged.
        at_bound = (t <= 0.0) & (g_t > 0)
        step[at_bound] = 0.0
        accepted = np.zeros(idx.size, dtype=bool)
        new_t, new_s, new_g = t.copy(), s_t.copy(), g_t.copy()
        trial = step.copy()
        for _ in range(40):
            pending = ~accepted & (trial != 0.0)
            if not pending.any():
                break
            p = np.flatnonzero(pending)
            cand = np.maximum(t[p] + trial[p], 0.0)
            s_c, g_c, _, _ = _profile_gradient(ns, cand, log_mu[idx[p]])
            ok = s_c <= s_t[p] * (1.0 + 1e-15) + 1e-300
            new_t[p[ok]], new_s[p[ok]], new_g[p[ok]] = cand[ok], s_c[ok], g_c[ok]
            accepted[p[ok]] = True
            trial[p[~ok]] *= 0.5
        moved = np.abs(new_t - t)
        n0[idx], s[idx], ds[idx] = new_t, new_s, new_g
        done = (moved <= 1e-13 * (t + 1e-6 * scale)) | at_bound | ~accepted
        active[idx[done]] = False

    _, _, lc, alpha = _profile_gradient(ns, n0, log_mu)
    ss_tot = (yc * yc).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - s / ss_tot, 1.0)
    return alpha, n0, np.exp(lc), r2


def _delta_n(n_k: int, grid: np.ndarray, curves: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Δn@10% from the power-law fit for each resampled curve; NaN where
    there is none (Mean <= 0, the curve not positive or not decreasing, or a
    decay too slow for a finite Δn) -- the same rules as saturation()."""
    out = np.full(curves.shape[0], np.nan)
    if grid.size < 3:
        return out
    finite = np.all(np.isfinite(curves), axis=1)
    positive = np.all(curves > 0, axis=1)
    with np.errstate(invalid="ignore"):
        increasing = np.any(np.diff(curves, axis=1) > _INCREASE_RTOL * np.abs(curves[:, :-1]), axis=1)
    valid = (means > 0) & finite & positive & ~increasing
    if not valid.any():
        return out
    alpha, n0, _, _ = fit_power_law_batch(grid, curves[valid])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        dn = (n_k + n0) * TARGET_FRACTION ** (-1.0 / alpha) - n0 - n_k
    dn[~np.isfinite(dn)] = np.nan
    out[valid] = dn
    return out


def _ranks(means: np.ndarray) -> np.ndarray:
    """Per resample (rows), rank 1 = largest Mean, ties in domain order --
    dowsing.kernels.metrics.ranks_by_mean, vectorised."""
    order = np.argsort(-means, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(means.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, means.shape[1] + 1)[None, :]
    return ranks


def bootstrap_domains(domains: list[DomainKernels], n_resamples: int = 200, level: float = 0.90,
                      seed: int = 0) -> BootstrapResult:
    """Bootstrap over each domain's facts, conditional on the curvature.

    Each resample draws every domain's counts m_k ~ Multinomial(N_k, 1/N_k)
    independently (one numpy Generator seeded with seed, domains in order),
    and computes per domain
      Mean_k  = m_k^T K_k[N_k] m_k / N_k^2,
      Share_k = |N_k Mean_k| / sum_j |N_j Mean_j| * 100 (metrics.shares_pct);
                its interval is the percentile interval of the signed share
                N_k Mean_k / sum_j |N_j Mean_j| * 100 mapped through |x|
                (magnitude_interval), so it reaches 0 when the sign is unsure,
      Rank_k  (1 = largest Mean, metrics.ranks_by_mean),
      Δn@10%  = (N_k + N0)(0.1^(-1/alpha)) - N0 - N_k from the power law fitted
                to the resampled curve mu_m(n_g) (saturation.fit_power_law's
                optimum, by fit_power_law_batch).
    Intervals are percentile intervals at `level`. The Δn interval is None
    when fewer than MIN_DELTA_N_FRACTION of the resamples have a Δn.
    rank_probabilities[r-1] = P(domain holds rank r); rank_stable when the
    largest of them is >= RANK_STABLE_PROBABILITY. curve_band gives
    (n_g, low, high) of mu_m(n_g) for the curves' band.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError("n_resamples must be positive")
    rng = np.random.default_rng(seed)
    n_domains = len(domains)
    means = np.empty((n_resamples, n_domains))
    curves_by_domain = []
    for k, domain in enumerate(domains):
        grid = np.asarray(domain.grid, dtype=float)
        kernels = np.asarray(domain.kernels, dtype=float)
        n_k = int(domain.n_k)
        if kernels.shape != (grid.size, n_k, n_k):
            raise ValueError(f"{domain.name}: kernels have shape {kernels.shape}, "
                             f"expected {(grid.size, n_k, n_k)}")
        at_n_k = np.flatnonzero(grid == n_k)
        if at_n_k.size != 1:
            raise ValueError(f"{domain.name}: the grid must contain n_k = {n_k} exactly once")
        counts = rng.multinomial(n_k, np.full(n_k, 1.0 / n_k), size=n_resamples)
        curves = resampled_curves(kernels, counts)
        curves_by_domain.append(curves)
        means[:, k] = curves[:, at_n_k[0]]

    sizes = np.array([int(d.n_k) for d in domains], dtype=float)
    totals_k = means * sizes[None, :]
    denominators = np.abs(totals_k).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Signed: Share_k is the magnitude of this; see magnitude_interval.
        signed_shares = np.where(denominators > 0, totals_k / denominators * 100.0, 0.0)
    ranks = _ranks(means)

    out = []
    for k, domain in enumerate(domains):
        grid = np.asarray(domain.grid, dtype=float)
        curves = curves_by_domain[k]
        rank_probabilities = [float(np.mean(ranks[:, k] == r)) for r in range(1, n_domains + 1)]
        most_likely = int(np.argmax(rank_probabilities)) + 1
        dn = _delta_n(int(domain.n_k), grid, curves, means[:, k])
        has_dn = np.isfinite(dn)
        dn_fraction = float(has_dn.mean())
        dn_interval = None
        if dn_fraction >= MIN_DELTA_N_FRACTION:
            lo, hi = percentile_interval(dn[has_dn], level)
            dn_interval = (float(lo), float(hi))
        band = percentile_interval(curves, level, axis=0)
        out.append(DomainUncertainty(
            name=domain.name,
            n_k=int(domain.n_k),
            mean_interval=tuple(float(v) for v in percentile_interval(means[:, k], level)),
            share_pct_interval=magnitude_interval(*(float(v) for v in percentile_interval(signed_shares[:, k], level))),
            delta_n_10pct_interval=dn_interval,
            delta_n_fraction=dn_fraction,
            rank_probabilities=rank_probabilities,
            most_likely_rank=most_likely,
            rank_stable=bool(rank_probabilities[most_likely - 1] >= RANK_STABLE_PROBABILITY),
            curve_band=[(float(n), float(lo), float(hi)) for n, lo, hi in zip(grid, band[0], band[1])],
        ))
    return BootstrapResult(n_resamples=int(n_resamples), level=float(level), seed=int(seed), domains=out)


@dataclass
class PriorityBootstrap:
    """Bootstrap of a ranking estimator's priorities (per domain, in domain
    order): percentile intervals at `level`, rank probabilities and stability."""

    n_resamples: int
    level: float
    seed: int
    priority_interval: list  # per domain (lo, hi)
    share_pct_interval: list  # per domain (lo, hi)
    rank_probabilities: list  # per domain, P(rank r) for r = 1..K
    most_likely_rank: list
    rank_stable: list
    rank_stable_probability: float = RANK_STABLE_PROBABILITY

    def to_dict(self) -> dict:
        return {
            "n_resamples": int(self.n_resamples),
            "level": float(self.level),
            "seed": int(self.seed),
            "rank_stable_probability": float(self.rank_stable_probability),
            "priority_interval": [_pair(i) for i in self.priority_interval],
            "share_pct_interval": [_pair(i) for i in self.share_pct_interval],
            "rank_probabilities": [[float(p) for p in row] for row in self.rank_probabilities],
            "most_likely_rank": [int(r) for r in self.most_likely_rank],
            "rank_stable": [bool(s) for s in self.rank_stable],
        }


def bootstrap_priorities(per_fact: list, n_resamples: int = 200, level: float = 0.90,
                         seed: int = 0) -> PriorityBootstrap:
    """Bootstrap over each domain's facts of a priority that is the mean of
    per-fact values x_ki (priority_k = mean_i x_ki).

    One numpy Generator seeded with `seed` draws, domain by domain, an
    (n_resamples, N_k) array of fact indices uniformly with replacement
    (rng.integers(0, N_k, size=(n_resamples, N_k))); resample r has
      priority_k(r) = mean_j x_k[idx_r,j],
      signed share_k(r) = priority_k(r) / sum_j |priority_j(r)| * 100 (0 when
                          all are 0); Share's interval is the percentile
                          interval of the signed share mapped through |x|
                          (magnitude_interval), as the paper's bootstrap does,
      rank_k(r) = rank by priority, descending, ties in domain order
                  (metrics.ranks_by_mean).
    Intervals are percentile intervals (percentile_interval) at `level`.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError("n_resamples must be positive")
    rng = np.random.default_rng(seed)
    n_domains = len(per_fact)
    priorities = np.empty((n_resamples, n_domains))
    for k, values in enumerate(per_fact):
        values = np.asarray(values, dtype=float)
        if values.ndim != 1 or values.size < 1:
            raise ValueError(f"domain {k}: per-fact values must be a non-empty list")
        idx = rng.integers(0, values.size, size=(n_resamples, values.size))
        priorities[:, k] = values[idx].mean(axis=1)
    denominators = np.abs(priorities).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        signed_shares = np.where(denominators > 0, priorities / denominators * 100.0, 0.0)
    ranks = _ranks(priorities)
    priority_interval, share_interval, probabilities, most_likely, stable = [], [], [], [], []
    for k in range(n_domains):
        lo, hi = percentile_interval(priorities[:, k], level)
        priority_interval.append((float(lo), float(hi)))
        share_interval.append(magnitude_interval(*(float(v) for v in percentile_interval(signed_shares[:, k], level))))
        probs = [float(np.mean(ranks[:, k] == r)) for r in range(1, n_domains + 1)]
        probabilities.append(probs)
        best = int(np.argmax(probs)) + 1
        most_likely.append(best)
        stable.append(bool(probs[best - 1] >= RANK_STABLE_PROBABILITY))
    return PriorityBootstrap(int(n_resamples), float(level), int(seed), priority_interval, share_interval,
                             probabilities, most_likely, stable)
