"""The Plan page through Streamlit's AppTest on a tiny model and a private
cache: Start runs the pilots as a background job, the page's table is
`allocate`'s allocation for whatever budget, costs, weights and caps are
typed, without a new job, and bad input says what the command line says
beside the input while the previous plan stays on screen."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dowsing.safe_text import md_escape

APP = str(Path(__file__).resolve().parent.parent / "app.py")
# Eight to twelve facts a domain: halves of four to six, so each pilot measures at n = 2, 4 (and 6).
FACTS = {"Alpha": "red", "Beta": "green", "Gamma": "blue"}
DOMAINS = [{"name": name, "facts": [f"{name} item {i} is stored in box {word}{i * 7 % 5}." for i in range(8 + 2 * k)]}
           for k, (name, word) in enumerate(FACTS.items())]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_dir):
    """A private cache with the domain set active; cached Streamlit
    resources (the job runner) are dropped so they point at it."""
    folder = tmp_path_factory.mktemp("plan-page-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        st.cache_resource.clear()
        from dowsing import workspace

        workspace.save_set_raw("Plan set", DOMAINS)
        workspace.set_active("Plan set")
        yield str(tiny_llama_dir)
        st.cache_resource.clear()


def plan_page(tiny: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = tiny
    at.run()
    at.switch_page("pages/plan.py")
    at.run()
    assert not at.exception, at.exception
    return at


def shown_table(at):
    """The plan's table (not the editor of costs, weights and caps), or None."""
    return next((d.value for d in at.dataframe if "Collect" in d.value.columns), None)


def editor(at):
    return next(e for e in at.data_editor if e.key.startswith("plan_table-"))


def job_id(tiny: str) -> str:
    from dowsing.domains import Domain
    from dowsing.jobs import JobRequest
    from dowsing.plan import PilotConfig

    domains = [Domain(d["name"], tuple(d["facts"])) for d in DOMAINS]
    return JobRequest(kind="plan", model_id=tiny, domains=domains, config=PilotConfig()).job_id()


def expected_counts(tiny: str, budget: float, costs=None, caps=None, weights=None, have=0) -> list:
    """`allocate` on the mean gain over the bootstrap curves fitted to the job's pilots, read from `have`."""
    import dataclasses

    from dowsing.jobs import default_runner
    from dowsing.plan import PlanConfig, allocate, fit_pilots, gain_function, most_examples

    curves = fit_pilots(default_runner().result(job_id(tiny)).to_dict(), PlanConfig(budget=budget))
    costs_or_1, caps_or_none = costs or [1.0] * len(curves), caps or [None] * len(curves)
    gains = [gain_function(dataclasses.replace(dc, have=have), "expected", most_examples(budget, c, cap))
             for dc, c, cap in zip(curves, costs_or_1, caps_or_none)]
    return allocate(gains, budget, costs, caps, weights).counts


@pytest.fixture(scope="module")
def planned(tiny):
    """The page after Start, polled (as the 1 s fragment would) until the plan shows."""
    at = plan_page(tiny)
    assert shown_table(at) is None
    assert any("No learning curves yet" in i.value for i in at.info)
    assert any(b.label == "Estimate time and memory" for b in at.button)  # no calibration of the model yet
    start = next(b for b in at.button if b.label == "Start")
    assert not start.disabled
    start.click()
    at.run()
    seen = []
    deadline = time.monotonic() + 180
    while shown_table(at) is None:
        assert time.monotonic() < deadline, f"the plan job did not finish; progress seen: {seen[-3:]}"
        assert not at.error, at.error[0].value
        seen += [p.proto.text for p in at.get("progress")]
        time.sleep(0.5)
        at.run()
        assert not at.exception, at.exception
    return at, seen


