"""Presenting a Result: the verdict (`dowsing.presentation.verdict`), the ranking that
ranks and the paper's quantities apart from it, the paper's full table for
the CLI (formatted, with reasons for "—"), the facts that move each domain
most, solver diagnostics, CSV, and a self-contained HTML report (plotly.js
inline, so it opens offline) that tells the Results page's story.
No Streamlit here; the app shows the same pieces.
"""
from __future__ import annotations

import html
import io
import json
import math
from datetime import datetime

import pandas as pd

from . import charts
from ..estimators import MEAN_LOSS, PAPER, PILOT_CURVE, PILOT_GAIN
from ..kernels import metrics
from ..validation.evidence import beats_mean_loss, estimator_evidence, evidence_sentence
from ..result import Result, format_sci
from ..safe_text import csv_cell
from . import verdict as verdict_mod
from .verdict import format_number

MEAN_SHARE = "Share of Mean, paper (%)"
TABLE_COLUMNS = ["Rank", "Concept", "Priority", "Share (%)", MEAN_SHARE, "Mean (paper)", "Δn@10%", "t vs rest", "p"]
MEAN_SHARE_MEANING = ("the paper's Share: the domain's total influence |N_k Mean_k| (N_k its facts) out of the sum "
                      "over every domain")


def format_t(value: float | None) -> str:
    """t like the paper's table: two decimals; "—" when undefined."""
    return "—" if value is None else f"{value:.2f}"


def format_p(value: float | None) -> str:
    """Two-sided p: plain below 3 significant digits, scientific when tiny."""
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 1e-3 else format_sci(value)


UNSTABLE = "⚠ unstable"


def format_share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def _has_mean(d) -> bool:
    return d.mean is not None and math.isfinite(d.mean)


def mean_shares(result: Result) -> dict[str, float | None]:
    """Domain -> the paper's Share of its Mean, |N_k Mean_k| / sum_j |N_j Mean_j| * 100
    (`metrics.shares_pct` on each domain's total influence sum_i I_ki = N_k Mean_k,
    N_k its facts), over the domains that have a Mean; None for a domain
    without one (its Mean is None or NaN). Under the paper's ranking it is the
    Share column itself."""
    known = [d for d in result.domains if _has_mean(d)]
    shares = dict(zip((d.name for d in known), metrics.shares_pct([d.n_facts * d.mean for d in known])))
    return {d.name: shares.get(d.name) for d in result.domains}


def mean_share_is_share(result: Result) -> bool:
    """True when the Share column already is the Share of Mean: ranked by the
    paper's estimator (the two are then one formula) and they agree to the
    digits shown (a result from an engine that ranked otherwise does not)."""
    if result.estimator != PAPER:
        return False
    shares = mean_shares(result)
    return all(shares[d.name] is not None and d.share_pct is not None
               and abs(shares[d.name] - d.share_pct) < 0.05 for d in result.domains)


def table_columns(result: Result) -> list[str]:
    """The ranked table's columns for this result: TABLE_COLUMNS, less the
    Share of Mean where the Share column already is it."""
    return [c for c in TABLE_COLUMNS if c != MEAN_SHARE or not mean_share_is_share(result)]


def mean_share_note(result: Result) -> str:
    """What the Share of Mean column is (or that Share is it), and which
    domains it leaves out for want of a Mean."""
    if mean_share_is_share(result):
        text = f"Share here is also the Share of Mean, paper: {MEAN_SHARE_MEANING}."
    else:
        text = f"Share of Mean, paper: {MEAN_SHARE_MEANING}, whatever ranked the domains."
    missing = [d.name for d in result.ranked() if not _has_mean(d)]
    if missing:
        text += (f" {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no Mean (—): "
                 "the Share of Mean is over the other domains.")
    return text


def format_interval(interval, fmt=format_sci) -> str | None:
    """'[lo, hi]' with each end formatted like its column; None when there is no interval."""
    if not interval or len(interval) != 2 or all(v is None for v in interval):
        return None
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def rank_probability_text(probabilities) -> str:
    """'P(rank 1) = 55%, P(rank 2) = 45%': the ranks a domain holds in ≥ 0.5% of resamples."""
    parts = [f"P(rank {r}) = {p:.0%}" for r, p in enumerate(probabilities or [], start=1) if p >= 0.005]
    return ", ".join(parts)


def ranking_statement(result: Result) -> str:
    """Which estimator ranked the domains, in one sentence."""
    name = result.estimator
    label = charts.estimator_label(result)
    if name == PAPER:
        return (f"Ranked by {label} (estimator “paper”, the Data Dowsing paper's method): "
                "Priority = Mean = ḡᵀ(H+λI)⁻¹ḡ.")
    return (f"Ranked by {label} (estimator “{name}”). Share is each domain's |priority| out of the total; "
            "the paper's Mean, Δn@10% and saturation curves come from the paper's concept-subspace method, "
            "apart from the ranking.")


def evidence_text(result: Result) -> str:
    """What the benchmark measured for this result's estimator (dowsing.validation.evidence), verbatim."""
    return evidence_sentence(result.estimator)


def evidence_is_weak(result: Result) -> bool:
    """True when the estimator did not beat ranking by mean loss on the benchmark
    (mean loss itself, an unmeasured estimator, or an interval that includes 0)."""
    name = result.estimator
    return name == MEAN_LOSS or not beats_mean_loss(estimator_evidence(name))


