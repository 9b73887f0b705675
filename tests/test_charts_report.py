"""The figure builders, the formatted table, the HTML report and the comparison,
on a hand-built Result whose numbers are known (no model, no Streamlit)."""
from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest

from dowsing.presentation import charts, comparison, report
from dowsing.result import DomainResult, Result, format_sci
from dowsing.presentation.verdict import format_number


def _domain(name, rank, mean, share, n_facts, dn=None, reason=None, alpha=0.5, n0=3.0, c=None, points=True,
            t=1.0, p=0.3):
    c = c if c is not None else (abs(mean) * (n_facts + n0) ** alpha)
    grid = np.geomspace(n_facts / 10, n_facts * 1000, 24)
    mus = c * (grid + n0) ** (-alpha) * (1 if mean > 0 else -1)
    sat = {"alpha": alpha if mean > 0 else None, "n0": n0 if mean > 0 else None, "c": c if mean > 0 else None,
           "r2": 0.999 if mean > 0 else None, "points": [[float(n), float(m)] for n, m in zip(grid, mus)] if points else []}
    return DomainResult(
        name=name, rank=rank, mean=mean, share_pct=share, t_vs_rest=t, p_value=p, n_facts=n_facts,
        delta_n_10pct=dn, delta_n_direct=dn, delta_n_reason=reason, saturation=sat,
        solver={"method": "cg", "iterations": 7, "rel_residual": 3.2e-7, "nonpositive_curvature": False},
        concept_vector_norm=12.5,
    )


def paper_like_result(created="2025-01-02T03:04:05+00:00") -> Result:
    """Table 1 of the paper, as a Result (Δn from the closed form of the fit)."""
    def dn(n, n0, alpha):
        return (n + n0) * 0.1 ** (-1 / alpha) - n0 - n

    domains = [
        _domain("Physics", 1, 3.7e-2, 10.2, 25, dn=dn(25, 3.0, 0.5), t=1.01),
        _domain("Astronomy", 2, 9.4e-1, 44.2, 25, dn=dn(25, 3.0, 0.5), t=1.00),
        _domain("Biology", 3, -2.6e-4, 18.6, 25, reason="Mean influence is not positive.", t=0.99),
        _domain("Economics", 4, -7.9e-5, 6.1, 25, reason="Mean influence is not positive.", t=-1.80, p=0.0004),
    ]
    per_example = []
    for d in domains:
        for k in range(6):
            per_example.append({"domain": d.name, "text": f"{d.name} fact {k}", "influence": d.mean * (k - 2)})
    return Result(
        model={"id": "tiny", "source": "directory", "architecture": "GPT2LMHeadModel", "parameters": 123456,
               "fingerprint": "abc", "device": "cpu", "dtype": "float32"},
        config={"damping": 1e-3, "blocks": 1, "solver": "auto"},
        domains=domains, per_example=per_example, timings={"total": 1.5}, created_at=created, cache_key="k" * 16,
    )


def test_colors_are_stable_per_domain_and_follow_set_order():
    result = paper_like_result()
    colors = charts.result_colors(result)
    assert list(colors) == ["Physics", "Astronomy", "Biology", "Economics"]
    assert len(set(colors.values())) == 4
    # The same name gets the same colour in every chart and in a union with another run.
    donut = charts.share_donut(result, colors)
    assert list(donut.data[0].marker.colors) == [colors[n] for n in donut.data[0].labels]
    curves = charts.saturation_curves(result, colors)
    for trace in curves.data:
        name = trace.legendgroup
        color = trace.marker.color if trace.mode == "markers" else trace.line.color
        assert color == colors[name]
    assert charts.domain_colors(["Physics", "Astronomy", "Chemistry"])["Physics"] == colors["Physics"]


def test_share_donut_values_are_the_shares():
    result = paper_like_result()
    fig = charts.share_donut(result)
    assert list(fig.data[0].values) == [10.2, 44.2, 18.6, 6.1]
    assert fig.data[0].hole == pytest.approx(0.55)


def test_saturation_curves_mark_now_saturation_and_ten_percent():
    result = paper_like_result()
    fig = charts.saturation_curves(result)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    phys = [t for t in fig.data if t.legendgroup == "Physics"]
    by_name = {t.name: t for t in phys}
    d = result.domain("Physics")
    now = by_name["Physics now"]
    assert now.x[0] == d.n_facts and now.y[0] == pytest.approx(d.mean)
    sat = by_name["Physics n+Δn"]
    assert sat.x[0] == pytest.approx(d.n_facts + d.delta_n_10pct)
    assert sat.y[0] == pytest.approx(0.1 * d.mean)
    ten = by_name["Physics 10%"]
    assert list(ten.y) == [pytest.approx(0.1 * d.mean)] * 2
    # The fit passes through μ(N) = Mean and reaches 10% at N + Δn: the closed form is consistent.
    s = d.saturation
    assert charts.power_law(d.n_facts, s["alpha"], s["n0"], s["c"]) == pytest.approx(d.mean)
    assert charts.power_law(d.n_facts + d.delta_n_10pct, s["alpha"], s["n0"], s["c"]) == pytest.approx(0.1 * d.mean)
    # Exactly one legend entry per domain; the rest toggle with it.
    assert [t.name for t in fig.data if t.showlegend is not False] == [
        "Physics", "Astronomy", "Biology (no positive μ)", "Economics (no positive μ)"]


def test_saturation_curves_skip_non_positive_points():
    result = paper_like_result()
    result.domains[0].saturation["points"][0][1] = -1.0
    fig = charts.saturation_curves(result)
    points = next(t for t in fig.data if t.name == "Physics")
    assert len(points.x) == 23 and all(y > 0 for y in points.y)


def test_formatted_table_is_the_papers_format():
    # A result without priorities (engines before 1.3.0) was ranked by the paper's Mean: Priority shows it.
    table = report.formatted_table(paper_like_result())
    # The paper's Table 1 shares are not the shares of its Means: the Share of Mean stands beside them.
    assert list(table.columns) == ["Rank", "Concept", "Priority", "Share (%)", "Share of Mean, paper (%)",
                                   "Mean (paper)", "Δn@10%", "t vs rest", "p"]
    first = table.iloc[0]
    assert (first["Rank"], first["Concept"], first["Priority"], first["Share (%)"], first["Mean (paper)"],
            first["t vs rest"]) == (1, "Physics", "3.7×10⁻²", "10.2%", "3.7×10⁻²", "1.01")
    assert table.iloc[2]["Δn@10%"] == "—"
    assert table.iloc[3]["Mean (paper)"] == table.iloc[3]["Priority"] == "-7.9×10⁻⁵"
    assert table.iloc[3]["p"] == "4.0×10⁻⁴"


def test_table_html_gives_the_reason_as_a_tooltip():
    html = report.table_html(paper_like_result())
    assert re.search(r'<abbr class="dw-missing" title="Mean influence is not positive.">—</abbr>', html)
    assert html.count("<tr>") == 5


