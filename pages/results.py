"""Results: one story. At the top the verdict in plain words (what to
collect first, how sure, the one number it rests on, from `dowsing.presentation.verdict`),
then the ranking that ranks with its intervals, each domain's diagnosis in
full, the share donut, the pilot curves and rank stability; the facts that
move each domain most; then "The paper's concept-subspace method" on its own:
how it fared on the benchmark, where it disagrees with the ranking, its
Mean, Share of Mean, Δn@10%, saturation curves and transfer heatmap. Solver
diagnostics and downloads (CSV, JSON, a self-contained HTML report that tells
the same story, with the collection plan's section when a finished plan of
the same model and domains exists) close the page.

While the run is still going, the page shows the ranking and the diagnosis
it handed ahead (the job's partial result), marked as such, with the paper's
section saying "computing…" beside the job's progress; it polls the job and
shows the whole result once the run ends."""
from __future__ import annotations

import streamlit as st

from dowsing.estimators import PAPER
from dowsing.presentation import charts, report, verdict
from dowsing.safe_text import md_escape
from dowsing.pipelines.plan import fit_pilots, plan_from_pilots
from pages import _shared

# The anchor of the paper's section, a URL fragment that links point at.
PAPER_SECTION = "paper"

_shared.ensure_router()
st.title("Results")

runner = _shared.runner()
job_id = _shared.job_to_show()
if not job_id:
    st.info("No run yet — go to **Run** and press Analyze.", icon=":material/info:")
    st.page_link("pages/run.py", label="Go to Run", icon=":material/play_circle:")
    st.stop()

state = runner.state(job_id)
# While the run is active, the ranking and the diagnosis it handed ahead (None until they are ready);
# the paper's quantities come with the whole result.
partial = runner.partial_result(job_id) if state is not None and state.active else None


def _rerun_once_ranked(now) -> None:
    if now.active and runner.partial_result(job_id) is not None:
        st.rerun()  # the whole page: the ranking is ready to show


if state is not None and state.active and partial is None:
    st.info(f"This run is still {state.status}. Its ranking and diagnosis appear here as soon as they are ready, "
            "the paper's quantities when the run finishes.", icon=":material/hourglass_top:")
    _shared.follow_job(job_id, "analysis", show=_rerun_once_ranked)
    st.stop()
result = partial if partial is not None else runner.result(job_id)
if result is None:
    reason = state.error if state is not None and state.status == "failed" else None
    st.warning("No result for this run" + (f": {md_escape(reason)}" if reason else ".") +
               " Run it again on the Run page.",
               icon=":material/warning:")
    st.page_link("pages/run.py", label="Go to Run", icon=":material/play_circle:")
    st.stop()

if partial is not None:
    st.warning("**The paper's quantities are still computing.** What shows is the ranking and the diagnosis, "
               "ready ahead of them; Mean, Share of Mean, Δn@10%, the saturation curves and the transfer heatmap "
               f"follow in [the paper's section](#{PAPER_SECTION}) when the run finishes, and this page then shows "
               "the whole result.", icon=":material/hourglass_top:")

done = [s for s in runner.history("analysis") if s.status == "done"]
if len(done) > 1:
    ids = [s.job_id for s in done]
    labels = _shared.job_labels(done)
    if job_id not in labels:
        ids.insert(0, job_id)
        labels[job_id] = "this run" if partial is None else "this run (still computing)"
    # a key of its own once the run is whole: under the same key the browser kept showing the label
    # "this run (still computing)" after the whole result had replaced the partial one
    picked = st.selectbox("Run", ids, index=ids.index(job_id), format_func=labels.get,
                          key=f"result_pick_{job_id}" + ("_partial" if partial is not None else ""),
                          help="Every finished run in the history, and what differs from the one before it.")
    if picked != job_id:
        _shared.set_current_job(picked)
        st.rerun()

colors = charts.result_colors(result)
ranked = result.ranked()
st.caption(f"{md_escape(report.model_summary(result))} · {len(result.domains)} domains · "
           f"{sum(d.n_facts for d in result.domains)} facts · {(result.created_at or '')[:19].replace('T', ' ')}")
stale = _shared.out_of_date_note(state)
if stale:
    st.warning(stale, icon=":material/update:")

paper = result.estimator == PAPER
estimator_label = charts.estimator_label(result)
found = verdict.verdict(result, esc=md_escape, strong=lambda s: f"**{s}**")
if found is not None:
    with st.container(border=True, key="verdict"):
        st.markdown(f"### {found.headline}")
        st.markdown(found.how_sure)
        st.metric(found.number_label, found.number, help=found.number_help)
        if found.caveat:
            st.warning(found.caveat, icon=":material/help:")

st.subheader("The ranking")
st.markdown("**" + report.ranking_statement(result) + "**")
# The benchmark's verdict on this estimator, verbatim: a warning where it did
# not beat ranking by mean loss, so nobody reads the ranking as more than it is.
if report.evidence_is_weak(result):
    st.warning(report.evidence_text(result), icon=":material/science:")
