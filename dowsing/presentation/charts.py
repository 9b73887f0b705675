"""Plotly figures of a Result: the share donut, the saturation curves (with the
bootstrap band), the rank probabilities, the cross-domain transfer heatmap and
the comparison of two runs. No Streamlit here: the app and the HTML report both
draw with these builders, so a domain has the same colour everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from ..result import DomainResult, Result, format_number, format_sci
from ..safe_text import chart_text

# Tableau 10 first (distinct, colour-blind friendlier), then more hues for big sets.
PALETTE: tuple[str, ...] = tuple(qualitative.T10) + tuple(qualitative.Alphabet)
FONT = "Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif"
# Saturation curves and Δn come from the paper's method, whatever ranked the domains.
SATURATION_SOURCE = "from the concept-subspace curvature (paper)"


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


def bootstrap_domains(result: Result) -> dict[str, dict]:
    """Domain name -> its entry of extras["bootstrap"]["domains"]; {} when the run has
    no bootstrap (CG solver, or a result cached before the bootstrap existed)."""
    boot = (result.extras or {}).get("bootstrap") or {}
    return {d["name"]: d for d in boot.get("domains") or [] if isinstance(d, dict) and "name" in d}


def ranking_domains(result: Result) -> dict[str, dict]:
    """Domain name -> the ranking estimator's uncertainty: {"priority_interval",
    "share_pct_interval", "rank_probabilities", "rank_stable"}, from
    extras["ranking"] (lists in domain order); for results without one (engines
    before 1.3.0 ranked by the paper's Mean) from the paper's bootstrap. {} when
    neither exists."""
    ranking = (result.extras or {}).get("ranking") or {}
    names = [d.name for d in result.domains]
    if ranking.get("rank_probabilities") and len(ranking["rank_probabilities"]) == len(names):
        out = {}
        for k, name in enumerate(names):
            entry = {key: (ranking.get(key) or [None] * len(names))[k]
                     for key in ("priority_interval", "share_pct_interval", "rank_probabilities", "rank_stable")}
            if entry["rank_stable"] is None:
                entry["rank_stable"] = True
            out[name] = entry
        return out
    if ranking:
        return {}
    return {name: {"priority_interval": b.get("mean_interval"), "share_pct_interval": b.get("share_pct_interval"),
                   "rank_probabilities": b.get("rank_probabilities"), "rank_stable": b.get("rank_stable", True)}
            for name, b in bootstrap_domains(result).items()}


def ranking_resamples(result: Result) -> int | None:
    """How many bootstrap resamples the ranking's uncertainty rests on."""
    extras = result.extras or {}
    source = extras.get("ranking") or extras.get("bootstrap") or {}
    return source.get("n_resamples")


def estimator_label(result: Result) -> str:
    """The ranking estimator's short label, for titles and axes."""
    from ..estimators import ESTIMATORS

    ranking = (result.extras or {}).get("ranking") or {}
    known = ESTIMATORS.get(result.estimator)
    return ranking.get("label") or (known.label if known else result.estimator)


def transfer_matrix(result: Result) -> tuple[list[str], list[list[float | None]]] | None:
    """(domain names, T) with T[j][k] = ∇L_jᵀ z_k from extras["transfer"]; None when absent."""
    transfer = (result.extras or {}).get("transfer") or {}
    names, matrix = transfer.get("domains"), transfer.get("matrix")
    if not names or not matrix or len(matrix) != len(names):
        return None
    return list(names), [list(row) for row in matrix]


def _rgba(color: str, alpha: float) -> str:
    """'#4C78A8' or 'rgb(76,120,168)' -> 'rgba(76,120,168,alpha)'."""
    color = color.strip()
    if color.startswith("#"):
        h = color[1:]
        if len(h) == 3:
            h = "".join(c * 2 for c in h)
        r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    else:
        r, g, b = (int(float(v)) for v in color[color.index("(") + 1:color.index(")")].split(",")[:3])
    return f"rgba({r},{g},{b},{alpha})"


def band_polygon(curve_band, lowest: float | None = None, clip=None) -> tuple[list[float], list[float]]:
    """The closed outline of a band [[n, lo, hi], ...]: x = n ascending then descending,
    y = hi then lo reversed.

    A log axis cannot show lo ≤ 0, so such a lo is drawn at a floor, a tenth of the
    smallest positive value of the band (or of `lowest`, the smallest point drawn with
    it, when that is smaller): the band then runs to the bottom of the plot,
    which reads as "could be zero or negative". With `clip` = (bottom, top), or
    a function of n that returns them, every y is cut to that range, so a band
    that spans decades does not set the axis.
    Rows with n ≤ 0, hi ≤ 0 or a missing value are left out."""
    rows = sorted(
        (float(n), float(lo), float(hi)) for n, lo, hi in (curve_band or [])
        if n is not None and lo is not None and hi is not None and n > 0 and hi > 0
        and math.isfinite(lo) and math.isfinite(hi)
    )
    if not rows:
        return [], []
    positive = [v for _, lo, hi in rows for v in (lo, hi) if v > 0]
    if lowest is not None and lowest > 0:
        positive.append(lowest)
    floor = 0.1 * min(positive)
    ns = [r[0] for r in rows]
    ys = [r[2] for r in rows] + [r[1] if r[1] > 0 else floor for r in rows][::-1]
    if clip is not None:
        bounds = [clip(n) if callable(clip) else clip for n in ns + ns[::-1]]
        ys = [min(max(y, lo), hi) for y, (lo, hi) in zip(ys, bounds)]
    return ns + ns[::-1], ys


def _layout(fig: go.Figure, **kwargs) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        font=dict(family=FONT, size=13),
        margin=dict(l=10, r=10, t=50, b=10),
        **kwargs,
    )
    return fig


