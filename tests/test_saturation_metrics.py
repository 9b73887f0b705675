"""Saturation fits, Δn and the paper's metrics against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.kernels import metrics
from dowsing.kernels.saturation import (DenseSystem, LowRankSystem, delta_n_from_fit, delta_n_on_curve, fit_power_law,
                                mu_function, n_grid, resampling_kernels, saturation)


@pytest.mark.parametrize("c,n0,alpha", [(2.0, 0.0, 1.0), (0.37, 12.5, 0.6), (5e-3, 300.0, 1.7)])
def test_fit_recovers_known_power_law(c, n0, alpha):
    ns = n_grid(30, 24, 1000.0)
    mus = c * (ns + n0) ** (-alpha)
    fit = fit_power_law(ns, mus)
    assert fit.alpha == pytest.approx(alpha, rel=1e-4)
    assert fit.c == pytest.approx(c, rel=1e-3)
    assert fit.n0 == pytest.approx(n0, rel=1e-3, abs=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)


def test_delta_n_formula_reaches_ten_percent_and_matches_the_curve_root():
    c, n0, alpha, n = 1.3, 40.0, 0.8, 30
    dn = delta_n_from_fit(n, n0, alpha)

    def mu(x):
        return c * (x + n0) ** (-alpha)

    assert mu(n + dn) == pytest.approx(0.1 * mu(n), rel=1e-12)
    ns = n_grid(n, 24, 1000.0)
    direct = delta_n_on_curve(mu, n, ns, np.array([mu(x) for x in ns]))
    assert direct == pytest.approx(dn, rel=1e-8)


def test_n_grid_spans_the_range_and_holds_n():
    ns = n_grid(33, 24, 1000.0)
    assert ns[0] == pytest.approx(3.3) and ns[-1] == pytest.approx(33000.0)
    assert 33.0 in ns and len(ns) >= 20 and np.all(np.diff(ns) > 0)


def _systems(seed, dim=12, rank=5, indefinite=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    h = a @ a.T / dim
    u = torch.randn(rank, dim, generator=gen, dtype=torch.float64)
    d = torch.rand(rank, generator=gen, dtype=torch.float64)
    if indefinite:
        d[0] = -0.3
    base = h + 0.5 * torch.eye(dim, dtype=torch.float64)
    hbar = u.T @ (u * d.unsqueeze(-1))
    return base, u, d, hbar


@pytest.mark.parametrize("indefinite", [False, True])
def test_low_rank_system_equals_dense_system(indefinite):
    base, u, d, hbar = _systems(1, indefinite=indefinite)
    n_k, n_total = 20, 80
    dense, low = DenseSystem(base, hbar, n_k, n_total), LowRankSystem(base, u, d, n_k, n_total)
    rhs = torch.randn(12, 4, dtype=torch.float64)
    for n in (2.0, 20.0, 150.0, 4000.0):
        assert torch.allclose(low.solve(n, rhs), dense.solve(n, rhs), rtol=1e-9, atol=1e-12)
        assert torch.allclose(low.solve(n, rhs[:, 0]), dense.solve(n, rhs[:, 0]), rtol=1e-9, atol=1e-12)


def test_mu_at_current_n_is_the_mean_and_kernels_average_to_mu():
    base, u, d, hbar = _systems(2)
    grads = torch.randn(7, 12, dtype=torch.float64)
    g = grads.mean(0)
    system = LowRankSystem(base, u, d, 7, 30)
    mu = mu_function(system, g)
    assert mu(7) == pytest.approx(float(g @ torch.linalg.solve(base, g)), rel=1e-10)
    grid = n_grid(7, 20, 1000.0)
    kernels = resampling_kernels(system, grads, grid)
    for q, n in enumerate(grid):
        assert kernels[q].mean() == pytest.approx(mu(float(n)), rel=1e-9)


def test_saturation_gives_reasons_instead_of_numbers():
    negative = saturation(lambda n: -1.0 / n, 10, -0.1, 20, 1000.0)
    assert negative["delta_n_10pct"] is None and "not positive" in negative["reason"]
    rising = saturation(lambda n: 1.0 + n * 1e-3, 10, 1.01, 20, 1000.0)
    assert rising["delta_n_10pct"] is None and "from the start" in rising["reason"]
    # Falls to about a third of today's value, then rises (as an indefinite H_bar_k allows).
    dip = saturation(lambda n: 1.0 / n if n < 40 else 0.025 + (n - 40) * 1e-2, 10, 0.1, 20, 1000.0)
    ns = np.array([n for n, _ in dip["points"]])
    last_fall = ns[ns < 40].max()
    assert dip["delta_n_10pct"] is None
    assert f"n ≈ {last_fall:.3g}" in dip["reason"] and f"{100 * (1 / last_fall) / 0.1:.0f}% of today" in dip["reason"]
    slow = saturation(lambda n: (n + 5.0) ** -0.002, 10, 15.0 ** -0.002, 20, 1000.0)
    assert slow["alpha"] == pytest.approx(0.002, rel=1e-6) and slow["delta_n_10pct"] is None
    assert "too slow" in slow["reason"]
    fine = saturation(lambda n: 2.0 * (n + 5.0) ** -1.2, 10, 2.0 * 15.0 ** -1.2, 20, 1000.0)
    assert fine["reason"] is None
    assert fine["delta_n_10pct"] == pytest.approx(delta_n_from_fit(10, 5.0, 1.2), rel=1e-4)
    assert fine["delta_n_direct"] == pytest.approx(fine["delta_n_10pct"], rel=1e-4)


def test_t_vs_rest_is_welch_from_scipy():
    rng = np.random.default_rng(0)
    groups = [rng.normal(0.3, 1.0, 25), rng.normal(0.0, 2.0, 30), rng.normal(-0.1, 0.5, 28)]
    got = metrics.t_vs_rest(groups)
    for k, (t, p) in enumerate(got):
        rest = np.concatenate([g for j, g in enumerate(groups) if j != k])
        # Welch's t by hand, independent of the code under test
        a, b = groups[k], rest
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        assert t == pytest.approx((a.mean() - b.mean()) / se, rel=1e-10)
        assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    assert metrics.t_vs_rest([np.array([1.0, 2.0])]) == [(None, None)]


def test_shares_sum_to_100_with_negative_influence_and_ranks_follow_means():
    totals = [3.0, -1.0, 0.5, -0.5]
    shares = metrics.shares_pct(totals)
    assert sum(shares) == pytest.approx(100.0)
    assert shares[1] == pytest.approx(20.0)
    assert metrics.ranks_by_mean([0.1, 2.0, -1.0, 0.1]) == [2, 1, 4, 3]
