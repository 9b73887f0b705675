"""Presenting a Result: the paper's table (formatted, with reasons for "—"),
the facts that move each domain most, solver diagnostics, CSV, and a
self-contained HTML report (plotly.js inline, so it opens offline).
No Streamlit here; the app shows the same pieces.
"""
from __future__ import annotations

import html
import io
import json
from datetime import datetime

import pandas as pd

from . import charts
from .result import Result, format_sci

TABLE_COLUMNS = ["Rank", "Concept", "Mean", "Share (%)", "Δn@10%", "t vs rest", "p"]


def format_t(value: float | None) -> str:
    """t like the paper's table: two decimals; "—" when undefined."""
    return "—" if value is None else f"{value:.2f}"


def format_p(value: float | None) -> str:
    """Two-sided p: plain below 3 significant digits, scientific when tiny."""
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 1e-3 else format_sci(value)


def table_rows(result: Result) -> list[dict]:
    """Rows of the paper's Table 1 as display strings, ranked, plus why Δn is missing."""
    rows = []
    for d in result.ranked():
        rows.append({
            "Rank": d.rank,
            "Concept": d.name,
            "Mean": format_sci(d.mean),
            "Share (%)": f"{d.share_pct:.1f}%" if d.share_pct is not None else "—",
            "Δn@10%": format_sci(d.delta_n_10pct),
            "t vs rest": format_t(d.t_vs_rest),
            "p": format_p(d.p_value),
            "reason": d.delta_n_reason if d.delta_n_10pct is None else None,
        })
    return rows


def formatted_table(result: Result) -> pd.DataFrame:
    """The paper's table as strings (what the app and the report show)."""
    return pd.DataFrame(table_rows(result), columns=TABLE_COLUMNS)


def table_html(result: Result, colors: dict[str, str] | None = None) -> str:
    """The table as HTML; a "—" carries its reason as a hover tooltip (title attribute)."""
    colors = colors or charts.result_colors(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = []
    for row in table_rows(result):
        cells = []
        for col in TABLE_COLUMNS:
            value = html.escape(str(row[col]))
            if col == "Concept":
                swatch = f'<span class="dw-swatch" style="background:{colors.get(row["Concept"], "#999")}"></span>'
                value = swatch + value
            elif col == "Δn@10%" and row["reason"]:
                value = f'<abbr class="dw-missing" title="{html.escape(row["reason"], quote=True)}">—</abbr>'
            cells.append(f'<td class="dw-{"text" if col == "Concept" else "num"}">{value}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table class="dw-table"><thead><tr>' + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>"
    )


TABLE_CSS = """
.dw-table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin: 0.5rem 0 1rem; }
.dw-table th { text-align: right; border-bottom: 2px solid #333; padding: 6px 12px; font-weight: 600; }
.dw-table th:nth-child(2) { text-align: left; }
.dw-table td { border-bottom: 1px solid #ddd; padding: 6px 12px; }
.dw-table td.dw-num { text-align: right; }
.dw-table td.dw-text { text-align: left; font-weight: 600; }
.dw-table tbody tr:first-child td { background: rgba(78,121,167,0.08); }
.dw-swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px; margin-right: 0.5em; vertical-align: baseline; }
.dw-missing { text-decoration: none; border-bottom: 1px dotted #888; cursor: help; font-size: 1.05em; }
"""


def missing_reasons(result: Result) -> dict[str, str]:
    """Domain -> why its Δn@10% is missing ("—" in the table)."""
    return {
        d.name: d.delta_n_reason or "no saturation estimate"
        for d in result.ranked()
        if d.delta_n_10pct is None
    }


def top_examples(result: Result, domain: str, top: int = 5) -> tuple[list[dict], list[dict]]:
    """The facts of `domain` with the highest and the lowest influence I_ki = g_kiᵀ z_k."""
    rows = [r for r in result.per_example if r.get("domain") == domain and r.get("influence") is not None]
    rows = sorted(rows, key=lambda r: r["influence"], reverse=True)
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


def to_csv(result: Result) -> str:
    """One row per domain with full-precision numbers (empty cell = null)."""
    rows = []
    for d in result.ranked():
        sat = d.saturation or {}
        solver = d.solver or {}
        rows.append({
            "rank": d.rank, "concept": d.name, "mean": d.mean, "share_pct": d.share_pct,
            "delta_n_10pct": d.delta_n_10pct, "delta_n_direct": d.delta_n_direct,
            "delta_n_reason": d.delta_n_reason, "t_vs_rest": d.t_vs_rest, "p_value": d.p_value,
            "n_facts": d.n_facts, "alpha": sat.get("alpha"), "n0": sat.get("n0"), "c": sat.get("c"),
            "r2": sat.get("r2"), "solver": solver.get("method"), "iterations": solver.get("iterations"),
            "rel_residual": solver.get("rel_residual"),
            "nonpositive_curvature": solver.get("nonpositive_curvature"),
            "concept_vector_norm": d.concept_vector_norm,
        })
    buffer = io.StringIO()
    pd.DataFrame(rows).to_csv(buffer, index=False)
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


def build_report(result: Result, title: str = "Data dowsing report") -> str:
    """A single HTML file: the table, the donut and the saturation curves (interactive,
    plotly.js embedded once), the model, the domains with their facts, the settings,
    the date. Opens offline in any browser."""
    figs = charts.figures(result)
    share_div = figs["share"].to_html(full_html=False, include_plotlyjs=True, default_width="100%")
    curve_div = figs["saturation"].to_html(full_html=False, include_plotlyjs=False, default_width="100%")
    esc = html.escape
    reasons = missing_reasons(result)
    reason_items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in reasons.items())
    top = result.ranked()[0] if result.domains else None
    headline = (
        f"<p class='lead'>More data on <b>{esc(top.name)}</b> is expected to help this model most "
        f"(rank 1, mean influence {esc(format_sci(top.mean))}).</p>" if top else ""
    )
    settings = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v))}</td></tr>"
                       for k, v in (result.config or {}).items())
    model_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                         for k, v in (result.model or {}).items())
    timings = "".join(f"<tr><th>{esc(str(k))}</th><td>{v:.2f} s</td></tr>"
                      for k, v in (result.timings or {}).items() if isinstance(v, (int, float)))
    domain_blocks = []
    for name, facts in _facts_by_domain(result).items():
        items = "".join(f"<li>{esc(f)}</li>" for f in facts)
        domain_blocks.append(f"<details><summary><b>{esc(name)}</b> ({len(facts)} facts)</summary><ol>{items}</ol></details>")
    diag = diagnostics_table(result).to_html(index=False, classes="dw-table dw-diag", border=0, escape=True)
    created = result.created_at or datetime.now().isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>
