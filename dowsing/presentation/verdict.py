"""The answer of one analysis in plain words: which domain to collect first,
how sure that is, and the one number it rests on; where the paper's
concept-subspace method disagrees with it; and a check that no sentence
about a domain contradicts that domain's diagnosis without naming the
method it comes from.

Pure functions of a Result (no Streamlit, no HTML): the Results page and the
HTML report tell the same story from here. Names of domains are returned as
they are; the caller escapes them for where they are shown (`esc`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..estimators import MEAN_LOSS, PAPER, PILOT_CURVE, PILOT_GAIN
from ..kernels import diagnosis as diagnosis_mod
from ..validation.evidence import estimator_evidence, evidence_label, load_evidence
from .charts import estimator_label, ranking_domains
from ..result import Result, format_number, format_sci

PAPER_METHOD = "the paper's concept-subspace method"
# Two neighbours in the ranking are told apart when they swap places in fewer
# than this share of the bootstrap resamples (both ways together).
SWAP_TIE = 0.10


def priority_meaning(result: Result) -> tuple[str, str]:
    """(what the ranking estimator's priority is, its unit) for headers and the
    verdict's number: the pilot curve's priority is a predicted drop of
    held-out loss in nats; a unitless score is ("priority", "")."""
    name = result.estimator
    target = (((result.extras or {}).get("ranking") or {}).get("details") or {}).get("target_n", 32)
    return {
        PILOT_CURVE: (f"predicted drop of loss after {target} more facts", "nats"),
        PILOT_GAIN: ("drop of held-out loss after the pilot fine-tune", "nats"),
        MEAN_LOSS: ("mean loss", "nats"),
        PAPER: ("mean influence by the paper's method", ""),
    }.get(name, ("priority", ""))


def with_unit(value: float | None, unit: str) -> str:
    text = format_number(value)
    return f"{text} {unit}" if unit and text != "—" else text


def join_names(names: list[str], esc=lambda s: s) -> str:
    """'A', 'A and B', 'A, B and C'."""
    names = [esc(n) for n in names]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _ranking_entries(result: Result) -> dict[str, dict]:

    return ranking_domains(result)


def stable_probability(result: Result) -> float:
    extras = result.extras or {}
    return float((extras.get("ranking") or extras.get("bootstrap") or {}).get("rank_stable_probability", 0.8))


def rank_groups(result: Result) -> list[list[str]]:
    """The ranked domains cut into groups that the bootstrap cannot tell
    apart, in rank order (a single domain is a group of one). Two
    neighbours r and r+1 share a group when one of them is unstable (holds
    its rank in fewer resamples than the stability threshold) and they swap
    places in at least SWAP_TIE of the resamples, P_a(r+1) + P_b(r); an
    unstable domain that meets no neighbour so joins the one it swaps with
    most. Otherwise a stable domain (one rank in at least the threshold's
    share of the resamples) stays apart, as the table marks it. Without a
    bootstrap every domain is its own group."""
    ranked = result.ranked()
    entries = _ranking_entries(result)
    if not ranked:
        return []
    probs = {d.name: list((entries.get(d.name) or {}).get("rank_probabilities") or []) for d in ranked}
    unstable = {d.name: (entries.get(d.name) or {}).get("rank_stable") is False for d in ranked}

    def p(name: str, position: int) -> float:  # position 0-based
        row = probs[name]
        return float(row[position]) if 0 <= position < len(row) and row[position] is not None else 0.0

    swaps = [p(a.name, i + 1) + p(b.name, i) for i, (a, b) in enumerate(zip(ranked, ranked[1:]))]
    linked = [bool(swaps[i] >= SWAP_TIE and unstable[ranked[i].name] and unstable[ranked[i + 1].name])
              for i in range(len(swaps))]
    for i, d in enumerate(ranked):
        if not unstable[d.name]:
            continue
        left = linked[i - 1] if i > 0 else False
        right = linked[i] if i < len(linked) else False
        if left or right or not swaps:
            continue
        options = [j for j in (i - 1, i) if 0 <= j < len(swaps)]
        linked[max(options, key=lambda j: swaps[j])] = True
    groups, current = [], [ranked[0].name]
    for i, d in enumerate(ranked[1:]):
        if linked[i]:
            current.append(d.name)
        else:
            groups.append(current)
            current = [d.name]
    groups.append(current)
    return groups


def tie_sentence(group: list[str], esc=lambda s: s) -> str:
    """'Astronomy, Biology and Physics cannot be told apart with these facts;
    add facts or treat them as equal.'"""
    if len(group) < 2:
        return ""
    return f"{join_names(group, esc)} cannot be told apart with these facts; add facts or treat them as equal."


def domain_helps(result: Result) -> dict[str, bool | None]:
    """Domain -> whether its diagnosis tells the user that more facts like
    theirs will lower its loss (diagnosis.HELPS of its kind); None where the
    result has no diagnosis for it or the kind is unknown to this version."""
    found = {x.get("domain"): x for x in (result.extras or {}).get("diagnosis") or [] if isinstance(x, dict)}
    return {d.name: diagnosis_mod.HELPS.get((found.get(d.name) or {}).get("kind")) for d in result.domains}


def diagnosis_sentences(result: Result) -> dict[str, str]:
    """Domain -> its diagnosis sentence, in full."""
    return {x["domain"]: x.get("sentence", "") for x in (result.extras or {}).get("diagnosis") or []
            if isinstance(x, dict) and "domain" in x}


@dataclass
class Verdict:
    """The answer at the top of the Results page and the report.

    first: the domains to collect first (more than one where they tie);
    headline: what to collect first, one sentence; how_sure: how sure, one
    sentence (a tie in plain words); number_label / number: the one number
    the ranking rests on, with its unit; caveat: where the first domain's
    diagnosis says more facts like these may not help; ties: every group of
    domains that cannot be told apart."""

    first: list[str]
    headline: str
    how_sure: str
    number_label: str
    number: str
    number_help: str
    caveat: str | None = None
    ties: list[list[str]] = field(default_factory=list)


def verdict(result: Result, esc=lambda s: s, strong=lambda s: s) -> Verdict | None:
    """The verdict of `result` in the terms of the estimator that ranked it;
    None for a result without domains. `esc` escapes a domain name for where
    it is shown, `strong` marks it up (bold)."""
    ranked = result.ranked()
    if not ranked:
        return None

    groups = rank_groups(result)
    ties = [g for g in groups if len(g) > 1]
    top = ranked[0]
    first = groups[0]
    label = estimator_label(result)
    meaning, unit = priority_meaning(result)
    entries = _ranking_entries(result)
    entry = entries.get(top.name) or {}
    interval = entry.get("priority_interval")
    n_resamples = ((result.extras or {}).get("ranking") or (result.extras or {}).get("bootstrap") or {}).get(
        "n_resamples")

    def name(n: str) -> str:
        return strong(esc(n))

    if len(first) == len(ranked) and len(ranked) > 1:
        headline = f"No domain stands out: by {label}, none of the {len(ranked)} can be told apart with these facts."
        how_sure = "Add facts to each domain, or treat them as equal and collect evenly."
    elif len(first) > 1:
        headline = f"Collect {join_names([name(n) for n in first])} first, in any order."
        how_sure = tie_sentence(first, esc)
    else:
        headline = f"Collect {name(top.name)} first."
        probs = entry.get("rank_probabilities") or []
        held = probs[0] if probs else None
        if held is not None:
            how_sure = (f"{'Sure' if held >= 0.95 else 'Fairly sure'}: {esc(top.name)} came first in {held:.0%} of "
                        f"{n_resamples or 'the'} bootstrap resamples of your facts.")
        else:
            how_sure = "How sure is not known: this result has no bootstrap of the ranking."
        later = [g for g in groups[1:] if len(g) > 1]
        if later:
            how_sure += " Below it, " + " ".join(tie_sentence(g, esc) for g in later)
    number = with_unit(top.ranking_priority, unit)
    if interval and all(v is not None for v in interval):
        number_help = (f"{meaning[:1].upper() + meaning[1:]} for {esc(top.name)}, by {label}; 90% interval "
                       f"{format_number(interval[0])} to {format_number(interval[1])}" + (f" {unit}." if unit else "."))
    else:
        number_help = f"{meaning[:1].upper() + meaning[1:]} for {esc(top.name)}, by {label}."
    if len(first) > 1:
        values = [result.domain(n).ranking_priority for n in first]
        number = (f"{format_number(min(values))} to {format_number(max(values))}" + (f" {unit}" if unit else ""))
        number_help = f"{meaning[:1].upper() + meaning[1:]} for {join_names(first, esc)}, by {label}."
    helps = domain_helps(result)
    doubtful = [n for n in first if helps.get(n) is False]
    caveat = None
    if doubtful:
        caveat = (f"Their diagnoses below say more facts like these may not help {join_names(doubtful, esc)} much"
                  if len(doubtful) > 1 else
                  f"{esc(doubtful[0])}'s diagnosis below says more facts like these may not help it much") + (
            f": {label} still puts {'them' if len(doubtful) > 1 else 'it'} first, so the gain from any domain "
            "is small; read the diagnoses before you collect.")
    return Verdict(first=first, headline=headline, how_sure=how_sure,
                   number_label=meaning[:1].upper() + meaning[1:] + (f" ({unit})" if unit else ""),
                   number=number, number_help=number_help, caveat=caveat, ties=ties)


# --- the paper's method beside the default ------------------------------------

def paper_ranks(result: Result) -> dict[str, int]:
    """Domain -> its rank by the paper's Mean (1 = largest; no Mean last)."""
    order = sorted(result.domains, key=lambda d: -(d.mean if d.mean is not None and math.isfinite(d.mean)
                                                   else -math.inf))
    return {d.name: k for k, d in enumerate(order, start=1)}


def paper_evidence_sentence(result: Result) -> str | None:
    """How the paper's method fared on the shipped benchmark, beside the
    estimator that ranked this result; None without shipped evidence."""
    data = load_evidence()
    paper = estimator_evidence(PAPER)
    if not data or not paper or paper.get("spearman") is None:
        return None

    def rho(entry: dict) -> str:
        lo, hi = entry.get("interval") or [None, None]
        return f"ρ = {entry['spearman']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")

    text = (f"On the shipped benchmark ({data['n_domains']} domains, real fine-tunes), the paper's method "
            f"ranked the domains with {rho(paper)} against the realised gain")
    name = result.estimator
    mine = estimator_evidence(name) if name != PAPER else None
    if mine and mine.get("spearman") is not None:
        text += f"; {evidence_label(name, mine)}, which ranks here, reached {rho(mine)}"
    mean_loss = estimator_evidence(MEAN_LOSS)
    if mean_loss and mean_loss.get("spearman") is not None and name != MEAN_LOSS:
        text += f", and plain mean loss {mean_loss['spearman']:.2f}"
    return text + ". Its numbers are shown for what they are: a different, less accurate reading."


