"""What the benchmark measured for each ranking estimator, as shipped with
the package (`data/benchmark_evidence.json`, written by
`python -m dowsing benchmark --evidence`): the app and the report quote it
next to every ranking, so a reader sees how far the ranking is known to
predict fine-tuning."""
from __future__ import annotations

import json
from functools import lru_cache

from ..domains import DATA_DIR
from ..estimators import ESTIMATORS, MEAN_LOSS

EVIDENCE_FILE = DATA_DIR / "benchmark_evidence.json"


@lru_cache(maxsize=1)
def load_evidence() -> dict | None:
    """The shipped evidence, or None when the package has none."""
    try:
        return json.loads(EVIDENCE_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def estimator_evidence(name: str) -> dict | None:
    """{"label", "spearman", "interval", "diff_vs_mean_loss", "diff_interval"}
    of one estimator on the benchmark's main recipe, or None."""
    data = load_evidence()
    if not data:
        return None
    return (data.get("estimators") or {}).get(name)


def evidence_label(name: str, entry: dict) -> str:
    """The estimator's label as the registry has it now (the evidence keeps
    the label of the run that measured it, for estimators no longer registered)."""
    known = ESTIMATORS.get(name)
    return known.label if known else entry.get("label", name)


def beats_mean_loss(entry: dict | None) -> bool:
    """True only when the paired bootstrap interval of rho minus mean loss's
    rho lies wholly above 0."""
    if not entry or not entry.get("diff_interval") or entry["diff_interval"][0] is None:
        return False
    return entry["diff_interval"][0] > 0


def evidence_sentence(name: str) -> str:
    """One plain sentence on how well this estimator's ranking predicted
    fine-tuning on the benchmark, and whether it beat mean loss; then, where
    the evidence has them, its rho on the ordinary and on the hard-case
    domains alone."""
    return _main_sentence(name) + _group_sentence(name)


def _group_sentence(name: str) -> str:
    groups = (load_evidence() or {}).get("groups") or {}
    parts = []
    for group in ("ordinary", "hard"):
        entry = ((groups.get(group) or {}).get("estimators") or {}).get(name)
        if entry and entry.get("spearman") is not None:
            lo, hi = entry.get("interval") or [None, None]
            span = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
            what = "hard-case" if group == "hard" else group
            parts.append(f"ρ = {entry['spearman']:.2f}{span} on the {groups[group]['n_domains']} {what} domains")
    return (" By kind of domain: " + "; ".join(parts) + ".") if parts else ""


def _main_sentence(name: str) -> str:
    data = load_evidence()
    entry = estimator_evidence(name)
    if not data or not entry:
        return "This estimator has not been measured on the benchmark."
    lo, hi = entry.get("interval") or [None, None]
    rho = entry.get("spearman")
    text = (f"On the benchmark ({data['n_domains']} domains, {data['model']}, {data['recipe_label']}) its ranking "
            f"had Spearman ρ = {rho:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "") +
            " against the realised fine-tuning gain")
    ceiling = (data.get("ceiling") or {}).get("spearman")
    if ceiling is not None:
        text += f" (the ground truth agrees with itself across seeds at ρ = {ceiling:.2f})"
    if name == MEAN_LOSS:
        rivals = [(n, e) for n, e in (data.get("estimators") or {}).items()
                  if n != MEAN_LOSS and e.get("spearman") is not None]
        winners = [n for n, e in rivals if beats_mean_loss(e)]
        if winners:
            return text + f"; {', '.join(winners)} beat it (paired interval above 0)."
        if not rivals:
            return text + "."
        best_name, best = max(rivals, key=lambda item: item[1]["spearman"])
        diff = best.get("diff_interval") or [None, None]
        span = f" [{diff[0]:+.2f}, {diff[1]:+.2f}]" if diff[0] is not None else ""
        return (text + f". No estimator beat it with a paired interval above 0: the best, {evidence_label(best_name, best)}, "
                f"had ρ = {best['spearman']:.2f}, a difference of {best['diff_vs_mean_loss']:+.2f}{span}.")
    if beats_mean_loss(entry):
        return text + "; it beat ranking by mean loss (paired interval above 0)."
    return text + "; it did not beat ranking by mean loss with an interval that excludes 0."


GROUPS = {"all": "all domains", "ordinary": "ordinary domains", "hard": "hard cases"}


def evidence_rows(group: str = "all") -> list[dict]:
    """The shipped benchmark's leaderboard over one group of domains ("all",
    "ordinary" or "hard"), best ρ first: per estimator its label, Spearman ρ
    against the realised gain with its 90% interval, and the paired
    difference against mean loss with its interval (and, over all domains,
    its time); [] without shipped evidence or that group."""
    data = load_evidence() or {}
    if group == "all":
        entries = data.get("estimators") or {}
    else:
        entries = (((data.get("groups") or {}).get(group) or {}).get("estimators")) or {}

    def span(pair) -> str:
        return f"[{pair[0]:+.2f}, {pair[1]:+.2f}]" if pair and None not in pair else "—"

    rows = []
    for name, entry in entries.items():
        if entry.get("spearman") is None:
            continue
        lo, hi = entry.get("interval") or [None, None]
        row = {"Estimator": evidence_label(name, {**(data.get("estimators") or {}).get(name, {}), **entry}),
               "ρ": round(entry["spearman"], 2),
               "90% interval": f"[{lo:.2f}, {hi:.2f}]" if lo is not None else "—",
               "ρ − mean loss": None if entry.get("diff_vs_mean_loss") is None else round(entry["diff_vs_mean_loss"], 2),
               "paired 90% interval": span(entry.get("diff_interval"))}
        if group == "all" and entry.get("time_s") is not None:
            row["time (s)"] = round(entry["time_s"])
        rows.append(row)
    return sorted(rows, key=lambda r: -r["ρ"])


def group_size(group: str) -> int | None:
    """How many domains a group of the shipped benchmark holds."""
    data = load_evidence() or {}
    if group == "all":
        return data.get("n_domains")
    return ((data.get("groups") or {}).get(group) or {}).get("n_domains")