def share_donut(result: Result, colors: dict[str, str] | None = None) -> go.Figure:
    """Donut of Share (%) per domain, in set order: |priority_k| / Σ_j |priority_j| × 100
    of the ranking estimator (with the paper's, |Σ_i I_ki| / Σ_j |Σ_i I_ji| × 100)."""
    from ..estimators import PAPER

    colors = colors or result_colors(result)
    domains = result.domains
    paper = result.estimator == PAPER
    fig = go.Figure(
        go.Pie(
            labels=[chart_text(d.name) for d in domains],
            values=[max(float(d.share_pct or 0.0), 0.0) for d in domains],
            hole=0.55,
            sort=False,
            direction="clockwise",
            marker=dict(colors=[colors[d.name] for d in domains], line=dict(color="white", width=2)),
            customdata=[[d.rank, format_sci(d.ranking_priority)] for d in domains],
            texttemplate="%{value:.1f}%",
            textposition="inside",
            insidetextorientation="horizontal",
            hovertemplate="<b>%{label}</b><br>Share %{value:.1f}%<br>Rank %{customdata[0]}"
            f"<br>{'Mean' if paper else 'Priority'} %{{customdata[1]}}<extra></extra>",
        )
    )
    fig.add_annotation(text="Share of<br>|influence|" if paper else "Share of<br>|priority|", showarrow=False,
                       font=dict(size=14, color="#555"))
    fig.update_layout(uniformtext=dict(minsize=10, mode="hide"))  # no text on slivers; the legend names them
    title = "Share of total influence" if paper else "Share of total |priority|"
    return _layout(fig, title=dict(text=title, x=0), showlegend=True,
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


BAND_FACTOR = 3.0  # how far a drawn band may stray from its computed points (a factor, either way)


def _near_points(xs: list, ys: list):
    """n -> (μ/BAND_FACTOR, μ·BAND_FACTOR) around the computed points, μ
    interpolated on the log-log axes; None without points."""
    if not xs:
        return None
    order = np.argsort(xs)
    lx, ly = np.log(np.asarray(xs, float)[order]), np.log(np.asarray(ys, float)[order])

    def bounds(n: float) -> tuple[float, float]:
        mu = float(np.exp(np.interp(math.log(n), lx, ly)))
        return mu / BAND_FACTOR, mu * BAND_FACTOR

    return bounds


def _saturation_marks(fig: go.Figure, d, mu_now: float, xs: list, color: str) -> None:
    """A domain's marks on the saturation chart: where it is now (N_k, μ(N_k)),
    its 10% line, and the saturation point (N_k + Δn, 0.1·μ(N_k)) when it has one."""
    group = label = chart_text(d.name)
    fig.add_trace(go.Scatter(
        x=[d.n_facts], y=[mu_now], mode="markers", name=f"{label} now", legendgroup=group, showlegend=False,
        marker=dict(color=color, size=13, symbol="diamond", line=dict(color="black", width=1)),
        hovertemplate=f"<b>{label}</b> now<br>n = N = {d.n_facts}<br>μ = %{{y:.3e}}<extra></extra>",
    ))
    ten_pct = 0.1 * mu_now
    fig.add_trace(go.Scatter(
        x=[min(xs), max(xs)], y=[ten_pct, ten_pct], mode="lines", name=f"{label} 10%",
        legendgroup=group, showlegend=False, line=dict(color=color, width=1, dash="dot"),
        hovertemplate=f"<b>{label}</b>: 10% of μ(N) = %{{y:.3e}}<extra></extra>",
    ))
    if d.delta_n_10pct is not None and d.delta_n_10pct > 0:
        n_sat = d.n_facts + d.delta_n_10pct
        fig.add_trace(go.Scatter(
            x=[n_sat], y=[ten_pct], mode="markers", name=f"{label} n+Δn", legendgroup=group,
            showlegend=False,
            marker=dict(color=color, size=14, symbol="star", line=dict(color="black", width=1)),
            hovertemplate=f"<b>{label}</b> saturates<br>n + Δn = %{{x:,.0f}}"
            f"<br>Δn@10% = {format_sci(d.delta_n_10pct)}<br>μ = %{{y:.3e}}<extra></extra>",
        ))


def saturation_curves(result: Result, colors: dict[str, str] | None = None) -> go.Figure:
    """Log-log μ_k(n) per domain: computed points, fitted c(n+N0)^−α, the current n
    (N_k, Mean_k), the saturation point (N_k + Δn, 0.1·μ(N_k)) and the 10% line;
    behind them, when the run has a bootstrap, the 90% band of the resampled μ(n)
    curves (extras["bootstrap"], curve_band) as a translucent area.

    Every trace of a domain shares one legend group, so a click on the legend
    toggles the whole domain. Points with μ ≤ 0 cannot sit on a log axis and
    are left out; a domain with none is listed in the legend as such.
    """
    colors = colors or result_colors(result)
    boot = bootstrap_domains(result)
    fig = go.Figure()
    for d in result.domains:
        color = colors[d.name]
        group = label = chart_text(d.name)
        xs, ys = _positive_points(d)
        sat = d.saturation or {}
        # The band is cut to a factor of BAND_FACTOR either side of the computed
        # points: beyond that it only says "anything", and it would set the axis.
        band_x, band_y = band_polygon((boot.get(d.name) or {}).get("curve_band"),
                                      lowest=min(ys) if ys else None, clip=_near_points(xs, ys))
        if band_x:
            # First, so the points and the fit are drawn over it.
            fig.add_trace(go.Scatter(
                x=band_x, y=band_y, mode="lines", fill="toself", fillcolor=_rgba(color, 0.18),
                line=dict(color=color, width=0), name=f"{label} 90% band", legendgroup=group,
                showlegend=False, hoverinfo="skip",
            ))
        if not xs:
            fig.add_trace(go.Scatter(x=[None], y=[None], name=f"{label} (no positive μ)", legendgroup=group,
                                     mode="markers", marker=dict(color=color)))
            continue
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=label, legendgroup=group,
            line=dict(color=color, width=1.5, dash="dot"), marker=dict(color=color, size=5, opacity=0.8),
            hovertemplate=f"<b>{label}</b><br>n = %{{x:,.0f}}<br>μ(n) = %{{y:.3e}}<extra>computed</extra>",
        ))
        fitted = all(sat.get(k) is not None for k in ("alpha", "n0", "c"))
        if fitted:
            grid = np.geomspace(min(xs), max(xs), 200)
            r2 = sat.get("r2")
            fit_label = f"α={sat['alpha']:.3g}, N0={sat['n0']:.3g}" + (f", R²={r2:.3f}" if r2 is not None else "")
            fig.add_trace(go.Scatter(
                x=grid, y=power_law(grid, sat["alpha"], sat["n0"], sat["c"]), mode="lines",
                name=f"{label} fit", legendgroup=group, showlegend=False,
                line=dict(color=color, width=2),
                hovertemplate=f"<b>{label}</b> fit ({fit_label})<br>n = %{{x:,.0f}}<br>μ = %{{y:.3e}}<extra></extra>",
            ))
        mu_now = current_mu(d)
        if mu_now is not None and mu_now > 0:
            _saturation_marks(fig, d, mu_now, xs, color)
    fig.update_xaxes(type="log", title="n, facts of the domain in the corpus")
    fig.update_yaxes(type="log", title="marginal influence μ(n)", exponentformat="power")
    return _layout(
        fig,
        title=dict(text="Saturation: μ(n) = c(n+N₀)<sup>−α</sup>  ◆ now  ★ n+Δn@10%  ┈ 10% line"
                        f"<br><sup>{SATURATION_SOURCE}</sup>", x=0),
        legend=dict(title=dict(text="Domain (click to toggle)")),
        hovermode="closest",
        height=480,
    )


