"""What every page shares: the sidebar (model picker, advanced settings, the
active domain set), the job runner, the job each page shows and how a job's
progress is shown.

Pages read the user's choices through the functions here; all computation is
in `dowsing/` (the engine runs in a worker process behind the job runner).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from dowsing import workspace
from dowsing.storage.caches import damage_notes
from dowsing.access.checkpoints import CheckpointError, allowed_checkpoints, parse_list, validate_checkpoints
from dowsing.access.checkpoints import summary as checkpoint_summary
from dowsing import estimators
from dowsing.config import CURVATURES, DEFAULT_ESTIMATOR, DEVICES, DTYPES, SOLVERS, AnalysisConfig, settings_changes
from dowsing.background.jobs import (NO_SUCH_JOB, JobRunner, JobState, default_runner, is_job_id, newest_match,
                                     spare_wanted)
from dowsing.access.models import EMBEDDED_ID, ModelError, allowed_model, is_hub_id, load_model
from dowsing.safe_text import md_escape

SOURCES = {
    "embedded": "Embedded default (SmolLM2-135M-Instruct)",
    "hub": "Hugging Face id",
    "directory": "Local model folder",
    "gguf": ".gguf file",
    "checkpoints": "Training checkpoints (oldest first)",
}
PLACEHOLDERS = {
    "hub": "e.g. gpt2 or Qwen/Qwen2.5-0.5B",
    "directory": "/path/to/model-folder (holds config.json)",
    "gguf": "/path/to/model.gguf",
    "checkpoints": "/runs/checkpoint-1000\n/runs/checkpoint-2000\n/runs/checkpoint-3000",
}
DEFAULTS = AnalysisConfig()
PLAN_BUDGET = 100.0  # the Plan page's budget until another is typed
ESTIMATOR_HELP = (
    "What orders the domains: "
    + "; ".join(f"{e.label}: {e.summary}" + (" (needs the model picked as Training checkpoints)"
                                              if "trajectory" in e.needs else "")
                for e in (estimators.get(n) for n in estimators.names("analysis")))
    + f". The default ({estimators.label(DEFAULT_ESTIMATOR)}) was chosen by the benchmark against real "
      "fine-tuning. The paper's Mean, transfer and saturation curves are computed whatever you choose."
)


def estimator_option(name: str) -> str:
    """'Gradient alignment …, Adam-preconditioned (default)' for the selectbox."""
    return estimators.label(name) + (" (default)" if name == DEFAULT_ESTIMATOR else "")


def ensure_router() -> None:
    """Make sure this page runs under app.py's router.

    A Streamlit server whose first request after start is a page URL
    (/results?job=...) treats pages/ as a v1 multipage folder and runs the
    page file alone, without app.py (no sidebar, no page config). Each page
    calls this first: it switches that relic off and reruns, and the rerun
    goes through app.py's st.navigation.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def _close_runner(jobs: JobRunner) -> None:
    close = getattr(jobs, "close", None)
    if close is not None:
        close()


# on_release: a runner dropped from the cache (cleared, or the server stopping) ends its spare worker at once
@st.cache_resource(show_spinner=False, on_release=_close_runner)
def runner() -> JobRunner:
    """One job runner per server process: it remembers the workers it started
    and keeps one warm spare for the next run (unless DOWSING_SPARE_WORKER=0)."""
    return default_runner(spare=spare_wanted())


@st.cache_resource(show_spinner=False, max_entries=2)
def _load(model_id: str | None, device: str, dtype: str):
    """(LoadedModel, None) or (None, one-line error). Errors are cached too, so an
    offline hub id is not retried on every rerun; "Retry" clears the cache.
    Only what `allowed_model` lets through is loaded."""
    try:
        return load_model(allowed_model(model_id), device=device, dtype=dtype), None
    except ModelError as exc:
        return None, str(exc).strip().splitlines()[0]
    except Exception as exc:  # a broken model folder must not take the app down
        return None, f"The model could not be loaded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@st.cache_data(show_spinner=False, max_entries=16)
