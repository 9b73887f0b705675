"""Run: start an analysis as a background job, follow its progress, and
reopen or delete past runs. The job id sits in the URL, so a refresh or a
second tab shows the same job."""
from __future__ import annotations

import streamlit as st

from dowsing import workspace
from dowsing import estimators
from dowsing.config import DEFAULT_ESTIMATOR, settings_changes
from dowsing.domains import DomainError, validation_problems
from dowsing.storage.caches import STORE_SIZE_LIMIT_BYTES
from dowsing.background.jobs import JobRequest, JobState, cache_usage, clear_results
from dowsing.access.models import ModelError
from dowsing.safe_text import md_escape
from pages import _shared

_shared.ensure_router()
st.title("Run an analysis")
st.caption(
    "The analysis runs in a separate worker process: you can switch pages, refresh or open a second tab "
    "while it runs. A request that was computed before is shown at once from the cache."
)

choice = _shared.model_choice()
config, config_problem = _shared.analysis_config()
set_name = workspace.active_set()
raw = workspace.load_set_raw(set_name)
domains = workspace.unchecked_domains(raw)
domain_problems = validation_problems(domains)

summary = st.columns(3)
summary[0].metric("Model",
                  "embedded default" if choice.source == "embedded" else md_escape(choice.text.rsplit("/", 1)[-1]),
                  help=md_escape(choice.label))
summary[1].metric("Domain set", md_escape(set_name), help=md_escape(", ".join(d.name for d in domains)))
summary[2].metric("Facts", sum(len(d.facts) for d in domains), help=f"{len(domains)} domains")
if config is not None:
    st.caption("Ranking estimator: **" + estimators.label(config.estimator) + "**" +
               (" — the default, chosen by the benchmark against real fine-tuning." if config.estimator ==
                DEFAULT_ESTIMATOR else f" (the default, chosen by the benchmark, is "
                                       f"{estimators.label(DEFAULT_ESTIMATOR)}).") +
               " Change it in the sidebar.")
    st.caption("Settings: " + (settings_changes(config.to_dict())
                               or "engine defaults (change them under Advanced settings in the sidebar)."))

with st.expander("Where to run", icon=":material/hub:"):
    run_on, run_on_problem = _shared.executor_choice("run")

blockers = _shared.run_blockers(choice, config_problem, domain_problems, set_name,
                               [f"Executor: {run_on_problem}"] if run_on_problem else None)
for blocker in blockers:
    st.warning(blocker, icon=":material/block:")
if domain_problems:
    with st.expander("Domain problems"):
        for problem in domain_problems:
            st.markdown(f"- {md_escape(problem)}")


