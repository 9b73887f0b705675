"""The plan check where the user's sample is not yet training data
(`dowsing.validation.fresh_plan_check`): the product's plan on samples of 10
facts, then the whole default model fine-tuned full-batch on what each
allocation collects.

    python benchmarks/plan_check_fresh.py --out fresh_plan_check.json        # run (resumes)
    python benchmarks/plan_check_fresh.py --tables fresh_plan_check.json     # the Markdown tables

The default domains are 8 ordinary and 8 hard cases of the shipped benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dowsing.validation.fresh_plan_check import (ALLOCATION_LABELS, ALLOCATIONS, COMPARED,  # noqa: E402
                                                 FreshCheckConfig, diagnosis_agreement, diagnosis_rows, merged,
                                                 run_check, summarise)

DEFAULT_DOMAINS = ("Physics", "Astronomy", "Biology", "Economics", "Cooking", "World geography",
                   "Norwegian (Bokmål)", "Invented: Kelvaran archipelago",
                   "Noise: parcel scans", "Noise: lab sample checksums", "Scrambled: tools and materials",
                   "Scrambled: sports and games", "Contradiction: invented countries",
                   "Contradiction: disputed review labels", "Grab-bag: nature and technology",
                   "Redundant: railways")


def _interval(d: dict) -> str:
    lo, hi = d["interval"]
    return f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def tables(state: dict) -> str:
    """The check's Markdown: per budget every allocation's realised gain,
    the paired differences and the predicted totals; then the calibration."""
    summary = summarise(state)
    lines = ["| Budget (a domain) | Allocation | Realised gain (nats/domain) | per seed | Plan − this [90%] "
             "| Recommended − this [90%] | Predicted (pilot nats, sum) |", "|---|---|---|---|---|---|---|"]
    for b in summary["budgets"].values():
        if not b["seeds"]:
            continue
        for a in ALLOCATIONS:
            r = b["realised"][a]
            plan_d = _interval(b["plan_minus"][a]) if a in COMPARED else "—"
            rec_d = _interval(b["recommended_minus"][a]) if a in COMPARED else "—"
            pred = b["predicted"].get(a)
            pred = ", ".join(f"{p:.3g}" for p in pred if p is not None) if pred else "—"
            lines.append(f"| {b['budget']} ({b['per_domain']}) | {ALLOCATION_LABELS[a]} | {r['mean']:.4f} | "
                         f"{', '.join(f'{x:.4f}' for x in r['per_seed'])} | {plan_d} | {rec_d} | {pred} |")
    lines.append("")
    lines.append("Recommendation per seed: " + "; ".join(f"budget {b['budget']}: {', '.join(map(str, b['recommend']))}"
                                                        for b in summary["budgets"].values()))
    c = summary["calibration"]
    if c.get("scale"):
        lines += ["", f"Calibration ({c['n']} rows): scale {c['scale']:.3g}; per domain median error "
                      f"{100 * c['uncalibrated_median_error']:.0f}% in pilot nats, {100 * c['cv_median_error']:.0f}% "
                      f"scaled (cross-validated by domain); plan totals {100 * c['uncalibrated_totals_median_error']:.0f}% "
                      f"and {100 * c['totals_median_error']:.0f}% scaled."]
    return "\n".join(lines)


def diagnosis_table(rows: list) -> str:
    """Per domain and seed its diagnosis and realised gain fraction, then
    the agreement of "more facts help" with the realised gain."""
    lines = ["| Domain | seed | kind | told more helps | loss (nats) | pilot drop / loss | realised gain / loss |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["domain"], r["seed"])):
        pct = "—" if r["drop_pct"] is None else f"{r['drop_pct']:.1f}%"
        lines.append(f"| {r['domain']} | {r['seed']} | {r['kind']} | {'yes' if r['helps'] else 'no'} | "
                     f"{r['loss']:.2f} | {pct} | {100 * r['gain_fraction']:.1f}% |")
    a = diagnosis_agreement(rows)
    ratio = "—" if a["ratio"] is None else f"{a['ratio']:.2f}x"
    lines += ["", f"Told more helps: {a['helps']['n']} rows, mean realised gain / loss "
                  f"{100 * (a['helps']['mean_gain_fraction'] or 0):.1f}%; told not: {a['not']['n']} rows, "
                  f"{100 * (a['not']['mean_gain_fraction'] or 0):.1f}%; ratio {ratio}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the run's JSON (resumed when it exists)")
    parser.add_argument("--tables", type=Path, nargs="+",
                        help="print the Markdown tables of finished runs' JSON (several: merged by seed and budget)")
    parser.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budgets", nargs="+", type=int, default=list(FreshCheckConfig.budgets_per_domain),
                        help="budgets in examples per domain on average (default 3 12)")
    parser.add_argument("--steps", type=int, default=FreshCheckConfig.steps)
    parser.add_argument("--lr", type=float, default=FreshCheckConfig.lr)
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded default model)")
    args = parser.parse_args(argv)
    if args.tables:
        state = merged([json.loads(p.read_text()) for p in args.tables])
        print(tables(state))
        print()
        print(diagnosis_table(diagnosis_rows(state, args.model)))
        return 0
    if not args.out:
        parser.error("--out or --tables is needed")
    import torch

    torch.manual_seed(0)
    config = FreshCheckConfig(domains=tuple(args.domains), seeds=tuple(args.seeds), steps=args.steps, lr=args.lr,
                              budgets_per_domain=tuple(args.budgets))
    state = run_check(args.model, config, args.out, report=lambda m: print(m, flush=True))
    print(tables(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