def test_top_examples_highest_and_lowest():
    result = paper_like_result()
    high, low = report.top_examples(result, "Physics", top=2)
    assert [r["text"] for r in high] == ["Physics fact 5", "Physics fact 4"]
    assert [r["text"] for r in low] == ["Physics fact 0", "Physics fact 1"]
    # Few facts: the two lists split them instead of overlapping.
    high, low = report.top_examples(result, "Physics", top=5)
    assert len(high) == 3 and len(low) == 3 and not {r["text"] for r in high} & {r["text"] for r in low}


def test_csv_has_full_precision_numbers():
    text = report.to_csv(paper_like_result())
    header, first = text.splitlines()[:2]
    assert header.startswith("rank,concept,estimator,priority,share_pct,share_of_mean_pct,mean,delta_n_10pct")
    assert first.startswith("1,Physics,paper,0.037,10.2,") and first.split(",")[6] == "0.037"


def test_html_report_is_self_contained():
    result = paper_like_result()
    html = report.build_report(result)
    assert html.startswith("<!DOCTYPE html>")
    assert "<script src=" not in html.replace('<script src="data:', "")  # no external scripts
    assert "plotly.js" in html or "Plotly" in html  # plotly.js is inline
    assert len(html) > 1_000_000
    for text in ("0.0370", "Physics fact 0", "GPT2LMHeadModel", "2025-01-02T03:04:05", "damping",
                 "By the paper&#x27;s method: mean influence is not positive.", "Saturation curves",
                 "Share of influence"):
        assert text in html
    assert html.count('class="plotly-graph-div"') == 2


def test_comparison_puts_ranks_and_means_side_by_side():
    a = paper_like_result()
    b = paper_like_result()
    b.domains[0].rank, b.domains[1].rank = 2, 1
    b.domains[0].mean = 5e-3
    b.domains = b.domains[:3] + [_domain("Chemistry", 4, 1e-3, 1.0, 10)]
    table = comparison.compare(a, b)
    assert list(table["Concept"]) == ["Physics", "Astronomy", "Biology", "Economics", "Chemistry"]
    phys = table.iloc[0]
    assert (phys["Rank A"], phys["Rank B"], phys["Rank change"]) == (1, 2, 1)
    assert (phys["Mean A"], phys["Mean B"]) == (3.7e-2, 5e-3)
    econ = table.iloc[3]
    assert math.isnan(econ["Rank B"]) or econ["Rank B"] is None
    shown = comparison.format_comparison(table)
    assert list(shown["Rank change"][:3]) == ["▼ 1", "▲ 1", "="]
    assert shown.iloc[0]["Mean B"] == format_sci(5e-3)
    assert shown.iloc[3]["Rank B"] == "—" and shown.iloc[4]["Rank A"] == "—"
    fig = charts.rank_comparison(a, b)
    assert {t.name for t in fig.data} == {"Physics", "Astronomy", "Biology", "Economics", "Chemistry"}


def with_uncertainty(result: Result) -> Result:
    """Add what the engine puts in extras: a bootstrap (Biology and Economics swap
    ranks, so both are unstable) and a transfer matrix whose diagonal is the Means."""
    probabilities = {"Physics": [0.97, 0.03, 0.0, 0.0], "Astronomy": [0.03, 0.95, 0.02, 0.0],
                     "Biology": [0.0, 0.02, 0.55, 0.43], "Economics": [0.0, 0.0, 0.43, 0.57]}
    domains = []
    for d in result.domains:
        points = d.saturation["points"]
        band = [[n, abs(mu) * 0.8, abs(mu) * 1.25] for n, mu in points]
        if d.name == "Astronomy":
            band[0][1] = -1.0  # a lower end below zero: drawn at the floor of the log axis
        domains.append({
            "name": d.name, "n_k": d.n_facts,
            "mean_interval": [d.mean * 0.8, d.mean * 1.2] if d.mean > 0 else [d.mean * 1.5, -d.mean],
            "share_pct_interval": [d.share_pct - 2.0, d.share_pct + 3.0],
            "delta_n_10pct_interval": [d.delta_n_10pct * 0.5, d.delta_n_10pct * 2] if d.delta_n_10pct else None,
            "delta_n_fraction": 1.0 if d.delta_n_10pct else 0.0,
            "rank_probabilities": probabilities[d.name],
            "most_likely_rank": d.rank,
            "rank_stable": max(probabilities[d.name]) >= 0.8,
            "curve_band": band,
        })
    names = [d.name for d in result.domains]
    means = [d.mean for d in result.domains]
    matrix = [[means[j] if j == k else (j + 1) * 1e-3 - k * 2e-3 for k in range(4)] for j in range(4)]
    result.extras = {
        "bootstrap": {"n_resamples": 200, "level": 0.9, "seed": 0, "rank_stable_probability": 0.8,
                      "conditional_on_curvature": True, "domains": domains},
        "transfer": {"domains": names, "matrix": matrix},
    }
    return result


def test_saturation_band_is_drawn_behind_each_domain_in_its_colour():
    result = with_uncertainty(paper_like_result())
    colors = charts.result_colors(result)
    fig = charts.saturation_curves(result, colors)
    boot = result.extras["bootstrap"]["domains"][0]
    phys = [t for t in fig.data if t.legendgroup == "Physics"]
    band = phys[0]  # first: the points and the fit lie on top of it
    assert band.name == "Physics 90% band" and band.fill == "toself" and band.showlegend is False
    ns = [row[0] for row in boot["curve_band"]]
    assert list(band.x) == pytest.approx(ns + ns[::-1])
    assert list(band.y) == pytest.approx([row[2] for row in boot["curve_band"]] +
                                         [row[1] for row in boot["curve_band"]][::-1])
    assert band.line.color == colors["Physics"]
    assert band.fillcolor.startswith("rgba(") and band.fillcolor.endswith(",0.18)")
    # A lower end ≤ 0 is not dropped: it is drawn at the bottom of the readable range around the points.
    astro = next(t for t in fig.data if t.name == "Astronomy 90% band")
    assert len(astro.x) == 2 * len(boot["curve_band"])
    astro_points = next(t for t in fig.data if t.name == "Astronomy")
    assert astro.y[-1] == pytest.approx(astro_points.y[0] / charts.BAND_FACTOR)
    # Domains without positive points still get their band, in their legend group.
    assert {t.legendgroup for t in fig.data if t.fill == "toself"} == {"Physics", "Astronomy", "Biology", "Economics"}
    # The legend still has one entry per domain.
    assert [t.name for t in fig.data if t.showlegend is not False] == [
        "Physics", "Astronomy", "Biology (no positive μ)", "Economics (no positive μ)"]