def _submit() -> None:
    try:
        request = JobRequest(model_id=choice.model_id, domains=domains, config=config, domain_set_name=set_name,
                             executor=run_on.to_dict() if run_on.kind != "local" else {})
        job_id = _shared.runner().submit(request)
    except (ModelError, DomainError, ValueError, OSError) as exc:
        st.session_state["run_error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return
    _shared.set_current_job(job_id)


def _pilot_line(status: dict | None) -> str | None:
    """'Pilot curves: **1 of 4 domains recomputed, 3 from cache** (to compute: Physics).'"""
    if status is None:
        return None
    small = status["no_pilot"]
    tail = (f" {md_escape(', '.join(small))} {'has' if len(small) == 1 else 'have'} too few facts for a pilot curve."
            if small else "")
    if not status["computed"] and not status["reused"]:
        return "Pilot curves: none to run." + tail
    # Before a run, the library's "all 4 domains computed" could read as done already.
    message = (status["message"] if status["reused"] else
               f"all {len(status['computed'])} domains new, none from cache")
    line = f"Pilot curves: **{md_escape(message)}**"
    if status["computed"] and status["reused"]:
        line += f" (to compute: {md_escape(', '.join(status['computed']))})"
    return line + "." + tail


refused = None
if not blockers:
    # Which domains' pilot curves this run would compute, from the stored units alone (no model is loaded).
    pilot_line = _pilot_line(_shared.pilot_status(choice.model_id, domains, config))
    if pilot_line:
        st.caption(pilot_line, help="Each domain's pilot curve is kept under its own facts, the model and the "
                                    "settings: after an edit only the edited or added domains run their pilots.")
    # What the run would cost on this machine, before it starts (dowsing.estimates.estimate).
    from dowsing.estimates.estimate import estimate_analysis
    from pages._estimate import estimate_panel

    refused = estimate_panel("run_estimate",
                             {"model": choice.model_id, "domains": [[d.name, list(d.facts)] for d in domains],
                              "config": config.to_dict(), "executor": run_on.to_dict()},
                             choice.model_id, config.device, config.dtype,
                             lambda cal, tok: estimate_analysis(choice.model_id, domains, config, run_on,
                                                                calibration=cal, tokenizer=tok))

st.button("Analyze", type="primary", icon=":material/play_arrow:", disabled=bool(blockers or refused),
          on_click=_submit,
          help="Rank every domain of the set by the ranking estimator, and compute the paper's influence, "
               "transfer and saturation beside it.")
if "run_error" in st.session_state:
    st.error(md_escape(st.session_state.pop("run_error")), icon=":material/error:")

job_id = _shared.current_job_id()
history: list[JobState] = _shared.runner().history("analysis")
if st.session_state.pop("goto_results", False) and job_id:
    opened = _shared.runner().state(job_id)
    if opened is not None and opened.status == "done":
        st.switch_page("pages/results.py", query_params={"job": job_id})


def _show_done(state: JobState) -> None:
    if state.status != "done":
        return
    st.progress(1.0, text="**done** — " + (state.message or "finished"))
    top = (state.summary or {}).get("top_domain")
    st.success(f"Finished. {f'**{md_escape(top)}** ranks first.' if top else ''}",
               icon=":material/check_circle:")
    stale = _shared.out_of_date_note(state)
    if stale:
        st.warning(stale, icon=":material/update:")
    st.page_link("pages/results.py", label="See the results", icon=":material/leaderboard:")


if job_id:
    st.subheader("Current run")
    shown = _shared.runner().state(job_id)

    def _show(state: JobState) -> None:
        # Under the progress and polled with it, so it says "running" once the job runs.
        st.caption(f"Job `{job_id[:12]}` · {md_escape(_shared.job_label(state))}")
        _show_done(state)

    _shared.follow_job(job_id, "analysis", show=_show)
    if shown is not None and shown.status == "failed":
        st.caption("The app is still usable: fix the cause (model, domains or settings) and press Analyze again.")
elif history:
    st.info("No run open in this tab: press **Analyze**, or open a past run from the History below.")
else:
    st.info("No run yet: check the model in the sidebar and the domains, then press **Analyze**.")


# --- history -------------------------------------------------------------------

def _open(job: str) -> None:
    _shared.set_current_job(job)
    st.session_state["goto_results"] = True
    st.session_state["history_changed"] = True


def _delete(job: str) -> None:
    _shared.runner().delete(job)
    if st.session_state.get("job_id") == job:
        _shared.set_current_job(None)
    st.session_state["history_changed"] = True


st.subheader("History")
if not history:
    st.caption("Past runs appear here, to reopen or delete.")


# Polled while a run is active, so its row reads "running" once it runs, not the "queued" it started as.
@st.fragment(run_every=2.0 if any(s.active for s in history[:30]) else None)
def _history() -> None:
    if st.session_state.pop("history_changed", False):
        st.rerun()  # the whole page: the current run changed, or Results is to open
    states = _shared.runner().history("analysis")[:30]
    for state in states:
        summary = state.summary or {}
        row = st.columns([2, 2, 3, 2, 1, 1], vertical_alignment="center")
        row[0].write((state.created_at or "")[:19].replace("T", " "))
        row[1].write(md_escape(summary.get("domain_set_name") or "—"))
        settings = settings_changes((state.request or {}).get("config") or {})
        row[2].write(md_escape(summary.get('model_id') or 'embedded default') + (f" · {settings}" if settings else ""))
        status = {"done": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
                  "cancelled": ":gray[:material/cancel:]", "running": ":blue[:material/hourglass_top:]",
                  "queued": ":blue[:material/hourglass_top:]"}.get(state.status, "")
        top = summary.get("top_domain")
        row[3].write(f"{status} {('top: ' + md_escape(top)) if top else state.status}"
                     + (" · :orange[out of date]" if state.status == "done" and _shared.run_domain_diff(state) else ""))
        row[4].button("Open", key=f"open-{state.job_id}", on_click=_open, args=(state.job_id,),
                      type="primary" if state.job_id == job_id else "secondary")
        row[5].button("", icon=":material/delete:", key=f"delete-{state.job_id}", on_click=_delete, args=(state.job_id,),
                      help="Delete this run from the history (its cached result stays).")


_history()


# --- the cache -------------------------------------------------------------------

def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def _clear() -> None:
    try:
        gone = clear_results()
    except ValueError as exc:  # a run is queued or running
        st.session_state["cache_note"] = ("warning", str(exc))
        return
    _shared.set_current_job(None)
    st.session_state["cache_note"] = (
        "success", f"Cleared {gone['entries']} cached entries, {gone['files']} result files and {gone['jobs']} "
                   "finished runs. Your domain sets and the model stay.")
    st.session_state["history_changed"] = True


with st.expander("Cache", icon=":material/storage:"):
    usage = cache_usage()
    st.caption(f"Computed results (runs, pilot curves, plans, logs): **{_mb(usage['results'])}**. Kept when you "
               f"clear them: your domain sets, model conversions and time calibrations, {_mb(usage['kept'])}. "
               f"Each store of results stays under {STORE_SIZE_LIMIT_BYTES / 2 ** 30:g} GiB; past that the least "
               "recently used entries go first and are recomputed when asked for again.")
    st.button("Clear results", icon=":material/delete_sweep:", on_click=_clear,
              disabled=any(s.active for s in history),
              help="Forget every computed result; the next run recomputes. Not while a run is queued or running.")
    note = st.session_state.pop("cache_note", None)
    if note:
        (st.success if note[0] == "success" else st.warning)(note[1])