def rank_probability_chart(result: Result) -> go.Figure | None:
    """Heatmap of P(domain holds rank r) over the bootstrap resamples of the ranking
    estimator (extras["ranking"]; the paper's bootstrap for older results): rows are
    the domains in rank order, columns the ranks 1..K; None without a bootstrap."""
    boot = ranking_domains(result)
    rows = [d for d in result.ranked() if d.name in boot and boot[d.name].get("rank_probabilities")]
    if not rows:
        return None
    k = max(len(boot[d.name]["rank_probabilities"]) for d in rows)
    z = [[float(p) for p in boot[d.name]["rank_probabilities"]] + [0.0] * (k - len(boot[d.name]["rank_probabilities"]))
         for d in rows]
    labels = [chart_text(d.name) + ("" if boot[d.name].get("rank_stable", True) else " ⚠") for d in rows]
    n_resamples = ranking_resamples(result)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(r) for r in range(1, k + 1)], y=labels, zmin=0, zmax=1, colorscale="Blues",
        text=[[f"{p:.0%}" for p in row] for row in z], texttemplate="%{text}",
        colorbar=dict(title="P", tickformat=".0%"), xgap=2, ygap=2,
        hovertemplate="<b>%{y}</b><br>P(rank %{x}) = %{z:.1%}<extra></extra>",
    ))
    fig.update_xaxes(title="rank", type="category")
    fig.update_yaxes(autorange="reversed", type="category")
    # Short enough for the narrow column it sits in on the Results page; the
    # resample count goes on a second, smaller line.
    title = "P(domain holds rank)" + (f"<br><sup>{n_resamples} bootstrap resamples</sup>" if n_resamples else "")
    return _layout(fig, title=dict(text=title, x=0), height=max(220, 70 + 42 * len(rows)))


