"""Bootstrap uncertainty on synthetic kernels with a
known population."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from dowsing.kernels.metrics import shares_pct
from dowsing.kernels.saturation import delta_n_from_fit, fit_power_law, n_grid
from dowsing.kernels.uncertainty import (RANK_STABLE_PROBABILITY, DomainKernels, _profile_gradient,
                                 bootstrap_domains, fit_power_law_batch, magnitude_interval,
                                 resampled_curves)


def population_domain(name, n_k, rng, mu_g, a_inv):
    """n_k gradients g_i ~ N(mu_g, I); one kernel at n = n_k. The population
    Mean is mu_g^T A^-1 mu_g (plus tr(A^-1)/n_k of bias in the estimate)."""
    grads = mu_g + rng.normal(size=(n_k, mu_g.size))
    return DomainKernels(name, n_k, np.array([float(n_k)]), (grads @ a_inv @ grads.T)[None])


def engine_like_domain(name, n_k, rng, shift=1.0, dim=6, n_total=200):
    """Kernels as the engine builds them: A(n) = B + (n - N_k)/M Hbar with
    B = (other domains' curvature + N_k Hbar)/M + lambda I, so A(n) is
    positive definite for n >= 0 and mu(n) decreases and saturates."""
    grid = n_grid(n_k, 24, 10.0)
    grads = rng.normal(size=dim) * shift + rng.normal(size=(n_k, dim))
    q = rng.normal(size=(dim, dim))
    others = q @ q.T / dim
    q = rng.normal(size=(dim, dim))
    hbar = q @ q.T / dim
    base = others + n_k / n_total * hbar + 0.1 * np.eye(dim)
    kernels = np.stack([grads @ np.linalg.solve(base + (n - n_k) / n_total * hbar, grads.T) for n in grid])
    return DomainKernels(name, n_k, grid, kernels), grads, base, hbar, n_total


def test_all_ones_counts_give_the_full_sample_mean():
    rng = np.random.default_rng(0)
    domain, grads, base, hbar, n_total = engine_like_domain("d", 17, rng)
    curve = resampled_curves(domain.kernels, np.ones((1, 17)))[0]
    g_bar = grads.mean(axis=0)
    direct = [g_bar @ np.linalg.solve(base + (n - 17) / n_total * hbar, g_bar) for n in domain.grid]
    np.testing.assert_allclose(curve, direct, rtol=1e-10)
    np.testing.assert_allclose(curve, domain.kernels.mean(axis=(1, 2)), rtol=1e-12)


def test_resampled_curve_is_the_resampled_mean_gradient():
    rng = np.random.default_rng(1)
    domain, grads, base, hbar, n_total = engine_like_domain("d", 11, rng)
    counts = rng.multinomial(11, np.full(11, 1 / 11), size=3)
    curves = resampled_curves(domain.kernels, counts)
    for m, curve in zip(counts, curves):
        g_m = m @ grads / 11
        direct = [g_m @ np.linalg.solve(base + (n - 11) / n_total * hbar, g_m) for n in domain.grid]
        np.testing.assert_allclose(curve, direct, rtol=1e-10)


def test_mean_interval_covers_the_population_mean_at_the_stated_rate():
    # 300 independent domains in one call: each domain's counts are drawn
    # independently, so each Mean interval is its own repetition.
    rng = np.random.default_rng(2)
    mu_g = np.array([1.5, -1.0, 0.5])
    a_inv = np.linalg.inv(np.diag([1.0, 2.0, 0.5]))
    truth = mu_g @ a_inv @ mu_g
    domains = [population_domain(f"d{i}", 40, rng, mu_g, a_inv) for i in range(300)]
    result = bootstrap_domains(domains, n_resamples=200, level=0.90, seed=3)
    covered = [d.mean_interval[0] <= truth <= d.mean_interval[1] for d in result.domains]
    assert 0.82 <= np.mean(covered) <= 0.97


def test_intervals_shrink_as_n_k_grows():
    rng = np.random.default_rng(4)
    mu_g = np.array([1.0, 0.5])
    a_inv = np.eye(2)

    def mean_width(n_k):
        domains = [population_domain(f"d{i}", n_k, rng, mu_g, a_inv) for i in range(20)]
        result = bootstrap_domains(domains, n_resamples=200, seed=5)
        return np.mean([d.mean_interval[1] - d.mean_interval[0] for d in result.domains])

    # Width ~ 1/sqrt(n_k): 16x the facts, about a quarter of the width.
    assert mean_width(320) < 0.4 * mean_width(20)


def test_rank_probabilities_sum_to_one_per_domain_and_per_rank():
    rng = np.random.default_rng(6)
    domains = [engine_like_domain(f"d{k}", 20, rng, shift=0.6)[0] for k in range(4)]
    result = bootstrap_domains(domains, n_resamples=200, seed=0)
    probs = np.array([d.rank_probabilities for d in result.domains])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0)
    for d in result.domains:
        assert 0.0 <= d.share_pct_interval[0] <= d.share_pct_interval[1] <= 100.0


def test_separated_domains_are_rank_stable_and_an_overlapping_pair_is_not():
    rng = np.random.default_rng(7)
    a_inv = np.eye(3)
    separated = [population_domain(f"d{k}", 40, rng, np.array([1.0, 0.0, 0.0]) * (1 + 2 * k), a_inv)
                 for k in range(3)]
    result = bootstrap_domains(separated, n_resamples=200, seed=0)
    assert all(d.rank_stable for d in result.domains)
    assert [d.most_likely_rank for d in result.domains] == [3, 2, 1]

    mu_g = np.array([2.0, 0.0, 0.0])
    pair = [population_domain("a", 40, rng, mu_g, a_inv), population_domain("b", 40, rng, mu_g, a_inv)]
    result = bootstrap_domains(pair, n_resamples=200, seed=0)
    assert not any(d.rank_stable for d in result.domains)
    assert max(result.domains[0].rank_probabilities) < RANK_STABLE_PROBABILITY


def test_deterministic_under_the_seed_and_json_ready():
    rng = np.random.default_rng(8)
    domains = [engine_like_domain(f"d{k}", 15, rng, shift=1 + k)[0] for k in range(3)]
    first = bootstrap_domains(domains, n_resamples=50, seed=11).to_dict()
    again = bootstrap_domains(domains, n_resamples=50, seed=11).to_dict()
    other = bootstrap_domains(domains, n_resamples=50, seed=12).to_dict()
    assert first == again
    assert first != other
    assert json.loads(json.dumps(first, allow_nan=False)) == first


def test_delta_n_interval_around_the_point_estimate():
    rng = np.random.default_rng(9)
    domain = engine_like_domain("d", 33, rng, shift=2.0)[0]
    result = bootstrap_domains([domain], n_resamples=200, seed=0).domains[0]
    assert result.delta_n_fraction == 1.0
    point = resampled_curves(domain.kernels, np.ones((1, 33)))[0]
    fit = fit_power_law(domain.grid, point)
    dn = delta_n_from_fit(33, fit.n0, fit.alpha)
    low, high = result.delta_n_10pct_interval
    assert low <= dn <= high
    assert len(result.curve_band) == domain.grid.size
    assert all(lo <= mu <= hi for (_, lo, hi), mu in zip(result.curve_band, point))


def test_no_delta_n_when_the_mean_is_negative():
    rng = np.random.default_rng(10)
    domain = engine_like_domain("d", 20, rng)[0]
    negative = DomainKernels("neg", 20, domain.grid, -domain.kernels)
    result = bootstrap_domains([negative, domain], n_resamples=50, seed=0)
    assert result.domains[0].delta_n_fraction == 0.0
    assert result.domains[0].delta_n_10pct_interval is None
    assert result.domains[0].mean_interval[1] < 0
    assert result.to_dict()["domains"][0]["delta_n_10pct_interval"] is None


def test_grid_must_contain_n_k():
    rng = np.random.default_rng(11)
    domain = engine_like_domain("d", 20, rng)[0]
    with pytest.raises(ValueError):
        bootstrap_domains([DomainKernels("d", 20, domain.grid + 0.5, domain.kernels)])


def _fit_curves():
    ns = n_grid(33, 24, 10.0)
    rng = np.random.default_rng(12)
    curves = [
        2.0 * (ns + 5.0) ** -0.7,                                 # exact power law
        3.0 * (ns + 40.0) ** -1.3 * (1 + 0.01 * np.sin(ns)),      # wiggle
        0.5 * ns ** -0.4 * np.exp(0.005 * rng.normal(size=ns.size)),  # N0 near the bound
    ]
    for k in range(3):
        domain = engine_like_domain(f"d{k}", 33, rng, shift=1 + k)[0]
        curves.append(resampled_curves(domain.kernels, np.ones((1, 33)))[0])
    return ns, np.array(curves)


def test_batch_fit_matches_fit_power_law():
    ns, curves = _fit_curves()
    alpha, n0, c, r2 = fit_power_law_batch(ns, curves)
    for i, curve in enumerate(curves):
        ref = fit_power_law(ns, curve)
        assert alpha[i] == pytest.approx(ref.alpha, rel=1e-6)
        assert c[i] == pytest.approx(ref.c, rel=1e-6)
        assert abs(n0[i] - ref.n0) <= 1e-6 * (ref.n0 + 1e-3 * ns.max())
        assert r2[i] == pytest.approx(ref.r2, rel=1e-6, abs=1e-9)
        ref_dn = delta_n_from_fit(33, ref.n0, ref.alpha)
        assert delta_n_from_fit(33, n0[i], alpha[i]) == pytest.approx(ref_dn, rel=1e-6)
        # Never a worse least-squares optimum than scipy's. For an exact power
        # law both sums of squares are rounding noise: the slack is one
        # rounding error of log mu per grid point, squared and summed.
        ours, _, _, _ = _profile_gradient(ns, n0[i:i + 1], np.log(curve[None]))
        theirs, _, _, _ = _profile_gradient(ns, np.array([ref.n0]), np.log(curve[None]))
        rounding = ns.size * (4 * np.finfo(float).eps * np.abs(np.log(curve)).max()) ** 2
        assert ours[0] <= theirs[0] * (1 + 1e-9) + rounding


def test_batch_fit_rejects_non_positive_curves():
    with pytest.raises(ValueError):
        fit_power_law_batch(np.array([1.0, 2.0, 3.0]), np.array([[1.0, 0.0, -1.0]]))


def test_bootstrap_is_fast_enough_for_the_default_size():
    rng = np.random.default_rng(13)
    domains = [engine_like_domain(f"d{k}", 33, rng, shift=1 + k)[0] for k in range(4)]
    assert domains[0].grid.size == 25
    start = time.perf_counter()
    bootstrap_domains(domains, n_resamples=200)
    assert time.perf_counter() - start < 5.0


def test_magnitude_interval_is_the_image_under_abs():
    assert magnitude_interval(-2.0, 5.0) == (0.0, 5.0)
    assert magnitude_interval(-5.0, 2.0) == (0.0, 5.0)
    assert magnitude_interval(1.0, 3.0) == (1.0, 3.0)
    assert magnitude_interval(-3.0, -1.0) == (1.0, 3.0)


def test_share_interval_of_a_domain_whose_sign_is_unsure_reaches_zero_and_holds_the_estimate():
    """With indefinite curvature a domain's Mean can straddle 0. A percentile
    interval of |share| would then lie wholly above the point estimate; the
    interval must hold the full-sample share and start at 0."""
    rng = np.random.default_rng(11)
    indefinite = np.diag([1.0, -1.0, 0.5])
    unsure = population_domain("unsure", 30, rng, np.array([1.0, 1.0, 0.0]), indefinite)  # g1^2 - g2^2 ~ 0
    clear = population_domain("clear", 30, rng, np.array([2.0, 0.0, 0.0]), np.eye(3))
    result = bootstrap_domains([unsure, clear], n_resamples=400, seed=0)
    full_means = [float(d.kernels[0].sum()) / d.n_k ** 2 for d in (unsure, clear)]
    full_shares = shares_pct([m * d.n_k for m, d in zip(full_means, (unsure, clear))])
    got = {d.name: d for d in result.domains}
    lo, hi = got["unsure"].share_pct_interval
    assert got["unsure"].mean_interval[0] < 0 < got["unsure"].mean_interval[1]
    assert lo == 0.0 and full_shares[0] <= hi
    lo, hi = got["clear"].share_pct_interval
    assert 0.0 < lo <= full_shares[1] <= hi <= 100.0


def test_priority_bootstrap_equals_a_direct_numpy_loop():
    """bootstrap_priorities against a plain loop over resamples: the same seeded
    index draws, then means, signed shares, ranks and percentiles by hand."""
    from dowsing.kernels.uncertainty import bootstrap_priorities

    rng = np.random.default_rng(7)
    per_fact = [rng.normal(0.4, 1.0, 9), rng.normal(0.1, 0.5, 14), rng.normal(-0.3, 2.0, 6), rng.normal(0.35, 0.2, 11)]
    n_resamples, level, seed = 300, 0.9, 11
    got = bootstrap_priorities([list(x) for x in per_fact], n_resamples=n_resamples, level=level, seed=seed)

    draw = np.random.default_rng(seed)
    indices = [draw.integers(0, len(x), size=(n_resamples, len(x))) for x in per_fact]
    k_domains = len(per_fact)
    priorities = np.zeros((n_resamples, k_domains))
    ranks = np.zeros((n_resamples, k_domains), dtype=int)
    signed = np.zeros((n_resamples, k_domains))
    for r in range(n_resamples):
        for k in range(k_domains):
            total = 0.0
            for i in indices[k][r]:
                total += per_fact[k][i]
            priorities[r, k] = total / len(per_fact[k])
        denominator = sum(abs(p) for p in priorities[r])
        for k in range(k_domains):
            signed[r, k] = priorities[r, k] / denominator * 100.0
            # rank 1 = largest; ties in domain order
            ranks[r, k] = 1 + sum(1 for j in range(k_domains) if priorities[r, j] > priorities[r, k]
                                  or (priorities[r, j] == priorities[r, k] and j < k))
    for k in range(k_domains):
        lo, hi = np.percentile(priorities[:, k], [5.0, 95.0])
        assert got.priority_interval[k] == pytest.approx((lo, hi), rel=1e-12)
        s_lo, s_hi = np.percentile(signed[:, k], [5.0, 95.0])
        assert got.share_pct_interval[k] == pytest.approx(magnitude_interval(s_lo, s_hi), rel=1e-12)
        probabilities = [float(np.mean(ranks[:, k] == rank)) for rank in range(1, k_domains + 1)]
        assert got.rank_probabilities[k] == pytest.approx(probabilities)
        best = int(np.argmax(probabilities)) + 1
        assert got.most_likely_rank[k] == best
        assert got.rank_stable[k] == (probabilities[best - 1] >= RANK_STABLE_PROBABILITY)
    # the point estimate sits inside its interval, and the result is JSON
    for k, x in enumerate(per_fact):
        lo, hi = got.priority_interval[k]
        assert lo <= np.mean(x) <= hi
    data = json.loads(json.dumps(got.to_dict()))
    assert data["n_resamples"] == n_resamples and len(data["rank_probabilities"]) == k_domains