def test_no_band_and_no_extra_charts_without_a_bootstrap():
    result = paper_like_result()
    assert not [t for t in charts.saturation_curves(result).data if t.fill == "toself"]
    assert charts.rank_probability_chart(result) is None and charts.transfer_heatmap(result) is None
    assert set(charts.figures(result)) == {"share", "saturation"}
    result.extras = {"bootstrap": None, "transfer": {"domains": [], "matrix": []}}
    assert charts.rank_probability_chart(result) is None and charts.transfer_heatmap(result) is None
    assert report.interval_note(result) is None and report.unstable_domains(result) == {}


def test_transfer_heatmap_is_the_matrix():
    result = with_uncertainty(paper_like_result())
    fig = charts.transfer_heatmap(result)
    heat = fig.data[0]
    matrix = result.extras["transfer"]["matrix"]
    assert [list(row) for row in heat.z] == matrix
    assert list(heat.y) == result.extras["transfer"]["domains"] == list(heat.x)
    assert heat.zmid == 0
    assert heat.text[0][0] == format_number(matrix[0][0]) and heat.text[2][1] == format_number(matrix[2][1])
    assert "loss of" in fig.layout.yaxis.title.text and "collected" in fig.layout.xaxis.title.text
    # The diagonal is each domain's own Mean.
    assert [matrix[k][k] for k in range(4)] == [d.mean for d in result.domains]


def test_rank_probability_chart_rows_in_rank_order():
    result = with_uncertainty(paper_like_result())
    heat = charts.rank_probability_chart(result).data[0]
    assert list(heat.y) == ["Physics", "Astronomy", "Biology ⚠", "Economics ⚠"]
    assert list(heat.x) == ["1", "2", "3", "4"]
    assert [list(row) for row in heat.z][2] == [0.0, 0.02, 0.55, 0.43]
    assert heat.text[0][0] == "97%"


def test_formatted_table_shows_intervals_and_marks_unstable_ranks():
    result = with_uncertainty(paper_like_result())
    table = report.formatted_table(result)
    boot = {d["name"]: d for d in result.extras["bootstrap"]["domains"]}
    for _, row in table.iterrows():
        b = boot[row["Concept"]]
        lo, hi = b["mean_interval"]
        # ranked by the paper's Mean: one bootstrap gives both columns their interval
        assert row["Mean (paper)"].endswith(f" [{format_sci(lo)}, {format_sci(hi)}]")
        assert row["Priority"].endswith(f" [{format_sci(lo)}, {format_sci(hi)}]")
        lo, hi = b["share_pct_interval"]
        assert row["Share (%)"].endswith(f" [{lo:.1f}%, {hi:.1f}%]")
        if b["delta_n_10pct_interval"]:
            lo, hi = b["delta_n_10pct_interval"]
            assert row["Δn@10%"].endswith(f" [{format_sci(lo)}, {format_sci(hi)}]")
        else:
            assert row["Δn@10%"] == "—"
    assert table.iloc[0]["Mean (paper)"] == "3.7×10⁻² [3.0×10⁻², 4.4×10⁻²]"
    assert list(table["Rank"]) == ["1", "2", "3 ⚠ unstable", "4 ⚠ unstable"]
    assert report.unstable_domains(result) == {"Biology": "P(rank 2) = 2%, P(rank 3) = 55%, P(rank 4) = 43%",
                                               "Economics": "P(rank 3) = 43%, P(rank 4) = 57%"}
    html = report.table_html(result)
    assert re.search(r'<abbr class="dw-unstable" title="P\(rank 2\) = 2%, P\(rank 3\) = 55%, P\(rank 4\) = 43%">'
                     r"3 ⚠ unstable</abbr>", html)
    assert '<span class="dw-ci">[3.0×10⁻², 4.4×10⁻²]</span>' in html
    assert "3.7×10⁻²" in html and "10.2%" in html
    csv_header = report.to_csv(result).splitlines()[0]
    assert csv_header.endswith("priority_lo,priority_hi,share_pct_lo,share_pct_hi,mean_lo,mean_hi,"
                               "delta_n_10pct_lo,delta_n_10pct_hi,rank_stable,p_rank_1,p_rank_2,p_rank_3,p_rank_4")


def test_html_report_has_intervals_rank_stability_and_transfer():
    result = with_uncertainty(paper_like_result())
    html = report.build_report(result)
    assert html.count('class="plotly-graph-div"') == 4
    # plotly.js is inlined with the first chart; every other chart comes after it.
    assert html.index('class="plotly-graph-div"') < html.index("<h2>Rank stability")
    for text in ("[0.0296, 0.0444]", "3 ⚠ unstable", "Rank stability", "Cross-domain transfer",
                 "if we collect Physics, does Astronomy improve too?", "90% bootstrap interval",
                 "Physics 90% band"):
        assert text in html, text


def test_curvature_warnings_say_what_each_solver_did():
    result = paper_like_result()
    assert report.curvature_warnings(result) == []
    cg, dense = result.domains[0], result.domains[1]
    cg.solver = dict(cg.solver or {}, method="cg", nonpositive_curvature=True)
    dense.solver = dict(dense.solver or {}, method="auto (structured Hessian, dense solve)", nonpositive_curvature=True)
    stopped, indefinite = report.curvature_warnings(result)
    assert cg.name in stopped and "stopped" in stopped and dense.name not in stopped
    assert dense.name in indefinite and "still exact" in indefinite and cg.name not in indefinite
    html = report.build_report(result)
    assert stopped.split(":")[0] in html and "still exact" in html  # the report says it too


def ranked_by_alignment(result: Result) -> Result:
    """The same domains ranked by another estimator: priorities whose order
    differs from the Means, and the ranking's own bootstrap in extras."""
    result = with_uncertainty(result)
    result.config = dict(result.config, estimator="alignment_adam")
    priorities = {"Physics": -1.0, "Astronomy": 2.0, "Biology": 5.0, "Economics": 0.5}
    ranks = {"Biology": 1, "Astronomy": 2, "Economics": 3, "Physics": 4}
    total = sum(abs(v) for v in priorities.values())
    for d in result.domains:
        d.priority, d.rank, d.share_pct = priorities[d.name], ranks[d.name], abs(priorities[d.name]) / total * 100
    probabilities = {"Biology": [0.9, 0.1, 0.0, 0.0], "Astronomy": [0.1, 0.6, 0.3, 0.0],
                     "Economics": [0.0, 0.3, 0.7, 0.0], "Physics": [0.0, 0.0, 0.0, 1.0]}
    names = [d.name for d in result.domains]
    result.extras["ranking"] = {
        "estimator": "alignment_adam", "label": "Gradient alignment between facts, Adam-preconditioned",
        "n_resamples": 200, "level": 0.9, "seed": 0, "rank_stable_probability": 0.8, "seconds": 1.0,
        "details": {"parameters": 1000},
        "priority_interval": [[priorities[n] - 0.5, priorities[n] + 0.25] for n in names],
        "share_pct_interval": [[1.0, 2.0 + k] for k in range(4)],
        "rank_probabilities": [probabilities[n] for n in names],
        "rank_stable": [max(probabilities[n]) >= 0.8 for n in names],
    }
    return result


