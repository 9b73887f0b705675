"""Results: which estimator ranked the domains and what the benchmark measured
for it, the ranked table with 90% bootstrap intervals (the ranking estimator's
Priority and Share, the paper's Share of Mean, Mean and Δn@10%), the share donut, the
saturation curves with their bands, rank stability, the
cross-domain transfer heatmap, the facts that move each domain most, solver
diagnostics and downloads (CSV, JSON, a self-contained HTML report, with the
collection plan's section when a finished plan of the same model and domains
exists)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dowsing import charts, report
from dowsing.plan import fit_pilots, plan_from_pilots
from dowsing.result import format_sci
from dowsing.safe_text import md_escape
from pages import _shared

_shared.ensure_router()
st.title("Results")

runner = _shared.runner()
job_id = _shared.job_to_show()
if not job_id:
    st.info("No run yet — go to **Run** and press Analyze.", icon=":material/info:")
    st.page_link("pages/run.py", label="Go to Run", icon=":material/play_circle:")
    st.stop()

state = runner.state(job_id)
if state is not None and state.active:
    st.info(f"This run is still {state.status} ({state.stage}: {md_escape(state.message)}). Results appear when it "
            "finishes.",
            icon=":material/hourglass_top:")
    st.page_link("pages/run.py", label="Follow its progress on Run", icon=":material/play_circle:")
    st.stop()
result = runner.result(job_id)
if result is None:
    reason = state.error if state is not None and state.status == "failed" else None
    st.warning("No result for this run" + (f": {md_escape(reason)}" if reason else ".") +
               " Run it again on the Run page.",
               icon=":material/warning:")
    st.page_link("pages/run.py", label="Go to Run", icon=":material/play_circle:")
    st.stop()

done = [s for s in runner.history("analysis") if s.status == "done"]
if len(done) > 1:
    ids = [s.job_id for s in done]
    labels = {s.job_id: _shared.job_label(s) for s in done}
    if job_id not in labels:
        ids.insert(0, job_id)
        labels[job_id] = "this run"
    picked = st.selectbox("Run", ids, index=ids.index(job_id), format_func=labels.get, key=f"result_pick_{job_id}",
                          help="Every finished run in the history.")
    if picked != job_id:
        _shared.set_current_job(picked)
        st.rerun()

colors = charts.result_colors(result)
ranked = result.ranked()
top = ranked[0] if ranked else None
st.caption(f"{md_escape(report.model_summary(result))} · {len(result.domains)} domains · "
           f"{sum(d.n_facts for d in result.domains)} facts · {(result.created_at or '')[:19].replace('T', ' ')}")

paper = result.estimator == "paper"
estimator_label = charts.estimator_label(result)
if top is not None:
    cols = st.columns(4)
    cols[0].metric("Collect first", md_escape(top.name), help=f"Rank 1: the highest priority by {estimator_label}.")
    top_ci = report.format_interval((charts.ranking_domains(result).get(top.name) or {}).get("priority_interval"))
    cols[1].metric("Priority", format_sci(top.ranking_priority),
                   help=f"{estimator_label}." + (f" 90% interval {top_ci}." if top_ci else ""))
    biggest = max(result.domains, key=lambda d: d.share_pct or 0)
    cols[2].metric("Largest share", md_escape(biggest.name),
                   delta=f"{biggest.share_pct:.1f}%", delta_color="off", delta_arrow="off",
                   help=f"Share: {report.share_meaning(result)}.")
    cols[3].metric("Δn@10% for " + md_escape(top.name), format_sci(top.delta_n_10pct),
                   help="More facts until the paper's marginal influence falls to 10% of today's value "
                        f"({charts.SATURATION_SOURCE})"
                        + (f". Missing: {top.delta_n_reason}" if top.delta_n_10pct is None else "."))

st.subheader("Concept priority ranking")
st.markdown("**" + report.ranking_statement(result) + "**")
# The benchmark's verdict on this estimator, verbatim: a warning where it did
# not beat ranking by mean loss, so nobody reads the ranking as more than it is.
if report.evidence_is_weak(result):
    st.warning(report.evidence_text(result), icon=":material/science:")
else:
    st.info(report.evidence_text(result), icon=":material/science:")
st.markdown(f"<style>{report.TABLE_CSS}</style>" + report.table_html(result, colors), unsafe_allow_html=True)
reasons = report.missing_reasons(result)
if reasons:
    st.caption("“—”: no saturation estimate (hover it for the reason). " +
               " ".join(f"**{md_escape(name)}**: {md_escape(why.rstrip('.'))}." for name, why in reasons.items()))
st.caption(f"Priority: {estimator_label}, the score that ranks the domains. "
           f"Share: {report.share_meaning(result)}. {report.mean_share_note(result)} "
           "Mean (paper): the paper's average per-example influence I = gᵀz in the concept subspace. "
           f"Δn@10%: more facts until the paper's marginal gain falls to 10% (power-law fit, "
           f"{charts.SATURATION_SOURCE}). "
           "t vs rest: Welch's t of the domain's per-fact priorities against all others (p two-sided).")
diagnosis = report.diagnosis_rows(result)
if diagnosis:
    st.subheader("What kind of domain each is")
    st.caption(report.DIAGNOSIS_HELP)
    st.dataframe(pd.DataFrame(diagnosis), hide_index=True, width="stretch",
                 column_config={"Diagnosis": st.column_config.TextColumn(width="large")})
# Under the table, not in the diagnostics: with an indefinite Hessian a Mean can
# be negative for that reason alone, which whoever reads the ranking must know.
for text in report.curvature_warnings(result):
    st.warning(md_escape(text), icon=":material/warning:")
interval_note = report.interval_note(result)
if interval_note:
    st.caption(interval_note)
    unstable = report.unstable_domains(result)
    if unstable:
        st.warning("Rank not stable under resampling of the facts — " +
                   "; ".join(f"**{md_escape(name)}**: {probs}" for name, probs in unstable.items()) +
                   ". Treat their order as a tie.", icon=":material/warning:")
else:
    st.caption("No 90% intervals for this result: the bootstrap needs a dense system per domain (not there with the "
               "CG solver and B > 1), "
               "and results cached before it existed do not carry one.")

left, right = st.columns([2, 3])
with left:
    st.plotly_chart(charts.share_donut(result, colors), key="share_chart", width="stretch")
with right:
    st.plotly_chart(charts.saturation_curves(result, colors), key="saturation_chart", width="stretch")
    st.caption(f"Saturation curves and Δn@10% {charts.SATURATION_SOURCE}, whatever ranked the domains.")
pilot_fig = charts.pilot_curves(result, colors)
if pilot_fig is not None:
    st.plotly_chart(pilot_fig, key="pilot_chart", width="stretch")
    st.caption(f"Beside the paper's μ(n): {charts.PILOT_SOURCE}; ★ where the priority is read. Its nats are the "
               "pilot runs' own, so it ranks; the Plan page turns such curves into how many examples to collect.")

rank_chart = charts.rank_probability_chart(result)
transfer_chart = charts.transfer_heatmap(result)
if rank_chart is not None or transfer_chart is not None:
    left, right = st.columns([2, 3])
    if rank_chart is not None:
        with left:
            st.subheader("Rank stability")
            st.caption("Share of the bootstrap resamples in which each domain (row) holds each rank (column) "
                       f"by {estimator_label}.")
            st.plotly_chart(rank_chart, key="rank_chart", width="stretch")
    if transfer_chart is not None:
        with right if rank_chart is not None else st.container():
            st.subheader("Cross-domain transfer")
            st.caption(report.TRANSFER_HELP)
            st.plotly_chart(transfer_chart, key="transfer_chart", width="stretch")

st.subheader("Facts that move each domain most")
fact_key = report.fact_score_key(result)
if fact_key == "priority" and not paper:
    st.caption(f"Each fact's own part of its domain's priority ({estimator_label}; the domain's priority is their "
               "mean), the highest and the lowest, with the paper's per-example influence I = gᵀz beside it.")
else:
    st.caption("Per-example influence I = gᵀz of each fact in its own domain: the highest and the lowest.")
if result.per_example:
    tabs = st.tabs([md_escape(d.name) for d in ranked])
    for tab, d in zip(tabs, ranked):
        highest, lowest = report.top_examples(result, d.name, top=5, key=fact_key)
        with tab:
            # One above the other at full width: side by side, the facts were cut off.
            for title, rows in (("Highest", highest), ("Lowest", lowest)):
                st.markdown(f"**{title} {'priority' if fact_key == 'priority' and not paper else 'influence'}**")
                columns = {}
                if fact_key == "priority" and not paper:
                    columns["Priority"] = [format_sci(r["priority"], 2) for r in rows]
                columns["Influence (paper)" if columns else "Influence"] = [format_sci(r.get("influence"), 2)
                                                                           for r in rows]
                columns["Fact"] = [r["text"] for r in rows]
                st.dataframe(
                    pd.DataFrame(columns), hide_index=True, width="stretch",
                    column_config={**{name: st.column_config.TextColumn(width=100) for name in columns
                                      if name != "Fact"},
                                   "Fact": st.column_config.TextColumn()},
                )
else:
    st.caption("This result holds no per-example influences.")

with st.expander("Solver diagnostics"):
    st.dataframe(report.diagnostics_table(result), hide_index=True, width="stretch")
    if report.ranking_details(result):
        st.caption(report.ranking_details(result))
    for note in (result.extras or {}).get("warnings") or []:
        st.caption(md_escape(note))
    info = st.columns(2)
    info[0].markdown("**Settings**")
    info[0].json(result.config, expanded=False)
    info[1].markdown("**Timings (s)**")
    info[1].json({k: round(v, 3) if isinstance(v, float) else v for k, v in (result.timings or {}).items()},
                 expanded=False)

st.subheader("Download")
dl = st.columns(3)
dl[0].download_button("Table (CSV)", report.to_csv(result), file_name=report.report_filename(result, "csv"),
                      mime="text/csv", icon=":material/table:", width="stretch", key="dl_csv")
dl[1].download_button("Result (JSON)", result.to_json(), file_name=report.report_filename(result, "json"),
                      mime="application/json", icon=":material/data_object:", width="stretch", key="dl_json")


planned = _shared.plan_for(result)


def _report_html() -> str:
    """The report, with the collection plan's section when there is a plan for these domains and this model."""
    if planned is None:
        return report.build_report(result)
    _, pilots, plan_config, _ = planned
    curves = fit_pilots(pilots.to_dict(), plan_config)
    return report.build_report(result, plan=plan_from_pilots(pilots, plan_config, curves), plan_curves=curves)


dl[2].download_button("Report (HTML)", _report_html,
                      file_name=report.report_filename(result, "html"), mime="text/html",
                      icon=":material/description:", width="stretch", key="dl_html", on_click="ignore",
                      help="One file with the table and interactive charts; opens offline, for people without the app.")
if planned is not None:
    plan_state, _, plan_config, kept = planned
    st.caption(f"The report includes the collection plan for these domains and this model: budget "
               f"{plan_config.budget:g} {plan_config.budget_unit} on the pilots measured "
               f"{(plan_state.finished_at or '')[:19].replace('T', ' ')} UTC (plan job {plan_state.job_id[:8]}), "
               + ("with the budget, costs, weights and caps last shown on the Plan page." if kept else
                  "at the Plan page's default budget; set another there and it is the one included."))
else:
    st.caption("No finished collection plan for these domains and this model: the report has no plan section.")
