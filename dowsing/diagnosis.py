"""A sentence per domain on what kind of domain it looks like, from measured
quantities only: its mean loss, and its pilot drop (how much training the
last blocks briefly on one half of its facts lowered the other half's loss,
averaged both ways; `dowsing.pilots`).

Loss says how much the model does not yet know; the pilot drop says how much
of that more facts like these can teach. Where they part ways (garbled text,
random codes, facts that contradict each other, near-duplicates) the loss
alone points the wrong way, and the sentence says so with its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = {
    "contradictory": "training on some facts makes the others worse",
    "learnable gap": "high loss, and more facts like these teach the rest",
    "hard to learn": "high loss, but more facts like these teach little",
    "overlapping": "low loss, but the facts carry strongly to each other",
    "known": "low loss, and more facts like these change little",
}
# Whether a kind tells the user that more facts like theirs will lower the loss:
# every other sentence shown about a domain must agree with this.
HELPS = {
    "contradictory": False,
    "learnable gap": True,
    "hard to learn": False,
    "overlapping": True,
    "known": False,
}


@dataclass
class Diagnosis:
    """One domain's reading: kind (a key of KINDS), the sentence, and the
    numbers it rests on (mean loss and pilot drop in nats, the drop as a
    share of the loss, and both ranks among the analysed domains, 1 = highest)."""

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


def diagnose(names: list, loss: list, pilot_drop: list, pilot_facts: int | None = None) -> list:
    """One Diagnosis per domain. A domain's loss is "high" when it is at or
    above the median of the domains analysed together, and its pilot drop
    "large" when above the median drop; a negative drop is
    "contradictory" whatever the loss. Where the pilot drop is missing (a
    domain too small for a pilot) the sentence says so and rests on the loss."""
    loss = [float(x) for x in loss]
    drops = [None if d is None or not np.isfinite(d) else float(d) for d in pilot_drop]
    loss_median = float(np.median(loss))
    known = [d for d in drops if d is not None]
    drop_median = float(np.median(known)) if known else 0.0
    loss_ranks = _ranks(loss)
    drop_ranks = _ranks([d if d is not None else float("nan") for d in drops])
    n = len(names)
    half = f"half of your facts ({pilot_facts} facts)" if pilot_facts else "half of your facts"
    out = []
    for k, name in enumerate(names):
        L, D = loss[k], drops[k]
        level = "high" if L >= loss_median else "low"
        loss_text = f"{level} loss ({L:.2f} nats, {_place(loss_ranks[k], n, 'highest')})"
        if D is None:
            out.append(Diagnosis(name, "known" if level == "low" else "learnable gap",
                                 f"{loss_text[0].upper()}{loss_text[1:]}; too few facts for a pilot run, so this "
                                 "reading rests on the loss alone.", L, None, None, loss_ranks[k], None))
            continue
        pct = 100.0 * D / L if L > 0 else None
        share = f" ({pct:.1f}% of its loss)" if pct is not None else ""
        drop_text = f"{abs(D):.3f} nats{share}"
        if D < 0:
            kind = "contradictory"
            sentence = (f"{loss_text[0].upper()}{loss_text[1:]}, and training on {half} raised the other half's "
                        f"loss by {abs(D):.3f} nats: the facts pull against each other, so more of the same may "
                        "not help and can hurt.")
        elif level == "high" and D <= drop_median:
            kind = "hard to learn"
            sentence = (f"High loss ({L:.2f} nats, {_place(loss_ranks[k], n, 'highest')}), but training on {half} "
                        f"lowered the other half's loss by only {drop_text}, {_place(drop_ranks[k], n, 'largest drop')}: more "
                        "of the same is unlikely to help much.")
        elif level == "high":
            kind = "learnable gap"
            sentence = (f"High loss ({L:.2f} nats, {_place(loss_ranks[k], n, 'highest')}), and training on {half} "
                        f"lowered the other half's loss by {drop_text}, {_place(drop_ranks[k], n, 'largest drop')}: a gap "
                        "that more facts like these fill.")
        elif D > drop_median:
            kind = "overlapping"
            sentence = (f"Low loss ({L:.2f} nats, {_place(loss_ranks[k], n, 'highest')}), but training on {half} "
                        f"lowered the other half's loss by {drop_text}, {_place(drop_ranks[k], n, 'largest drop')}: your facts "
                        "overlap strongly, so more like them keep paying off.")
        else:
            kind = "known"
            sentence = (f"Low loss ({L:.2f} nats, {_place(loss_ranks[k], n, 'highest')}), and training on {half} "
                        f"lowered the other half's loss by only {drop_text}: the model largely knows this already.")
        out.append(Diagnosis(name, kind, sentence, L, D, pct, loss_ranks[k], drop_ranks[k]))
    return out


def _place(rank: int, n: int, word: str) -> str:
    """'the highest of 12', '3rd highest of 12'."""
    return f"the {word} of {n}" if rank == 1 else f"{_ordinal(rank)} {word} of {n}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
