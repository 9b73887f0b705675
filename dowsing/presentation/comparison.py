"""Side-by-side comparison of two runs (two models, or one domain set before
and after an edit): ranks and means next to each other."""
from __future__ import annotations

import pandas as pd

from ..result import Result, format_sci


def compare(a: Result, b: Result, label_a: str = "A", label_b: str = "B") -> pd.DataFrame:
    """One row per domain in either run (A's rank order, then B-only domains):
    rank, priority (of the run's ranking estimator), the paper's mean, share and
    Δn@10% in each run, and the rank change B − A
    (negative = the domain moved up in B). Missing values are None."""
    by_a = {d.name: d for d in a.domains}
    by_b = {d.name: d for d in b.domains}
    names = [d.name for d in a.ranked()] + [d.name for d in b.ranked() if d.name not in by_a]
    rows = []
    for name in names:
        da, db = by_a.get(name), by_b.get(name)
        rows.append({
            "Concept": name,
            f"Rank {label_a}": da.rank if da else None,
            f"Rank {label_b}": db.rank if db else None,
            "Rank change": (db.rank - da.rank) if da and db else None,
            f"Priority {label_a}": da.ranking_priority if da else None,
            f"Priority {label_b}": db.ranking_priority if db else None,
            f"Mean {label_a}": da.mean if da else None,
            f"Mean {label_b}": db.mean if db else None,
            f"Share {label_a} (%)": da.share_pct if da else None,
            f"Share {label_b} (%)": db.share_pct if db else None,
            f"Δn@10% {label_a}": da.delta_n_10pct if da else None,
            f"Δn@10% {label_b}": db.delta_n_10pct if db else None,
        })
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as display strings: means and Δn like the paper, ranks as
    integers, a rank change as ▲/▼ with the number of places."""
    out = table.copy().astype(object)
    for col in out.columns:
        if col.startswith(("Mean", "Δn", "Priority")):
            out[col] = [format_sci(None if pd.isna(v) else float(v)) for v in table[col]]
        elif col.startswith("Share"):
            out[col] = ["—" if pd.isna(v) else f"{float(v):.1f}%" for v in table[col]]
        elif col.startswith("Rank ") and col != "Rank change":
            out[col] = ["—" if pd.isna(v) else str(int(v)) for v in table[col]]
    out["Rank change"] = [_arrow(v) for v in table["Rank change"]]
    return out


def _arrow(change) -> str:
    if change is None or pd.isna(change):
        return "—"
    change = int(change)
    if change < 0:
        return f"▲ {-change}"
    if change > 0:
        return f"▼ {change}"
    return "="
