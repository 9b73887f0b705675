"""The plan check: does the collection plan buy more than simple allocations
when the model is really trained on what each one collects, and how far do
the learning curves extrapolate?

For a budget B (examples, every one costing 1) and the benchmark's domains:

* "plan": `dowsing.pipelines.plan.allocate` on each domain's learning curve, fitted
  (`plan.fit_pilots`) to the pilot fine-tunes the pilot estimators ran on
  the domain's sample (sizes up to the half's 8 facts), have = the sample's
  size (what the product assumes), cap = the domain's pool;
* "plan_weighted": the same with have = the sample's weight in the
  protocol's training counted in added facts (`weighted_have`): the
  baseline draws few of the samples' facts, so a domain has far fewer
  facts' worth of training than its sample holds;
* "even": B / K per domain (`even_counts`);
* "proportional": B split in proportion to each domain's mean loss
  (`proportional_counts`), the allocation a user who collects where the
  loss is highest would make.

Each allocation is one fine-tune (`protocol.plan_run_losses`): the baseline
run's minibatches plus every domain's first m_k pool facts. The realised
gain of domain k is its test loss after the baseline minus after the run;
an allocation's total is the mean over domains (every domain weighs the
same, the plan's default). Differences between allocations are paired by
seed and domain, with a percentile interval over resampled domains.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.curves import FITTERS, choose_form, predict
from ..pipelines.plan import (MEAN_LOSS_FIELD, DomainCurve, PlanConfig, allocate, even_counts, fit_pilots, gain_function, most_examples,
                    paired_difference, predicted_total, proportional_counts)

ALLOCATIONS = ("plan", "plan_weighted", "recommended", "even", "proportional", "ranking")
PLANS = ("plan", "plan_weighted", "recommended")
PREDICTIONS = ("doses", "pilot_scaled", "pilot", "pilot_scaled_weighted", "pilot_weighted")
# the plans are what the product computes by default
PLAN_RULE = PlanConfig(budget=1).rule
ALLOCATION_LABELS = {"plan": "the plan, have = the sample",
                     "plan_weighted": "the plan, have = the sample's weight in training",
                     "recommended": "what the Plan page recommends (the plan, or even where not shown better)",
                     "even": "spread evenly", "proportional": "proportional to mean loss",
                     "ranking": "proportional to the default ranking's score"}


# --- allocations -------------------------------------------------------------

def default_budgets(n_domains: int, pool: int) -> tuple:
    """The plan check's two budgets when the user names none: an eighth and
    a half of every domain's pool on average (4 and 16 a domain with pools
    of 32), at least one example a domain."""
    return (n_domains * max(1, pool // 8), n_domains * max(1, pool // 2))


def pilot_measurements(names: list, fits: list, mean_losses: list, have: float) -> dict:
    """The pilot estimators' fits (`estimators.pilot`, details "fits") in the
    layout `plan.fit_pilots` reads: per domain its sizes, drops, per-fact
    drops per size and the halves' sizes; a domain without a pilot gets no
    sizes (no curve)."""
    out = []
    for name, fit, loss in zip(names, fits, mean_losses):
        entry = {"name": name, "n_facts": have, MEAN_LOSS_FIELD: float(loss), "sizes": [], "drop": [],
                 "per_fact_by_size": [], "strata": []}
        if fit:
            entry.update(sizes=fit["sizes"], drop=fit["drop"], per_fact_by_size=fit["per_fact_by_size"],
                         strata=fit["strata"])
        out.append(entry)
    return {"domains": out}


def weighted_have(sample: int, base_facts: int, n_max: int, added_weight: float) -> float:
    """A sample's weight in the protocol's training, in added facts: each
    run draws its base minibatches from all `base_facts` sample facts, so a
    sample fact carries steps / base_facts of weight over a run, and an
    added fact steps * added_weight / n_max (`protocol.plan_run_losses`);
    the sample is worth sample * n_max / (base_facts * added_weight) added
    facts (16 * 32 / 592 = 0.86 on the shipped benchmark)."""
    return sample * n_max / (base_facts * added_weight)


def _bought(curves: list, budget: int, caps: list):
    """The product's allocation (`plan.gain_function`, the default rule: the
    mean gain over the bootstrap curves) from each curve's have."""
    gains = [gain_function(dc, PLAN_RULE, most_examples(budget, 1.0, cap)) for dc, cap in zip(curves, caps)]
    return allocate(gains, budget, caps=caps)


