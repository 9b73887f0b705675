"""Saturation fits, Δn and the paper's metrics against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.kernels import metrics
from dowsing.kernels.saturation import (DenseSystem, LowRankSystem, delta_n_from_fit, delta_n_on_curve, fit_power_law,
                                mu_function, n_grid, pencil_spectrum, resampling_kernels, saturation)


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


def _pencil_case(seed, dim=40, rank=15, base_shift=0.5, negative_d=0, duplicates=0):
    """B = H + base_shift I (indefinite for a negative shift), U with `duplicates`
    repeated rows (P singular), d with `negative_d` negative entries."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    base = a @ a.T / dim + base_shift * torch.eye(dim, dtype=torch.float64)
    u = torch.randn(rank, dim, generator=gen, dtype=torch.float64)
    u[rank - duplicates:] = u[:duplicates]
    d = torch.rand(rank, generator=gen, dtype=torch.float64) + 0.05
    d[:negative_d] *= -1.0
    return base, u, d, u.T @ (u * d.unsqueeze(-1))


# (case, which eigendecomposition the spectrum takes)
PENCIL_CASES = [
    (dict(), "symmetric"),
    (dict(base_shift=-0.6), "symmetric"),  # indefinite B, P indefinite
    (dict(negative_d=15), "symmetric"),  # every token of negative curvature
    (dict(duplicates=5), "symmetric"),  # P exactly singular
    (dict(negative_d=4), "general"),
    (dict(base_shift=-0.6, negative_d=4), "general"),  # B and d both indefinite, as with the exact Hessian
    (dict(negative_d=4, duplicates=3), "general"),  # and P singular
]


@pytest.mark.parametrize("case,how", PENCIL_CASES)
def test_pencil_spectrum_is_the_inner_inverse(case, how):
    base, u, d, _ = _pencil_case(3, **case)
    p = u @ torch.linalg.solve(base, u.T)
    spectrum = pencil_spectrum(p, d)
    assert spectrum.how == how
    pn, dn = p.numpy(), np.diag(d.numpy())
    for c in (-0.09, -1e-3, 0.0, 0.05, 2.0, 300.0):
        want = c * np.linalg.solve(np.eye(len(d)) + c * dn @ pn, dn)  # c (I + c D P)^-1 D
        got = ((spectrum.v * spectrum.weights(c)) @ spectrum.right(torch.eye(len(d), dtype=torch.float64))).real
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10 * max(np.abs(want).max(), 1e-300))