def _check_checkpoints(specs: tuple) -> tuple[str | None, str | None, str | None]:
    """(last checkpoint's folder, summary, None) or (None, None, one-line
    error); cached per list, so typing elsewhere does not re-read them."""
    try:
        checked = validate_checkpoints(allowed_checkpoints(specs))
    except CheckpointError as exc:
        return None, None, str(exc)
    return str(checked[-1].path), checkpoint_summary(checked), None


@st.cache_data(show_spinner=False, max_entries=32, ttl=60)
def _pilot_status(model_id: str | None, domains: tuple, config_json: str, units_seen: str) -> dict | None:
    """`analysis.pilot_status` for these inputs (None where the run has no
    pilots or the inputs cannot be keyed). `units_seen` only keys the cache:
    it changes whenever a job ends, since a job that ended may have stored
    pilot curves; a run from the command line shows within the ttl."""
    from dowsing.pipelines.analysis import pilot_status

    try:
        return pilot_status(model_id, [{"name": name, "facts": list(facts)} for name, facts in domains],
                            AnalysisConfig.from_dict(json.loads(config_json)))
    except (ModelError, ValueError, OSError):  # DomainError is a ValueError; the page shows its blockers instead
        return None


def pilot_status(model_id: str | None, domains: list, config: AnalysisConfig) -> dict | None:
    """Which domains' pilot curves a run of these domains would compute and
    which it would find stored (`analysis.pilot_status`: no model is
    loaded), cached per inputs until a job ends."""
    return _pilot_status(model_id, tuple((d.name, tuple(d.facts)) for d in domains),
                         json.dumps(config.to_dict(), sort_keys=True), jobs_ended())


def jobs_ended() -> str:
    """A mark that changes whenever a job ends: a job that ended may have
    stored results and pilot curves, so what was read of the cache before
    is read again."""
    ended = [s.finished_at or "" for s in runner().history() if not s.active]
    return f"{len(ended)}|{max(ended, default='')}"


@dataclass(frozen=True)
class ModelChoice:
    source: str  # a key of SOURCES
    text: str  # what the user typed ("" for the embedded default); the last checkpoint's folder for checkpoints
    problem: str | None  # a one-line reason the choice is unusable, before loading
    checkpoints: tuple = ()  # the training checkpoints, oldest first (source "checkpoints")
    note: str | None = None  # what the checkpoints are, once checked

    @property
    def model_id(self) -> str | None:
        """The id the engine takes: None for the embedded default."""
        return None if self.source == "embedded" else self.text

    @property
    def label(self) -> str:
        return EMBEDDED_ID if self.source == "embedded" else self.text


def model_choice() -> ModelChoice:
    source = st.session_state.get("source", "embedded")
    if source not in SOURCES:
        source = "embedded"
    text = (st.session_state.get("model") or "").strip()
    if source == "embedded":
        return ModelChoice("embedded", "", None)
    if source == "checkpoints":
        specs = tuple(parse_list(st.session_state.get("checkpoints_text") or ""))
        if not specs:
            return ModelChoice(source, "", "List your model's training checkpoints, one folder per line, oldest "
                                           "first.")
        last, note, problem = _check_checkpoints(specs)
        return ModelChoice(source, last or "", problem[:1].upper() + problem[1:] if problem else None, specs, note)
    if not text:
        return ModelChoice(source, text, f"Enter a {SOURCES[source].lower()} or choose the embedded default.")
    if source == "hub" and not is_hub_id(text):
        return ModelChoice(source, text, "A Hugging Face id is a name or owner/name (letters, digits, '.', '_' "
                                         "and '-'); pick Local model folder or .gguf file for a path.")
    if source == "gguf" and not text.lower().endswith(".gguf"):
        return ModelChoice(source, text, "A .gguf file path must end in .gguf.")
    # Paths outside the model roots all get one message, before anything
    # looks at the disk; inside them, what is missing is said.
    try:
        text = allowed_model(text) or ""
    except ModelError as exc:
        return ModelChoice(source, text, str(exc))
    problem = None
    if source == "directory" and not Path(text).is_dir():
        problem = "No folder at that path in the model folders."
    elif source == "gguf" and not Path(text).is_file():
        problem = "No file at that path in the model folders."
    return ModelChoice(source, text, problem)