def transfer_heatmap(result: Result) -> go.Figure | None:
    """Heatmap of T[j][k] = ∇L_jᵀ z_k: row j is the domain that improves, column k the
    domain whose data is collected; the diagonal is each domain's Mean. A diverging
    scale centred at 0 (blue: the loss of j drops, red: it rises). None when absent."""
    found = transfer_matrix(result)
    if found is None:
        return None
    names, matrix = found
    z = [[None if v is None else float(v) for v in row] for row in matrix]
    text = [[format_number(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=[chart_text(n) for n in names], y=[chart_text(n) for n in names], zmid=0, colorscale="RdBu", text=text, texttemplate="%{text}",
        colorbar=dict(title="loss falls by<br>∇L_jᵀz_k", exponentformat="power"), xgap=2, ygap=2,
        hovertemplate="Collect <b>%{x}</b> → loss of <b>%{y}</b> falls by %{text} (negative: rises)<extra></extra>",
    ))
    fig.update_xaxes(title="data collected (k)", type="category")
    fig.update_yaxes(title="loss of (j)", type="category", autorange="reversed")
    return _layout(fig, title=dict(text="Paper's method: collect column k, row j's loss falls (blue) or rises (red)",
                                   x=0),
                   height=max(300, 110 + 48 * len(names)))


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
            x=xs, y=ys, mode="lines+markers+text", name=chart_text(name), line=dict(color=colors[name], width=3),
            marker=dict(size=12), text=[chart_text(name)] * len(xs),
            # Names outside the lines: left of run A, right of run B.
            textposition=["middle left" if x == label_a else "middle right" for x in xs],
            hovertemplate=f"<b>{chart_text(name)}</b><br>%{{x}}: rank %{{y}}<extra></extra>",
        ))
    n_max = max([*ranks_a.values(), *ranks_b.values(), 1])
    fig.update_yaxes(autorange=False, range=[n_max + 0.5, 0.5], dtick=1, title="rank")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[label_a, label_b], range=[-0.9, 1.9])
    return _layout(fig, title=dict(text="Rank in each run", x=0), height=360, showlegend=False)


