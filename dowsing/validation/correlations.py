"""Rank correlations and their bootstrap intervals."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

def spearman(x, y) -> float | None:
    """Spearman's rho (scipy), None when undefined (constant or non-finite input)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(stats.spearmanr(x, y).statistic)
    return value if math.isfinite(value) else None


def kendall(x, y) -> float | None:
    """Kendall's tau-b (scipy), None when undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(stats.kendalltau(x, y).statistic)
    return value if math.isfinite(value) else None


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.pearsonr(x, y).statistic)


def bootstrap_spearman(priority_samples, gain_samples, resamples: int, seed: int, interval_pct: float = 90.0):
    """Percentile interval of rho(priority, gain) when each domain's priority
    and gain are means over facts that are resampled with replacement.

    priority_samples: per domain, per-fact numbers whose mean is the
    priority, or a plain number (held fixed). gain_samples: the same for the gain.
    """
    if resamples == 0:
        return [None, None]
    rng = np.random.default_rng(seed)

    def draw(sample):
        if np.isscalar(sample):
            return float(sample)
        arr = np.asarray(sample, dtype=float)
        return float(arr[rng.integers(0, len(arr), len(arr))].mean())

    values = []
    for _ in range(resamples):
        p = [draw(s) for s in priority_samples]
        g = [draw(s) for s in gain_samples]
        rho = spearman(p, g)
        if rho is not None:
            values.append(rho)
    if len(values) < resamples / 2:
        return [None, None]
    tail = (100.0 - interval_pct) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]




def domain_bootstrap(priority, gain, baseline=None, resamples: int = 2000, seed: int = 0,
                     interval_pct: float = 90.0) -> dict:
    """Percentile intervals over resampled domains.

    Each resample draws K domains with replacement and recomputes
    rho(priority, gain) (ties from repeated domains get average ranks) and,
    when `baseline` is given, the paired difference
    rho(priority, gain) - rho(baseline, gain) on the same draw.
    Returns {"rho": [lo, hi], "diff": [lo, hi] or None, "diff_p_le_0": the
    share of resamples where the difference is <= 0}.
    """
    p, g = np.asarray(priority, dtype=float), np.asarray(gain, dtype=float)
    b = None if baseline is None else np.asarray(baseline, dtype=float)
    out = {"rho": [None, None], "diff": None, "diff_p_le_0": None}
    if resamples == 0 or len(p) < 3 or not (np.isfinite(p).all() and np.isfinite(g).all()):
        return out
    rng = np.random.default_rng(seed)
    rhos, diffs = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(p), len(p))
        rho = spearman(p[idx], g[idx])
        if rho is None:
            continue
        rhos.append(rho)
        if b is not None:
            other = spearman(b[idx], g[idx])
            if other is not None:
                diffs.append(rho - other)
    tail = (100.0 - interval_pct) / 2
    if len(rhos) >= resamples / 2:
        out["rho"] = [float(np.percentile(rhos, tail)), float(np.percentile(rhos, 100 - tail))]
    if b is not None and len(diffs) >= resamples / 2:
        out["diff"] = [float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))]
        out["diff_p_le_0"] = float(np.mean(np.asarray(diffs) <= 0))
    return out