def paper_disagreements(result: Result, esc=lambda s: s) -> list[str]:
    """Where the paper's method disagrees with the ranking that ranks, one
    sentence each, every one naming the paper's method: another domain first,
    domains it moves by two or more ranks, and domains where it predicts no
    drop of loss (Mean ≤ 0) while the diagnosis says more facts help (or a
    drop where the diagnosis says they do not). Empty for a result ranked
    by the paper's method."""
    if result.estimator == PAPER or not result.domains:
        return []
    by_paper = paper_ranks(result)
    ranked = result.ranked()
    out = []
    paper_first = min(by_paper, key=by_paper.get)
    if paper_first != ranked[0].name:
        out.append(f"The paper's method would collect {esc(paper_first)} first, where the ranking above puts "
                   f"{esc(ranked[0].name)} first.")
    moved = [d for d in ranked if abs(by_paper[d.name] - d.rank) >= 2]
    if moved:
        out.append("The paper's method ranks " + "; ".join(
            f"{esc(d.name)} {_ordinal(by_paper[d.name])} (above: {_ordinal(d.rank)})" for d in moved) + ".")
    helps = domain_helps(result)
    no_drop = [d.name for d in ranked if d.mean is not None and math.isfinite(d.mean) and d.mean <= 0
               and helps.get(d.name) is True]
    drop = [d.name for d in ranked if d.mean is not None and math.isfinite(d.mean) and d.mean > 0
            and helps.get(d.name) is False and by_paper[d.name] == 1]
    if no_drop:
        out.append(f"The paper's method predicts no drop of loss from more data on {join_names(no_drop, esc)} "
                   "(its Mean is not positive), while the pilot fine-tunes on your facts measured that more facts "
                   "help: with an indefinite curvature a Mean can be negative for that reason alone.")
    if drop:
        out.append(f"The paper's method predicts the largest drop of loss for {join_names(drop, esc)}, while the "
                   "pilot fine-tunes on your facts measured little gain from more facts like them.")
    if out:
        out.append("Why they part: the paper's method predicts the change of loss from gradients and curvature of "
                   "a small concept adapter at today's weights; the ranking above rests on what short fine-tunes "
                   "on your own facts actually did.")
    return out


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# --- one story: no sentence about a domain against its diagnosis --------------