def table_rows(result: Result) -> list[dict]:
    """Rows of the ranked table as display strings, plus why Δn is missing.

    Priority is the ranking estimator's score (the paper's Mean for results of
    engines before 1.3.0); Mean (paper) and Δn@10% are the paper's. With a
    bootstrap in the result, "intervals" holds the 90% intervals per column
    ('[lo, hi]'): Priority, Share and the rank stability from the ranking
    estimator's bootstrap (extras["ranking"]), Mean (paper) and Δn@10% from
    the paper's (extras["bootstrap"]); "rank_stable" says whether the most
    likely rank has probability ≥ the stability threshold, "rank_help" gives
    the rank probabilities."""
    boot = charts.bootstrap_domains(result)
    ranking = charts.ranking_domains(result)
    shares_of_mean = mean_shares(result)
    rows = []
    for d in result.ranked():
        b = boot.get(d.name)
        r = ranking.get(d.name)
        intervals: dict[str, str] = {}
        rank_stable, rank_help = None, None
        if r is not None:
            for col, key, fmt in (("Priority", "priority_interval", format_sci),
                                  ("Share (%)", "share_pct_interval", format_share)):
                text = format_interval(r.get(key), fmt)
                if text:
                    intervals[col] = text
            rank_stable = bool(r.get("rank_stable", True))
            rank_help = rank_probability_text(r.get("rank_probabilities"))
        if b is not None:
            for col, key in (("Mean (paper)", "mean_interval"), ("Δn@10%", "delta_n_10pct_interval")):
                text = format_interval(b.get(key), format_sci)
                if text:
                    intervals[col] = text
            fraction = b.get("delta_n_fraction")
            if "Δn@10%" in intervals and fraction is not None and fraction < 0.995:
                intervals["Δn@10%"] += f" ({fraction:.0%} of resamples)"
        rows.append({
            "Rank": d.rank if rank_stable is not False else f"{d.rank} {UNSTABLE}",
            "Concept": d.name,
            "Priority": format_sci(d.ranking_priority),
            "Share (%)": format_share(d.share_pct),
            MEAN_SHARE: format_share(shares_of_mean[d.name]),
            "Mean (paper)": format_sci(d.mean),
            "Δn@10%": format_sci(d.delta_n_10pct),
            "t vs rest": format_t(d.t_vs_rest),
            "p": format_p(d.p_value),
            "reason": d.delta_n_reason if d.delta_n_10pct is None else None,
            "intervals": intervals,
            "rank_stable": rank_stable,
            "rank_help": rank_help,
        })
    return rows


def formatted_table(result: Result) -> pd.DataFrame:
    """The ranked table as strings (what the app and the report show); a 90% bootstrap
    interval follows its value ('3.7×10⁻² [2.9×10⁻², 4.4×10⁻²]') when the result has one,
    and an unstable rank reads '2 ⚠ unstable'."""
    columns = table_columns(result)
    rows = []
    for row in table_rows(result):
        shown = {col: row[col] for col in columns}
        for col, interval in row["intervals"].items():
            shown[col] = f"{shown[col]} {interval}"
        if row["rank_stable"] is not None:
            shown["Rank"] = str(shown["Rank"])  # one type per column once some ranks carry a mark
        rows.append(shown)
    return pd.DataFrame(rows, columns=columns)


def interval_note(result: Result) -> str | None:
    """What the brackets mean; None without any bootstrap."""
    extras = result.extras or {}
    boot = extras.get("bootstrap")
    ranking = extras.get("ranking") or {}
    if not boot and not ranking.get("priority_interval"):
        return None
    source = ranking if ranking.get("priority_interval") else boot
    level = source.get("level", 0.9)
    threshold = source.get("rank_stable_probability", 0.8)
    text = (f"[lo, hi]: {level:.0%} bootstrap interval over each domain's facts "
            f"({source.get('n_resamples', '?')} resamples")
    if ranking.get("priority_interval") and (result.estimator != PAPER or not boot):
        text += ("): Priority, Share and rank stability resample the estimator's per-fact values; "
                 "Mean (paper) and Δn@10% resample the gradients with the curvature held fixed." if boot else
                 "; the estimator's per-fact values).")
    else:
        text += ", curvature held fixed)."
    return (text + f" {UNSTABLE}: the domain holds its rank in fewer than {threshold:.0%} of the resamples "
            "(hover the rank for the probabilities).")


def unstable_domains(result: Result) -> dict[str, str]:
    """Domain -> its rank probabilities, for the domains whose rank is unstable."""
    return {row["Concept"]: row["rank_help"] for row in table_rows(result) if row["rank_stable"] is False}