def check_allocations(curves: list, budget: int, caps: list, weighted: list | None = None,
                      ranking: list | None = None) -> dict:
    """The allocations of one budget and the plan's predicted total gain of
    each on `curves` (the pilot recipe's nats, summed over domains, with its
    band): {"counts": {allocation: [m_k]}, "predicted": {allocation:
    {"gain", "band"}}, "spent": {allocation: examples}, "gap_bound"}.
    "recommended" is what the Plan page recommends: the plan, or spreading
    evenly where the plan's paired band over the even split holds 0
    (`plan.paired_difference`, `plan.verdict`).
    weighted: the same curves with have = `weighted_have` (the
    "plan_weighted" allocation; None: not made). ranking: the default
    ranking's score per domain ("ranking", the budget split in proportion
    to max(score, 0); None: not made)."""
    bought = _bought(curves, budget, caps)
    counts = {"plan": bought.counts}
    if weighted is not None:
        counts["plan_weighted"] = _bought(weighted, budget, caps).counts
    weights = [1.0] * len(curves)  # every domain weighs the same, the plan's default
    even = even_counts(budget, caps)
    shown = paired_difference(curves, bought.counts, even, weights)["shown"]
    counts.update(recommended=list(bought.counts) if shown else list(even), even=even,
                  proportional=proportional_counts(budget, [dc.mean_loss for dc in curves], caps))
    if ranking is not None:
        positive = [max(float(v), 0.0) if v is not None and math.isfinite(v) else 0.0 for v in ranking]
        counts["ranking"] = proportional_counts(budget, positive, caps) if sum(positive) > 0 else list(even)
    predicted = {a: {k: v for k, v in predicted_total(curves, c, weights).items() if k != "counts"}
                 for a, c in counts.items()}
    return {"counts": counts, "predicted": predicted, "spent": {a: int(sum(c)) for a, c in counts.items()},
            "gap_bound": bought.gap_bound, "rule": PLAN_RULE}


def plan_curves(names: list, fits: list, mean_losses: list, have: float, seed: int, resamples: int) -> list:
    """Each domain's DomainCurve from the pilot estimators' measurements,
    `have` facts of it in training already."""
    measured = pilot_measurements(names, fits, mean_losses, have)
    return fit_pilots(measured, PlanConfig(budget=1, seed=seed, bootstrap_resamples=max(resamples, 100)))


# --- the realised gains ------------------------------------------------------

def realised_difference(gains_a, gains_b, resamples: int, seed: int, interval_pct: float) -> dict:
    """mean over seeds and domains of gains_a - gains_b ([seed][domain]
    each), and its percentile interval over resamples of the domains (each
    resample keeps a domain's seeds together, so the seeds stay paired)."""
    diff = np.asarray(gains_a, dtype=float) - np.asarray(gains_b, dtype=float)
    per_domain = diff.mean(axis=0)
    point = float(per_domain.mean())
    if resamples <= 0:
        return {"diff": point, "interval": [None, None], "per_seed": diff.mean(axis=1).tolist()}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_domain), size=(resamples, len(per_domain)))
    means = per_domain[picks].mean(axis=1)
    tail = (100.0 - interval_pct) / 2.0
    return {"diff": point, "interval": [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))],
            "per_seed": diff.mean(axis=1).tolist()}