# Phrases that tell the reader more data of a kind will, or will not, lower its
# loss. A sentence that names a method ("paper") is that method's reading and
# is allowed to differ.
SAYS_NO = ("not predicted to lower", "unlikely to help", "teach little", "may not help", "not help",
           "change little", "changes little", "largely knows", "pull against")
SAYS_YES = ("keep paying off", "would help most", "expected to help", "gap that more facts", "gains most",
            "more facts help", "that more facts like these fill")
METHOD_WORDS = ("paper",)


def sentence_polarity(sentence: str) -> bool | None:
    """True when `sentence` says more data helps, False when it says it does
    not, None when it says neither (or both)."""
    low = sentence.lower()
    no = any(p in low for p in SAYS_NO)
    yes = any(p in low for p in SAYS_YES)
    return None if no == yes else yes


def contradictions(text: str, result: Result) -> list[tuple[str, str, str]]:
    """(domain, its diagnosis sentence, the sentence that contradicts it) for
    each sentence of `text` (the page's or the report's visible text) that
    names exactly one domain, says that more data helps it or does not,
    disagrees with that domain's diagnosis (HELPS) and names no method."""
    helps = domain_helps(result)
    diag = diagnosis_sentences(result)
    names = [d.name for d in result.domains]
    own = {" ".join(s.split()) for s in diag.values()}
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        flat = " ".join(sentence.split())
        if not flat or any(flat in s for s in own):
            continue
        named = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", flat)]
        if len(named) != 1 or helps.get(named[0]) is None:
            continue
        if any(w in flat.lower() for w in METHOD_WORDS):
            continue
        polarity = sentence_polarity(flat)
        if polarity is not None and polarity != helps[named[0]]:
            out.append((named[0], diag.get(named[0], ""), flat))
    return out