def table_html(result: Result, colors: dict[str, str] | None = None) -> str:
    """The table as HTML; a "—" carries its reason as a hover tooltip (title attribute)."""
    colors = colors or charts.result_colors(result)
    columns = table_columns(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in table_rows(result):
        cells = []
        for col in columns:
            value = html.escape(str(row[col]))
            if col == "Concept":
                swatch = f'<span class="dw-swatch" style="background:{colors.get(row["Concept"], "#999")}"></span>'
                value = swatch + value
            elif col == "Δn@10%" and row["reason"]:
                value = f'<abbr class="dw-missing" title="{html.escape(row["reason"], quote=True)}">—</abbr>'
            elif col == "Rank" and row["rank_help"]:
                css = "dw-unstable" if row["rank_stable"] is False else "dw-rank"
                value = f'<abbr class="{css}" title="{html.escape(row["rank_help"], quote=True)}">{value}</abbr>'
            if col in row["intervals"]:
                value += f'<br><span class="dw-ci">{html.escape(row["intervals"][col])}</span>'
            cells.append(f'<td class="dw-{"text" if col == "Concept" else "num"}">{value}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table class="dw-table"><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>"
    )


TABLE_CSS = """
.dw-scroll { max-width: 100%; overflow-x: auto; }
.dw-table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin: 0.5rem 0 1rem; }
.dw-table th { text-align: right; border-bottom: 2px solid #333; padding: 6px 12px; font-weight: 600; vertical-align: bottom; }
.dw-table td, .dw-table th { overflow-wrap: break-word; }
.dw-table td.dw-num, .dw-table td.dw-text { white-space: nowrap; }
.dw-table td.dw-fact { text-align: left; width: 100%; }
.dw-facts th:last-child { text-align: left; }
.dw-table th:nth-child(2) { text-align: left; }
.dw-table td { border-bottom: 1px solid #ddd; padding: 6px 12px; }
.dw-table td.dw-num { text-align: right; }
.dw-table td.dw-text { text-align: left; font-weight: 600; }
.dw-table tbody tr:first-child td { background: rgba(78,121,167,0.08); }
.dw-swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.5em; vertical-align: baseline; }
.dw-missing { text-decoration: none; border-bottom: 1px dotted #888; cursor: help; font-size: 1.05em; }
.dw-ci { color: #666; font-size: 0.82em; white-space: nowrap; }
.dw-rank { text-decoration: none; cursor: help; }
.dw-unstable { text-decoration: none; border-bottom: 1px dotted #b35900; color: #b35900; cursor: help; font-weight: 600; white-space: nowrap; }
"""


TRANSFER_HELP = ("The paper's method's prediction, read across a row: cell (row j, column k) is how much collecting "
                 "data like domain k is predicted to change the loss of domain j (∇L_jᵀz_k; blue: the loss falls, "
                 "red: it rises; the diagonal is each domain's own Mean) — e.g. if we collect Physics, does "
                 "Astronomy improve too?")


# --- the story: the verdict, the ranking that ranks, the paper's method beside it ---

def verdict_html(result: Result) -> str:
    """The verdict (dowsing.presentation.verdict) as the report's opening block."""
    found = verdict_mod.verdict(result, esc=html.escape, strong=lambda s: f"<b>{s}</b>")
    if found is None:
        return ""
    esc = html.escape
    caveat = f"<p class='caveat'>{found.caveat}</p>" if found.caveat else ""
    return (f"<div class='verdict'><p class='lead'>{found.headline}</p><p>{found.how_sure}</p>"
            f"<p class='number'><span class='number-label'>{esc(found.number_label)}:</span> "
            f"<b>{esc(found.number)}</b><br><span class='note'>{found.number_help}</span></p>{caveat}</div>")


def ranking_rows(result: Result) -> list[dict]:
    """The ranking that ranks, one row per domain in rank order, as display
    strings: Rank, Domain, the priority with its unit (plain decimals), its
    90% interval, how often the domain holds its rank across the bootstrap
    resamples, and its Share."""
    meaning, unit = verdict_mod.priority_meaning(result)
    value_col = meaning[:1].upper() + meaning[1:] + (f" ({unit})" if unit else "")
    entries = charts.ranking_domains(result)
    rows = []
    for d in result.ranked():
        entry = entries.get(d.name) or {}
        interval = entry.get("priority_interval")
        probs = entry.get("rank_probabilities") or []
        held = probs[d.rank - 1] if 0 < d.rank <= len(probs) and probs[d.rank - 1] is not None else None
        rows.append({
            "Rank": str(d.rank) + (f" {UNSTABLE}" if entry.get("rank_stable") is False else ""),
            "Domain": d.name,
            value_col + " [90% interval]": format_number(d.ranking_priority) + (
                f"\n[{format_number(interval[0])}, {format_number(interval[1])}]"
                if interval and None not in interval else ""),
            "Holds the rank (% of resamples)": "—" if held is None else f"{100 * held:.0f}",
            "Share (%)": "—" if d.share_pct is None else f"{d.share_pct:.1f}",
            "rank_help": rank_probability_text(probs),
        })
    return rows


def _rows_html(rows: list[dict], colors: dict[str, str], name_col: str, tips: dict | None = None) -> str:
    """A dw-table of display rows ("reason" and "rank_help" are not columns);
    the name column gets its swatch; `tips` maps (row index, column) to a
    tooltip; a value "a\nb" shows b on a smaller second line."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c not in ("reason", "rank_help")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for col in columns:
            value, _, below = str(row[col]).partition("\n")
            value = html.escape(value) + (f'<br><span class="dw-ci">{html.escape(below)}</span>' if below else "")
            tip = (tips or {}).get((i, col))
            if col == name_col:
                value = (f'<span class="dw-swatch" style="background:{colors.get(row[col], "#999")}"></span>' + value)
            if tip:
                value = f'<abbr class="dw-missing" title="{html.escape(tip, quote=True)}">{value}</abbr>'
            cells.append(f'<td class="dw-{"text" if col == name_col else "num"}">{value}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<div class="dw-scroll"><table class="dw-table"><thead><tr>' + head + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div>")


def facts_table_html(columns: dict[str, list]) -> str:
    """Columns of numbers and a last, wrapping "Fact" column as a dw-table
    that fits the page."""
    names = list(columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in names)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"dw-fact" if c == "Fact" else "dw-num"}">{html.escape(str(columns[c][i]))}</td>'
                         for c in names) + "</tr>"
        for i in range(len(columns[names[0]]) if names else 0))
    return ('<div class="dw-scroll"><table class="dw-table dw-facts"><thead><tr>' + head + "</tr></thead><tbody>"
            + body + "</tbody></table></div>")


def ranking_table_html(result: Result, colors: dict[str, str] | None = None) -> str:
    """The ranking that ranks as an HTML table (`ranking_rows`); an unstable
    rank carries its rank probabilities as a tooltip."""
    colors = colors or charts.result_colors(result)
    rows = ranking_rows(result)
    tips = {(i, "Rank"): r["rank_help"] for i, r in enumerate(rows) if r["rank_help"]}
    return _rows_html(rows, colors, "Domain", tips)


def paper_rows(result: Result) -> list[dict]:
    """The paper's quantities per domain, in the order of the ranking that
    ranks: its own rank, Mean, Share of Mean, Δn@10% (facts) with the reason
    where it is missing, t vs rest and p."""
    shares = mean_shares(result)
    by_paper = verdict_mod.paper_ranks(result)
    boot = charts.bootstrap_domains(result)
    rows = []
    for d in result.ranked():
        interval = (boot.get(d.name) or {}).get("mean_interval")
        rows.append({
            "Domain": d.name,
            "Paper's rank": by_paper[d.name],
            "Mean influence [90% interval]": format_number(d.mean) + (
                f"\n[{format_number(interval[0])}, {format_number(interval[1])}]"
                if interval and None not in interval else ""),
            "Share of Mean (%)": "—" if shares[d.name] is None else f"{shares[d.name]:.1f}",
            "Δn@10% (facts)": format_number(d.delta_n_10pct),
            "t vs rest": format_t(d.t_vs_rest),
            "p": format_p(d.p_value),
            "reason": d.delta_n_reason if d.delta_n_10pct is None else None,
        })
    return rows


def paper_table_html(result: Result, colors: dict[str, str] | None = None) -> str:
    """`paper_rows` as an HTML table; a missing Δn carries its reason (by the
    paper's method) as a tooltip."""
    colors = colors or charts.result_colors(result)
    rows = paper_rows(result)
    tips = {(i, "Δn@10% (facts)"): "By the paper's method: " + r["reason"] for i, r in enumerate(rows)
            if r["reason"]}
    return _rows_html(rows, colors, "Domain", tips)


PAPER_COLUMNS_HELP = ("Mean influence: the paper's average per-fact influence I = gᵀz in the concept subspace "
                      "(positive: more facts like these are predicted to lower the loss). Share of Mean: the "
                      "domain's total influence |N_k Mean_k| out of all domains'. Δn@10%: how many more facts until "
                      "the paper's marginal influence μ(n) = c(n+N₀)^−α falls to a tenth of today's. t vs rest: "
                      "Welch's t of the domain's per-fact values against all other domains' (p two-sided).")


def paper_intro(result: Result, esc=lambda s: s) -> list[str]:
    """The paper's section's opening sentences: how the method fared on the
    shipped benchmark, then where it disagrees with the ranking above and why
    (dowsing.presentation.verdict)."""
    out = []
    evidence = verdict_mod.paper_evidence_sentence(result)
    if evidence:
        out.append(evidence)
    if result.estimator == PAPER:
        out.append("This result is ranked by the paper's method itself: the ranking above is this method's.")
        return out
    disagreements = verdict_mod.paper_disagreements(result, esc)
    out += disagreements or ["On these domains the paper's method orders the domains as the ranking above does."]
    return out


def missing_delta_n_notes(result: Result) -> dict[str, str]:
    """Domain -> why the paper's method gives no Δn@10%, as a sentence that
    names the method."""
    return {name: "By the paper's method: " + why[:1].lower() + why[1:] for name, why in missing_reasons(result).items()}



def missing_reasons(result: Result) -> dict[str, str]:
    """Domain -> why its Δn@10% is missing ("—" in the table)."""
    return {
        d.name: d.delta_n_reason or "no saturation estimate"
        for d in result.ranked()
        if d.delta_n_10pct is None
    }


def fact_score_key(result: Result) -> str:
    """Which per-fact number orders the facts: the ranking estimator's per-fact
    value ("priority") when the result has it, else the paper's influence."""
    return "priority" if any(r.get("priority") is not None for r in result.per_example) else "influence"


def top_examples(result: Result, domain: str, top: int = 5, key: str = "influence") -> tuple[list[dict], list[dict]]:
    """The facts of `domain` with the highest and the lowest `key`: the paper's
    influence I_ki = g_kiᵀ z_k, or the ranking estimator's per-fact "priority"."""
    rows = [r for r in result.per_example if r.get("domain") == domain and r.get(key) is not None]
    rows = sorted(rows, key=lambda r: r[key], reverse=True)
    # With few facts the two lists would overlap: split them down the middle instead.
    n_high = min(top, (len(rows) + 1) // 2)
    n_low = min(top, len(rows) - n_high)
    highest = rows[:n_high]
    lowest = list(reversed(rows[len(rows) - n_low:])) if n_low else []
    return highest, lowest


def diagnostics_table(result: Result) -> pd.DataFrame:
    """Solver and fit diagnostics per domain, in rank order."""
    rows = []
    for d in result.ranked():
        solver = d.solver or {}
        sat = d.saturation or {}
        rows.append({
            "Concept": d.name,
            "Solver": solver.get("method"),
            "Iterations": solver.get("iterations"),
            "Rel. residual": format_sci(solver.get("rel_residual")),
            "Non-positive curvature": "yes" if solver.get("nonpositive_curvature") else "no",
            "‖v‖ before normalising": format_sci(d.concept_vector_norm, 2),
            "α": format_sci(sat.get("alpha"), 2),
            "N₀": format_sci(sat.get("n0"), 2),
            "c": format_sci(sat.get("c"), 2),
            "R²": "—" if sat.get("r2") is None else f"{sat['r2']:.4f}",
            "Δn direct": format_sci(d.delta_n_direct),
            "Facts": d.n_facts,
        })
    return pd.DataFrame(rows)


def ranking_details(result: Result) -> str | None:
    """What the ranking estimator used, in one line; None for older results."""
    ranking = (result.extras or {}).get("ranking")
    if not ranking:
        return None
    details = ranking.get("details") or {}
    text = f"Ranking estimator: {ranking.get('label') or result.estimator}"
    if "parameters" in details:
        text += (f"; gradients over {details['parameters']:,} parameters (the last {details.get('blocks')} blocks "
                 "and the final norm)")
    if details.get("preconditioner") == "adam":
        text += (f"; Adam's second moment from {details.get('adam_batches')} seeded minibatches of "
                 f"{details.get('adam_batch_size')} facts, ε = {details.get('adam_eps'):g}")
    seconds = ranking.get("seconds")
    return text + (f"; {seconds:.1f} s." if isinstance(seconds, (int, float)) else ".")


def curvature_warnings(result: Result) -> list[str]:
    """What non-positive curvature means for this result, per kind of solver.

    CG stops at the first direction with p^T (H + lambda I) p <= 0, so its z is
    not the solution; a dense solve of an indefinite system is still exact, but
    the Means can then be negative and mu(n) can pass through poles."""
    flagged = [d for d in result.ranked() if (d.solver or {}).get("nonpositive_curvature")]
    stopped = [d.name for d in flagged if (d.solver or {}).get("method") == "cg"]
    indefinite = [d.name for d in flagged if (d.solver or {}).get("method") != "cg"]
    out = []
    if stopped:
        out.append("CG met a direction of non-positive curvature for " + ", ".join(stopped) +
                   " and stopped there: its z is not the solution and those Means are not to be trusted. "
                   "Use the auto or exact solver, Gauss-Newton curvature, or a larger damping λ.")
    if indefinite:
        out.append("H + λI is not positive definite for " + ", ".join(indefinite) +
                   ": the dense solve is still exact, but the loss is not convex there, so a "
                   "Mean can be negative and μ(n) can jump where H(n) + λI turns singular. Gauss-Newton "
                   "curvature or a larger damping λ gives a positive-definite system.")
    return out


def share_meaning(result: Result) -> str:
    """What the Share column is a share of, for the estimator that ranked
    the result: Share_k = |priority_k| / sum_j |priority_j| (the paper's
    estimator: of |sum_i I_ki|)."""
    name = result.estimator
    if name == PAPER:
        return "the domain's part of the total |influence| (the paper's Share)"
    if name == PILOT_CURVE:
        target = ((result.extras or {}).get("ranking") or {}).get("details", {}).get("target_n", 32)
        return (f"the domain's part of the total predicted gain at {target} more facts (the pilot learning curve's "
                "extrapolated drop of held-out loss; magnitudes)")
    if name == PILOT_GAIN:
        return "the domain's part of the total pilot gain (drop of held-out loss after the pilot fine-tunes; magnitudes)"
    if name == MEAN_LOSS:
        return "the domain's part of the total mean loss in nats, which says little about what more data buys"
    return "the domain's part of the total |priority|"


def share_heading(result: Result) -> str:
    return {PAPER: "Share of influence", PILOT_CURVE: "Share of the predicted gain",
            PILOT_GAIN: "Share of the pilot gain", MEAN_LOSS: "Share of mean loss"}.get(result.estimator,
                                                                                        "Share of |priority|")


DIAGNOSIS_HELP = ("Each domain's kind from measured numbers only: its mean loss, and how much fine-tuning the last "
                  "blocks briefly on one half of its facts (at most 8 of them) lowered the other half's loss "
                  "(both ways, averaged). "
                  "Loss says what the model does not know yet; the drop says how much of that more facts like "
                  "these can teach.")


def diagnosis_rows(result: Result) -> list[dict]:
    """Per domain, in rank order: {"Rank", "Concept", "Kind", "Diagnosis"};
    empty when the result has no diagnosis."""
    by_name = {d["domain"]: d for d in (result.extras or {}).get("diagnosis") or []}
    return [{"Rank": d.rank, "Concept": d.name, "Kind": by_name[d.name]["kind"],
             "Diagnosis": by_name[d.name]["sentence"]} for d in result.ranked() if d.name in by_name]


def _diagnosis_html(result: Result) -> str:
    rows = diagnosis_rows(result)
    if not rows:
        return ""
    esc = html.escape
    items = "".join(f"<li><b>{esc(r['Concept'])}</b> (rank {r['Rank']}, {esc(r['Kind'])}): {esc(r['Diagnosis'])}</li>"
                    for r in rows)
    return f"<h2>What kind of domain each is</h2><p class='note'>{esc(DIAGNOSIS_HELP)}</p><ul>{items}</ul>"


def to_csv(result: Result) -> str:
    """One row per domain with full-precision numbers (empty cell = null), the
    Share of Mean (`mean_shares`) in every file whatever ranked it; with a
    bootstrap also the 90% interval ends (priority and share from the ranking
    estimator's bootstrap, mean and Δn from the paper's), rank stability and P(rank r).
    Text cells that start like a spreadsheet formula get a leading apostrophe."""
    boot = charts.bootstrap_domains(result)
    ranking = charts.ranking_domains(result)
    shares_of_mean = mean_shares(result)
    diagnosis = {x["domain"]: x for x in (result.extras or {}).get("diagnosis") or []}
    rows = []
    for d in result.ranked():
        sat = d.saturation or {}
        solver = d.solver or {}
        rows.append({
            "rank": d.rank, "concept": d.name, "estimator": result.estimator, "priority": d.ranking_priority,
            "share_pct": d.share_pct, "share_of_mean_pct": shares_of_mean[d.name], "mean": d.mean,
            "delta_n_10pct": d.delta_n_10pct, "delta_n_direct": d.delta_n_direct,
            "delta_n_reason": d.delta_n_reason, "t_vs_rest": d.t_vs_rest, "p_value": d.p_value,
            "n_facts": d.n_facts, "alpha": sat.get("alpha"), "n0": sat.get("n0"), "c": sat.get("c"),
            "r2": sat.get("r2"), "solver": solver.get("method"), "iterations": solver.get("iterations"),
            "rel_residual": solver.get("rel_residual"),
            "nonpositive_curvature": solver.get("nonpositive_curvature"),
            "concept_vector_norm": d.concept_vector_norm,
        })
        found = diagnosis.get(d.name)
        if found is not None:
            rows[-1].update(kind=found["kind"], diagnosis=found["sentence"], pilot_drop=found["pilot_drop"])
        r_entry, b = ranking.get(d.name), boot.get(d.name)
        for source, keys in ((r_entry, ("priority_interval", "share_pct_interval")),
                             (b, ("mean_interval", "delta_n_10pct_interval"))):
            if source is None:
                continue
            for key in keys:
                lo, hi = source.get(key) or (None, None)
                rows[-1][key.replace("_interval", "_lo")] = lo
                rows[-1][key.replace("_interval", "_hi")] = hi
        if r_entry is not None:
            rows[-1]["rank_stable"] = r_entry.get("rank_stable")
            for r, p in enumerate(r_entry.get("rank_probabilities") or [], start=1):
                rows[-1][f"p_rank_{r}"] = p
    buffer = io.StringIO()
    # domain names and diagnoses carry user text: no cell may open as a spreadsheet formula
    pd.DataFrame([{k: csv_cell(v) for k, v in row.items()} for row in rows]).to_csv(buffer, index=False)
    return buffer.getvalue()


def model_summary(result: Result) -> str:
    """'id · architecture · 135M parameters · cpu/float32'."""
    m = result.model or {}
    params = m.get("parameters")
    size = f"{params / 1e6:.1f}M parameters" if isinstance(params, (int, float)) else "? parameters"
    return " · ".join(str(x) for x in (m.get("id", "?"), m.get("architecture", "?"), size,
                                        f"{m.get('device', '?')}/{m.get('dtype', '?')}"))


def _facts_by_domain(result: Result) -> dict[str, list[str]]:
    facts: dict[str, list[str]] = {d.name: [] for d in result.domains}
    for row in result.per_example:
        facts.setdefault(row.get("domain"), []).append(row.get("text", ""))
    return facts


def report_filename(result: Result, ext: str) -> str:
    stamp = (result.created_at or "")[:19].replace(":", "").replace("-", "").replace("T", "-") or "run"
    return f"dowsing-{stamp}.{ext}"


def _uncertainty_html(result: Result) -> str:
    """The bootstrap's note and the ranks that do not hold across resamples."""
    esc = html.escape
    note = interval_note(result)
    if not note:
        return "<p class='note'>No bootstrap intervals in this result (CG solver with B &gt; 1, or an older result).</p>"
    out = f"<p class='note'>{esc(note)}</p>"
    unstable = unstable_domains(result)
    if unstable:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in unstable.items())
        out += f"<p>Ranks that do not hold across resamples:</p><ul>{items}</ul>"
    return out


def _pilot_section(figs: dict) -> str:
    if "pilot" not in figs:
        return ""
    div = figs["pilot"].to_html(full_html=False, include_plotlyjs=False, default_width="100%")
    return (f"<section><h2>Pilot learning curves</h2><p>{html.escape(charts.PILOT_SOURCE)}; ★ where the priority "
            f"is read.</p>{div}</section>")


def _figure_sections(result: Result, figs: dict) -> tuple[str, str]:
    """(rank stability section, transfer section), each '' where the result has no such figure."""
    esc = html.escape
    rank_section = transfer_section = ""
    if "rank" in figs:
        rank_div = figs["rank"].to_html(full_html=False, include_plotlyjs=False, default_width="100%")
        extras = result.extras or {}
        threshold = (extras.get("ranking") or extras.get("bootstrap") or {}).get("rank_stable_probability", 0.8)
        rank_section = (f"<section><h2>Rank stability</h2><p>Each cell is the share of bootstrap resamples in which "
                        f"the domain (row) holds the rank (column) under the ranking estimator; a domain is stable "
                        f"when one rank has at least {threshold:.0%}.</p>{rank_div}</section>")
    if "transfer" in figs:
        transfer_div = figs["transfer"].to_html(full_html=False, include_plotlyjs=False, default_width="100%")
        transfer_section = f"<section><h3>Cross-domain transfer (paper's method)</h3><p>{esc(TRANSFER_HELP)}</p>{transfer_div}</section>"
    return rank_section, transfer_section


def _kv_rows(mapping: dict, value=lambda v: json.dumps(v)) -> str:
    esc = html.escape
    return "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(value(v))}</td></tr>" for k, v in (mapping or {}).items())


def _diagnostics_html(result: Result) -> str:
    """The solver diagnostics table and every note under it."""
    esc = html.escape
    diag = diagnostics_table(result).to_html(index=False, classes="dw-table dw-diag", border=0, escape=True)
    diag += "".join(f'<p class="note">{esc(text)}</p>' for text in curvature_warnings(result))
    if ranking_details(result):
        diag += f'<p class="note">{esc(ranking_details(result))}</p>'
    return diag + "".join(f'<p class="note">{esc(text)}</p>' for text in (result.extras or {}).get("warnings") or [])


def page_head(title: str) -> str:
    """The start of a standalone HTML page up to inside its <style>: the
    title and the rules every dowsing report shares."""
    return (f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: {charts.FONT}; max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} .meta {{ color: #666; margin-top: 0; }}""")


def build_report(result: Result, title: str = "Data dowsing report", plan=None, plan_curves: list | None = None) -> str:
    """A single HTML file: the table with its 90% intervals, the donut, the rank
    probabilities, the saturation curves with their bands and the transfer heatmap
    (interactive, plotly.js embedded once), the model, the domains with their facts, the settings,
    the date. Opens offline in any browser.

    With a collection plan (`dowsing.pipelines.plan.PlanResult` on the same domains, and
    optionally the curves it was built on) a "Collection plan" section follows
    the charts (`plan_section_html`); a ValueError (`plan_mismatch`) when the
    plan is for other domains or another model."""
    if plan is not None and plan_mismatch(result, plan):
        raise ValueError(plan_mismatch(result, plan))
    figs = charts.figures(result)
    # plotly.js rides with the first chart on the page: the later ones call it.
    share_div = figs["share"].to_html(full_html=False, include_plotlyjs=True, default_width="100%")
    curve_div = figs["saturation"].to_html(full_html=False, include_plotlyjs=False, default_width="100%")
    esc = html.escape
    note = interval_note(result)
    uncertainty = _uncertainty_html(result)
    rank_section, transfer_section = _figure_sections(result, figs)
    notes = missing_delta_n_notes(result)
    reason_items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in notes.items())
    evidence_class = "evidence weak" if evidence_is_weak(result) else "evidence"
    ranking_block = (f"<p class='ranked-by'>{esc(ranking_statement(result))}</p>"
                     f"<p class='{evidence_class}'>{esc(evidence_text(result))}</p>")
    paper_intro_html = "".join(f"<p>{esc(line)}</p>" for line in paper_intro(result))
    warnings_html = "".join(f"<p class='note'>{esc(text)}</p>" for text in curvature_warnings(result))
    created = result.created_at or datetime.now().isoformat(timespec="seconds")
    return page_head(title) + f"""
.lead {{ font-size: 1.25rem; margin: 0.3rem 0; }} .note {{ color: #555; font-size: 0.95rem; }}
.verdict {{ border: 1px solid #c9d6e6; border-radius: 6px; padding: 0.6rem 1rem; background: #f7fafd; }}
.verdict .number b {{ font-size: 1.2rem; }} .number-label {{ color: #555; }}
.caveat {{ border-left: 4px solid #b35900; padding: 0.3rem 0.8rem; background: #fff4e5; }}
.grid {{ display: grid; grid-template-columns: 1fr; gap: 1rem; }}
table.kv th {{ text-align: left; padding: 3px 12px 3px 0; color: #555; font-weight: 500; }}
table.kv td {{ font-family: ui-monospace, monospace; overflow-wrap: anywhere; }}
details {{ margin: 0.3rem 0; }} footer {{ color: #888; margin-top: 3rem; font-size: 0.9rem; }}
.ranked-by {{ font-weight: 600; }}
.evidence {{ border-left: 4px solid #4e79a7; padding: 0.4rem 0.8rem; background: #f3f6fa; }}
.evidence.weak {{ border-left-color: #b35900; background: #fff4e5; }}
.paper {{ border-top: 2px solid #ccc; margin-top: 2rem; }}
{TABLE_CSS}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(model_summary(result))} · created {esc(created)}</p>
{verdict_html(result)}
<h2>The ranking</h2>
{ranking_block}
{ranking_table_html(result)}
{uncertainty}
{_diagnosis_html(result)}
<div class="grid">
<section><h2>{esc(share_heading(result))}</h2><p class="note">Share: {esc(share_meaning(result))}.</p>{share_div}</section>
{_pilot_section(figs)}
{rank_section}
</div>
<section class="paper"><h2>The paper's concept-subspace method</h2>
{paper_intro_html}
{paper_table_html(result)}
<p class="note">{esc(PAPER_COLUMNS_HELP)} {esc(mean_share_note(result))}</p>
{"<p>Δn@10% shows “—” where the paper's method gives no saturation estimate:</p><ul>" + reason_items + "</ul>" if notes else ""}
{warnings_html}
<section><h3>Saturation curves ({esc(charts.SATURATION_SOURCE)})</h3>
<p>μ(n) is the paper's marginal influence of one more fact when the corpus holds n facts of the domain;
◆ marks today's n, ★ the point n+Δn where μ falls to 10% of today's value (dotted line).
Click a domain in the legend to hide or show it.{" The shaded area is the 90% bootstrap band of μ(n), cut to a factor of 3 either side of the computed points." if note else ""}</p>{curve_div}</section>
{transfer_section}
</section>
{_plan_section(plan, plan_curves) if plan is not None else ""}
{_appendix_html(result)}
<footer>Generated by dowsing (engine {esc(result.engine_version)}) · cache key {esc(result.cache_key or "—")}</footer>
</body></html>
"""


def _appendix_html(result: Result) -> str:
    """The report's closing sections: the domains with their facts, the
    model, the settings, the timings and the solver diagnostics."""
    esc = html.escape
    timings = _kv_rows({k: v for k, v in (result.timings or {}).items() if isinstance(v, (int, float))},
                       lambda v: f"{v:.2f} s")
    domain_blocks = []
    for name, facts in _facts_by_domain(result).items():
        items = "".join(f"<li>{esc(f)}</li>" for f in facts)
        domain_blocks.append(f"<details><summary><b>{esc(name)}</b> ({len(facts)} facts)</summary><ol>{items}</ol></details>")
    return (f'<h2>Domains</h2>{"".join(domain_blocks)}\n'
            f'<h2>Model</h2><table class="kv">{_kv_rows(result.model, str)}</table>\n'
            f'<h2>Settings</h2><table class="kv">{_kv_rows(result.config)}</table>\n'
            + (f"<h2>Timings</h2><table class='kv'>{timings}</table>\n" if timings else "")
            + f"<h2>Solver diagnostics</h2>{_diagnostics_html(result)}")


def _g3(value) -> str:
    """A plan's number: three significant digits, "—" for none."""
    return "—" if value is None else f"{value:.3g}"


def plan_mismatch(result: Result, plan) -> str | None:
    """Why `plan` cannot go into `result`'s report, in one line; None when it
    can: the same domain names, and the same model where both record its
    fingerprint."""
    ours, theirs = [d.name for d in result.domains], [d["domain"] for d in plan.domains]
    if sorted(ours) != sorted(theirs):
        return (f"the plan is for the domains {', '.join(theirs)}, the analysis for {', '.join(ours)}: "
                "a plan goes into the report of an analysis of the same domains")
    mine, its = (result.model or {}).get("fingerprint"), (plan.model or {}).get("fingerprint")
    if mine and its and mine != its:
        return (f"the plan is for the model {plan.model.get('id', '?')} ({its[:12]}), the analysis for "
                f"{result.model.get('id', '?')} ({mine[:12]}): a plan goes into the report of the same model")
    return None


def plan_meta(plan) -> str:
    """'budget 100 examples, spent 100 · pilot … · created …': which plan this is."""
    alloc = plan.allocation
    later = f"round {alloc['round']}, what is left of the " if alloc.get("round", 1) > 1 else ""
    return (f"{later}budget {alloc['budget']:g} {alloc['budget_unit']}, spent {alloc['spent']:g} · pilot "
            f"{plan.pilot['recipe']} · created {plan.created_at or ''}")


def plan_section_html(plan, curves: list | None = None, heading: str = "h2", include_plotlyjs: bool = False) -> str:
    """The body of a collection plan (`dowsing.pipelines.plan.PlanResult`), as both the
    standalone plan report and the analysis report show it: what it
    recommends (`plan.recommendation`: spreading evenly where the plan is not
    shown to beat it, the plan's counts then second), its round, what its
    gains are, the predicted total against spreading the budget evenly and putting
    it all on the domain of highest mean loss (each with its 90% band, and the
    plan minus each, paired), the table per domain (examples to collect, cost,
    predicted gain with its band, the last example's gain, the fit), the
    allocation chart, the learning curves when `curves` are given, the totals
    chart and the notes. `heading` is the level of its headings;
    `include_plotlyjs` embeds plotly.js with its first chart."""
    from . import plan_charts
    from ..pipelines.plan import MEAN_LOSS_RULE, SIMPLE_RULES, fit_text, plan_rows, recommendation, round_text

    esc = html.escape
    figs = plan_charts.plan_figures(plan, curves) if curves is not None else {
        "allocation": plan_charts.allocation_chart(plan), "totals": plan_charts.totals_chart(plan)}
    divs = {name: fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs and name == "allocation",
                              default_width="100%") for name, fig in figs.items()}
    rec = recommendation(plan)
    later = (plan.allocation or {}).get("round", 1) > 1
    table = pd.DataFrame([{"Domain": r["domain"], "Facts now": r["n_facts"], "In training": r["have"],
                           **({"Collected before": r["collected_before"]} if later else {}),
                           **({f"Collect ({SIMPLE_RULES[rec['by']]})": r["collect"],
                               "Curves' preference (not shown better)" if "evidence" not in plan.verdict else
                               "Curves' preference (realised less on the benchmark)": r["curves_prefer"]}
                              if rec["by"] != "plan" else {"Collect": r["collect"]}),
                           "Cost": _g3(r["cost"]),
                           "Predicted gain [90% band]": "—" if r["gain"] is None else
                           f"{_g3(r['gain'])} [{_g3(r['gain_5pct'])}, {_g3(r['gain_95pct'])}]",
                           "Last example's gain": _g3(r["marginal_gain_last"]), "Fit": fit_text(r)}
                          for r in plan_rows(plan)]).to_html(index=False, classes="dw-table", border=0, escape=True)
    headline = f"<p class='recommend'><b>{esc(rec['headline'])}</b></p>" + (
        f"<p>{esc(round_text(plan))}</p>" if round_text(plan) else "")
    totals = plan.totals
    lines = []
    for key, label in (("plan", "This plan"), ("even", "Spread evenly"), (MEAN_LOSS_RULE, "Split by mean loss"),
                       ("ranking", "Split by the ranking's score"), ("highest_loss", f"All on {totals['highest_loss'].get('domain')} (highest mean loss)")):
        if key not in totals:
            continue
        band = totals[key]["band"]
        line = (f"<li><b>{esc(label)}</b>: {_g3(totals[key].get('expected', totals[key]['gain']))} "
                f"[{_g3(band[0])}, {_g3(band[1])}]")
        if "plan_minus_this" in totals[key]:
            diff = totals[key]["plan_minus_this"]
            line += (f"; plan minus this {_g3(diff.get('expected', diff['gain']))} [{_g3(diff['band'][0])}, "
                     f"{_g3(diff['band'][1])}] (paired)")
        lines.append(line + "</li>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in plan.notes)
    verdict = "".join(f"<p><b>{esc(sentence)}</b></p>" for sentence in (plan.verdict or {}).get("sentences", []))
    h = heading
    return f"""{headline}<p class="note">{esc(plan_charts.UNITS_NOTE)}</p>{verdict}
<{h}>Predicted total gain (weighted; mean over the bootstrap curves) [90% band]</{h}><ul>{"".join(lines)}</ul>
<{h}>Per domain</{h}>{table}
<section>{divs["allocation"]}</section>
{f'<section>{divs["curves"]}</section>' if "curves" in divs else ""}
<section>{divs["totals"]}</section>
<{h}>Notes</{h}><ul>{notes}</ul>"""


def _plan_section(plan, curves: list | None) -> str:
    """The analysis report's "Collection plan" section."""
    return (f"<section><h2>Collection plan</h2><p class='meta'>{html.escape(plan_meta(plan))}</p>"
            f"{plan_section_html(plan, curves, heading='h3')}</section>")


def plan_report_html(plan, curves: list, title: str = "Data collection plan") -> str:
    """A collection plan (`dowsing.pipelines.plan.PlanResult`, with the curves it was
    built on) as one HTML file: `plan_section_html` (the totals against the
    baselines, the table per domain, the allocation, the learning curves and
    the totals as interactive charts, plotly.js inline, the notes), then the
    settings."""
    esc = html.escape
    return page_head(title) + f"""
.note {{ color: #555; }}
table.kv th {{ text-align: left; padding: 3px 12px 3px 0; color: #555; font-weight: 500; }}
table.kv td {{ font-family: ui-monospace, monospace; }}
{TABLE_CSS}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(model_summary(plan))} · {esc(plan_meta(plan))}</p>
{plan_section_html(plan, curves, include_plotlyjs=True)}
<h2>Settings</h2><table class="kv">{_kv_rows(plan.config)}</table>
</body></html>
"""
