"""The paper's metrics over domains: Rank, Share (%), t vs rest."""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats


def ranks_by_mean(means) -> list[int]:
    """Rank 1 = largest Mean; ties keep the domains' order."""
    order = sorted(range(len(means)), key=lambda k: (-means[k], k))
    out = [0] * len(means)
    for position, k in enumerate(order, start=1):
        out[k] = position
    return out


def shares_pct(totals) -> list[float]:
    """Share_k = |sum_i I_ki| / sum_j |sum_i I_ji| * 100.

    Absolute values, so shares sum to 100 even when some influence is
    negative (the paper's Table 1 has negative Means with positive shares).
    """
    magnitudes = np.abs(np.asarray(totals, dtype=float))
    total = magnitudes.sum()
    if total == 0.0:
        return [0.0] * len(magnitudes)
    return list(magnitudes / total * 100.0)


def t_vs_rest(influences) -> list[tuple[float | None, float | None]]:
    """Welch's t of domain k's per-example influences against all other
    domains' per-example influences, with its two-sided p-value."""
    out = []
    for k, own in enumerate(influences):
        rest = [x for j, other in enumerate(influences) if j != k for x in other]
        if len(own) < 2 or len(rest) < 2:
            out.append((None, None))
            continue
        with warnings.catch_warnings():
            # Identical values (e.g. the two per-fact alignments of a 2-fact
            # domain) give no t; the None below says so without a warning.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_ind(np.asarray(own), np.asarray(rest), equal_var=False)
        t, p = float(result.statistic), float(result.pvalue)
        out.append((t if math.isfinite(t) else None, p if math.isfinite(p) else None))
    return out
