"""Validate: does the ranking hold? Ground truth by training, rival
estimators side by side, cross-domain transfer, and an exactness check.

The validation runs as a background job (`dowsing.background.jobs`, kind "validation"):
it waits its turn behind any other heavy run, survives a refresh (its id is
in the URL) and Cancel stops it; this page polls it.
"""
from __future__ import annotations

import streamlit as st

from dowsing.presentation import charts, report
from dowsing import workspace
from dowsing.domains import DomainError
from dowsing.background.jobs import JobRequest, one_line
from dowsing.access.models import ModelError
from dowsing.validation import validate as validation
from dowsing.safe_text import md_escape
from pages import _shared

_shared.ensure_router()
st.title("Validate")
st.caption("Does the ranking hold? Each domain's facts are split into a training and a held-out half; every "
           "estimator scores the domains from the training half, and short training runs measure what adding "
           "each domain's data really does to the held-out loss.")

choice = _shared.model_choice()
config, _ = _shared.analysis_config()
set_name = workspace.active_set()
raw = workspace.load_set_raw(set_name)
domains = workspace.unchecked_domains(raw)

left, right = st.columns([3, 1])
left.markdown(f"Model **{md_escape(choice.label)}** · domain set **{md_escape(set_name)}** · "
              f"{len(domains)} domains · "
              f"{sum(len(d.facts) for d in domains)} facts")
right.number_input("Fine-tuning steps", 1, 200, validation.ValidationConfig().finetune_steps,
                   key="validation_steps", help="AdamW steps per run (one baseline run and one per domain).")


def _vconfig():
    # with training checkpoints picked, the trajectory estimators read them instead of the baseline fine-tune
    return validation.ValidationConfig(finetune_steps=int(st.session_state["validation_steps"]),
                                       damping=config.damping if config else 1e-3,
                                       checkpoints=choice.checkpoints)


def _start() -> None:
    try:
        vconfig = _vconfig()
        request = JobRequest(kind="validation", model_id=choice.model_id, domains=domains, config=vconfig,
                             domain_set_name=set_name)
        _shared.set_current_job(_shared.runner().submit(request), "validation")
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["validation_error"] = one_line(exc) or type(exc).__name__


if domains and not choice.problem:
    # What the validation would cost on this machine, before it starts (dowsing.estimates.estimate).
    from dowsing.estimates.estimate import estimate_validation
    from pages._estimate import estimate_panel

    try:
        planned = _vconfig()
    except ValueError as exc:
        left.warning(one_line(exc) or type(exc).__name__, icon=":material/block:")
    else:
        with left:
            estimate_panel("validation_estimate", {"model": choice.model_id, "config": planned.to_dict(),
                                                   "domains": [[d.name, list(d.facts)] for d in domains]},
                           choice.model_id, "cpu", "float32",
                           lambda cal, tok: estimate_validation(choice.model_id, domains, planned, calibration=cal,
                                                                tokenizer=tok))

left.button("Start validation", icon=":material/science:", disabled=bool(choice.problem) or not domains,
            on_click=_start,
            help="Runs in the background, after any analysis or benchmark already running; the estimate above says "
                 "how long on this machine. The same request again shows the stored result at once.")
if "validation_error" in st.session_state:
    st.error(md_escape(st.session_state.pop("validation_error")))

run_id, result = _shared.picked_result("validation", "Validation run")

if result is not None:
    st.subheader("Leaderboard")
    st.caption("ρ fine-tune: Spearman's ρ between the estimator's priority and the realised held-out gain from "
               "fine-tuning, with a bootstrap interval over facts. ρ subspace: against the gain in the concept "
               "subspace. τ vs default: Kendall's τ with dowsing's default ranking. Time includes the shared forward pass.")
    st.dataframe(result.table(), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("ρ fine-tune", "ρ subspace", "τ vs default", "time (s)")})
    scatter = charts.validation_scatter(result)
    if scatter is not None:
        st.subheader("Predicted priority vs realised gain")
        st.plotly_chart(scatter, width="stretch", key="validate_scatter")
    response = charts.subspace_response_scatter(result)
    if response is not None:
        sub = result.subspace
        st.subheader("In the concept subspace: predicted vs realised held-out change")
        st.caption(f"Over domains × ε: Pearson {sub['pearson']:.2f}, Spearman {sub['spearman']:.2f}, "
                   f"slope {sub['slope']:.2f} (1 = the linear prediction is exact).")
        st.plotly_chart(response, width="stretch", key="validate_subspace")
    with st.expander("Run details"):
        st.json({"config": result.config, "timings": result.timings}, expanded=False)
        st.download_button("Validation (JSON)", result.to_json(), file_name=f"validation-{run_id[:12]}.json",
                           mime="application/json")

st.subheader("Cross-domain transfer")
job_id = _shared.job_to_show()
analysis = _shared.runner().result(job_id) if job_id else None
transfer_chart = charts.transfer_heatmap(analysis) if analysis is not None else None
if transfer_chart is not None:
    st.caption(report.TRANSFER_HELP + f" From the run shown on Results: {md_escape(report.model_summary(analysis))}.")
    st.plotly_chart(transfer_chart, width="stretch", key="validate_transfer")
else:
    st.info("No analysis result yet — run one on the Run page to see its transfer matrix.", icon=":material/info:")

st.subheader("Exactness check")
st.caption("Conjugate gradient against a dense solve of (H + λI) z = ḡ in the first domain's concept subspace "
           "(B = 1, at most 8 facts per domain), on the loaded model.")


def _exactness() -> None:
    loaded, problem = _shared._load(choice.model_id, config.device if config else "cpu",
                                    config.dtype if config else "float32")
    if loaded is None:
        st.session_state["exactness"] = {"error": problem}
        return
    check = validation.exactness_check(loaded, domains, damping=config.damping if config else 1e-3)
    st.session_state["exactness"] = dict(check, model=choice.label)


st.button("Run exactness check", icon=":material/rule:", disabled=bool(choice.problem) or not domains,
          on_click=_exactness, help="Takes a few seconds on the default model.")
check = st.session_state.get("exactness")
if check and "error" in check:
    st.error(md_escape(check["error"]))
elif check:
    st.caption(f"{md_escape(check['model'])} · domain {md_escape(check['domain'])} · {check['n_facts']} facts · "
               f"λ = {check['damping']:g} · "
               f"{check['seconds']:.1f} s")
    cols = st.columns(3)
    cols[0].metric("Relative error, CG vs dense", f"{check['rel_error']:.1e}")
    cols[1].metric("CG iterations", check["cg_iterations"], help=f"subspace dimension {check['dim']}")
    cols[2].metric("CG residual", f"{check['cg_rel_residual']:.1e}")
    if check["nonpositive_curvature"]:
        st.warning("The damped Hessian is not positive definite here: CG stops at the first direction of "
                   "non-positive curvature, so it cannot match the dense solve. A larger damping λ fixes that.")