def test_a_result_ranked_by_another_estimator_shows_its_priority_next_to_the_papers_mean():
    from dowsing.cli import format_table
    from dowsing.validation.evidence import beats_mean_loss, estimator_evidence, evidence_sentence

    result = ranked_by_alignment(paper_like_result())
    table = report.formatted_table(result)
    assert list(table["Concept"]) == ["Biology", "Astronomy", "Economics", "Physics"]
    biology = table.iloc[0]
    assert biology["Priority"] == f"{format_sci(5.0)} [{format_sci(4.5)}, {format_sci(5.25)}]"
    assert biology["Share (%)"] == f"{5 / 8.5 * 100:.1f}% [1.0%, 4.0%]"
    paper_boot = {d["name"]: d for d in result.extras["bootstrap"]["domains"]}
    lo, hi = paper_boot["Biology"]["mean_interval"]
    assert biology["Mean (paper)"] == f"{format_sci(-2.6e-4)} [{format_sci(lo)}, {format_sci(hi)}]"
    # rank stability from the ranking's bootstrap, not the paper's
    assert list(table["Rank"]) == ["1", "2 ⚠ unstable", "3 ⚠ unstable", "4"]
    heat = charts.rank_probability_chart(result).data[0]
    assert list(heat.y) == ["Biology", "Astronomy ⚠", "Economics ⚠", "Physics"]
    assert [list(row) for row in heat.z][0] == [0.9, 0.1, 0.0, 0.0]
    donut = charts.share_donut(result)
    assert "Priority" in donut.data[0].hovertemplate and "priority" in donut.layout.title.text
    assert "concept-subspace curvature (paper)" in charts.saturation_curves(result).layout.title.text

    sentence = evidence_sentence("alignment_adam")
    html = report.build_report(result)
    assert report.ranking_statement(result) in html.replace("&#x27;", "'")
    assert sentence.replace("'", "&#x27;") in html
    weak = not beats_mean_loss(estimator_evidence("alignment_adam"))
    assert report.evidence_is_weak(result) == weak
    assert ("class='evidence weak'" in html) == weak
    assert "Saturation curves (from the concept-subspace curvature (paper))" in html
    assert "Collect <b>Biology</b> first." in html and "<b>5.00</b>" in html

    text = format_table(result)
    lines = text.splitlines()
    assert lines[0] == report.ranking_statement(result) and lines[1] == sentence
    assert lines[3].split()[:4] == ["Rank", "Concept", "Priority", "[90%"]
    first = lines[4]
    assert first.startswith("1") and "Biology" in first and f"{format_sci(5.0)} [{format_sci(4.5)}, " in first
    assert "from the concept-subspace curvature (paper)" in text


def test_the_paper_estimator_says_so_and_quotes_its_evidence():
    from dowsing.validation.evidence import evidence_sentence

    result = with_uncertainty(paper_like_result())
    result.config = dict(result.config, estimator="paper")
    assert "“paper”" in report.ranking_statement(result)
    assert report.evidence_text(result) == evidence_sentence("paper")
    html = report.build_report(result)
    assert evidence_sentence("paper").replace("'", "&#x27;") in html


# --- the paper's Share of Mean beside the ranking estimator's Share -------------------

def _share_of_mean_by_hand(means, n_facts) -> list:
    """The paper's Share, |N_k Mean_k| / sum_j |N_j Mean_j| * 100 over the finite Means (NaN
    elsewhere), in plain numpy."""
    m = np.array([np.nan if v is None else v for v in means], dtype=float) * np.asarray(n_facts, dtype=float)
    known = np.isfinite(m)
    out = np.full(len(m), np.nan)
    out[known] = np.abs(m[known]) / np.abs(m[known]).sum() * 100
    return list(out)


def _csv_rows(result):
    import csv
    import io

    return list(csv.DictReader(io.StringIO(report.to_csv(result))))


def test_share_of_mean_stands_beside_the_estimator_s_share_in_every_table():
    from dowsing.cli import format_table

    result = ranked_by_alignment(paper_like_result())
    ranked = result.ranked()
    expected = dict(zip((d.name for d in ranked), _share_of_mean_by_hand([d.mean for d in ranked],
                                                                         [d.n_facts for d in ranked])))
    n = {d.name: d.n_facts for d in ranked}
    total = sum(abs(n[d.name] * d.mean) for d in ranked)
    assert expected["Astronomy"] == pytest.approx(n["Astronomy"] * 9.4e-1 / total * 100)

    table = report.formatted_table(result)
    assert list(table.columns)[3:5] == ["Share (%)", "Share of Mean, paper (%)"]
    assert list(table["Share of Mean, paper (%)"]) == [f"{expected[n]:.1f}%" for n in table["Concept"]]
    assert table.iloc[0]["Share (%)"].startswith(f"{5 / 8.5 * 100:.1f}%")  # the estimator's Share is unchanged

    rows = _csv_rows(result)
    assert [float(r["share_of_mean_pct"]) for r in rows] == pytest.approx([expected[r["concept"]] for r in rows],
                                                                          rel=1e-12)
    assert list(rows[0])[4:6] == ["share_pct", "share_of_mean_pct"]

    page = report.build_report(result)
    paper = page[page.index("<th>Paper&#x27;s rank</th>"):]
    head = paper[:paper.index("</thead>")]
    assert "<th>Share of Mean (%)</th>" in head
    for name, share in expected.items():
        row = paper[paper.index(f"</span>{name}</td>"):]
        row = row[:row.index("</tr>")]
        assert f">{share:.1f}<" in row
    assert "Share of Mean, paper: the paper&#x27;s Share: the domain&#x27;s total influence |N_k Mean_k|" in page

    text = format_table(result)
    header = text.splitlines()[3]
    assert header.index("Share ") < header.index("Share of Mean, paper") < header.index("Mean (paper)")
    for line in text.splitlines()[4:8]:
        name = line.split()[1]
        assert f"{expected[name]:.1f}%" in line
    assert "Share of Mean, paper: the paper's Share: the domain's total influence |N_k Mean_k|" in text


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_domain_without_a_mean_shows_a_dash_and_the_share_is_over_the_others(missing):
    from dowsing.cli import format_table

    result = ranked_by_alignment(paper_like_result())
    result.domain("Biology").mean = missing
    others = [d for d in result.domains if d.name != "Biology"]
    expected = dict(zip((d.name for d in others), _share_of_mean_by_hand([d.mean for d in others],
                                                                         [d.n_facts for d in others])))
    assert sum(expected.values()) == pytest.approx(100.0)

    shown = dict(zip(*(report.formatted_table(result)[c] for c in ("Concept", "Share of Mean, paper (%)"))))
    assert shown == {"Biology": "—", **{n: f"{v:.1f}%" for n, v in expected.items()}}
    rows = {r["concept"]: r["share_of_mean_pct"] for r in _csv_rows(result)}
    assert rows["Biology"] == ""
    assert {n: float(v) for n, v in rows.items() if n != "Biology"} == pytest.approx(expected, rel=1e-12)
    note = report.mean_share_note(result)
    assert "Biology has no Mean (—): the Share of Mean is over the other domains." in note
    assert note.replace("'", "&#x27;") in report.build_report(result)
    assert note in format_table(result)