def analysis_config() -> tuple[AnalysisConfig | None, str | None]:
    """The Advanced settings as an AnalysisConfig, or (None, the reason it is invalid)."""
    state = st.session_state
    try:
        return AnalysisConfig(
            damping=float(state.get("cfg_damping", DEFAULTS.damping)),
            blocks=int(state.get("cfg_blocks", DEFAULTS.blocks)),
            solver=state.get("cfg_solver", DEFAULTS.solver),
            curvature=state.get("cfg_curvature", DEFAULTS.curvature),
            device=state.get("cfg_device", DEFAULTS.device),
            dtype=state.get("cfg_dtype", DEFAULTS.dtype),
            estimator=state.get("cfg_estimator", DEFAULTS.estimator),
            align_blocks=int(state.get("cfg_align_blocks", DEFAULTS.align_blocks)),
            checkpoints=model_choice().checkpoints,
        ), None
    except ValueError as exc:
        return None, str(exc)


def active_set_name() -> str:
    return workspace.active_set()


def login_gate() -> None:
    """With an ``[auth]`` section in .streamlit/secrets.toml (Streamlit's
    OpenID Connect login, which needs the Authlib package), nothing of the
    app shows until the visitor has logged in; without one the app is open
    to whoever reaches it (by default only this machine: README, Security)."""
    try:
        wanted = "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file: no login configured
        wanted = False
    if wanted and not st.user.get("is_logged_in", False):
        st.title("Data dowsing")
        st.button("Log in", icon=":material/login:", on_click=st.login)
        st.stop()


def store_notes() -> None:
    """Say, once, that a damaged cache store was moved aside and started empty
    (`dowsing.storage.caches`): what was in it is computed again."""
    for note in damage_notes():
        st.warning(note, icon=":material/build:")


# --- the job a page shows ----------------------------------------------------
# Each kind has its own URL parameter (?job= for analyses, ?validation=,
# ?benchmark=), kept in the session too, so a refresh and a page switch show
# the same job and the pages do not overwrite each other's.

def current_job_id(param: str = "job") -> str | None:
    """The job in the URL (?param=...), else the one this session last looked at.
    A value that is not a job id is dropped with a "no such job" note, never
    looked up."""
    job = st.query_params.get(param) or st.session_state.get(f"{param}_id")
    if job and not is_job_id(job):
        set_current_job(None, param)
        st.warning(NO_SUCH_JOB, icon=":material/warning:")
        return None
    if job:
        set_current_job(job, param)
    return job or None


def job_to_show() -> str | None:
    """The current analysis, else the newest finished one (which then becomes
    current): a fresh tab shows the last result rather than an empty page."""
    job = current_job_id()
    if job:
        return job
    done = [s for s in runner().history("analysis") if s.status == "done"]
    if not done:
        return None
    set_current_job(done[0].job_id)
    return done[0].job_id


def set_current_job(job_id: str | None, param: str = "job") -> None:
    if job_id:
        st.session_state[f"{param}_id"] = job_id
        if st.query_params.get(param) != job_id:
            st.query_params[param] = job_id
    else:
        st.session_state.pop(f"{param}_id", None)
        if param in st.query_params:
            del st.query_params[param]