def budget_summary(check: dict, realised: dict, resamples: int, seed: int, interval_pct: float) -> dict:
    """One budget's report: per allocation its realised total per seed and
    their mean (mean over domains of the test-loss drop), and the plan's
    paired difference against each simple allocation."""
    totals = {a: {"per_seed": [float(np.mean(g)) for g in gains], "mean": float(np.mean(gains))}
              for a, gains in realised.items()}
    paired = {plan: {other: realised_difference(realised[plan], realised[other], resamples, seed, interval_pct)
                     for other in realised if other not in PLANS}
              for plan in PLANS if plan in realised}
    return {**check, "realised": totals, "realised_per_domain": {a: np.mean(g, axis=0).tolist()
                                                                 for a, g in realised.items()},
            "plan_minus": paired["plan"], "plan_weighted_minus": paired.get("plan_weighted", {}),
            "recommended_minus": paired.get("recommended", {})}


# --- extrapolation -------------------------------------------------------------

def relative_error(predicted, measured) -> float | None:
    if predicted is None or measured is None or not math.isfinite(predicted) or measured == 0:
        return None
    return abs(predicted - measured) / abs(measured)


def extrapolation_row(dc: DomainCurve, doses: list, gains: dict, weighted: DomainCurve | None = None) -> dict:
    """One domain's extrapolation from small n to the largest dose N.

    gains: {dose: seed-mean measured gain}. Predictions of gain(N):
    * "doses": the curve forms (`curves.choose_form`) fitted to the measured
      gains at the doses below N, read at N;
    * "pilot_scaled": the measured gain at the largest of those doses times
      the pilot curve's ratio [G(S + N) - G(S)] / [G(S + n) - G(S)];
    * "pilot": the pilot curve's own G(S + N) - G(S), in the pilot recipe's
      nats (a different recipe from the ground truth's: its scale differs);
    * "pilot_scaled_weighted", "pilot_weighted": the same two with S the
      weighted curve's have (`weighted_have`), where `weighted` is given.
    """
    top, small = doses[-1], doses[:-1]
    measured = gains[top]
    row = {"domain": dc.name, "measured": measured}
    if len(small) >= 2:
        form, _, reason = choose_form(small, [gains[n] for n in small])
        if form is None:
            row["doses"] = {"predicted": None, "reason": reason}
        else:
            value = float(predict(form, FITTERS[form](small, [gains[n] for n in small]), top))
            row["doses"] = {"predicted": value, "form": form, "error": relative_error(value, measured)}
    else:
        row["doses"] = {"predicted": None, "reason": f"needs two doses below {top}"}
    for suffix, curve in (("", dc), ("_weighted", weighted)):
        if curve is None:
            continue
        row["pilot_scaled" + suffix], row["pilot" + suffix] = _pilot_predictions(curve, small, top, gains, measured)
    return row


def _pilot_predictions(dc: DomainCurve, small: list, top: int, gains: dict, measured: float) -> tuple:
    """(scaled, raw) predictions of gain(top) from one pilot curve."""
    if not (dc.curve.identifiable and small):
        reason = {"predicted": None, "reason": dc.curve.reason or "no dose below the largest"}
        return reason, reason
    whole = dc.curve.gain(dc.n_facts, top)
    part = dc.curve.gain(dc.n_facts, small[-1])
    scaled = gains[small[-1]] * whole / part if part > 0 else None
    return ({"predicted": scaled, "error": relative_error(scaled, measured)},
            {"predicted": whole, "error": relative_error(whole, measured)})


def error_summary(rows: list, groups: list) -> dict:
    """Per prediction and per group ("all", "ordinary", "hard"): the median
    and the worst relative error over the domains that have one, and how
    many domains have none."""
    out = {}
    for key in PREDICTIONS:
        if not any(key in r for r in rows):
            continue
        out[key] = {}
        for group in ("all", "ordinary", "hard"):
            chosen = [r for r, g in zip(rows, groups)
                      if group == "all" or (group == "ordinary") == (g == "ordinary")]
            errors = [r.get(key, {}).get("error") for r in chosen]
            have = [e for e in errors if e is not None]
            out[key][group] = {"median": float(np.median(have)) if have else None,
                               "worst": float(np.max(have)) if have else None,
                               "n": len(have), "missing": len(errors) - len(have)}
    return out


