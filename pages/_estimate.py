"""The estimate shown before a run starts: predicted wall time and peak
memory on this machine, and the refusal of a run whose memory exceeds what it
has (the page disables its start button with the reason).

The page passes what the run would be asked (its signature) and how to
estimate it; the numbers come from `dowsing.estimates.estimate`. An estimate is kept in
st.session_state per signature, so reruns cost nothing; it is computed at once
when the model's calibration is on disk (counting tokens only), else on a
button press (the calibration runs once per model in a child process).
What the run finds stored (its cached result, the pilot curves of its
domains) is read again whenever a job ends.
"""
from __future__ import annotations

import hashlib
import json

import streamlit as st

from dowsing.estimates import cost_report
from dowsing.estimates import estimate as est
from dowsing.safe_text import md_escape
from pages import _shared


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_tokenizer(model_id: str | None):
    """The model's tokenizer, loaded once per server (the Start page and the estimates share it)."""
    return est.load_tokenizer(model_id)


def _compute(key: str, signature: str, model_id, device: str, dtype: str, build) -> None:
    try:
        with st.spinner("Calibrating on the model (once per model, a few seconds plus loading it)…"):
            calibration = est.calibration_in_subprocess(model_id, device, dtype)
        st.session_state[key] = (signature, build(calibration, cached_tokenizer(model_id)).to_dict(), None)
    except ValueError as exc:  # the input: the run itself would refuse it the same way
        st.session_state[key] = (signature, None, str(exc).strip().splitlines()[0] if str(exc).strip() else
                                 type(exc).__name__)
        st.session_state[f"{key}_refused"] = signature
    except (OSError, RuntimeError) as exc:
        st.session_state[key] = (signature, None, str(exc).strip().splitlines()[0] if str(exc).strip() else
                                 type(exc).__name__)


def _show(estimate: dict) -> str | None:
    """Show the estimate; the refusal when its peak exceeds the memory available."""
    available = cost_report.available_memory_bytes(estimate["device"])
    cols = st.columns(3)
    cols[0].metric("Predicted time", est.format_seconds(estimate["total_s"]),
                   help="Wall time on this machine, from a short calibration on the model, with the machine as "
                        "quiet as the calibration found it.")
    cols[1].metric("Peak memory", est.format_bytes(estimate["peak_bytes"]),
                   help=f"Predicted peak {estimate['memory_kind']}, during {estimate['peak_stage']}.")
    cols[2].metric("Available", est.format_bytes(available) if available is not None else "unknown")
    refusal = None
    if available is not None and estimate["peak_bytes"] > available:
        refusal = (f"The predicted peak memory ({est.format_bytes(estimate['peak_bytes'])}, during "
                   f"{estimate['peak_stage']}) exceeds the {est.format_bytes(available)} this machine has available, "
                   "so the run is refused. Use fewer or shorter facts, fewer domains or a smaller model.")
        st.warning(refusal, icon=":material/memory:")
    busy = est.load_note()
    if busy:
        st.caption(busy)
    with st.expander("Where the time goes"):
        st.dataframe([{"stage": name, "time": est.format_seconds(seconds),
                       "peak memory": est.format_bytes(estimate["memory_bytes"].get(name, 0))}
                      for name, seconds in estimate["stages_s"].items()], hide_index=True, width="stretch")
        for line in estimate["notes"]:
            st.caption(line)
    # The calibration's file and per-operation constants: for whoever checks the cost model.
    with st.expander("How the estimate was made (developer detail)"):
        for line in estimate["basis"]:
            st.caption(line)
    return refusal


def estimate_panel(key: str, signature: dict, model_id, device: str, dtype: str, build) -> str | None:
    """Show the estimate of the run described by `signature`.
    build(calibration, tokenizer) -> Estimate. Returns why the run is refused
    (its peak memory exceeds what the machine has, or the input is over a
    limit), else None."""
    # a job that ended may have stored this run's result or some of its pilot curves: estimate it again
    signature = {**signature, "jobs_ended": _shared.jobs_ended()}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()
    slot = st.session_state.get(key)
    if slot is None or slot[0] != digest:
        try:
            ready = est.cached_calibration(model_id, device, dtype, est.default_threads()) is not None
        except (ValueError, OSError, RuntimeError):
            ready = False
        if ready:
            _compute(key, digest, model_id, device, dtype, build)
        else:
            st.button("Estimate time and memory", icon=":material/timer:", key=f"{key}_button",
                      on_click=_compute, args=(key, digest, model_id, device, dtype, build),
                      help="Predict the wall time and peak memory on this machine before starting. The first "
                           "estimate for a model calibrates on it once (a few seconds after loading it).")
            return None
    _, estimate, error = st.session_state[key]
    if error:
        st.error(f"No estimate: {md_escape(error)}", icon=":material/error:")
        return error if st.session_state.get(f"{key}_refused") == digest else None
    return _show(estimate)
