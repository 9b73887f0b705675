"""The benchmark's leaderboard: how well each estimator's ranking of domains
predicts the realised fine-tuning gain, next to how well the ground truth
predicts itself."""
from __future__ import annotations

import numpy as np

from .correlations import domain_bootstrap, spearman

BASELINE = "mean_loss"


def mean_gain(gains_by_seed: list) -> list:
    """Per domain, the realised gain averaged over seeds."""
    return np.mean(np.asarray(gains_by_seed, dtype=float), axis=0).tolist()


def reliability(truth: dict) -> dict:
    """The ground truth's own noise: Spearman between seeds of each recipe,
    and between recipes (seed-averaged gains). truth: {recipe: [gain per
    domain, per seed]}. The seed-to-seed rho bounds what any estimator can
    reach against one seed; `spearman_brown` is the reliability of the mean
    of the seeds, 2r / (1 + r) for two seeds, the ceiling against the mean."""
    seeds = {}
    for name, runs in truth.items():
        pairs = [spearman(runs[a], runs[b]) for a in range(len(runs)) for b in range(a + 1, len(runs))]
        pairs = [p for p in pairs if p is not None]
        r = float(np.mean(pairs)) if pairs else None
        m = len(runs)
        seeds[name] = {"spearman": r,
                       "spearman_brown": (m * r / (1 + (m - 1) * r)) if r is not None and r > -1 / max(m - 1, 1) else None}
    names = list(truth)
    between = [{"a": a, "b": b, "spearman": spearman(mean_gain(truth[a]), mean_gain(truth[b]))}
               for i, a in enumerate(names) for b in names[i + 1:]]
    return {"between_seeds": seeds, "between_recipes": between}


def benchmark_leaderboard(scores, truth: dict, main_recipe: str, resamples: int, seed: int,
                          interval_pct: float = 90.0) -> list:
    """One row per estimator, best rho on the main recipe first.

    Per recipe: rho = Spearman(priority, seed-averaged gain), its percentile
    interval over resampled domains, and the paired difference against the
    mean-loss baseline on the same resamples (interval, and the share of
    resamples where it is <= 0)."""
    baseline = next((s for s in scores if s.name == BASELINE), None)
    rows = []
    for i, s in enumerate(scores):
        row = {"estimator": s.name, "label": s.label, "priority": s.priority, "time_s": s.time_s, "recipes": {}}
        for name, runs in truth.items():
            gain = mean_gain(runs)
            boot = domain_bootstrap(s.priority, gain, None if baseline is None or s is baseline else baseline.priority,
                                    resamples, seed + i, interval_pct)
            row["recipes"][name] = {
                "spearman": spearman(s.priority, gain), "interval": boot["rho"],
                "diff_vs_mean_loss": (None if baseline is None or s is baseline
                                      else _diff(spearman(s.priority, gain), spearman(baseline.priority, gain))),
                "diff_interval": boot["diff"], "diff_p_le_0": boot["diff_p_le_0"],
                "per_seed": [spearman(s.priority, g) for g in runs],
            }
        row["spearman_main"] = row["recipes"][main_recipe]["spearman"]
        rows.append(row)
    rows.sort(key=lambda r: -(r["spearman_main"] if r["spearman_main"] is not None else -2))
    return rows


def _diff(a, b):
    return None if a is None or b is None else a - b


def choose_winner(rows: list, tie: float = 0.02) -> str | None:
    """The estimator with the best rho on the main recipe; among those within
    `tie` of it, the fastest."""
    ranked = [r for r in rows if r["spearman_main"] is not None]
    if not ranked:
        return None
    best = max(r["spearman_main"] for r in ranked)
    close = [r for r in ranked if r["spearman_main"] >= best - tie]
    return min(close, key=lambda r: r["time_s"])["estimator"]