# --- tables --------------------------------------------------------------------

def plan_table(check: dict):
    """Per budget and allocation: examples spent, the realised total gain
    (mean over domains and seeds, and per seed), the plan's predicted total
    (pilot recipe's nats, summed over domains), and the plan minus this
    allocation with its interval, as a DataFrame."""
    import pandas as pd

    rows = []
    for entry in check.get("budgets", []):
        for name in (a for a in ALLOCATIONS if a in entry["realised"]):
            diff = entry["plan_minus"].get(name)
            weighted = (entry.get("plan_weighted_minus") or {}).get(name)
            recommended = (entry.get("recommended_minus") or {}).get(name)
            rows.append({
                "Budget": entry["budget"], "Allocation": ALLOCATION_LABELS[name], "Spent": entry["spent"][name],
                "Realised gain (nats/domain)": entry["realised"][name]["mean"],
                "per seed": ", ".join(f"{v:.4f}" for v in entry["realised"][name]["per_seed"]),
                "Predicted (pilot nats, sum)": entry["predicted"][name]["gain"],
                "Plan − this": None if diff is None else diff["diff"],
                "interval": "—" if diff is None else _interval(diff["interval"], 4),
                "Weighted plan − this": None if weighted is None else weighted["diff"],
                "interval ": "—" if weighted is None else _interval(weighted["interval"], 4),
                "Recommended − this": None if recommended is None else recommended["diff"],
                "interval  ": "—" if recommended is None else _interval(recommended["interval"], 4),
            })
    return pd.DataFrame(rows)


def extrapolation_table(check: dict):
    """Per prediction and set of domains: the median and the worst relative
    error of the predicted gain at the largest dose, as a DataFrame."""
    import pandas as pd

    ex = check.get("extrapolation") or {}
    labels = {"doses": f"curve fitted to the measured gains at n = {', '.join(map(str, ex.get('fit_doses', [])))}",
              "pilot_scaled": "pilot curve (have = sample), scaled by the measured gain at the largest of those",
              "pilot": "pilot curve (have = sample) alone, pilot recipe's nats",
              "pilot_scaled_weighted": "pilot curve (have = sample's weight), scaled likewise",
              "pilot_weighted": "pilot curve (have = sample's weight) alone, pilot recipe's nats"}
    rows = []
    for key, label in labels.items():
        for group, cell in ((ex.get("summary") or {}).get(key) or {}).items():
            rows.append({"Prediction": label, "Domains": group, "Median error": cell["median"],
                         "Worst error": cell["worst"], "n": cell["n"], "none": cell["missing"]})
    return pd.DataFrame(rows)


def _interval(pair, digits: int) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:+.{digits}f}, {pair[1]:+.{digits}f}]"


def extrapolation_domains(check: dict):
    """Per domain: the measured gain at the largest dose, each prediction
    with its relative error, and the paper's and the measured delta n at
    10% where the run computed them, as a DataFrame."""
    import pandas as pd

    ex = check.get("extrapolation") or {}
    saturation = check.get("saturation") or {}
    rows = []
    for row, group in zip(ex.get("rows", []), ex.get("sets", [])):
        sat = saturation.get(row["domain"]) or {}
        measured_dn = (sat.get("measured") or {}).get("delta_n_10pct")
        rows.append({
            "Domain": row["domain"], "Set": group, f"gain at {ex['target']}": row["measured"],
            "fitted to doses": row["doses"].get("predicted"), "error (doses)": row["doses"].get("error"),
            "pilot, scaled": row["pilot_scaled"].get("predicted"), "error (scaled)": row["pilot_scaled"].get("error"),
            "pilot": row["pilot"].get("predicted"), "error (pilot)": row["pilot"].get("error"),
            "paper Δn@10%": sat.get("paper_delta_n_10pct"),
            "measured Δn@10%": measured_dn if measured_dn is not None or not sat else f"> {ex['target']}",
        })
    return pd.DataFrame(rows)