def _ranked_by_the_paper(n_facts: list) -> Result:
    """The paper's estimator on domains of `n_facts` facts: Share is of each
    domain's total influence N_k Mean_k, as the analysis computes it."""
    result = paper_like_result()
    result.config = dict(result.config, estimator="paper")
    totals = np.array([n * d.mean for n, d in zip(n_facts, result.domains)])
    for n, d, share in zip(n_facts, result.domains, np.abs(totals) / np.abs(totals).sum() * 100):
        d.n_facts, d.share_pct = n, float(share)
    return result


def test_ranked_by_the_paper_the_share_is_the_share_of_mean_and_shows_once():
    from dowsing.cli import format_table

    result = _ranked_by_the_paper([25, 5, 40, 25])
    assert [d.share_pct for d in result.domains] == pytest.approx(_share_of_mean_by_hand(
        [d.mean for d in result.domains], [25, 5, 40, 25]))
    table = report.formatted_table(result)
    assert [c for c in table.columns if c.startswith("Share")] == ["Share (%)"]
    page = report.build_report(result)
    head = page[page.index('<table class="dw-table">'):page.index("</thead>")]
    assert head.count("Share") == 1 and "Share here is also the Share of Mean, paper" in page
    text = format_table(result)
    assert "Share of Mean, paper" not in text.splitlines()[3] and "Share here is also the Share of Mean" in text
    assert "share_of_mean_pct" in _csv_rows(result)[0]  # the file keeps every column whatever ranked it


# --- the collection plan's figures, CSV and report ---------------------------------

