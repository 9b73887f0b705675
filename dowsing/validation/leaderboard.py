"""The benchmark's leaderboard: how well each estimator's ranking of domains
predicts the realised fine-tuning gain, next to how well the ground truth
predicts itself."""
from __future__ import annotations

import numpy as np

from ..estimators import LOOKAHEAD_SIGN, MEAN_LOSS, PILOT_GAIN, EstimatorScore
from .correlations import domain_bootstrap, spearman

BASELINE = MEAN_LOSS


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


# The sets of domains each leaderboard is read on, and the margin the default may give up on the ordinary ones.
GROUP_SETS = ("all", "ordinary", "hard")
ORDINARY_MARGIN = 0.05


def group_leaderboards(scores, gains_by_seed: list, groups: list, resamples: int, seed: int,
                       interval_pct: float = 90.0) -> dict:
    """On the main reading's seed-averaged gain, one leaderboard per set of
    domains: "all", "ordinary" (every domain whose group is not a hard-case
    kind, including domains outside the shipped benchmark) and "hard" (the
    hard cases). Per estimator: rho, its interval over resampled domains of
    that set, and the paired difference against mean loss with its
    interval. A set with fewer than 3 domains has no leaderboard."""
    from ..domains import domain_set

    gain = np.asarray(mean_gain(gains_by_seed), dtype=float)
    sets = {"all": list(range(len(gain))),
            "ordinary": [i for i, g in enumerate(groups) if domain_set(g) != "hard"],
            "hard": [i for i, g in enumerate(groups) if domain_set(g) == "hard"]}
    baseline = next((s for s in scores if s.name == BASELINE), None)
    out = {}
    for name, rows in sets.items():
        if len(rows) < 3:
            continue
        target = gain[rows].tolist()
        board = []
        for i, s in enumerate(scores):
            mine = [s.priority[j] for j in rows]
            base = None if baseline is None or s is baseline else [baseline.priority[j] for j in rows]
            boot = domain_bootstrap(mine, target, base, resamples, seed + i, interval_pct)
            rho = spearman(mine, target)
            board.append({"estimator": s.name, "label": s.label, "spearman": rho, "interval": boot["rho"],
                          "diff_vs_mean_loss": None if base is None else _diff(rho, spearman(base, target)),
                          "diff_interval": boot["diff"], "time_s": s.time_s})
        board.sort(key=lambda r: -(r["spearman"] if r["spearman"] is not None else -2))
        out[name] = {"n_domains": len(rows), "rows": board}
    return out


DEFAULT_RULE = (f"the estimator with the highest rho on all domains among those whose paired {{pct}} interval "
                f"against mean loss on all domains lies above 0 and whose rho on the ordinary domains is not "
                f"more than {ORDINARY_MARGIN} below mean loss's; mean loss when none qualifies")


def choose_default(by_group: dict, interval_pct: float = 90.0) -> dict:
    """The default ranking estimator by the stated rule (DEFAULT_RULE), with
    the rule and one sentence on why. Without both an "all" leaderboard and
    mean loss on it, mean loss stays the default."""
    rule = DEFAULT_RULE.format(pct=f"{interval_pct:g}%")
    board = (by_group.get("all") or {}).get("rows") or []
    ordinary = {r["estimator"]: r for r in (by_group.get("ordinary") or {}).get("rows") or []}
    if not any(r["estimator"] == BASELINE for r in board):
        return {"estimator": BASELINE, "rule": rule, "reason": "mean loss was not measured: it stays the default"}
    qualified = []
    for r in board:
        if r["estimator"] == BASELINE or not r["diff_interval"] or r["diff_interval"][0] is None:
            continue
        lower = r["diff_interval"][0]
        ord_diff = (ordinary.get(r["estimator"]) or {}).get("diff_vs_mean_loss")
        if lower > 0 and (ord_diff is None or ord_diff >= -ORDINARY_MARGIN):
            qualified.append(r)
    if not qualified:
        best = max((r for r in board if r["estimator"] != BASELINE and r["spearman"] is not None),
                   key=lambda r: r["spearman"], default=None)
        why = "no estimator qualified"
        if best is not None:
            lo, hi = best["diff_interval"] or [None, None]
            span = f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else ""
            why += (f"; the best on all domains, {best['estimator']}, had rho {best['spearman']:.2f}, "
                    f"{best['diff_vs_mean_loss']:+.2f}{span} against mean loss")
        return {"estimator": BASELINE, "rule": rule, "reason": why}
    pick = max(qualified, key=lambda r: r["spearman"])
    lo, hi = pick["diff_interval"]
    return {"estimator": pick["estimator"], "rule": rule,
            "reason": (f"{pick['estimator']} had rho {pick['spearman']:.2f} on all domains, "
                       f"{pick['diff_vs_mean_loss']:+.2f} [{lo:+.2f}, {hi:+.2f}] against mean loss")}


STACK_INPUTS = (MEAN_LOSS, PILOT_GAIN, LOOKAHEAD_SIGN)
STACKED = "stacked_cv"


def stacked_scores(scores, gains_by_seed: list, forward_s: float = 0.0):
    """A combination of estimators fitted across domains and never scored on
    a domain it was fitted on: for each domain k, least squares of the
    realised gain's rank on the input estimators' ranks (with an intercept)
    over every other domain, applied to k's ranks. Ranks (scaled to [0, 1])
    keep a domain with an outsized gain from steering the fit. The inputs
    are STACK_INPUTS that the run scored; None with fewer than two of them.
    Its time is the inputs' times with the shared forward pass counted once."""
    from scipy.stats import rankdata

    inputs = [s for s in scores if s.name in STACK_INPUTS]
    n = len(gains_by_seed[0]) if gains_by_seed else 0
    if len(inputs) < 2 or n < 4:
        return None
    x = np.column_stack([(rankdata(s.priority) - 1) / (n - 1) for s in inputs])
    gain = np.asarray(mean_gain(gains_by_seed), dtype=float)
    predicted, weights = [], []
    for k in range(n):
        rest = [j for j in range(n) if j != k]
        y = (rankdata(gain[rest]) - 1) / (len(rest) - 1)
        design = np.column_stack([np.ones(len(rest)), x[rest]])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        predicted.append(float(coef[0] + x[k] @ coef[1:]))
        weights.append(coef[1:].tolist())
    seconds = sum(s.time_s for s in inputs) - (len(inputs) - 1) * forward_s
    label = "Stacked: " + ", ".join(s.name for s in inputs) + " (fitted across domains, leave one domain out)"
    return EstimatorScore(STACKED, label, predicted, None, seconds,
                          {"inputs": [s.name for s in inputs], "weights_per_fold": weights})