def job_label(state: JobState) -> str:
    """'12 Mar 14:05 · Physics first · default set · gpt2 · curvature = ggn' for
    pickers and history (an analysis's settings only where they differ from
    the defaults; a validation or benchmark says its winner)."""
    summary = state.summary or {}
    when = (state.created_at or "")[:16].replace("T", " ")
    model = summary.get("model_id") or "embedded default"
    if len(model) > 40:
        model = "…" + model[-39:]
    top, winner = summary.get("top_domain"), summary.get("winner")
    outcome = f"{top} first" if top else f"best: {winner}" if winner else "done"
    settings = settings_changes((state.request or {}).get("config") or {}) if state.kind == "analysis" else ""
    parts = [when, state.status if state.status != "done" else outcome, summary.get("domain_set_name") or "",
             model, settings]
    return " · ".join(p for p in parts if p)


def job_status(state: JobState, noun: str) -> None:
    """How a job stands, for every kind: its progress (or behind which run it
    is queued) with Cancel while it runs, the one-line error when it failed, a
    note when it was cancelled. A finished job is left to the page."""
    if state.active:
        if state.status == "queued" and state.stage == "queued" and state.pid is not None:
            st.info(md_escape(state.message[:1].upper() + state.message[1:]), icon=":material/hourglass_top:")
        else:
            stage = state.stage or state.status
            # "running ·" so a running job never reads as waiting; a message that only repeats its stage is dropped.
            message = state.message if state.message and state.message.strip() != stage.strip() else ""
            text = (f"{state.status} · " if state.status != stage else "") + f"**{md_escape(stage)}**" + (
                f" — {md_escape(message)}" if message else "")
            st.progress(min(max(float(state.fraction or 0.0), 0.0), 1.0), text=text)
        st.button("Cancel", icon=":material/stop:", key=f"cancel-{state.job_id}", on_click=runner().cancel,
                  args=(state.job_id,), help=f"Stop the {noun} (and anything it started, Ray tasks included).")
    elif state.status == "failed":
        st.error(f"The {noun} failed: {md_escape(state.error or state.message or 'no message')}",
                 icon=":material/error:")
    elif state.status == "cancelled":
        st.warning(f"The {noun} was cancelled.", icon=":material/cancel:")


def follow_job(job_id: str, noun: str, show=None) -> JobState | None:
    """Show the job with `job_status` (and `show(state)` after it), polled
    every second while it is active; the whole page reruns once it ends, so
    what depends on its result appears. Returns its state at this run."""
    first = runner().state(job_id)

    @st.fragment(run_every=1.0 if first is not None and first.active else None)
    def _panel() -> None:
        now = runner().state(job_id)
        if now is None:
            st.info(f"That {noun} is no longer known (deleted, or from another cache).")
            return
        job_status(now, noun)
        if show is not None:
            show(now)
        if first is not None and first.active and not now.active:
            st.rerun()  # the whole page: stop polling, show the result

    _panel()
    return first


def job_picker(kind: str, param: str, label: str) -> str | None:
    """A picker over the jobs of `kind`, newest first, on the current one
    (else the newest); the pick becomes current. None when there are none."""
    states = runner().history(kind)
    job_id = current_job_id(param) or (states[0].job_id if states else None)
    if not states:
        return job_id
    ids = [s.job_id for s in states]
    labels = {s.job_id: job_label(s) for s in states}
    if job_id not in labels:
        ids.insert(0, job_id)
        labels[job_id] = "this run"
    picked = st.selectbox(label, ids, index=ids.index(job_id), format_func=labels.get, key=f"{param}_pick_{job_id}")
    if picked != job_id:
        set_current_job(picked, param)
        st.rerun()
    return job_id


def picked_result(kind: str, label: str):
    """(job id, result): the job picker of `kind` (its URL parameter is the
    kind's name), the picked job followed while it runs, and its result once
    done (else None); (None, None) when there is no job of that kind."""
    job_id = job_picker(kind, kind, label)
    state = follow_job(job_id, kind) if job_id else None
    return job_id, (runner().result(job_id) if state is not None and state.status == "done" else None)


# --- the sidebar --------------------------------------------------------------