PILOT_SOURCE = ("pilot fine-tunes on your own facts: the drop of one half's held-out loss after training on n facts "
                "of the other half, both ways, and the line a + b ln n through those points")


def pilot_curves(result: Result, colors: dict[str, str] | None = None) -> go.Figure | None:
    """Per domain, the pilot learning curve the ranking was read from (a
    result ranked by the pilot learning curve): the measured drops at the
    pilot sizes as markers, the fitted line a + b ln n from 1 to twice the
    target n, and ★ at the target n where the priority is read. None when
    the result carries no pilot fits."""
    fits = (((result.extras or {}).get("ranking") or {}).get("details") or {}).get("fits")
    if not fits:
        return None
    colors = colors or result_colors(result)
    fig = go.Figure()
    seen = []  # the measured drops and the read-off points: the y range is cut to them
    for d, fit in zip(result.domains, fits):
        if not fit:
            continue
        color, label = colors.get(d.name, "#999"), chart_text(d.name)
        target = fit["target"]
        grid = np.geomspace(1, 2 * target, 60)
        line = fit["intercept"] + fit["slope_per_ln_n"] * np.log(grid)
        fig.add_trace(go.Scatter(x=grid, y=line, mode="lines", line=dict(color=color), name=label,
                                 legendgroup=label,
                                 hovertemplate=f"{label}<br>n = %{{x:.0f}}<br>predicted drop %{{y:.3f}} nats<extra></extra>"))
        fig.add_trace(go.Scatter(x=fit["sizes"], y=fit["drop"], mode="markers", marker=dict(color=color, size=8),
                                 legendgroup=label, showlegend=False,
                                 hovertemplate=f"{label}: pilot on %{{x}} facts<br>drop %{{y:.3f}} nats<extra></extra>"))
        at = fit["intercept"] + fit["slope_per_ln_n"] * math.log(target)
        seen += [float(v) for v in fit["drop"] if v is not None and math.isfinite(v)] + [float(at)]
        fig.add_trace(go.Scatter(x=[target], y=[at], mode="markers", marker=dict(color=color, size=13, symbol="star"),
                                 legendgroup=label, showlegend=False,
                                 hovertemplate=f"{label}: read at n = {target}<br>%{{y:.3f}} nats<extra></extra>"))
    fig.update_xaxes(type="log", title="n facts trained on (pilot)")
    fig.update_yaxes(title="drop of held-out loss (nats)")
    if seen:
        lo, hi = min(seen + [0.0]), max(seen)
        pad = 0.15 * (hi - lo or 1.0)
        fig.update_yaxes(range=[lo - pad, hi + pad])
    return _layout(fig, title=dict(text="Pilot learning curves", x=0), height=380)


