"""Plotly figures of a collection plan (`dowsing.pipelines.plan.PlanResult`): the
examples to collect per domain, each domain's predicted learning curve with
its 90% band and the plan's point on it, and the plan's predicted total
against the two baselines. No Streamlit here: the Plan page and the HTML
report draw with these builders, and a domain has the colour it has in the
analysis's charts (its position in the domain set).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .charts import _layout, _rgba, domain_colors
from ..safe_text import chart_text
from ..kernels.curves import BAND, predict
from ..pipelines.plan import MEAN_LOSS_RULE, SIMPLE_RULES, DomainCurve, PlanResult, recommendation

UNITS_NOTE = ("Gains are drops of held-out loss in nats per fact after the short pilot fine-tunes: they rank the "
              "domains and split the budget; a full training run's nats differ.")


def plan_colors(plan: PlanResult) -> dict[str, str]:
    return domain_colors(d["domain"] for d in plan.domains)


def _g(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def allocation_chart(plan: PlanResult, colors: dict[str, str] | None = None) -> go.Figure:
    """Horizontal bars: the examples to collect of each domain as
    recommended (`plan.recommendation`: the plan's counts, or the even split
    where the plan is not shown to beat it, with the plan's counts then
    drawn as open diamonds, the curves' preference), in set order from the
    top; a domain without an identifiable curve says so beside its bar."""
    colors = colors or plan_colors(plan)
    rec = recommendation(plan)
    rows = rec["rows"]
    unit = plan.allocation["budget_unit"]
    text = [str(d["collect"]) if d["identifiable"] else "not identifiable" for d in rows]
    hover = [f"<b>{chart_text(d['domain'])}</b><br>collect {d['collect']}<br>cost {_g(d['cost'])}"
             + (f"<br>predicted gain {_g(d.get('expected_gain', d['gain']))} [{_g(d['gain_band'][0])}, "
                f"{_g(d['gain_band'][1])}]"
                if d["identifiable"] else f"<br>{chart_text(d['reason'])}") for d in rows]
    fig = go.Figure(go.Bar(
        y=[chart_text(d["domain"]) for d in rows], x=[d["collect"] for d in rows], orientation="h",
        marker=dict(color=[colors[d["domain"]] for d in rows]), text=text, name="recommended",
        # an empty bar has no inside: its "0" or "not identifiable" goes beside it
        textposition=["inside" if d["collect"] else "outside" for d in rows],
        hovertext=hover, hoverinfo="text", cliponaxis=False,
    ))
    if rec["preference"] is not None:
        fig.add_trace(go.Scatter(
            y=[chart_text(n) for n, _ in rec["preference"]], x=[m for _, m in rec["preference"]], mode="markers",
            name="the curves' preference",
            marker=dict(symbol="diamond-open", size=12, color="#333", line=dict(width=2)),
            hovertemplate="<b>%{y}</b><br>the curves would collect %{x}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="examples to collect", rangemode="tozero")
    alloc = plan.allocation
    by = {"plan": "the plan", "even": "spread evenly (the plan is not shown to beat it)"}.get(
        rec["by"], f"{SIMPLE_RULES.get(rec['by'], rec['by'])} (the plan realised less on the benchmark)")
    spent = sum(d["cost"] for d in rows)
    title = f"Examples to collect, recommended: {by}; budget {alloc['budget']:g} {chart_text(unit)}, spent {spent:g}"
    return _layout(fig, title=dict(text=title, x=0), showlegend=rec["preference"] is not None,
                   height=max(260, 60 + 34 * len(rows)))


def curve_band(dc: DomainCurve, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G(n), 5% and 95% quantiles of the bootstrap curves' G(n)) on `grid`."""
    curve = dc.curve
    grid = np.asarray(grid, dtype=float)
    point = np.asarray(predict(curve.form, curve.params, grid), dtype=float)
    if curve.draws is None or not len(curve.draws):
        return point, point, point
    draws = predict(curve.form, curve.draws.T, grid[:, None])  # (grid, resamples)
    low, high = np.quantile(draws, BAND, axis=1)
    return point, low, high


def _have(row: dict, dc: DomainCurve) -> float:
    """Where the plan read the domain's curve from: its have plus what the
    rounds before collected (older plans: their have, or their facts)."""
    for key in ("reads_from", "have"):
        if row.get(key) is not None:
            return row[key]
    return dc.n_facts


def plan_curves_chart(plan: PlanResult, curves: list, colors: dict[str, str] | None = None) -> go.Figure:
    """Each domain's predicted learning curve G(n) (the drop of its held-out
    loss after the pilot recipe on n facts) on a log n axis: the pilot's
    points, the fitted form, the 90% band of the bootstrap curves, ◆ at the
    facts already in training (have; none from have = 0, where G = 0) and ★
    at have + the examples recommended (`plan.recommendation`), so the gain is the rise from
    ◆ (or 0) to ★. A domain whose curve is not
    identifiable shows its pilot points only. One legend group per domain."""
    colors = colors or plan_colors(plan)
    rows = {d["domain"]: d for d in recommendation(plan)["rows"]}
    sizes = [n for dc in curves for n in dc.curve.sizes] or [1.0]
    right = max([max(_have(rows[dc.name], dc) + rows[dc.name]["collect"], 1) for dc in curves] + sizes)
    grid = np.geomspace(max(1.0, min(sizes)), 1.3 * right, 120)
    fig = go.Figure()
    for dc in curves:
        color, row = colors[dc.name], rows[dc.name]
        group = label = chart_text(dc.name)
        curve = dc.curve
        if not curve.identifiable:
            fig.add_trace(go.Scatter(
                x=curve.sizes or [None], y=curve.drops or [None], mode="markers", legendgroup=group,
                name=f"{label} (not identifiable)", marker=dict(color=color, size=7, symbol="x"),
                hovertemplate=f"<b>{label}</b>: {chart_text(curve.reason)}<br>n = %{{x}}<br>drop %{{y:.3g}}<extra></extra>",
            ))
            continue
        point, low, high = curve_band(dc, grid)
        fig.add_trace(go.Scatter(
            x=np.concatenate([grid, grid[::-1]]), y=np.concatenate([high, low[::-1]]), mode="lines",
            fill="toself", fillcolor=_rgba(color, 0.16), line=dict(color=color, width=0), legendgroup=group,
            name=f"{label} 90% band", showlegend=False, hoverinfo="skip",
        ))
        fig.add_trace(go.Scatter(
            x=grid, y=point, mode="lines", line=dict(color=color, width=2), legendgroup=group, name=label,
            hovertemplate=f"<b>{label}</b> ({curve.form} fit)<br>n = %{{x:,.0f}}<br>G(n) = %{{y:.3g}}<extra></extra>",
        ))
        fig.add_trace(go.Scatter(
            x=curve.sizes, y=curve.drops, mode="markers", legendgroup=group, showlegend=False,
            name=f"{label} pilot", marker=dict(color=color, size=7, line=dict(color="white", width=1)),
            hovertemplate=f"<b>{label}</b> pilot<br>n = %{{x}}<br>drop %{{y:.3g}}<extra></extra>",
        ))
        # from have = 0 the curve starts at G(0) = 0, off a log axis: the star alone
        now = _have(row, dc)
        after = now + row["collect"]
        marks = [(now, "now", 0, "diamond", 12)] if now >= 1 else []
        if after >= 1:
            marks.append((after, "after the plan", row["collect"], "star", 15))
        fig.add_trace(go.Scatter(
            x=[m[0] for m in marks], y=[curve.value(m[0]) for m in marks], mode="markers", legendgroup=group,
            showlegend=False, name=f"{label} plan",
            marker=dict(color=color, size=[m[4] for m in marks], symbol=[m[3] for m in marks],
                        line=dict(color="black", width=1)),
            customdata=[[m[1], m[2]] for m in marks],
            hovertemplate=f"<b>{label}</b> %{{customdata[0]}}<br>n = %{{x:,.0f}} (+%{{customdata[1]}})"
                          f"<br>G(n) = %{{y:.3g}}<br>gain {_g(row['gain'])} [{_g((row['gain_band'] or [None])[0])}, "
                          f"{_g((row['gain_band'] or [None, None])[1])}]<extra></extra>",
        ))
    fig.update_xaxes(type="log", title="n, facts of the domain")
    fig.update_yaxes(title="G(n), drop of held-out loss (nats per fact, pilot)")
    return _layout(fig, title=dict(text="Predicted learning curves, 90% band  ◆ now  ★ after the plan", x=0),
                   legend=dict(title=dict(text="Domain (click to toggle)")), hovermode="closest", height=480)


TOTAL_LABELS = {"plan": "This plan", "even": "Spread evenly", MEAN_LOSS_RULE: "Split by mean loss",
                "ranking": "Split by the ranking's score", "highest_loss": "All on the highest loss"}


def totals_chart(plan: PlanResult) -> go.Figure:
    """The predicted total (weighted) gain of the plan, of spreading the
    budget evenly, of splitting it by mean loss and of spending it all on
    the domain of highest mean loss: the mean over the bootstrap curves
    (what the plan maximises), each with its 90% band as an error bar."""
    totals = plan.totals
    keys = [k for k in TOTAL_LABELS if k in totals]
    labels = [TOTAL_LABELS[k] + (f" ({chart_text(totals[k]['domain'])})" if k == "highest_loss" else "") for k in keys]
    gains = [totals[k].get("expected", totals[k]["gain"]) for k in keys]
    fig = go.Figure(go.Bar(
        x=labels, y=gains, marker=dict(color=["#4e79a7"] + ["#bab0ac"] * (len(keys) - 1)),
        error_y=dict(type="data", symmetric=False, array=[totals[k]["band"][1] - g for k, g in zip(keys, gains)],
                     arrayminus=[g - totals[k]["band"][0] for k, g in zip(keys, gains)], color="#333"),
        customdata=[[totals[k]["band"][0], totals[k]["band"][1], totals[k]["spent"]] for k in keys],
        hovertemplate="<b>%{x}</b><br>gain %{y:.3g} [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"
                      "<br>spent %{customdata[2]:g}<extra></extra>",
    ))
    fig.update_yaxes(title="predicted total gain (nats, pilot)")
    return _layout(fig, title=dict(text="Predicted total gain (mean over the bootstrap curves), 90% band", x=0),
                   showlegend=False, height=380)


def plan_figures(plan: PlanResult, curves: list) -> dict[str, go.Figure]:
    colors = plan_colors(plan)
    return {"allocation": allocation_chart(plan, colors), "curves": plan_curves_chart(plan, curves, colors),
            "totals": totals_chart(plan)}