def sidebar():
    """Model picker, advanced settings and the active domain set (every page).
    Returns the sidebar slot where `model_status` later shows the loaded model."""
    if "source" not in st.session_state:
        # A new session (a refresh, a new tab) starts from the last pick on this
        # server, never from the URL: a link cannot pick or load a model.
        pick = workspace.model_pick()
        if pick.get("source") in SOURCES:
            st.session_state.update(pick)
    with st.sidebar:
        st.markdown("### :material/water_drop: Data dowsing")
        st.caption("Which concept domain would gain most from more training data?")
        st.radio(
            "Model", list(SOURCES), format_func=SOURCES.get, key="source", on_change=_remember_model_pick,
            help="The causal language model to analyse. It is loaded once per server process.",
        )
        source = st.session_state.get("source", "embedded")
        if source == "checkpoints":
            st.text_area(
                SOURCES[source], key="checkpoints_text", placeholder=PLACEHOLDERS[source],
                on_change=_remember_model_pick,
                help="One Hugging Face model folder per line (or a hub step, owner/name@revision), oldest first; "
                     "the last is the model analysed. They must be one architecture with one tokenizer. The "
                     "checkpoint estimators (TracIn, Diff-In, variance of gradients, cartography, EL2N) read them.",
            )
        elif source != "embedded":
            st.text_input(
                SOURCES[source], key="model", placeholder=PLACEHOLDERS[source], on_change=_remember_model_pick,
                help="Press Enter to load. Hugging Face ids load from the local cache (or the hub when online). "
                     "Folders and .gguf files load only from under the model folders: the cache's models folder "
                     "and the Hugging Face cache, or those listed in DOWSING_MODEL_ROOTS.",
            )
        status_box = st.container()
        offered = estimators.names("analysis")
        st.selectbox("Ranking estimator", offered, index=offered.index(DEFAULTS.estimator),
                     format_func=estimator_option, key="cfg_estimator", help=ESTIMATOR_HELP)
        with st.expander("Advanced settings"):
            st.number_input("Alignment blocks", min_value=1, max_value=96, value=DEFAULTS.align_blocks, step=1,
                            key="cfg_align_blocks",
                            help="The gradient-alignment estimators use the parameters of this many final "
                                 "transformer blocks and the final norm (all blocks when the model has fewer).")
            st.number_input("Damping λ", min_value=0.0, value=DEFAULTS.damping, format="%.1e", step=1e-4,
                            key="cfg_damping", help="λ in (H + λI) z = g. Larger is more stable, less exact.")
            st.number_input("Blocks B", min_value=1, max_value=48, value=DEFAULTS.blocks, step=1, key="cfg_blocks",
                            help="How many final transformer blocks carry the concept adapter.")
            st.selectbox("Solver", SOLVERS, index=SOLVERS.index(DEFAULTS.solver), key="cfg_solver",
                         help="auto: the fastest exact method; cg: conjugate gradient (the paper's); exact: dense.")
            st.selectbox("Curvature", CURVATURES, index=CURVATURES.index(DEFAULTS.curvature), key="cfg_curvature",
                         help="hessian: exact second derivative; ggn: Gauss-Newton (positive semi-definite).")
            st.selectbox("Device", DEVICES, index=DEVICES.index(DEFAULTS.device), key="cfg_device")
            st.selectbox("Precision", DTYPES, index=DTYPES.index(DEFAULTS.dtype), key="cfg_dtype",
                         help="bfloat16 needs CUDA.")
            _, problem = analysis_config()
            if problem:
                st.error(md_escape(problem[:1].upper() + problem[1:]))
        _domain_set_picker()
    return status_box


def _remember_model_pick() -> None:
    workspace.set_model_pick({key: st.session_state.get(key) for key in workspace.MODEL_PICK_KEYS})


def _domain_set_picker() -> None:
    names = workspace.list_sets()
    active = workspace.active_set()
    if not names:
        return
    if active not in names:
        active = names[0]
    st.selectbox(
        "Domain set", names, index=names.index(active), key=f"sidebar_set_{active}",
        on_change=_switch_set, args=(f"sidebar_set_{active}",),
        help="The domains the next analysis uses. Edit them on the Domains page.",
    )


