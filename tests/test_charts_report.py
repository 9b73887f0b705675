"""The figure builders, the formatted table, the HTML report and the comparison,
on a hand-built Result whose numbers are known (no model, no Streamlit)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from dowsing import charts, comparison, report
from dowsing.result import DomainResult, Result, format_sci


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
    table = report.formatted_table(paper_like_result())
    assert list(table.columns) == ["Rank", "Concept", "Mean", "Share (%)", "Δn@10%", "t vs rest", "p"]
    first = table.iloc[0]
    assert (first["Rank"], first["Concept"], first["Mean"], first["Share (%)"], first["t vs rest"]) == (
        1, "Physics", "3.7×10⁻²", "10.2%", "1.01")
    assert table.iloc[2]["Δn@10%"] == "—"
    assert table.iloc[3]["Mean"] == "-7.9×10⁻⁵"
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
    assert header.startswith("rank,concept,mean,share_pct,delta_n_10pct")
    assert first.startswith("1,Physics,0.037,10.2,")


def test_html_report_is_self_contained():
    result = paper_like_result()
    html = report.build_report(result)
    assert html.startswith("<!DOCTYPE html>")
    assert "<script src=" not in html.replace('<script src="data:', "")  # no external scripts
    assert "plotly.js" in html or "Plotly" in html  # plotly.js is inline
    assert len(html) > 1_000_000
    for text in ("3.7×10⁻²", "Physics fact 0", "GPT2LMHeadModel", "2025-01-02T03:04:05", "damping",
                 "Mean influence is not positive.", "Saturation curves", "Share of influence"):
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