body {{ font-family: {charts.FONT}; max-width: 1100px; margin: 2rem auto; padding: 0 1.5rem; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }} .meta {{ color: #666; margin-top: 0; }}
.lead {{ font-size: 1.15rem; }}
.grid {{ display: grid; grid-template-columns: 1fr; gap: 1rem; }}
table.kv th {{ text-align: left; padding: 3px 12px 3px 0; color: #555; font-weight: 500; }}
table.kv td {{ font-family: ui-monospace, monospace; }}
details {{ margin: 0.3rem 0; }} footer {{ color: #888; margin-top: 3rem; font-size: 0.9rem; }}
{TABLE_CSS}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(model_summary(result))} · created {esc(created)}</p>
{headline}
<h2>Concept priority ranking</h2>
{table_html(result)}
{"<p>Δn@10% shows “—” where no saturation estimate exists:</p><ul>" + reason_items + "</ul>" if reasons else ""}
<div class="grid">
<section><h2>Share of influence</h2>{share_div}</section>
<section><h2>Saturation curves</h2>
<p>μ(n) is the marginal influence of one more fact when the corpus holds n facts of the domain;
◆ marks today's n, ★ the point n+Δn where μ falls to 10% of today's value (dotted line).
Click a domain in the legend to hide or show it.</p>{curve_div}</section>
</div>
<h2>Domains</h2>{"".join(domain_blocks)}
<h2>Model</h2><table class="kv">{model_rows}</table>
<h2>Settings</h2><table class="kv">{settings}</table>
{"<h2>Timings</h2><table class='kv'>" + timings + "</table>" if timings else ""}
<h2>Solver diagnostics</h2>{diag}
<footer>Generated by dowsing (engine {esc(result.engine_version)}) · cache key {esc(result.cache_key or "—")}</footer>
</body></html>
"""
