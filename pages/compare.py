"""Compare runs: two finished runs side by side (two models, or a domain set
before and after an edit): ranks and means next to each other, and beside
them the domains and facts that differ between the two runs."""
from __future__ import annotations

import streamlit as st

from dowsing.presentation import charts, comparison, report
from dowsing.config import settings_changes
from dowsing.presentation.fact_diff import diff_rows, set_diff
from dowsing.safe_text import md_escape
from pages import _shared

_shared.ensure_router()
st.title("Compare runs")
st.caption("Pick two finished runs, for example two models on the same domains, or one domain set before "
           "and after an edit. Colours follow the domains, as on the Results page.")

runner = _shared.runner()
done = [s for s in runner.history("analysis") if s.status == "done"]
if len(done) < 2:
    st.info(f"Comparing needs two finished runs; there {'is' if len(done) == 1 else 'are'} {len(done)}. "
            "Run another analysis (a different model, domain set or settings) on the Run page.",
            icon=":material/info:")
    st.page_link("pages/run.py", label="Go to Run", icon=":material/play_circle:")
    st.stop()

ids = [s.job_id for s in done]
labels = _shared.job_labels(done)
pick = st.columns(2)
id_a = pick[0].selectbox("Run A", ids, index=1, format_func=labels.get, key="compare_a")
id_b = pick[1].selectbox("Run B", ids, index=0, format_func=labels.get, key="compare_b")
if id_a == id_b:
    st.warning("Pick two different runs.", icon=":material/warning:")
    st.stop()
result_a, result_b = runner.result(id_a), runner.result(id_b)
if result_a is None or result_b is None:
    st.warning("One of these runs has no stored result any more; run it again.", icon=":material/warning:")
    st.stop()

for col, result, name in ((pick[0], result_a, "A"), (pick[1], result_b, "B")):
    col.caption(f"{md_escape(report.model_summary(result))} · {len(result.domains)} domains · ranked by "
                f"{charts.estimator_label(result)} · settings: {settings_changes(result.config) or 'engine defaults'}")

table = comparison.compare(result_a, result_b, "A", "B")
ranks, facts = st.columns([3, 2])
with ranks:
    st.subheader("Ranks, priorities and means")
    st.dataframe(comparison.format_comparison(table), hide_index=True, width="stretch", key="compare_table",
                 column_config={"Rank change": st.column_config.TextColumn(
                     help="▲ moved up in B, ▼ moved down, = same rank")})
with facts:
    st.subheader("Facts that differ")
    requests = {job: (runner.state(job).request or {}) if runner.state(job) else {} for job in (id_a, id_b)}
    diff = set_diff(requests[id_a].get("domains") or [], requests[id_b].get("domains") or [])
    if diff.empty:
        st.caption("Both runs read the same domains and facts: the differences come from the model or the settings.")
    else:
        st.caption(md_escape(diff.summary()) + " (from A to B).")
        st.dataframe(diff_rows(diff), hide_index=True, width="stretch", key="compare_facts",
                     column_config={"Before": st.column_config.TextColumn("In A"),
                                    "After": st.column_config.TextColumn("In B")})
colors = charts.result_colors(result_a, result_b)
cols = st.columns([2, 3])
cols[0].plotly_chart(charts.rank_comparison(result_a, result_b, "A", "B", colors), key="rank_chart", width="stretch")
with cols[1]:
    donuts = st.columns(2)
    for col, result, name in ((donuts[0], result_a, "A"), (donuts[1], result_b, "B")):
        fig = charts.share_donut(result, colors)
        fig.update_layout(title=dict(text=f"Share, run {name}"), showlegend=False, height=320)
        col.plotly_chart(fig, key=f"share_{name}", width="stretch")