def _switch_set(key: str) -> None:
    workspace.set_active(st.session_state[key])


def model_status(box) -> None:
    """Load the chosen model (cached per process) and show what is loaded, or a
    one-line error. Runs after the page, so the page shows while a model loads."""
    choice = model_choice()
    config, _ = analysis_config()
    device = config.device if config else "cpu"
    dtype = config.dtype if config else "float32"
    with box:
        if choice.problem:
            st.info(md_escape(choice.problem))
            return
        if choice.note:
            st.caption(md_escape(choice.note))
        with st.spinner("Loading model… (the embedded model is converted once, about 15 s)"):
            loaded, error = _load(choice.model_id, device, dtype)
        if error:
            st.error(md_escape(error))
            if st.button("Retry", key="retry_model"):
                _load.clear()
                st.rerun()
            return
        info = loaded.info
        st.success(f"**{md_escape(info.architecture)}** · {info.n_params / 1e6:,.1f}M parameters · {info.device} · "
                   f"{info.dtype}",
                   icon=":material/check_circle:")



EXECUTOR_LABELS = {"local": "This machine, in one process", "ray": "Ray (this machine's cores or a cluster)"}


def executor_choice(key: str):
    """Where a run's units of work go: (ExecutorConfig, None) or (None, the
    problem). With Ray, "Connect" asks the cluster (in a child process, so
    the app never starts Ray itself) and shows its CPUs and GPUs."""
    import os

    from dowsing.pipelines.executor import EXECUTORS, ExecutorConfig, describe_in_subprocess

    kind = st.radio("Executor", EXECUTORS, format_func=EXECUTOR_LABELS.get, horizontal=True, key=f"{key}_executor",
                    help="Ray runs the independent units of work (counterfactual fine-tunes, learning-curve points, "
                         "per-domain solves) as tasks, on this machine's cores or on a cluster. The numbers are "
                         "the same either way.")
    if kind == "local":
        st.caption(f"Runs in one process on this machine ({os.cpu_count()} CPUs).")
        return ExecutorConfig(), None
    address = st.text_input("Ray address", key=f"{key}_ray_address",
                            placeholder="empty: start Ray on this machine · auto · ray://head-node:10001",
                            help="Empty starts Ray on this machine's cores for the run. auto joins the cluster this "
                                 "machine belongs to (started with `ray start`); ray://host:10001 joins a remote one.")
    address = address.strip() or None
    try:
        config = ExecutorConfig(kind="ray", address=address)
    except ValueError as exc:
        return None, md_escape(exc)
    def connect() -> None:
        with st.spinner("Asking Ray…"):
            try:
                st.session_state[f"{key}_cluster"] = (address, describe_in_subprocess(config), None)
            except ValueError as exc:
                st.session_state[f"{key}_cluster"] = (address, None, str(exc))

    st.button("Connect", icon=":material/lan:", key=f"{key}_connect", on_click=connect,
              help="Ask the cluster what it has; nothing runs yet.")
    seen = st.session_state.get(f"{key}_cluster")
    if seen and seen[0] == address:
        if seen[2]:
            st.error(md_escape(seen[2]), icon=":material/cloud_off:")
            return None, f"Ray: {md_escape(seen[2])}"
        res = seen[1]
        cols = st.columns(3)
        cols[0].metric("Nodes", res["nodes"])
        cols[1].metric("CPUs", res["CPU"])
        cols[2].metric("GPUs", res["GPU"])
    else:
        st.caption("Press Connect to see the cluster's CPUs and GPUs before you start.")
    return config, None


