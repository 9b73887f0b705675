"""Plotly figures of a benchmark result (a BenchmarkResult.to_dict()): the
leaderboard with its intervals, predicted against realised gain per
estimator, and the learning curves beside the predicted saturation."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..safe_text import chart_text
from .leaderboard import BASELINE

GROUP_COLORS = {"everyday": "#1f77b4", "encyclopedic": "#2ca02c", "specialist": "#9467bd", "language": "#ff7f0e",
                "invented": "#d62728", "other": "#7f7f7f"}


def leaderboard_chart(result: dict, recipe: str, ceiling: float | None = None) -> go.Figure:
    """Spearman rho per estimator with its 90% interval over resampled
    domains, best first; the dashed line is the ground truth's seed-to-seed rho."""
    rows = sorted(result["leaderboard"], key=lambda r: -(r["recipes"][recipe]["spearman"] or -2))
    labels = [r["label"] for r in rows]
    rho = [r["recipes"][recipe]["spearman"] for r in rows]
    lo = [(r["recipes"][recipe]["interval"] or [None, None])[0] for r in rows]
    hi = [(r["recipes"][recipe]["interval"] or [None, None])[1] for r in rows]
    plus = [h - v if h is not None and v is not None else 0 for v, h in zip(rho, hi)]
    minus = [v - low if low is not None and v is not None else 0 for v, low in zip(rho, lo)]
    colors = ["#d62728" if r["estimator"] == result.get("winner") else
              ("#7f7f7f" if r["estimator"] == BASELINE else "#1f77b4") for r in rows]
    fig = go.Figure(go.Bar(
        x=rho, y=labels, orientation="h", marker_color=colors,
        error_x={"type": "data", "array": plus, "arrayminus": minus, "visible": True},
        hovertemplate="%{y}<br>ρ = %{x:.2f}<extra></extra>"))
    if ceiling is not None:
        fig.add_vline(x=ceiling, line_dash="dash", line_color="black",
                      annotation_text=f"seed-to-seed ρ = {ceiling:.2f}", annotation_position="top left")
    fig.update_layout(title=f"Spearman ρ against the realised fine-tuning gain ({recipe}), 90% interval",
                      xaxis_title="Spearman ρ", yaxis={"autorange": "reversed"}, xaxis_range=[-1, 1.05],
                      height=120 + 32 * len(rows), margin={"l": 10, "r": 10, "t": 60, "b": 40})
    return fig


def scatter_chart(result: dict, estimator: str, recipe: str) -> go.Figure:
    """Each domain's priority (x) against its realised gain (y), coloured by
    familiarity group."""
    row = next(r for r in result["leaderboard"] if r["estimator"] == estimator)
    gain = result["truth"][recipe]["gain"]
    groups = result.get("groups") or {}
    fig = go.Figure()
    for group, color in GROUP_COLORS.items():
        idx = [i for i, d in enumerate(result["domains"]) if groups.get(d, "other") == group]
        if not idx:
            continue
        fig.add_trace(go.Scatter(
            x=[row["priority"][i] for i in idx], y=[gain[i] for i in idx], mode="markers+text",
            text=[chart_text(result["domains"][i]) for i in idx], textposition="top center", name=group,
            marker={"color": color, "size": 9},
            hovertemplate="%{text}<br>priority %{x:.3g}<br>realised gain %{y:.3g}<extra></extra>"))
    rho = row["recipes"][recipe]["spearman"]
    fig.update_layout(title=f"{row['label']}: priority against realised held-out gain "
                            f"(ρ = {rho:.2f})" if rho is not None else row["label"],
                      xaxis_title="predicted priority", yaxis_title="realised gain (nats)", height=480)
    return fig


def learning_curve_chart(curve: dict) -> go.Figure:
    """Left: the measured held-out loss against added facts. Right: the
    marginal gain per added fact relative to the first added facts, measured
    and as the engine predicts it (mu(n) / mu(n_1))."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out loss after fine-tuning",
                                                        "marginal gain, relative to the first facts"))
    points = curve["measured"]["points"]
    fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                             name="measured loss", line={"color": "#1f77b4"}), row=1, col=1)
    ratio = curve["measured_saturation"]["ratio"]
    if ratio:
        fig.add_trace(go.Scatter(x=[p[0] for p in ratio], y=[p[1] for p in ratio], mode="lines+markers",
                                 name="measured", line={"color": "#1f77b4"}), row=1, col=2)
    predicted = [p for p in curve["predicted"]["ratio"] if p[1] is not None]
    if predicted:
        fig.add_trace(go.Scatter(x=[p[0] for p in predicted], y=[p[1] for p in predicted], mode="lines+markers",
                                 name="predicted (paper's μ(n))", line={"color": "#d62728", "dash": "dash"}),
                      row=1, col=2)
    fig.add_hline(y=0.1, line_dash="dot", line_color="gray", row=1, col=2)
    fig.update_xaxes(title_text="facts added (n)")
    fig.update_layout(title=f"{curve['domain']}: learning curve", height=360)
    return fig
