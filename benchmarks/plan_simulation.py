"""The plan's allocation rules on synthetic domains whose true learning
curves are known: how much of the true gain each rule buys, against
spreading evenly and splitting by mean loss, and what reading the curves
from have = 10 costs when the facts are not in training. No model: pilot points are
drawn from the true curve plus each fact's own offset, as a pilot measures
them (halves of 5 facts, sizes 2, 4, 5), then `plan.fit_pilots` and
`plan.build_plan` run as in the product (have 0, budget 48, caps 12, 16
domains, as in an outside check of the plan).

    python benchmarks/plan_simulation.py            # both truths, 30 repetitions each
    python benchmarks/plan_simulation.py --reps 10

Prints, per truth and noise level, the mean over repetitions of each
allocation's true total gain divided by spreading evenly's, and how often
each rule fell more than 2% below spreading evenly.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dowsing.pipelines.plan import PlanConfig, build_plan, fit_pilots  # noqa: E402

DOMAINS, FACTS, SIZES, BUDGET, CAP = 16, 10, (2, 4, 5), 48, 12
TRUTHS = {
    # concave in ln n, like the fitted log form
    "log": lambda n, level, scale: level * math.log1p(n / scale),
    # saturating, outside both fitted forms
    "saturating": lambda n, level, scale: level * (1 - math.exp(-n / scale)),
}
RULES = {"point": dict(rule="point"), "expected": dict(rule="expected"),
         "expected+shrink": dict(rule="expected", shrink=True),
         # the sample read as already in training, when it is not (the truth counts from 0)
         "expected, have 10": dict(rule="expected", have=FACTS)}


def one_world(rep: int, truth: str, noise: float) -> dict:
    """One set of synthetic domains and every allocation's true total gain."""
    rng = np.random.default_rng(rep)
    curve = TRUTHS[truth]
    entries, gains = [], []
    for k in range(DOMAINS):
        level, scale = float(np.exp(rng.normal(-3, 0.8))), float(rng.uniform(1, 20 if truth == "log" else 30))
        offsets = rng.normal(0, noise * level, FACTS)
        rows = [[curve(n, level, scale) + o + rng.normal(0, 0.1 * noise * level) for o in offsets] for n in SIZES]
        entries.append({"name": f"D{k}", "n_facts": FACTS, "mean_loss": float(rng.uniform(2, 8)), "sizes": list(SIZES),
                        "drop": [float(np.mean(r)) for r in rows], "per_fact_by_size": rows,
                        "strata": [FACTS // 2, FACTS - FACTS // 2]})
        gains.append(lambda m, level=level, scale=scale: curve(m, level, scale))
    caps = {f"D{k}": CAP for k in range(DOMAINS)}
    out = {}
    for label, fields in RULES.items():
        config = PlanConfig(budget=BUDGET, caps=caps, bootstrap_resamples=300, **fields)
        plan = build_plan(fit_pilots({"domains": entries}, config), config)
        out[label] = sum(g(plan.row(f"D{k}")["collect"]) for k, g in enumerate(gains))
        for split in ("even", "mean_loss"):
            out[split] = sum(g(m) for g, m in zip(gains, plan.totals[split]["counts"].values()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print("| truth | noise | " + " | ".join(list(RULES) + ["mean_loss"]) + " | >2% below even |")
    print("|---" * (len(RULES) + 4) + "|")
    for truth in TRUTHS:
        for noise in (0.3, 0.6):
            worlds = [one_world(rep, truth, noise) for rep in range(args.reps)]
            ratios = [f"{np.mean([w[k] / w['even'] for w in worlds]):.3f}" for k in list(RULES) + ["mean_loss"]]
            below = ", ".join(f"{k} {np.mean([w[k] < 0.98 * w['even'] for w in worlds]):.2f}" for k in RULES)
            print(f"| {truth} | {noise} | " + " | ".join(ratios) + f" | {below} |")


if __name__ == "__main__":
    main()