@pytest.mark.parametrize("case,how", PENCIL_CASES)
def test_forms_and_mu_equal_dense_and_woodbury_solves(case, how):
    """The kernels and mu(n) on the grid and between its points, against the
    dense solve and against one Woodbury solve per n, with the spectral form
    in use."""
    base, u, d, hbar = _pencil_case(4, **case)
    n_k, n_total = 9, 60
    grads = torch.randn(n_k, base.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = grads.mean(0)
    grid = n_grid(n_k, 24, 1000.0)
    low, dense = LowRankSystem(base, u, d, n_k, n_total), DenseSystem(base, hbar, n_k, n_total)
    forms = low.forms(grid, grads)
    assert low.spectral(grid, grads) and low.spectrum.how == how
    by_dense = np.stack([(grads @ torch.linalg.solve(base + (n - n_k) / n_total * hbar, grads.T)).numpy()
                         for n in grid])
    by_woodbury = np.stack([(grads @ low.solve(float(n), grads.T)).numpy() for n in grid])
    for want in (by_dense, by_woodbury):
        for got_q, want_q in zip(forms, want):
            assert np.linalg.norm(got_q - want_q) <= 1e-9 * np.linalg.norm(want_q)
    assert np.array_equal(resampling_kernels(low, grads, grid), forms)
    np.testing.assert_allclose(dense.forms(grid, grads), by_dense, rtol=1e-12)
    mu = mu_function(low, g, grid)
    for n in list(grid) + [0.5 * (grid[3] + grid[4]), 1234.5]:
        want = float(g @ torch.linalg.solve(base + (n - n_k) / n_total * hbar, g))
        assert mu(float(n)) == pytest.approx(want, rel=1e-9, abs=1e-12 * abs(float(g @ g)))


def test_defective_pencil_falls_back_to_woodbury_solves():
    """Two tokens with the same input and opposite curvature make diag(d) P
    defective (a Jordan block at 0), so its eigenvectors are no basis: the
    check at the ends rejects the spectral form and every n is today's
    Woodbury solve, which still equals the dense solve."""
    base, u, d, _ = _pencil_case(10, negative_d=4)
    u[1], d[1] = u[0], -d[0]
    hbar = u.T @ (u * d.unsqueeze(-1))
    n_k, n_total = 9, 60
    grads = torch.randn(n_k, base.shape[0], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    grid = n_grid(n_k, 24, 1000.0)
    low = LowRankSystem(base, u, d, n_k, n_total)
    forms = low.forms(grid, grads)
    assert not low.spectral(grid, grads)
    assert np.array_equal(forms, np.stack([(grads @ low.solve(float(n), grads.T)).numpy() for n in grid]))
    for q, n in enumerate(grid):
        want = (grads @ torch.linalg.solve(base + (n - n_k) / n_total * hbar, grads.T)).numpy()
        assert np.linalg.norm(forms[q] - want) <= 1e-9 * np.linalg.norm(want)
    g = grads.mean(0)
    assert mu_function(low, g, grid)(50.0) == float(g @ low.solve(50.0, g))


def test_near_singular_curvature_on_the_grid():
    """A(n) nearly singular at a grid point (1 + c lam ~ 1e-7 for one
    eigenvalue): the spectral kernels still equal the dense solve's, to the
    accuracy the conditioning allows (cond ~ 1e8, so 1e-6)."""
    base, u, d, hbar = _pencil_case(6, negative_d=15)
    n_k, n_total = 9, 60
    grid = n_grid(n_k, 24, 1000.0)
    spectrum = pencil_spectrum(u @ torch.linalg.solve(base, u.T), d)
    lam = spectrum.lam[spectrum.lam < 0]
    # move the curvature so that c at grid[20] sits just off the pole -1/lam of the most negative lam
    c = (grid[20] - n_k) / n_total
    scale = float(-1.0 / (c * lam.min())) * (1 - 1e-7)
    d, hbar = d * scale, hbar * scale
    grads = torch.randn(n_k, base.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    low = LowRankSystem(base, u, d, n_k, n_total)
    forms = low.forms(grid, grads)
    assert low.spectral(grid, grads)
    for q, n in enumerate(grid):
        a_n = base + (n - n_k) / n_total * hbar
        want = (grads @ torch.linalg.solve(a_n, grads.T)).numpy()
        rtol = 1e-6 if q == 20 else 1e-9
        assert np.linalg.norm(forms[q] - want) <= rtol * np.linalg.norm(want)


def _engine_case(seed, negative_d=0.0, others_shift=0.0, offset=False, dim=40, rank=15, n_k=9, n_total=60):
    """As the engine builds it: B = (other domains' curvature + N_k Hbar)/M + lambda I,
    so A(n) = (others + n Hbar)/M + lambda I; `negative_d` of the token
    curvatures are scaled by -`negative_d`, `others_shift` moves the other
    domains' curvature (indefinite when negative); `offset` gives three tokens
    the inputs of three others and -0.3 times their curvature, so d has both
    signs while Hbar stays positive semi-definite."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    others = (a @ a.T / dim + others_shift * torch.eye(dim, dtype=torch.float64)) * 0.2 * (n_total - n_k)
    u = torch.randn(rank, dim, generator=gen, dtype=torch.float64)
    d = torch.rand(rank, generator=gen, dtype=torch.float64) + 0.05
    d[:3] *= -negative_d if negative_d else 1.0
    if offset:
        u[:3], d[:3] = u[3:6], -0.3 * d[3:6]
    hbar = u.T @ (u * d.unsqueeze(-1))
    base = (others + n_k * hbar) / n_total + 1e-3 * torch.eye(dim, dtype=torch.float64)
    # gradients mostly in the span of the domain's tokens, so mu(n) falls to 10% on the grid
    grads = (torch.randn(n_k, rank, generator=gen, dtype=torch.float64) + 1.0) @ u \
        + 0.1 * torch.randn(n_k, dim, generator=gen, dtype=torch.float64)
    return base, u, d, grads, n_k, n_total


# (case, the spectrum's kind, whether the curve has a fit)
SATURATION_CASES = [(dict(), "symmetric", True), (dict(offset=True), "general", True),
                    (dict(negative_d=0.5, others_shift=-0.3), "general", False)]


@pytest.mark.parametrize("case,how,fitted", SATURATION_CASES)
def test_saturation_from_forms_equals_saturation_by_solves(case, how, fitted):
    """Every number saturation() reports, from the grid values of the forms and
    the spectral mu, against mu by one Woodbury solve per n."""
    base, u, d, grads, n_k, n_total = _engine_case(12, **case)
    g = grads.mean(0)
    grid = n_grid(n_k, 24, 1000.0)
    mean = float(g @ torch.linalg.solve(base, g))
    by_solves = saturation(lambda n: float(g @ LowRankSystem(base, u, d, n_k, n_total).solve(n, g)), n_k, mean,
                           24, 1000.0)
    low = LowRankSystem(base, u, d, n_k, n_total)
    forms = low.forms(grid, torch.vstack([grads, g.unsqueeze(0)]))
    assert low.spectral(grid, grads) and low.spectrum.how == how
    got = saturation(mu_function(low, g, grid), n_k, mean, 24, 1000.0, mus=forms[:, -1, -1])
    assert (got["alpha"] is not None) == fitted and (got["delta_n_direct"] is not None) == fitted
    assert got["reason"] == by_solves["reason"]
    for key in ("alpha", "n0", "c", "r2", "delta_n_10pct", "delta_n_direct"):
        if by_solves[key] is None:
            assert got[key] is None
        else:
            assert got[key] == pytest.approx(by_solves[key], rel=1e-8, abs=1e-8 * grid[0] if key == "n0" else 0.0)
    np.testing.assert_allclose(np.array(got["points"]), np.array(by_solves["points"]), rtol=1e-10)


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