def _measured_plan(budget=30.0, **fields):
    """A plan on hand-made pilot points (no model): two domains whose drops
    rise like a + b ln n with noise across facts, and one too small for a pilot."""
    from dowsing.pipelines.plan import PilotMeasurements, PlanConfig, fit_pilots, plan_from_pilots

    rng = np.random.default_rng(0)
    entries = []
    for name, b, n_facts in (("Physics", 0.010, 8), ("Astronomy", 0.004, 10)):
        sizes = [2, 4] if n_facts == 8 else [2, 4, 5]
        rows = [list(0.02 + b * math.log(n) + rng.normal(0, 0.002, n_facts)) for n in sizes]
        entries.append({"name": name, "n_facts": n_facts, "mean_loss": 5.0 + b, "sizes": sizes, "drop":
                        [float(np.mean(r)) for r in rows], "per_fact_by_size": rows, "strata":
                        [n_facts // 2, n_facts - n_facts // 2], "seconds": [0.1] * len(sizes)})
    entries.append({"name": "Biology", "n_facts": 3, "mean_loss": 9.0, "sizes": [], "drop": [],
                    "per_fact_by_size": [], "strata": [], "seconds": []})
    config = PlanConfig(budget=budget, **fields)
    pilots = PilotMeasurements(model={"id": "hand-made", "parameters": 1}, recipe="AdamW, 4 steps",
                               domains=entries, settings=config.curve_settings())
    curves = fit_pilots(pilots.to_dict(), config)
    return plan_from_pilots(pilots, config, curves), curves


def test_the_plan_figures_show_the_plan_s_numbers():
    from dowsing.presentation import plan_charts
    from dowsing.pipelines.plan import recommendation

    plan, curves = _measured_plan(have_by_domain={"Physics": 8, "Astronomy": 10})
    counts = [d["collect"] for d in plan.domains]
    assert sum(counts) == 30 and counts[2] == 0
    # the bars are what is recommended: the plan's counts, or the even split with the plan's as diamonds
    rec = recommendation(plan)
    bars = plan_charts.allocation_chart(plan).data[0]
    assert list(bars.x) == [m for _, m in rec["counts"]] and list(bars.y) == ["Physics", "Astronomy", "Biology"]
    if rec["by"] == "even":
        diamonds = plan_charts.allocation_chart(plan).data[1]
        assert list(diamonds.x) == counts
    assert bars.text[2] == "not identifiable"
    fig = plan_charts.plan_curves_chart(plan, curves)
    for dc, row in zip(curves[:2], rec["rows"][:2]):
        marks = next(t for t in fig.data if t.name == f"{dc.name} plan")
        assert list(marks.x) == [dc.n_facts, dc.n_facts + row["collect"]]
        # the rise from now (◆) to after the plan (★) is the domain's predicted gain
        assert marks.y[1] - marks.y[0] == pytest.approx(row["gain"], rel=1e-9, abs=1e-15)
        band = next(t for t in fig.data if t.name == f"{dc.name} 90% band")
        assert band.fill == "toself" and len(band.x) == 2 * 120
        point, low, high = plan_charts.curve_band(dc, [dc.n_facts])
        assert low[0] <= high[0] and point[0] == pytest.approx(dc.curve.value(dc.n_facts))
    assert any(t.name == "Biology (not identifiable)" for t in fig.data)
    totals = plan_charts.totals_chart(plan).data[0]
    keys = ("plan", "even", "mean_loss", "ranking", "highest_loss")
    assert list(totals.y) == [plan.totals[k]["expected"] for k in keys]
    assert list(totals.error_y.array) == pytest.approx([plan.totals[k]["band"][1] - plan.totals[k]["expected"]
                                                        for k in keys])
    # from have = 0 the curve starts at G(0) = 0, off the log axis: the star alone, at the examples collected
    fresh, fresh_curves = _measured_plan()
    marks = next(t for t in plan_charts.plan_curves_chart(fresh, fresh_curves).data if t.name == "Physics plan")
    fresh_row = recommendation(fresh)["rows"][0]
    assert list(marks.x) == [fresh_row["collect"]]
    assert marks.y[0] == pytest.approx(fresh_row["gain"], rel=1e-9)


def test_the_plan_csv_and_report_carry_the_table():
    import csv
    import io

    from dowsing.presentation import plan_charts
    from dowsing.pipelines.plan import PLAN_ROW_FIELDS, plan_csv

    plan, curves = _measured_plan(budget=21.0, budget_unit="money", costs={"Physics": 3.0})
    rows = list(csv.DictReader(io.StringIO(plan_csv(plan))))
    assert tuple(rows[0]) == PLAN_ROW_FIELDS
    from dowsing.pipelines.plan import recommendation

    recommended = recommendation(plan)["rows"]  # the plan's, or the simple split recommended instead
    assert [int(r["collect"]) for r in rows] == [d["collect"] for d in recommended]
    assert [int(r["curves_prefer"]) for r in rows] == [d["collect"] for d in plan.domains]
    assert float(rows[0]["cost"]) == 3.0 * recommended[0]["collect"]
    assert rows[2]["gain"] == "" and rows[2]["reason"].startswith("too few facts for a pilot")
    page = report.plan_report_html(plan, curves)
    assert page.count("plotly.js v") == 1 and page.count('class="plotly-graph-div"') == 3  # plotly.js once, inline
    assert plan_charts.UNITS_NOTE.replace("'", "&#x27;") in page
    assert "not identifiable: too few facts for a pilot" in page and "budget 21 money" in page


def test_share_says_what_it_is_a_share_of_and_the_report_shows_the_diagnosis():
    import dataclasses

    base = paper_like_result()
    config = dict(base.config, estimator="pilot_curve")
    extras = dict(base.extras or {}, ranking={"estimator": "pilot_curve", "details": {"target_n": 32}},
                  diagnosis=[{"domain": d.name, "kind": "known", "sentence": f"{d.name} is known already.",
                              "pilot_drop": 0.01} for d in base.domains])
    result = dataclasses.replace(base, config=config, extras=extras)
    assert report.share_meaning(result).startswith("the domain's part of the total predicted gain at 32 more facts")
    page = report.build_report(result)
    assert "Share of the predicted gain" in page and "predicted gain at 32 more facts" in page
    assert all(f"{d.name} is known already." in page for d in base.domains)
    rows = report.diagnosis_rows(result)
    assert [r["Concept"] for r in rows] == [d.name for d in result.ranked()]
    assert "kind" in report.to_csv(result).splitlines()[0]
    mean_loss = dataclasses.replace(base, config=dict(base.config, estimator="mean_loss"))
    assert "says little" in report.share_meaning(mean_loss)


def test_pilot_curves_draw_the_fitted_line_through_the_pilot_points():
    import dataclasses
    import math

    from dowsing.presentation import charts

    base = paper_like_result()
    fits = [{"sizes": [2, 4, 8], "drop": [0.1, 0.15, 0.2], "intercept": 0.03, "slope_per_ln_n": 0.08, "target": 32},
            None, {"sizes": [2, 4, 8], "drop": [0.0, 0.01, 0.01], "intercept": 0.0, "slope_per_ln_n": 0.005,
                   "target": 32}, None]
    result = dataclasses.replace(base, extras={"ranking": {"details": {"fits": fits}}})
    fig = charts.pilot_curves(result)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == ["Physics", "Biology"]
    for trace, fit in zip(lines, (fits[0], fits[2])):
        assert list(trace.y) == [fit["intercept"] + fit["slope_per_ln_n"] * math.log(n) for n in trace.x]
    stars = [t for t in fig.data if t.mode == "markers" and t.marker.symbol == "star"]
    assert stars[0].y[0] == 0.03 + 0.08 * math.log(32)
    assert charts.pilot_curves(base) is None
    assert "Pilot learning curves" in report.build_report(result)


def _plan_table(page: str, after: str) -> tuple[list[str], list[int]]:
    """(domains, examples to collect) of the first plan table after `after` in `page`."""
    start = page.index(after)
    table = page[page.index('<table class="dataframe dw-table"', start):]
    table = table[:table.index("</table>")]
    head = re.findall(r"<th>(.*?)</th>", table[:table.index("</thead>")])
    rows = [re.findall(r"<td>(.*?)</td>", row, re.S) for row in table.split("<tbody>")[1].split("</tr>")[:-1]]
    domain, collect = head.index("Domain"), next(k for k, h in enumerate(head) if h.startswith("Collect"))
    return [r[domain] for r in rows], [int(r[collect]) for r in rows]


def _result_on_plan_domains() -> Result:
    """The paper-like result on the hand-made plan's three domains."""
    result = paper_like_result()
    result.domains = [d for d in result.domains if d.name != "Economics"]
    result.per_example = [r for r in result.per_example if r["domain"] != "Economics"]
    return result


def test_the_analysis_report_carries_the_collection_plan_section():
    plan, curves = _measured_plan(budget=21.0, budget_unit="money", costs={"Physics": 3.0})
    result = _result_on_plan_domains()
    without = report.build_report(result)
    assert "Collection plan" not in without and without.count('class="plotly-graph-div"') == 2

    page = report.build_report(result, plan=plan, plan_curves=curves)
    assert page.count("plotly.js v") == 1  # plotly.js still once, with the first chart
    assert page.count('class="plotly-graph-div"') == 2 + 3  # allocation, learning curves, totals
    section = page[page.index("<h2>Collection plan</h2>"):page.index("<h2>Domains</h2>")]
    assert "budget 21 money, spent" in section and plan.pilot["recipe"] in section
    names, counts = _plan_table(section, "Per domain")
    from dowsing.pipelines.plan import recommendation

    assert names == [d["domain"] for d in plan.domains]
    assert counts == [m for _, m in recommendation(plan)["counts"]] and sum(counts) > 0
    t = plan.totals
    assert f"<b>This plan</b>: {t['plan']['expected']:.3g} [{t['plan']['band'][0]:.3g}, {t['plan']['band'][1]:.3g}]" in section
    assert "<b>Spread evenly</b>" in section
    assert f"<b>All on {t['highest_loss']['domain']} (highest mean loss)</b>" in section
    diff = t["even"]["plan_minus_this"]
    assert f"plan minus this {diff['expected']:.3g} [{diff['band'][0]:.3g}, {diff['band'][1]:.3g}] (paired)" in section
    assert all(html.escape(sentence) in section for sentence in plan.verdict["sentences"])
    assert "not identifiable: too few facts for a pilot" in section

    # One source for the section: the standalone plan report shows the same table, totals and notes.
    standalone = report.plan_report_html(plan, curves)
    assert _plan_table(standalone, "Per domain") == (names, counts)
    for piece in ("<b>Spread evenly</b>", f"plan minus this {diff['expected']:.3g}", plan.notes[0][:40]):
        assert piece in standalone and piece in section

    # Without the curves the section still has the allocation and the totals.
    page = report.build_report(result, plan=plan)
    assert page.count('class="plotly-graph-div"') == 2 + 2 and "Collection plan" in page


def test_a_plan_for_other_domains_or_another_model_is_refused_in_one_line():
    plan, curves = _measured_plan()
    other = paper_like_result()  # four domains, the plan three
    problem = report.plan_mismatch(other, plan)
    assert problem and "\n" not in problem and "Economics" in problem
    with pytest.raises(ValueError, match="a plan goes into the report of an analysis of the same domains"):
        report.build_report(other, plan=plan, plan_curves=curves)
    result = _result_on_plan_domains()
    assert report.plan_mismatch(result, plan) is None  # the hand-made plan records no fingerprint
    plan.model = {"id": "another", "fingerprint": "f" * 64}
    assert "same model" in report.plan_mismatch(result, plan)
    with pytest.raises(ValueError):
        report.build_report(result, plan=plan)


# --- one story: the verdict, the paper's method beside it, no contradiction ------------

def pilot_ranked(result: Result, probabilities: dict, priorities: dict, kinds: dict) -> Result:
    """`result` ranked by the pilot learning curve with these rank
    probabilities and priorities (nats), each domain diagnosed as `kinds`."""
    from dowsing.kernels import diagnosis

    result = with_uncertainty(result)
    order = sorted(priorities, key=priorities.get, reverse=True)
    for d in result.domains:
        d.priority = priorities[d.name]
        d.rank = order.index(d.name) + 1
    names = [d.name for d in result.domains]
    result.config = {**result.config, "estimator": "pilot_curve"}
    result.extras["ranking"] = {
        "label": "Pilot learning curve, extrapolated", "n_resamples": 200, "rank_stable_probability": 0.8,
        "priority_interval": [[priorities[n] * 0.8, priorities[n] * 1.2] for n in names],
        "share_pct_interval": [[1.0, 2.0] for _ in names],
        "rank_probabilities": [probabilities[n] for n in names],
        "rank_stable": [max(probabilities[n]) >= 0.8 for n in names],
        "details": {"target_n": 32},
    }
    result.extras["diagnosis"] = [{"domain": n, "kind": kinds[n], "sentence": f"{n}: {diagnosis.KINDS[kinds[n]]}."}
                                  for n in names]
    return result


def _kind(helps: bool) -> str:
    from dowsing.kernels import diagnosis

    return next(k for k, v in diagnosis.HELPS.items() if v is helps)


def test_verdict_names_the_first_domain_how_sure_and_the_number_with_its_unit():
    from dowsing.presentation import verdict

    result = pilot_ranked(paper_like_result(),
                          {"Physics": [0.05, 0.95, 0, 0], "Astronomy": [0.93, 0.05, 0.02, 0],
                           "Biology": [0.02, 0, 0.9, 0.08], "Economics": [0, 0, 0.08, 0.92]},
                          {"Physics": 0.12, "Astronomy": 0.183, "Biology": 0.05, "Economics": 0.01},
                          {n: _kind(True) for n in ("Physics", "Astronomy", "Biology", "Economics")})
    found = verdict.verdict(result)
    assert found.headline == "Collect Astronomy first."
    assert found.how_sure == "Fairly sure: Astronomy came first in 93% of 200 bootstrap resamples of your facts."
    assert found.number == "0.183 nats" and "after 32 more facts" in found.number_label
    assert "0.146 to 0.220 nats" in found.number_help
    assert found.ties == [] and found.caveat is None


def test_unstable_ranks_read_as_a_tie_in_plain_words():
    from dowsing.presentation import verdict

    result = pilot_ranked(paper_like_result(),
                          {"Physics": [0.4, 0.3, 0.3, 0], "Astronomy": [0.3, 0.4, 0.3, 0],
                           "Biology": [0.3, 0.3, 0.4, 0], "Economics": [0, 0, 0, 1.0]},
                          {"Physics": 0.2, "Astronomy": 0.19, "Biology": 0.18, "Economics": 0.01},
                          {"Physics": _kind(True), "Astronomy": _kind(True), "Biology": _kind(False),
                           "Economics": _kind(False)})
    assert verdict.rank_groups(result) == [["Physics", "Astronomy", "Biology"], ["Economics"]]
    found = verdict.verdict(result)
    assert found.first == ["Physics", "Astronomy", "Biology"]
    assert found.how_sure == ("Physics, Astronomy and Biology cannot be told apart with these facts; add facts or "
                              "treat them as equal.")
    assert found.number == "0.180 to 0.200 nats"
    # Biology's diagnosis says more facts may not help: the verdict says so rather than contradict it.
    assert "Biology's diagnosis below says more facts like these may not help it much" in found.caveat
    # Without a bootstrap every domain is its own group and the verdict says how sure is unknown.
    result.extras = {"diagnosis": result.extras["diagnosis"]}
    assert verdict.rank_groups(result) == [["Physics"], ["Astronomy"], ["Biology"], ["Economics"]]
    assert "How sure is not known" in verdict.verdict(result).how_sure


def test_plain_numbers():
    from dowsing.presentation.verdict import format_number

    assert format_number(0.18) == "0.180" and format_number(2.8634) == "2.86" and format_number(1234.5) == "1,234"
    assert format_number(None) == "—" and format_number(float("nan")) == "—" and format_number(0) == "0"
    assert format_number(3.7e-5) == "3.70×10⁻⁵"


def test_the_papers_section_says_how_it_fared_and_where_it_disagrees():
    from dowsing.presentation import verdict

    result = pilot_ranked(paper_like_result(),
                          {"Physics": [0.05, 0.95, 0, 0], "Astronomy": [0.03, 0.02, 0.05, 0.9],
                           "Biology": [0.02, 0, 0.9, 0.08], "Economics": [0.9, 0.03, 0.05, 0.02]},
                          {"Physics": 0.12, "Astronomy": 0.01, "Biology": 0.05, "Economics": 0.2},
                          {"Physics": _kind(True), "Astronomy": _kind(False), "Biology": _kind(False),
                           "Economics": _kind(True)})
    # The paper's Means: Astronomy first, Economics (first by the pilot curve, diagnosed as helped) last and negative.
    sentences = verdict.paper_disagreements(result)
    assert sentences[0] == ("The paper's method would collect Astronomy first, where the ranking above puts "
                            "Economics first.")
    assert any("predicts no drop of loss from more data on Economics" in s for s in sentences)
    assert all("paper's method" in s for s in sentences[:-1])
    evidence = verdict.paper_evidence_sentence(result)
    assert evidence.startswith("On the shipped benchmark") and "ρ = 0.36" in evidence and "0.88" in evidence
    page = report.build_report(result).replace("&#x27;", "'")
    assert page.index("The ranking</h2>") < page.index("<h2>The paper's concept-subspace method")
    # Mean, Share of Mean and Δn live in the paper's section only.
    top = page[page.index("<body>"):page.index("<h2>The paper's concept-subspace method")]
    assert "Mean influence" not in top and "Δn@10% (facts)" not in top and "Share of Mean (%)" not in top
    assert "Collect <b>Economics</b> first." in top


def test_no_sentence_contradicts_a_diagnosis_unless_it_names_its_method():
    from dowsing.presentation import verdict

    result = pilot_ranked(paper_like_result(),
                          {"Physics": [0.9, 0.1, 0, 0], "Astronomy": [0.1, 0.9, 0, 0],
                           "Biology": [0, 0, 0.9, 0.1], "Economics": [0, 0, 0.1, 0.9]},
                          {"Physics": 0.2, "Astronomy": 0.1, "Biology": 0.05, "Economics": 0.01},
                          {"Physics": _kind(True), "Astronomy": _kind(True), "Biology": _kind(False),
                           "Economics": _kind(False)})
    bad = "More data on Astronomy is not predicted to lower the loss. Biology would help most."
    found = verdict.contradictions(bad, result)
    assert [name for name, _, _ in found] == ["Astronomy", "Biology"]
    assert verdict.contradictions("By the paper's method more data on Astronomy is not predicted to lower the loss.",
                                  result) == []
    # The report as a whole tells one story.
    text = re.sub(r"<[^>]+>", " ", report.build_report(result)).replace("&#x27;", "'")
    assert verdict.contradictions(text, result) == []


def test_transfer_heatmap_title_says_what_its_colours_say():
    fig = charts.transfer_heatmap(with_uncertainty(paper_like_result()))
    title = fig.layout.title.text
    assert "falls (blue)" in title and "rises (red)" in title and "paper" in title.lower()
    # RdBu: the low end (a rise of the loss) is red, the high end (a fall) blue.
    scale = fig.data[0].colorscale
    assert "103,0,31" in scale[0][1].replace(" ", "") and "5,48,97" in scale[-1][1].replace(" ", "")


def test_saturation_bands_are_cut_to_a_readable_range_around_the_points():
    result = with_uncertainty(paper_like_result())
    for entry in result.extras["bootstrap"]["domains"]:
        entry["curve_band"] = [[n, lo * 1e-5, hi * 1e5] for n, lo, hi in entry["curve_band"]]
    fig = charts.saturation_curves(result)
    for d in result.domains:
        points = next((t for t in fig.data if t.name == d.name), None)
        band = next((t for t in fig.data if t.name == f"{d.name} 90% band"), None)
        if points is None or band is None:
            continue
        assert points.mode == "lines+markers"
        factor = charts.BAND_FACTOR
        assert min(band.y) >= min(points.y) / factor * (1 - 1e-9)
        assert max(band.y) <= max(points.y) * factor * (1 + 1e-9)


def test_fact_differences_between_two_sets():
    from dowsing.presentation.fact_diff import diff_rows, set_diff

    before = [{"name": "A", "facts": ["x", "y", "z"]}, {"name": "B", "facts": ["q"]}]
    after = [{"name": "A", "facts": ["x", "Y", "z", "w"]}, {"name": "C", "facts": ["r"]}]
    diff = set_diff(before, after)
    assert diff.summary() == "C added; B removed; A: 1 fact added, 1 fact changed"
    assert {(r["Change"], r["Before"], r["After"]) for r in diff_rows(diff) if r["Domain"] == "A"} == {
        ("fact added", "", "w"), ("fact changed", "y", "Y")}
    assert set_diff(before, before).empty


@pytest.mark.parametrize("helps", [(True, True, False, False), (False, True, False, True), (False, False, False, False),
                                   (True, True, True, True)])
@pytest.mark.parametrize("signs", [(1, 1, -1, -1), (-1, 1, 1, -1)])
def test_every_sentence_of_the_report_agrees_with_the_diagnoses(helps, signs):
    """Whatever the kinds and whichever Means are negative, the report names
    the paper's method wherever it says otherwise than a diagnosis."""
    from dowsing.presentation import verdict

    names = ["Physics", "Astronomy", "Biology", "Economics"]
    result = pilot_ranked(paper_like_result(),
                          {"Physics": [0.5, 0.5, 0, 0], "Astronomy": [0.5, 0.5, 0, 0],
                           "Biology": [0, 0, 0.85, 0.15], "Economics": [0, 0, 0.15, 0.85]},
                          {"Physics": 0.2, "Astronomy": 0.19, "Biology": 0.05, "Economics": 0.01},
                          {n: _kind(h) for n, h in zip(names, helps)})
    for d, sign in zip(result.domains, signs):
        d.mean = sign * abs(d.mean)
    text = re.sub(r"<[^>]+>", " ", report.build_report(result)).replace("&#x27;", "'")
    assert verdict.contradictions(text, result) == []


def test_the_allocation_chart_draws_the_even_split_when_the_plan_is_not_shown_better():
    from dataclasses import replace as dc_replace

    from dowsing.presentation import plan_charts
    from dowsing.pipelines.plan import recommendation

    plan, _ = _measured_plan()
    even = dc_replace(plan, verdict={**plan.verdict, "recommend": "even"})
    fig = plan_charts.allocation_chart(even)
    assert list(fig.data[0].x) == [d["collect"] for d in even.even_domains]
    assert list(fig.data[1].x) == [d["collect"] for d in plan.domains]
    assert "spread evenly" in fig.layout.title.text and recommendation(even)["by"] == "even"
    mine = dc_replace(plan, verdict={**plan.verdict, "recommend": "plan"})
    fig = plan_charts.allocation_chart(mine)
    assert len(fig.data) == 1 and list(fig.data[0].x) == [d["collect"] for d in plan.domains]


HOSTILE_NAMES = ('<a href="https://evil.example/">Physics</a>', "Bold <b>x</b> &lt;i&gt;",
                 "Rate 100%{y}", "Economics & more")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif hasattr(value, "tolist"):
        yield from _strings(value.tolist())


def test_a_domain_name_shows_in_every_chart_as_written_never_as_plotly_markup():
    import dataclasses

    from dowsing.safe_text import chart_text

    base = paper_like_result()
    domains = [dataclasses.replace(d, name=name) for d, name in zip(base.domains, HOSTILE_NAMES)]
    names = [d.name for d in domains]
    fits = [{"sizes": [2, 4, 8], "drop": [0.1, 0.15, 0.2], "intercept": 0.03, "slope_per_ln_n": 0.08,
             "target": 32}] * 4
    extras = {"ranking": {"details": {"fits": fits}, "rank_probabilities": [[1, 0, 0, 0], [0, 1, 0, 0],
                                                                             [0, 0, 1, 0], [0, 0, 0, 1]]},
              "transfer": {"domains": names, "matrix": [[0.1 * (i + j) for j in range(4)] for i in range(4)]}}
    result = dataclasses.replace(base, domains=domains, extras=extras)
    figs = dict(charts.figures(result), compare=charts.rank_comparison(result, result))
    assert {"share", "saturation", "pilot", "transfer", "rank"} <= set(figs)
    # what plotly would read as markup: its tags, its entities, a hover template's placeholders
    tag = re.compile(r"<(/?)(a|b|i|em|span|sup|sub|br|extra|s|u)\b", re.IGNORECASE)
    entity = re.compile(r"&(#\d+|#x[\da-fA-F]+|[a-z]+);")
    for key, fig in figs.items():
        texts = list(_strings(fig.to_plotly_json()))
        joined = "\n".join(texts)
        for name in names:
            assert chart_text(name) in joined, (key, name)  # the name is there, character for character
        for text in texts:
            assert not entity.search(text), (key, text)
            assert all(m.group(2).lower() in ("b", "br", "extra", "sup") for m in tag.finditer(text)), (key, text)
        assert "100%{y}" not in joined and "<a " not in joined and "&lt;" not in joined, key
    assert chart_text(names[0]).replace("\u2060", "") == names[0]