def figures(result: Result) -> dict[str, go.Figure]:
    """The charts of one run, with one colour map; "rank", "transfer" and
    "pilot" only when the result carries a bootstrap, a transfer matrix and
    pilot fits."""
    colors = result_colors(result)
    figs = {"share": share_donut(result, colors), "saturation": saturation_curves(result, colors)}
    for key, fig in (("rank", rank_probability_chart(result)), ("transfer", transfer_heatmap(result)),
                     ("pilot", pilot_curves(result, colors))):
        if fig is not None:
            figs[key] = fig
    return figs


# --- validation (a ValidationResult from dowsing.validate) ----------------------

def validation_scatter(validation) -> go.Figure | None:
    """Per estimator, each domain's priority (x) against its realised held-out
    gain from fine-tuning (y); one panel per estimator, own x scale each."""
    if not validation.finetune:
        return None
    colors = domain_colors(validation.domains)
    labels = [est["label"] for est in validation.estimators]
    columns = 3
    rows = (len(labels) + columns - 1) // columns
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=rows, cols=columns, subplot_titles=labels, horizontal_spacing=0.08,
                        vertical_spacing=0.14 if rows > 1 else 0.2)
    for i, est in enumerate(validation.estimators):
        row, col = i // columns + 1, i % columns + 1
        for name, priority, gain in zip(validation.domains, est["priority"], validation.finetune["gain"]):
            fig.add_trace(go.Scatter(
                x=[priority], y=[gain], mode="markers", name=chart_text(name), legendgroup=chart_text(name),
                showlegend=i == 0,
                marker=dict(color=colors[name], size=11, line=dict(width=1, color="white")),
                hovertemplate=f"<b>{chart_text(name)}</b><br>{est['label']}: %{{x:.3g}}<br>realised gain: %{{y:.3g}}<extra></extra>",
            ), row=row, col=col)
    fig.update_yaxes(title_text="realised gain", col=1)
    return _layout(fig, height=90 + 250 * rows, legend=dict(title=dict(text="Domain")),
                   title=dict(text="Priority (x) against realised held-out gain from fine-tuning (y)", x=0))


def subspace_response_scatter(validation) -> go.Figure | None:
    """Predicted against realised held-out loss change in the concept subspace,
    one point per (domain whose data is added, domain measured, ε), with the
    line realised = predicted."""
    sub = validation.subspace
    if not sub:
        return None
    colors = domain_colors(validation.domains)
    symbols = ("circle", "square", "diamond", "triangle-up", "x", "star")
    eps_values = sorted({eps for resp in sub["per_domain"] for eps in resp["eps"]})
    fig = go.Figure()
    everything = []
    for k, resp in enumerate(sub["per_domain"]):
        name = validation.domains[k]
        for i, eps in enumerate(resp["eps"]):
            predicted, realised = resp["predicted"][i], resp["realised"][i]
            everything += list(predicted) + list(realised)
            fig.add_trace(go.Scatter(
                x=predicted, y=realised, mode="markers", name=f"{chart_text(name)}, ε = {eps:g}",
                legendgroup=chart_text(name),
                marker=dict(color=colors[name], size=9, symbol=symbols[eps_values.index(eps) % len(symbols)]),
                text=[chart_text(n) for n in validation.domains],
                hovertemplate=(f"add <b>{chart_text(name)}</b> (ε = {eps:g})<br>measured on %{{text}}<br>"
                               "predicted %{x:.3g}<br>realised %{y:.3g}<extra></extra>"),
            ))
    finite = [v for v in everything if v is not None and math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="realised = predicted",
                                 line=dict(color="#888", dash="dot", width=1), hoverinfo="skip"))
    fig.update_xaxes(title="predicted change of held-out loss")
    fig.update_yaxes(title="realised change")
    return _layout(fig, height=460, title=dict(text="Concept subspace: predicted vs realised", x=0))
