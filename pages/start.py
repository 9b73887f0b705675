"""Start: what dowsing answers, the three steps (Domains → Run → Results)
with the time each takes on this machine, and the shipped benchmark's
verdict. The run's time comes from the estimate when the model's calibration
is cached (counting tokens only); else from the shipped measurement, so the
page never calibrates or loads a model itself."""
from __future__ import annotations

import streamlit as st

from dowsing import workspace
from dowsing.estimators import MEAN_LOSS
from dowsing.validation.evidence import estimator_evidence, evidence_label, load_evidence
from dowsing.safe_text import md_escape
from pages import _shared

# The default analysis on the default model and domains, measured on a 2-core
# CPU machine (README, Performance): what the page says before a calibration exists.
SHIPPED_ANALYSIS_S = 92.7

_shared.ensure_router()
st.title("Which data should you collect next?")
st.markdown(
    "dowsing takes your language model and a few facts for each **concept domain** (Physics, Astronomy, "
    "law, medicine, a language, …) and tells you which domain would gain most from more training data, how sure "
    "that is, and what each domain looks like: a gap more facts fill, something the model already knows, or "
    "facts that fight each other."
)

choice = _shared.model_choice()
config, _ = _shared.analysis_config()
set_name = workspace.active_set()
domains = workspace.unchecked_domains(workspace.load_set_raw(set_name))
n_facts = sum(len(d.facts) for d in domains)


def _run_time() -> tuple[str, str]:
    """(time text, where it comes from) of an analysis of the active set."""
    try:
        from dowsing.estimates import estimate as est

        if config is not None and not choice.problem:
            cal = est.cached_calibration(choice.model_id, config.device, config.dtype, est.default_threads())
            if cal is not None:
                from dowsing.estimates.estimate import estimate_analysis
                from dowsing.pipelines.executor import ExecutorConfig
                from pages._estimate import cached_tokenizer

                found = estimate_analysis(choice.model_id, domains, config, ExecutorConfig(), calibration=cal,
                                          tokenizer=cached_tokenizer(choice.model_id))
                return est.format_seconds(found.total_s), "estimated for this machine, model and domain set"
    except (ValueError, OSError, RuntimeError, ImportError):
        pass
    minutes = max(1, round(SHIPPED_ANALYSIS_S / 60))
    return (f"about {minutes} min", "measured for the default model and domains on a 2-core CPU machine; the Run "
                                    "page estimates it for yours")


run_time, run_basis = _run_time()
steps = st.columns(3)
with steps[0].container(border=True):
    st.markdown("#### 1 · Domains")
    st.markdown(f"Your facts, one list per domain. The active set has **{len(domains)} domains, {n_facts} "
                "facts**: edit them, or keep them to try it.")
    st.caption("A few minutes of your time; every edit is saved as you type.")
    st.page_link("pages/domains.py", label="Edit domains", icon=":material/edit_note:")
with steps[1].container(border=True):
    st.markdown("#### 2 · Run")
    st.markdown(f"One analysis of the active set: **{run_time}**.")
    st.caption(run_basis[:1].upper() + run_basis[1:] + ". It runs in the background; you can leave the page.")
    st.page_link("pages/run.py", label="Run the analysis", icon=":material/play_circle:")
with steps[2].container(border=True):
    st.markdown("#### 3 · Results")
    st.markdown("The verdict in one sentence: what to collect first, how sure, and why.")
    latest = next((x for x in _shared.runner().history("analysis") if x.status == "done"), None)
    top = ((latest.summary or {}).get("top_domain") if latest else None)
    if top:
        st.markdown(f"Your latest run ranks **{md_escape(top)}** first.")
    st.caption("Read at once when the run ends; a report in one HTML file to send on.")
    st.page_link("pages/results.py", label="See the results", icon=":material/leaderboard:")

data = load_evidence()
if data:
    default = (data.get("default") or {}).get("estimator")
    entry = estimator_evidence(default) if default else None
    mean_loss = estimator_evidence(MEAN_LOSS)
    if entry:
        st.subheader("Why you can trust the ranking")
        st.markdown(
            f"The shipped benchmark trained {data['model'].replace('embedded:', '')} on more facts of "
            f"{data['n_domains']} domains and measured what each gained. The default ranking, "
            f"**{evidence_label(default, entry)}**, predicted that gain with Spearman ρ = {entry['spearman']:.2f}"
            + (f", against {mean_loss['spearman']:.2f} for ranking by the model's loss alone" if mean_loss else "")
            + " (1 is a perfect ranking).")
        st.page_link("pages/benchmark.py", label="The shipped benchmark's verdict", icon=":material/query_stats:")