else:
    st.info(report.evidence_text(result), icon=":material/science:")
st.markdown(f"<style>{report.TABLE_CSS}</style>" + report.ranking_table_html(result, colors), unsafe_allow_html=True)
interval_note = report.interval_note(result)
if interval_note:
    st.caption(interval_note)
else:
    st.caption("No 90% intervals for this result: the bootstrap needs a dense system per domain (not there with the "
               "CG solver and B > 1), "
               "and results cached before it existed do not carry one.")
st.caption(f"Share: {report.share_meaning(result)}.")

diagnosis = report.diagnosis_rows(result)
if diagnosis:
    st.subheader("What kind of domain each is")
    st.caption(report.DIAGNOSIS_HELP)
    # In full, one per line: in a table cell the sentences were cut off.
    with st.container(key="diagnoses"):
        for row in diagnosis:
            st.markdown(f"**{md_escape(row['Concept'])}** (rank {row['Rank']}, {md_escape(row['Kind'])}): "
                        f"{md_escape(row['Diagnosis'])}")

left, right = st.columns([2, 3])
with left:
    st.plotly_chart(charts.share_donut(result, colors), key="share_chart", width="stretch")
pilot_fig = charts.pilot_curves(result, colors)
rank_chart = charts.rank_probability_chart(result)
with right:
    if pilot_fig is not None:
        st.plotly_chart(pilot_fig, key="pilot_chart", width="stretch")
        st.caption(f"{charts.PILOT_SOURCE[:1].upper() + charts.PILOT_SOURCE[1:]}; ★ where the priority is read. "
                   "The Plan page turns such curves into how many examples to collect.")
    elif rank_chart is not None:
        st.subheader("Rank stability")
        st.caption("Share of the bootstrap resamples in which each domain (row) holds each rank (column) "
                   f"by {estimator_label}.")
        st.plotly_chart(rank_chart, key="rank_chart", width="stretch")
if rank_chart is not None and pilot_fig is not None:
    st.subheader("Rank stability")
    st.caption("Share of the bootstrap resamples in which each domain (row) holds each rank (column) "
               f"by {estimator_label}.")
    st.plotly_chart(rank_chart, key="rank_chart", width="stretch")

if partial is not None:
    st.divider()
    st.header("The paper's concept-subspace method", anchor=PAPER_SECTION)
    st.markdown("**computing…** Mean, Share of Mean, Δn@10%, the saturation curves and the transfer heatmap appear "
                "here when the run finishes; so do each fact's influence, the solver diagnostics and the downloads.")
    _shared.follow_job(job_id, "analysis")  # polled; the whole page reruns onto the whole result once it ends
    st.stop()

st.subheader("Facts that move each domain most")
fact_key = report.fact_score_key(result)
_, fact_unit = verdict.priority_meaning(result)
fact_header = "Priority" + (f" ({fact_unit})" if fact_unit else "")
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
                    columns[fact_header] = [verdict.format_number(r["priority"]) for r in rows]
                columns["Influence (paper)" if columns else "Influence"] = [verdict.format_number(r.get("influence"))
                                                                           for r in rows]
                columns["Fact"] = [r["text"] for r in rows]
                # HTML, not a grid: a fact wraps within the page instead of running past its cell.
                st.markdown(report.facts_table_html(columns), unsafe_allow_html=True)
else:
    st.caption("This result holds no per-example influences.")

st.divider()
st.header("The paper's concept-subspace method", anchor=PAPER_SECTION)
for line in report.paper_intro(result, md_escape):
    st.markdown(line)
st.markdown(report.paper_table_html(result, colors), unsafe_allow_html=True)
st.caption(report.PAPER_COLUMNS_HELP + " " + md_escape(report.mean_share_note(result)))
notes = report.missing_delta_n_notes(result)
if notes:
    st.caption("“—” in Δn@10% (hover it for the reason): " +
               " ".join(f"**{md_escape(name)}**: {md_escape(why.rstrip('.'))}." for name, why in notes.items()))
# With an indefinite Hessian a Mean can be negative for that reason alone,
# which whoever reads the paper's numbers must know.
for text in report.curvature_warnings(result):
    st.warning(md_escape(text), icon=":material/warning:")
st.plotly_chart(charts.saturation_curves(result, colors), key="saturation_chart", width="stretch")
st.caption(f"Saturation curves and Δn@10% {charts.SATURATION_SOURCE}; the bands are cut to a factor of 3 either "
           "side of the computed points.")
transfer_chart = charts.transfer_heatmap(result)
if transfer_chart is not None:
    st.subheader("Cross-domain transfer (paper's method)")
    st.caption(report.TRANSFER_HELP)
    st.plotly_chart(transfer_chart, key="transfer_chart", width="stretch")

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
