"""A sentence per domain on what kind of domain it looks like, from measured
quantities only: its mean loss, and its pilot drop (how much training the
last blocks briefly on one half of its facts lowered the other half's loss,
averaged both ways; `dowsing.kernels.pilots`).

Loss says how much the model does not yet know; the pilot drop says how much
of that more facts like these can teach. Where they part ways (garbled text,
random codes, facts that contradict each other, near-duplicates) the loss
alone points the wrong way, and the sentence says so with its numbers.

The kinds rest on absolute cut points, never on the other domains analysed
with it, so a domain's kind does not change when domains are added or
removed. Two are fitted on the benchmark's per-domain rows
(`data/diagnosis_benchmark.json`): the pilot drop as a share of the loss
above which more facts help, and the loss above which it counts as high,
each the split of that quantity that best separates the realised gain
fraction (realised gain at 32 added facts / loss, in logs) into two groups
(`split_point`). The third, the loss below which a domain is saturated, is a
stated choice: no benchmark domain comes near it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

KINDS = {
    "contradictory": "training on some facts makes the others clearly worse",
    "saturated": "the model already predicts these facts well; more change little",
    "learnable gap": "high loss, and more facts like these teach the rest",
    "hard to learn": "high loss, but more facts like these teach little",
    "overlapping": "moderate loss, but the facts carry strongly to each other",
    "known": "moderate loss, and more facts like these change little",
}
# Whether a kind tells the user that more facts like theirs will lower the loss:
# every other sentence shown about a domain must agree with this.
HELPS = {
    "contradictory": False,
    "saturated": False,
    "learnable gap": True,
    "hard to learn": False,
    "overlapping": True,
    "known": False,
}
BENCHMARK_FILE = Path(__file__).resolve().parent.parent / "data" / "diagnosis_benchmark.json"
# The shipped rows' column of a domain's mean loss, a key of the file, not an estimator.
MEAN_LOSS_KEY = "mean_loss"
# Below this mean loss (nats per token; a geometric-mean token probability above
# e^-1 = 0.37) the model already predicts the facts: a chosen value, since the
# benchmark's lowest domain loss is 2.45 nats and cannot place it.
SATURATED_LOSS = 1.0


@dataclass(frozen=True)
class Cuts:
    """The absolute cut points of the kinds: drop_share (pilot drop / loss at
    or above which more facts help, and whose negative marks a clear rise),
    high_loss (nats at or above which the loss is high), saturated_loss
    (nats below which the model already predicts the facts)."""

    drop_share: float
    high_loss: float
    saturated_loss: float = SATURATED_LOSS


def split_point(x, y) -> float:
    """The least-squares split of y on x: the midpoint t between two adjacent
    distinct values of x that minimises sum over both sides (x >= t, x < t)
    of (y_i - the side's mean)^2; ties go to the smaller t. A regression
    stump with one cut."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    values = np.unique(x)
    if len(values) < 2:
        raise ValueError("a split needs at least two distinct values")
    best, best_t = np.inf, None
    for t in (values[:-1] + values[1:]) / 2:
        above = x >= t
        sse = float(((y[above] - y[above].mean()) ** 2).sum() + ((y[~above] - y[~above].mean()) ** 2).sum())
        if sse < best - 1e-12:
            best, best_t = sse, float(t)
    return best_t


@lru_cache(maxsize=1)
def benchmark_rows() -> tuple:
    """The benchmark's per-domain rows (domain, group, mean_loss, pilot_drop,
    gain_32) as shipped."""
    data = json.loads(BENCHMARK_FILE.read_text(encoding="utf-8"))
    return tuple(data["domains"])


def fit_cuts(rows) -> Cuts:
    """Cuts fitted on benchmark rows: drop_share = split_point of
    ln(gain_32 / mean_loss) on pilot_drop / mean_loss, high_loss =
    split_point of the same on mean_loss."""
    loss = np.array([r[MEAN_LOSS_KEY] for r in rows], dtype=float)
    share = np.array([r["pilot_drop"] for r in rows], dtype=float) / loss
    realised = np.log(np.array([r["gain_32"] for r in rows], dtype=float) / loss)
    return Cuts(split_point(share, realised), split_point(loss, realised))


@lru_cache(maxsize=1)
def benchmark_cuts() -> Cuts:
    """The shipped cut points: `fit_cuts` on `benchmark_rows`."""
    return fit_cuts(benchmark_rows())


def agreement(rows, cuts: Cuts | None = None, leave_one_out: bool = False) -> dict:
    """How well the kinds agree with the realised gain on benchmark rows: the
    mean realised gain fraction (gain_32 / mean_loss) of the domains told
    that more data helps and of those told it does not, their ratio, and
    per group the kinds given. leave_one_out: each row's kind from cuts
    fitted on the other rows (cross-validated)."""
    rows = list(rows)
    kinds = []
    for i, row in enumerate(rows):
        fitted = fit_cuts(rows[:i] + rows[i + 1:]) if leave_one_out else (cuts or benchmark_cuts())
        kinds.append(classify(row[MEAN_LOSS_KEY], row["pilot_drop"], fitted))
    fraction = np.array([r["gain_32"] / r[MEAN_LOSS_KEY] for r in rows])
    helps = np.array([HELPS[k] for k in kinds])
    told, not_told = fraction[helps], fraction[~helps]
    groups = {}
    for row, kind in zip(rows, kinds):
        groups.setdefault(row["group"], []).append(kind)
    mean_helps = float(told.mean()) if len(told) else None
    mean_not = float(not_told.mean()) if len(not_told) else None
    return {"kinds": kinds, "n_helps": int(helps.sum()), "n_not": int((~helps).sum()),
            "gain_fraction_helps": mean_helps, "gain_fraction_not": mean_not,
            "ratio": mean_helps / mean_not if mean_helps is not None and mean_not else None, "groups": groups}


def classify(loss: float, drop: float | None, cuts: Cuts | None = None) -> str:
    """The kind of one domain from its mean loss L and pilot drop D alone:

    * D missing: "saturated" if L < saturated_loss, "learnable gap" if
      L >= high_loss, else "known" (the loss alone);
    * L < saturated_loss and D < drop_share * L: "saturated";
    * D < -drop_share * L (a rise larger than what counts as help): "contradictory";
    * D >= drop_share * L: "learnable gap" if L >= high_loss, else "overlapping";
    * otherwise "hard to learn" if L >= high_loss, else "known"."""
    cuts = cuts or benchmark_cuts()
    high = loss >= cuts.high_loss
    if drop is None:
        return "saturated" if loss < cuts.saturated_loss else ("learnable gap" if high else "known")
    helpful = drop >= cuts.drop_share * loss
    if loss < cuts.saturated_loss and not helpful:
        return "saturated"
    if drop < -cuts.drop_share * loss:
        return "contradictory"
    if helpful:
        return "learnable gap" if high else "overlapping"
    return "hard to learn" if high else "known"


@dataclass
class Diagnosis:
    """One domain's reading: kind (a key of KINDS), the sentence, and the
    numbers it rests on (mean loss and pilot drop in nats, the drop as a
    share of the loss, and both ranks among the analysed domains, 1 = highest;
    the ranks are context only, the kind never reads them)."""

    domain: str
    kind: str
    sentence: str
    loss: float
    pilot_drop: float | None
    drop_pct_of_loss: float | None
    loss_rank: int
    drop_rank: int | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _ranks(values: list) -> list:
    """1 for the largest value; NaN and None last."""
    keyed = [(-(v if v is not None and np.isfinite(v) else -np.inf), i) for i, v in enumerate(values)]
    out = [0] * len(values)
    for rank, (_, i) in enumerate(sorted(keyed), start=1):
        out[i] = rank
    return out


def diagnose(names: list, loss: list, pilot_drop: list, pilot_facts: int | None = None,
             cuts: Cuts | None = None) -> list:
    """One Diagnosis per domain, its kind from `classify` on its own loss and
    pilot drop with the benchmark's cut points (`benchmark_cuts`), so it
    does not depend on the other domains; the sentence states the numbers,
    the cut they were held against and, for context, the ranks among the
    domains given. Where the pilot drop is missing (a domain too small for a
    pilot) the sentence says so and rests on the loss."""
    cuts = cuts or benchmark_cuts()
    loss = [float(x) for x in loss]
    drops = [None if d is None or not np.isfinite(d) else float(d) for d in pilot_drop]
    loss_ranks = _ranks(loss)
    drop_ranks = _ranks([d if d is not None else float("nan") for d in drops])
    n, n_drops = len(names), sum(d is not None for d in drops)
    # a pilot trains on at most 8 facts of one half (`pilots.pilot_sizes`) and reads the whole other half
    half = f"{pilot_facts} of your facts" if pilot_facts else "half of your facts (at most 8 of them)"
    out = []
    for k, name in enumerate(names):
        L, D = loss[k], drops[k]
        kind = classify(L, D, cuts)
        loss_text = f"loss {L:.2f} nats{_loss_word(L, cuts)}, {_place(loss_ranks[k], n, 'highest', 'lowest')}"
        if D is None:
            out.append(Diagnosis(name, kind, f"{loss_text[0].upper()}{loss_text[1:]}; too few facts for a pilot run, "
                                 "so this reading rests on the loss alone.", L, None, None, loss_ranks[k], None))
            continue
        pct = 100.0 * D / L if L > 0 else None
        share = f" ({pct:.1f}% of its loss)" if pct is not None else ""
        rank = _place(drop_ranks[k], n_drops, "largest drop", "smallest drop")
        cut = f"{100 * cuts.drop_share:.1f}%"
        lead = f"{loss_text[0].upper()}{loss_text[1:]}"
        if kind == "contradictory":
            risen = f" ({-pct:.1f}% of its loss)" if pct is not None else ""
            sentence = (f"{lead}, and training on {half} raised the other half's loss by {abs(D):.3f} nats{risen}, "
                        f"more than the benchmark's cut of {cut} of the loss: the facts pull against each other, so "
                        "more of the same may not help and can hurt.")
        elif kind == "saturated":
            sentence = (f"{lead}: the model already predicts these facts (below {cuts.saturated_loss:.1f} nats), and "
                        f"training on {half} changed the other half's loss by {D:+.3f} nats{share}: more of the "
                        "same has little left to teach.")
        elif HELPS[kind]:
            tail = ("a gap that more facts like these fill." if kind == "learnable gap" else
                    "your facts carry strongly to each other, so more like them keep paying off.")
            sentence = (f"{lead}; training on {half} lowered the other half's loss by {D:.3f} nats{share}, "
                        f"{rank}, at or above the benchmark's cut of {cut} for domains that gain from more facts: "
                        f"{tail}")
        else:
            tail = ("more of the same is unlikely to help much, despite the loss." if kind == "hard to learn" else
                    "more facts like these are unlikely to change it much.")
            sentence = (f"{lead}; training on {half} lowered the other half's loss by only {D:.3f} nats{share}, "
                        f"{rank}, below the benchmark's cut of {cut} for domains that gain from more facts: {tail}")
        out.append(Diagnosis(name, kind, sentence, L, D, pct, loss_ranks[k], drop_ranks[k]))
    return out


def _loss_word(loss: float, cuts: Cuts) -> str:
    """' (high: at least the benchmark's 4.6-nat cut)' where the absolute cut says so, else ''."""
    if loss >= cuts.high_loss:
        return f" (high: at or above the benchmark's cut of {cuts.high_loss:.2f} nats)"
    return ""


def _place(rank: int, n: int, word: str, opposite: str) -> str:
    """'the highest of 12', '3rd highest of 12', '2nd lowest of 12', 'the lowest of 12';
    'the only one' for a single domain."""
    if n <= 1:
        return "the only domain"
    if rank == 1:
        return f"the {word} of {n}"
    if rank == n:
        return f"the {opposite} of {n}"
    if rank > (n + 1) / 2:
        return f"{_ordinal(n + 1 - rank)} {opposite} of {n}"
    return f"{_ordinal(rank)} {word} of {n}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
