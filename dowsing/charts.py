"""Plotly figures of a Result: the share donut, the saturation curves and the
comparison of two runs. No Streamlit here: the app and the HTML report both
draw with these builders, so a domain has the same colour everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from .result import DomainResult, Result, format_sci

# Tableau 10 first (distinct, colour-blind friendlier), then more hues for big sets.
PALETTE: tuple[str, ...] = tuple(qualitative.T10) + tuple(qualitative.Alphabet)
FONT = "Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"


def domain_colors(names: Iterable[str]) -> dict[str, str]:
    """Colour of each domain = PALETTE[its position in the domain set].

    Colours follow the set's order, not the rank, so a domain keeps its colour
    in every chart of a run, and across runs when passed the union of names.
    """
    colors: dict[str, str] = {}
    for name in names:
        if name not in colors:
            colors[name] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def result_colors(*results: Result) -> dict[str, str]:
    """Stable colours for one or more runs: the union of their domain names in set order."""
    return domain_colors(d.name for r in results for d in r.domains)


def _layout(fig: go.Figure, **kwargs) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        font=dict(family=FONT, size=13),
        margin=dict(l=10, r=10, t=50, b=10),
        **kwargs,
    )
    return fig


def share_donut(result: Result, colors: dict[str, str] | None = None) -> go.Figure:
    """Donut of Share (%) = |Σ_i I_ki| / Σ_j |Σ_i I_ji| × 100 per domain, in set order."""
    colors = colors or result_colors(result)
    domains = result.domains
    fig = go.Figure(
        go.Pie(
            labels=[d.name for d in domains],
            values=[max(float(d.share_pct or 0.0), 0.0) for d in domains],
            hole=0.55,
            sort=False,
            direction="clockwise",
            marker=dict(colors=[colors[d.name] for d in domains], line=dict(color="white", width=2)),
            customdata=[[d.rank, format_sci(d.mean)] for d in domains],
            texttemplate="%{value:.1f}%",
            textposition="inside",
            insidetextorientation="horizontal",
            hovertemplate="<b>%{label}</b><br>Share %{value:.1f}%<br>Rank %{customdata[0]}"
            "<br>Mean %{customdata[1]}<extra></extra>",
        )
    )
    fig.add_annotation(text="Share of<br>|influence|", showarrow=False, font=dict(size=14, color="#555"))
    fig.update_layout(uniformtext=dict(minsize=10, mode="hide"))  # no text on slivers; the legend names them
    return _layout(fig, title=dict(text="Share of total influence", x=0), showlegend=True,
                   legend=dict(title=dict(text="Domain")), height=420)


def power_law(n, alpha: float, n0: float, c: float):
    """The fitted saturation curve μ(n) = c (n + n0)^(−α)."""
    return c * np.power(np.asarray(n, dtype=float) + n0, -alpha)


def current_mu(domain: DomainResult) -> float | None:
    """μ at the current n = N_k: Mean_k by construction; the fit where Mean_k ≤ 0 is useless."""
    if domain.mean is not None and domain.mean > 0:
        return float(domain.mean)
    sat = domain.saturation or {}
    if all(sat.get(k) is not None for k in ("alpha", "n0", "c")):
        return float(power_law(domain.n_facts, sat["alpha"], sat["n0"], sat["c"]))
    return None


def _positive_points(domain: DomainResult) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for point in (domain.saturation or {}).get("points") or []:
        n, mu = point[0], point[1]
        if n is not None and mu is not None and n > 0 and mu > 0 and math.isfinite(mu):
            xs.append(float(n))
            ys.append(float(mu))
    return xs, ys


def saturation_curves(result: Result, colors: dict[str, str] | None = None) -> go.Figure:
    """Log-log μ_k(n) per domain: computed points, fitted c(n+N0)^−α, the current n
    (N_k, Mean_k), the saturation point (N_k + Δn, 0.1·μ(N_k)) and the 10% line.

    Every trace of a domain shares one legend group, so a click on the legend
    toggles the whole domain. Points with μ ≤ 0 cannot sit on a log axis and
    are left out; a domain with none is listed in the legend as such.
    """
    colors = colors or result_colors(result)
    fig = go.Figure()
    for d in result.domains:
        color = colors[d.name]
        group = d.name
        xs, ys = _positive_points(d)
        sat = d.saturation or {}
        if not xs:
            fig.add_trace(go.Scatter(x=[None], y=[None], name=f"{d.name} (no positive μ)", legendgroup=group,
                                     mode="markers", marker=dict(color=color)))
            continue
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=d.name, legendgroup=group,
            marker=dict(color=color, size=7, opacity=0.8),
            hovertemplate=f"<b>{d.name}</b><br>n = %{{x:,.0f}}<br>μ(n) = %{{y:.3e}}<extra>computed</extra>",
        ))
        fitted = all(sat.get(k) is not None for k in ("alpha", "n0", "c"))
        if fitted:
            grid = np.geomspace(min(xs), max(xs), 200)
            r2 = sat.get("r2")
            fit_label = f"α={sat['alpha']:.3g}, N0={sat['n0']:.3g}" + (f", R²={r2:.3f}" if r2 is not None else "")
            fig.add_trace(go.Scatter(
                x=grid, y=power_law(grid, sat["alpha"], sat["n0"], sat["c"]), mode="lines",
                name=f"{d.name} fit", legendgroup=group, showlegend=False,
                line=dict(color=color, width=2),
                hovertemplate=f"<b>{d.name}</b> fit ({fit_label})<br>n = %{{x:,.0f}}<br>μ = %{{y:.3e}}<extra></extra>",
            ))
        mu_now = current_mu(d)
        if mu_now is None or mu_now <= 0:
            continue
        fig.add_trace(go.Scatter(
            x=[d.n_facts], y=[mu_now], mode="markers", name=f"{d.name} now", legendgroup=group, showlegend=False,
            marker=dict(color=color, size=13, symbol="diamond", line=dict(color="black", width=1)),
            hovertemplate=f"<b>{d.name}</b> now<br>n = N = {d.n_facts}<br>μ = %{{y:.3e}}<extra></extra>",
        ))
        ten_pct = 0.1 * mu_now
        fig.add_trace(go.Scatter(
            x=[min(xs), max(xs)], y=[ten_pct, ten_pct], mode="lines", name=f"{d.name} 10%",
            legendgroup=group, showlegend=False, line=dict(color=color, width=1, dash="dot"),
            hovertemplate=f"<b>{d.name}</b>: 10% of μ(N) = %{{y:.3e}}<extra></extra>",
        ))
        if d.delta_n_10pct is not None and d.delta_n_10pct > 0:
            n_sat = d.n_facts + d.delta_n_10pct
            fig.add_trace(go.Scatter(
                x=[n_sat], y=[ten_pct], mode="markers", name=f"{d.name} n+Δn", legendgroup=group,
                showlegend=False,
                marker=dict(color=color, size=14, symbol="star", line=dict(color="black", width=1)),
                hovertemplate=f"<b>{d.name}</b> saturates<br>n + Δn = %{{x:,.0f}}"
                f"<br>Δn@10% = {format_sci(d.delta_n_10pct)}<br>μ = %{{y:.3e}}<extra></extra>",
            ))
    fig.update_xaxes(type="log", title="n, facts of the domain in the corpus")
    fig.update_yaxes(type="log", title="marginal influence μ(n)", exponentformat="power")
    return _layout(
        fig,
        title=dict(text="Saturation: μ(n) = c(n+N₀)^−α  ◆ now  ★ n+Δn@10%  ┈ 10% line", x=0),
        legend=dict(title=dict(text="Domain (click to toggle)")),
        hovermode="closest",
        height=480,
    )


def rank_comparison(a: Result, b: Result, label_a: str = "A", label_b: str = "B",
                    colors: dict[str, str] | None = None) -> go.Figure:
    """Slope chart: each domain's rank in run A joined to its rank in run B."""
    colors = colors or result_colors(a, b)
    ranks_a = {d.name: d.rank for d in a.domains}
    ranks_b = {d.name: d.rank for d in b.domains}
    fig = go.Figure()
    for name in colors:
        xs, ys = [], []
        if name in ranks_a:
            xs.append(label_a)
            ys.append(ranks_a[name])
        if name in ranks_b:
            xs.append(label_b)
            ys.append(ranks_b[name])
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers+text", name=name, line=dict(color=colors[name], width=3),
            marker=dict(size=12), text=[name] * len(xs),
            # Names outside the lines: left of run A, right of run B.
            textposition=["middle left" if x == label_a else "middle right" for x in xs],
            hovertemplate=f"<b>{name}</b><br>%{{x}}: rank %{{y}}<extra></extra>",
        ))
    n_max = max([*ranks_a.values(), *ranks_b.values(), 1])
    fig.update_yaxes(autorange=False, range=[n_max + 0.5, 0.5], dtick=1, title="rank")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[label_a, label_b], range=[-0.9, 1.9])
    return _layout(fig, title=dict(text="Rank in each run", x=0), height=360, showlegend=False)


def figures(result: Result) -> dict[str, go.Figure]:
    """The charts of one run, with one colour map."""
    colors = result_colors(result)
    return {"share": share_donut(result, colors), "saturation": saturation_curves(result, colors)}

