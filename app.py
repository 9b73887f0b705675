"""The dowsing dashboard: a router over the pages plus the shared sidebar.

Run with `make run` (or `streamlit run app.py`). The pages only lay out
widgets; analyses, validations, benchmarks and a plan's pilots run as
background jobs, in a worker process behind `dowsing.background.jobs`.
"""
import streamlit as st

from pages import _shared

st.set_page_config(page_title="Data dowsing", page_icon="🪄", layout="wide")
_shared.login_gate()  # only where .streamlit/secrets.toml configures a login

page = st.navigation([
    st.Page("pages/start.py", title="Start", icon=":material/home:", url_path="start", default=True),
    st.Page("pages/domains.py", title="Domains", icon=":material/edit_note:", url_path="domains"),
    st.Page("pages/run.py", title="Run", icon=":material/play_circle:", url_path="run"),
    st.Page("pages/results.py", title="Results", icon=":material/leaderboard:", url_path="results"),
    st.Page("pages/plan.py", title="Plan", icon=":material/shopping_cart:", url_path="plan"),
    st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/validate.py", title="Validate", icon=":material/fact_check:", url_path="validate"),
    st.Page("pages/benchmark.py", title="Benchmark", icon=":material/query_stats:", url_path="benchmark"),
])
model_box = _shared.sidebar()
_shared.store_notes()  # a cache store found damaged in the last run and rebuilt
page.run()
# After the page, so the page is on screen while a model loads.
_shared.model_status(model_box)