def run_blockers(choice, config_problem, domain_problems, set_name: str, first: list | None = None) -> list:
    """What keeps a run of the active domain set from starting, one line
    each, as Markdown: `first` (the page's own, Markdown already), then the
    model, the settings and the domain set."""
    blockers = list(first or [])
    if choice.problem:
        blockers.append(f"Model: {md_escape(choice.problem)}")
    if config_problem:
        blockers.append(f"Advanced settings: {md_escape(config_problem)}")
    if domain_problems:
        blockers.append(f"The domain set “{md_escape(set_name)}” has {len(domain_problems)} problem"
                        f"{'' if len(domain_problems) == 1 else 's'}; fix them on the Domains page.")
    return blockers



def kept_plan_config(state: JobState) -> tuple:
    """(PlanConfig, kept) of a finished plan job: the last valid one the Plan
    page showed for it in this session (kept True), else the page's default
    budget on the job's pilot settings."""
    from dowsing.pipelines.plan import PilotConfig, PlanConfig

    kept = st.session_state.get("plan_good", {}).get(state.job_id)
    if kept:
        return PlanConfig.from_dict(kept), True
    pilot = PilotConfig.from_dict((state.request or {}).get("config") or {})
    return PlanConfig(budget=PLAN_BUDGET, pilot_sizes=pilot.pilot_sizes, seed=pilot.seed, device=pilot.device,
                      dtype=pilot.dtype, batch_size=pilot.batch_size), False


def plan_for(result) -> tuple | None:
    """(plan job state, its pilot measurements, the PlanConfig to plan with,
    whether that is the one kept from the Plan page) of the newest finished
    plan of the same model and domain names as the analysis `result`; None
    when there is none."""
    found = newest_match(runner(), "plan", [d.name for d in result.domains], (result.model or {}).get("fingerprint"))
    if found is None:
        return None
    state, pilots = found
    try:
        return (state, pilots, *kept_plan_config(state))
    except ValueError:  # a kept configuration this version no longer accepts: as if there were no plan
        return None


# --- what a run's domains are against the domains now -------------------------

def run_domain_diff(state: JobState | None):
    """What changed in the run's domain set since the run (`dowsing.presentation.fact_diff.SetDiff`),
    or None when the set is gone, unnamed, or unchanged."""
    from dowsing.presentation.fact_diff import set_diff

    if state is None or state.kind != "analysis":
        return None
    request = state.request or {}
    name = request.get("domain_set_name") or (state.summary or {}).get("domain_set_name")
    if not name or name not in workspace.list_sets():
        return None
    try:
        diff = set_diff(request.get("domains") or [], workspace.load_set_raw(name))
    except (workspace.WorkspaceError, OSError):
        return None
    return None if diff.empty else diff


def out_of_date_note(state: JobState | None) -> str | None:
    """'The domain set “Default” changed after this run (Biology: 1 fact changed): …'
    for a run whose domains were edited since; None when they were not."""
    diff = run_domain_diff(state)
    if diff is None:
        return None
    from dowsing.safe_text import md_escape

    name = (state.request or {}).get("domain_set_name") or (state.summary or {}).get("domain_set_name")
    changes = diff.summary()
    if len(changes) > 160:
        changes = changes[:159] + "…"
    return (f"Out of date: the domain set “{md_escape(name)}” changed after this run ({md_escape(changes)}). "
            "Run it again on Run for an answer on the facts as they are now.")


def job_labels(states: list) -> dict:
    """job id -> `job_label`, plus what differs from the run before it of the
    same kind (its domains, when they differ), so no two runs of different
    domains read the same."""
    from dowsing.presentation.fact_diff import set_diff

    labels = {}
    for k, state in enumerate(states):
        label = job_label(state)
        older = states[k + 1] if k + 1 < len(states) else None
        if older is not None:
            diff = set_diff((older.request or {}).get("domains") or [], (state.request or {}).get("domains") or [])
            if not diff.empty:
                changes = diff.summary()
                label += " · vs previous: " + (changes if len(changes) <= 70 else changes[:69] + "…")
        labels[state.job_id] = label
    return labels