def test_start_runs_the_pilots_as_a_job_and_the_table_is_allocates(planned, tiny):
    from dowsing.jobs import default_runner
    from dowsing.plan import PilotMeasurements

    at, seen = planned
    assert seen and any(s.startswith(("**loading model**", "**pilots**", "**starting**", "**queued**")) for s in seen)
    state = default_runner().state(job_id(tiny))
    assert state.kind == "plan" and state.status == "done"
    assert isinstance(default_runner().result(job_id(tiny)), PilotMeasurements)
    table = shown_table(at)
    assert list(table["Domain"]) == list(FACTS)
    counts = expected_counts(tiny, 100.0)
    assert list(table["Collect"]) == counts and sum(counts) > 0  # the tiny model's curves buy something
    assert list(table["Cost"]) == [float(c) for c in counts]
    assert any("nats per fact after the pilot recipe's short fine-tunes" in c.value and "does not promise" in c.value
               for c in at.caption)
    assert any(m.label == "This plan" for m in at.metric)
    assert at.number_input(key="plan_budget").value == 100 and isinstance(at.number_input(key="plan_budget").value, int)
    shown = {m.label: m for m in at.metric}
    assert {"Spread evenly", "Split by mean loss"} <= set(shown)
    # the verdict the library gives is what the page says, above the metrics
    from dowsing.plan import PlanConfig, plan_from_pilots

    library = plan_from_pilots(default_runner().result(job_id(tiny)), PlanConfig(budget=100))
    want = library.verdict["sentences"]
    for key, label in (("even", "Spread evenly"), ("mean_loss", "Split by mean loss")):
        # a difference whose band holds 0 is not shown as a win
        assert ("not shown" in shown[label].delta) == (not library.totals[key]["plan_minus_this"]["shown"])
    shown_sentences = {a.value for a in list(at.info) + list(at.success)}
    assert want and set(want) <= shown_sentences and any("spreading evenly" in s for s in want)
    assert any(c.value.startswith("Default 0: your facts are examples") for c in at.caption)
    specs = {c.key: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    assert specs["plan_allocation_chart"]["data"][0]["x"] == counts
    assert any(t.get("fill") == "toself" for t in specs["plan_curves_chart"]["data"])  # the bands
    assert {"Plan (CSV)", "Plan (JSON)", "Report (HTML)"} <= {d.label for d in at.get("download_button")}
    assert next(b for b in at.button if b.label == "Start").disabled  # measured: nothing to start


def test_another_budget_costs_and_caps_reallocate_without_a_new_job(planned, tiny):
    from dowsing.jobs import default_runner

    at, _ = planned
    before = default_runner().state(job_id(tiny))
    at.number_input(key="plan_budget").set_value(37).run()
    assert list(shown_table(at)["Collect"]) == expected_counts(tiny, 37.0)
    key = editor(at).key
    at.session_state[key] = {"edited_rows": {0: {"cost": 3.0}, 1: {"cap": 2}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception and not at.error, at.error
    table = shown_table(at)
    assert list(table["Collect"]) == expected_counts(tiny, 37.0, costs=[3.0, 1.0, 1.0], caps=[None, 2, None])
    assert table["Cost"][0] == 3.0 * table["Collect"][0]
    assert any(c.value.startswith("In money") for c in at.caption)
    after = default_runner().state(job_id(tiny))
    assert (after.run_id, after.finished_at) == (before.run_id, before.finished_at)
    assert [s.job_id for s in default_runner().history("plan")] == [job_id(tiny)]
    at.session_state[key] = {"edited_rows": {}, "added_rows": [], "deleted_rows": []}
    at.run()


def test_bad_input_says_what_the_cli_says_and_the_previous_plan_stays(planned, tiny):
    from dowsing.plan import PlanConfig

    at, _ = planned
    at.number_input(key="plan_budget").set_value(40).run()
    good = list(shown_table(at)["Collect"])
    assert good == expected_counts(tiny, 40.0)
    for bad in (0, -5):
        at.number_input(key="plan_budget").set_value(bad).run()
        with pytest.raises(ValueError) as refused:
            PlanConfig(budget=bad)
        # the message the CLI prints after "error: ", escaped for Markdown
        assert [e.value for e in at.error] == [md_escape(refused.value)]
        assert list(shown_table(at)["Collect"]) == good
        assert any("last valid input (budget 40 examples)" in c.value for c in at.caption)
    at.number_input(key="plan_budget").set_value(40).run()
    key = editor(at).key
    at.session_state[key] = {"edited_rows": {0: {"cost": 0.0}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert [e.value for e in at.error] == [md_escape("the cost of 'Alpha' must be a number > 0, got 0.0")]
    assert list(shown_table(at)["Collect"]) == good


def test_facts_already_in_training_move_where_the_curves_are_read_and_too_many_are_refused(planned, tiny):
    from dowsing.domains import Domain
    from dowsing.plan import PlanConfig, check_plan

    at, _ = planned
    at.session_state[editor(at).key] = {"edited_rows": {}, "added_rows": [], "deleted_rows": []}
    at.number_input(key="plan_budget").set_value(40).run()
    assert not at.error, at.error
    at.number_input(key="plan_have").set_value(3).run()
    table = shown_table(at)
    assert list(table["In training"]) == [3, 3, 3] and list(table["Collect"]) == expected_counts(tiny, 40, have=3)
    at.number_input(key="plan_have").set_value(9).run()  # Alpha has 8 facts
    with pytest.raises(ValueError) as refused:
        check_plan(PlanConfig(budget=40, have=9), [Domain(d["name"], tuple(d["facts"])) for d in DOMAINS])
    # the command line's message (the page may escape it for Markdown)
    assert len(at.error) == 1 and "is more than its 8 facts" in str(refused.value)
    assert all(part in at.error[0].value for part in ("have 9 for", "is more than its 8 facts"))
    at.number_input(key="plan_have").set_value(0).run()
    assert not at.error and list(shown_table(at)["In training"]) == [0, 0, 0]


def test_a_fresh_session_shows_the_measured_plan_at_once(planned, tiny):
    at = plan_page(tiny)  # a refresh, or a second tab: the same model and domains find their job
    assert not at.get("progress") and list(shown_table(at)["Collect"]) == expected_counts(tiny, 100.0)


def test_with_a_finished_analysis_of_the_same_model_and_domains_its_report_is_offered_with_the_plan(planned, tiny):
    from dowsing.config import AnalysisConfig
    from dowsing.domains import Domain
    from dowsing.jobs import JobRequest, default_runner

    at = plan_page(tiny)
    labels = {d.label for d in at.get("download_button")}
    assert "Analysis report with this plan (HTML)" not in labels  # no analysis of these domains yet
    runner = default_runner()
    domains = [Domain(d["name"], tuple(d["facts"])) for d in DOMAINS]
    analysis = runner.submit(JobRequest(model_id=tiny, domains=domains, config=AnalysisConfig(estimator="paper")))
    deadline = time.monotonic() + 180
    while (state := runner.state(analysis)).status != "done":
        assert state.status not in ("failed", "cancelled"), state.error
        assert time.monotonic() < deadline, "the analysis did not finish"
        time.sleep(0.5)
    at = plan_page(tiny)
    assert "Analysis report with this plan (HTML)" in {d.label for d in at.get("download_button")}
    assert any(c.value.startswith("With the analysis of") and analysis[:8] in c.value for c in at.caption)
