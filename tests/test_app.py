"""Every page of the app through Streamlit's AppTest, with a tiny model and a
temporary cache (the worker processes inherit DOWSING_CACHE)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dowsing.result import format_sci
from dowsing.safe_text import md_escape
from dowsing.presentation.verdict import format_number

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SMALL_CSV = """domain,fact
Physics,Light travels faster than sound.
Physics,A force changes the motion of a body.
Physics,Energy is conserved in a closed system.
Astronomy,The Moon orbits the Earth.
Astronomy,Jupiter is the largest planet of the Solar System.
Astronomy,The Sun is a star.
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for this module; cached Streamlit resources (the job
    runner, loaded models) are dropped so they point at it."""
    folder = tmp_path_factory.mktemp("dowsing-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        st.cache_resource.clear()
        yield folder
        st.cache_resource.clear()


@pytest.fixture(scope="module")
def tiny(cache, tiny_gpt2_dir) -> str:
    return str(tiny_gpt2_dir)


def make_app(tiny: str, page: str | None = "pages/domains.py") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = tiny
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, at.exception
    return at


def workspace_raw():
    from dowsing import workspace

    return workspace.load_set_raw(workspace.active_set())


def editors(at):
    return [e for e in at.data_editor if e.key and e.key.startswith("facts-")]


def button(at, label):
    return next(b for b in at.button if b.label == label)


def test_the_start_page_says_what_dowsing_answers_and_how_long_each_step_takes(tiny):
    from dowsing import workspace

    at = make_app(tiny, None)
    assert at.title[0].value == "Which data should you collect next?"
    text = " ".join(m.value for m in at.markdown)
    assert "1 · Domains" in text and "2 · Run" in text and "3 · Results" in text
    # The run's time before anyone clicks: the estimate's or, without a calibration, the shipped figure.
    assert re.search(r"One analysis of the active set: \*\*(about \d+ min|[\d.]+ (s|min))\*\*", text), text
    n_facts = sum(len(d["facts"]) for d in workspace.load_set_raw(workspace.active_set()))
    assert f"{n_facts} facts" in text
    # The shipped benchmark's verdict, and the way to each step.
    assert "ρ = 0.88" in text
    links = " ".join(str(link.proto) for link in at.get("page_link"))
    for page in ("domains", "run", "results", "benchmark"):
        assert page in links, links


def test_domains_page_starts_from_the_default_set(tiny):
    from dowsing.domains import default_domains

    at = make_app(tiny)
    assert at.title[0].value == "Domains"
    defaults = default_domains()
    eds = editors(at)
    assert len(eds) == len(defaults)
    assert list(eds[0].value["fact"]) == list(defaults[0].facts)
    assert [t.value for t in at.text_input if t.key and t.key.startswith("name-")] == [d.name for d in defaults]
    # The sidebar shows what is loaded.
    assert "GPT2LMHeadModel" in at.sidebar.success[0].value
    assert "cpu" in at.sidebar.success[0].value and "float32" in at.sidebar.success[0].value


def test_empty_states_before_any_run(tiny):
    for page, text in (("pages/run.py", "No run yet"), ("pages/results.py", "No run yet — go to **Run**"),
                       ("pages/compare.py", "two finished runs")):
        at = make_app(tiny, page)
        assert any(text in i.value for i in at.info), (page, [i.value for i in at.info])


def test_editing_a_fact_is_saved_and_validated(tiny):
    at = make_app(tiny)
    key = editors(at)[0].key
    at.session_state[key] = {"edited_rows": {0: {"fact": "Edited: light is fast."}}, "added_rows": [],
                             "deleted_rows": []}
    at.run()
    assert not at.exception
    assert workspace_raw()[0]["facts"][0] == "Edited: light is fast."
    assert any(c.value.startswith(":green[:material/check_circle:] Saved at") for c in at.caption)
    # An empty fact and a duplicate are flagged inline, and still saved (mid-edit).
    at2 = make_app(tiny)
    key = editors(at2)[0].key
    first = workspace_raw()[0]["facts"][0]
    at2.session_state[key] = {"edited_rows": {1: {"fact": ""}}, "added_rows": [{"fact": first}], "deleted_rows": []}
    at2.run()
    warnings = " ".join(w.value for w in at2.warning)
    assert "empty fact" in warnings and "twice" in warnings
    assert workspace_raw()[0]["facts"][1] == ""
    # Fix it again so later tests have a valid set.
    at3 = make_app(tiny)
    key = editors(at3)[0].key
    at3.session_state[key] = {"edited_rows": {1: {"fact": "Second fact, fixed."}}, "added_rows": [],
                              "deleted_rows": []}
    at3.run()
    assert not [w for w in at3.warning if "empty fact" in w.value]


def test_add_rename_delete_undo_and_reorder_domains(tiny):
    at = make_app(tiny)
    n = len(editors(at))
    at.text_input(key="new_domain_name").set_value("Chemistry")
    button(at, "Add domain").click()
    at.run()
    assert len(editors(at)) == n + 1
    assert workspace_raw()[-1]["name"] == "Chemistry"
    # Rename through the name field.
    name_key = [t.key for t in at.text_input if t.key and t.key.startswith("name-")][-1]
    at.text_input(key=name_key).set_value("Chemistry 2").run()
    assert workspace_raw()[-1]["name"] == "Chemistry 2"
    # Move it up one place.
    up = [b for b in at.button if b.key and b.key.startswith("up-")][-1]
    up.click().run()
    assert workspace_raw()[-2]["name"] == "Chemistry 2"
    # Delete it, then undo: the undo is enabled only once there is something to undo.
    assert button(at, "Undo delete").disabled
    delete = [b for b in at.button if b.key and b.key.startswith("del-")][-2]
    delete.click().run()
    assert "Chemistry 2" not in [d["name"] for d in workspace_raw()]
    assert any("Deleted the domain" in s.value for s in at.success)
    assert not button(at, "Undo delete").disabled
    button(at, "Undo delete").click().run()
    assert [d["name"] for d in workspace_raw()][-2] == "Chemistry 2"
    assert button(at, "Undo delete").disabled
    delete = [b for b in at.button if b.key and b.key.startswith("del-")][-2]
    delete.click().run()
    assert len(editors(at)) == n


def test_bad_import_names_line_or_field_and_changes_nothing(tiny):
    from dowsing import workspace

    at = make_app(tiny)
    before_sets, before = workspace.list_sets(), workspace_raw()
    at.text_area(key="paste_text").set_value('{"domains": [{"name": "A", "facts": ["x", 3]}]}')
    button(at, "Import pasted text").click().run()
    assert md_escape("domains[0].facts[1]") in at.error[0].value  # user text reaches Markdown escaped
    at.text_area(key="paste_text").set_value("domain,fact\nA,x\nB\n")
    button(at, "Import pasted text").click().run()
    assert "line 3" in at.error[0].value
    at.text_area(key="paste_text").set_value('{"domains": [')
    button(at, "Import pasted text").click().run()
    assert "line 1" in at.error[0].value
    assert workspace.list_sets() == before_sets and workspace_raw() == before
    assert not at.exception


def test_import_export_and_named_sets(tiny):
    from dowsing import workspace

    at = make_app(tiny)
    at.text_area(key="paste_text").set_value(SMALL_CSV)
    button(at, "Import pasted text").click().run()
    assert workspace.active_set() == "Pasted set"
    assert [d["name"] for d in workspace_raw()] == ["Physics", "Astronomy"]
    assert len(editors(at)) == 2
    downloads = {d.label for d in at.get("download_button")}
    assert {"Export JSON", "Export CSV"} <= downloads
    # Both example sets load as sets of their own.
    from dowsing.domains import example_sets

    names = list(example_sets())
    assert len(names) >= 2
    at.button(key=f"example_{names[1]}").click().run()
    assert workspace.active_set() == names[1]
    assert len(editors(at)) >= 2
    # Back to the small set for the run tests.
    workspace.set_active("Pasted set")


def run_until_done(at, timeout_s=180):
    """Rerun the Run page (as the 1 s fragment would) until its job finishes;
    returns the progress texts seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        seen += [p.proto.text for p in at.get("progress")]
        if any(s.value.startswith("Finished") for s in at.success):
            return seen
        if at.error:
            raise AssertionError(at.error[0].value)
        time.sleep(0.5)
    raise AssertionError(f"the job did not finish in {timeout_s} s; progress seen: {seen[-3:]}")


@pytest.fixture(scope="module")
def finished_job(tiny):
    from dowsing import workspace

    workspace.save_set_raw("Small", [
        {"name": "Physics", "facts": ["Light travels faster than sound.", "A force changes the motion of a body.",
                                      "Energy is conserved in a closed system."]},
        {"name": "Astronomy", "facts": ["The Moon orbits the Earth.", "The Sun is a star.",
                                        "Jupiter is the largest planet of the Solar System."]},
    ])
    workspace.set_active("Small")
    at = make_app(tiny, "pages/run.py")
    assert at.title[0].value == "Run an analysis"
    button(at, "Analyze").click()
    at.run()
    job_id = at.query_params["job"][0] if isinstance(at.query_params["job"], list) else at.query_params["job"]
    progress = run_until_done(at)
    return at, job_id, progress


def test_run_page_shows_progress_and_finishes(finished_job):
    at, job_id, progress = finished_job
    assert job_id
    assert progress, "no progress bar was shown"
    assert any("done" in p for p in progress)
    # The history lists the run.
    assert at.button(key=f"open-{job_id}")


def test_results_show_the_numbers_of_the_result(finished_job, tiny):
    _, job_id, _ = finished_job
    from dowsing.presentation import report
    from dowsing.background.jobs import default_runner

    result = default_runner().result(job_id)
    assert result is not None
    at = results_page(tiny, job_id)
    table = "".join(m.value for m in at.markdown if "dw-table" in m.value)  # the ranking's, then the paper's
    shown = [w.value for w in at.warning]
    warnings = report.curvature_warnings(result)
    assert warnings  # the tiny model's Hessian is indefinite: there is a warning to find
    assert all(md_escape(text) in shown for text in warnings)
    for d in result.domains:
        assert d.name in table
        assert format_number(d.mean) in table
        assert f">{d.share_pct:.1f}<" in table
        if d.delta_n_10pct is None and d.delta_n_reason:
            assert d.delta_n_reason.replace("'", "&#x27;")[:20] in table  # the tooltip
    ranked = result.ranked()
    assert table.index(ranked[0].name) < table.index(ranked[-1].name)
    # Ranked by the default estimator, by its priority; the page says which and quotes its evidence verbatim.
    from dowsing.config import DEFAULT_ESTIMATOR
    from dowsing.validation.evidence import evidence_sentence

    assert result.config["estimator"] == DEFAULT_ESTIMATOR
    assert [d.priority for d in ranked] == sorted((d.priority for d in result.domains), reverse=True)
    assert any(m.value == "**" + report.ranking_statement(result) + "**" for m in at.markdown)
    sentence = evidence_sentence(DEFAULT_ESTIMATOR)
    boxes = at.warning if report.evidence_is_weak(result) else at.info
    assert sentence in [b.value for b in boxes]
    assert "from the concept-subspace curvature (paper)" in specs_title(at)
    # The verdict on top, in the ranking's terms, with its number and unit; every diagnosis in full.
    from dowsing.presentation import verdict

    found = verdict.verdict(result, esc=md_escape, strong=lambda s: f"**{s}**")
    assert at.markdown[0].value == f"### {found.headline}" or any(m.value == f"### {found.headline}"
                                                                    for m in at.markdown)
    assert any(m.value == found.how_sure for m in at.markdown)
    assert any(m.value == found.number for m in at.metric)
    for row in result.extras["diagnosis"]:
        assert any(md_escape(row["sentence"]) in m.value for m in at.markdown), row["sentence"]
    # The paper's section, after the ranking, opens with the benchmark's word on the method.
    assert "The paper's concept-subspace method" in [h.value for h in at.header]
    assert any(m.value.startswith("On the shipped benchmark") and "ρ = 0.36" in m.value for m in at.markdown)
    charts = at.get("plotly_chart")
    assert len(charts) >= 2  # + rank stability and transfer when the result has them
    specs = [json.loads(c.proto.spec) for c in charts]
    assert specs[0]["data"][0]["type"] == "pie"
    assert specs[1]["layout"]["xaxis"]["type"] == "log"
    downloads = {d.label for d in at.get("download_button")}
    assert {"Table (CSV)", "Result (JSON)", "Report (HTML)"} <= downloads
    assert at.expander and any(e.label == "Solver diagnostics" for e in at.expander)


def specs_title(at) -> str:
    chart = next(c for c in at.get("plotly_chart") if c.key == "saturation_chart")
    return json.loads(chart.proto.spec)["layout"]["title"]["text"]


def results_page(tiny, job_id):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = tiny
    at.query_params["job"] = job_id
    at.switch_page("pages/results.py")
    at.run()
    assert not at.exception, at.exception
    return at


def test_results_show_intervals_rank_stability_and_transfer(finished_job, tiny):
    _, job_id, _ = finished_job
    from dowsing.presentation import report
    from dowsing.background.jobs import default_runner

    result = default_runner().result(job_id)
    boot = {d["name"]: d for d in result.extras["bootstrap"]["domains"]}  # the tiny run solves densely
    ranking = result.extras["ranking"]  # the ranking estimator's bootstrap, lists in domain order
    at = results_page(tiny, job_id)
    table = "".join(m.value for m in at.markdown if "dw-table" in m.value)
    for k, d in enumerate(result.domains):
        lo, hi = boot[d.name]["mean_interval"]  # Mean (paper)
        assert f"[{format_number(lo)}, {format_number(hi)}]" in table
        lo, hi = ranking["priority_interval"][k]
        assert f"{format_number(d.priority)}<br><span class=\"dw-ci\">[{format_number(lo)}, {format_number(hi)}]" in table
        if not ranking["rank_stable"][k]:
            assert f"{d.rank} ⚠ unstable" in table
    assert any("90% bootstrap interval" in c.value for c in at.caption)
    # Rank stability and the transfer heatmap, with the sentence that says how to read it.
    assert {"Rank stability", "Cross-domain transfer (paper's method)"} <= {h.value for h in at.subheader}
    assert any("if we collect Physics, does Astronomy improve too?" in c.value for c in at.caption)
    specs = {c.key: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    assert specs["transfer_chart"]["data"][0]["z"] == result.extras["transfer"]["matrix"]
    assert specs["transfer_chart"]["data"][0]["type"] == "heatmap"
    assert len(specs["rank_chart"]["data"][0]["z"]) == len(result.domains)
    # the rank chart shows the ranking estimator's probabilities, rows in rank order
    by_rank = sorted(range(len(result.domains)), key=lambda k: result.domains[k].rank)
    assert specs["rank_chart"]["data"][0]["z"] == [ranking["rank_probabilities"][k] for k in by_rank]
    bands = [t for t in specs["saturation_chart"]["data"] if t.get("fill") == "toself"]
    assert {t["legendgroup"] for t in bands} <= {d.name for d in result.domains} and bands


def test_results_and_run_say_when_the_domains_changed_after_the_run(finished_job, tiny):
    from dowsing import workspace
    from dowsing.background.jobs import default_runner
    from pages._shared import job_labels

    _, job_id, _ = finished_job
    at = results_page(tiny, job_id)
    assert not any("Out of date" in w.value for w in at.warning)
    raw = workspace.load_set_raw("Small")
    edited = [dict(d, facts=list(d["facts"])) for d in raw]
    edited[0]["facts"][0] = "Sound travels slower than light."
    workspace.save_set_raw("Small", edited)
    try:
        at = results_page(tiny, job_id)
        stale = next(w.value for w in at.warning if w.value.startswith("Out of date"))
        from dowsing.safe_text import md_escape

        assert md_escape("Physics: 1 fact changed") in stale
        at = make_app(tiny, "pages/run.py")
        assert any("out of date" in m.value for m in at.markdown)
        # A label says what differs from the run before it.
        state = default_runner().state(job_id)
        later = type(state)(**{**state.__dict__, "job_id": "later",
                               "request": {**state.request, "domains": edited}})
        assert "vs previous: Physics: 1 fact changed" in job_labels([later, state])["later"]
    finally:
        workspace.save_set_raw("Small", raw)


def test_results_of_an_old_result_without_extras(finished_job, tiny, monkeypatch):
    """A result cached before the bootstrap and the transfer matrix existed still shows."""
    _, job_id, _ = finished_job
    from dowsing.background.jobs import LocalJobRunner, default_runner
    from dowsing.result import Result

    result = default_runner().result(job_id)
    old = Result.from_dict({**result.to_dict(), "extras": {}})
    # The page reads results through the (cached) job runner: replace the service, not the page.
    monkeypatch.setattr(LocalJobRunner, "result", lambda self, _job_id: old)
    at = results_page(tiny, job_id)
    table = "".join(m.value for m in at.markdown if "dw-table" in m.value)
    body = table[table.index("<tbody>"):]  # after the CSS, which names every class
    assert 'class="dw-ci"' not in body and "unstable" not in body
    assert any("No 90% intervals" in c.value for c in at.caption)
    assert {c.key for c in at.get("plotly_chart")} == {"share_chart", "saturation_chart"}


def test_results_report_includes_the_newest_plan_of_the_same_model_and_domains(finished_job, tiny):
    """Without a finished plan the page says the report has none; once a plan
    job of the same model and domains is done, the page names it (budget,
    when) and the report the download builds carries its section."""
    from dowsing.presentation import report
    from dowsing.domains import Domain
    from dowsing.background.jobs import JobRequest, default_runner, newest_match
    from dowsing.pipelines.plan import PilotConfig, PlanConfig, fit_pilots, plan_from_pilots
    from pages._shared import PLAN_BUDGET

    _, job_id, _ = finished_job
    runner = default_runner()
    result = runner.result(job_id)
    at = results_page(tiny, job_id)
    assert any("No finished collection plan" in c.value for c in at.caption)

    domains = [Domain(d.name, tuple(r["text"] for r in result.per_example if r["domain"] == d.name))
               for d in result.domains]
    plan_job = runner.submit(JobRequest(kind="plan", model_id=tiny, domains=domains, config=PilotConfig()))
    deadline = time.monotonic() + 120
    while (state := runner.state(plan_job)).status != "done":
        assert state.status not in ("failed", "cancelled"), state.error
        assert time.monotonic() < deadline, "the plan job did not finish"
        time.sleep(0.5)
    names, fingerprint = [d.name for d in result.domains], result.model["fingerprint"]
    found_state, pilots = newest_match(runner, "plan", list(reversed(names)), fingerprint)
    assert found_state.job_id == plan_job
    assert newest_match(runner, "plan", names[:1], fingerprint) is None
    assert newest_match(runner, "plan", names, "another model") is None
    assert newest_match(runner, "analysis", names, pilots.model["fingerprint"]) is not None  # the Plan page's way

    at = results_page(tiny, job_id)
    caption = next(c.value for c in at.caption if c.value.startswith("The report includes the collection plan"))
    assert f"budget {PLAN_BUDGET:g} examples" in caption and state.finished_at[:19].replace("T", " ") in caption
    assert plan_job[:8] in caption and "default budget" in caption
    # What the download builds: the analysis report with the plan's section, its counts the recommended ones
    # (the plan's, or the even split where the plan is not shown to beat it).
    config = PlanConfig(budget=PLAN_BUDGET)  # the page's default on the job's default pilot settings
    curves = fit_pilots(pilots.to_dict(), config)
    plan = plan_from_pilots(pilots, config, curves)
    page = report.build_report(result, plan=plan, plan_curves=curves)
    section = page[page.index("<h2>Collection plan</h2>"):page.index("<h2>Domains</h2>")]
    head = re.findall(r"<th>(.*?)</th>", section[section.index("<thead>"):section.index("</thead>")])
    collect = next(k for k, h in enumerate(head) if h.startswith("Collect"))
    table = section[section.index("<tbody>"):section.index("</tbody>")]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("</tr>")[:-1]]
    from dowsing.pipelines.plan import recommendation

    assert [(r[0], int(r[collect])) for r in rows] == recommendation(plan)["counts"]


def test_compare_two_runs(finished_job, tiny):
    from dowsing import workspace

    at = make_app(tiny, "pages/compare.py")
    assert at.info and "two finished runs" in at.info[0].value
    # A second run: the same domains with a different damping.
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = tiny
    at.session_state["cfg_damping"] = 1e-2  # as if typed under Advanced settings
    at.switch_page("pages/run.py")
    at.run()
    # The ranking estimator, chosen in the sidebar: the paper's method for this run.
    picker = at.sidebar.selectbox(key="cfg_estimator")
    from dowsing import estimators
    from dowsing.config import DEFAULT_ESTIMATOR

    assert picker.label == "Ranking estimator" and picker.value == DEFAULT_ESTIMATOR
    assert f"{estimators.label(DEFAULT_ESTIMATOR)} (default)" in list(picker.options)
    assert "chosen by the benchmark" in picker.help and "Data Dowsing paper" in picker.help
    picker.set_value("paper").run()
    assert any("Paper: concept-subspace influence" in c.value for c in at.caption)
    button(at, "Analyze").click()
    run_until_done(at)
    from dowsing.background.jobs import default_runner

    job = at.query_params["job"][0] if isinstance(at.query_params["job"], list) else at.query_params["job"]
    state = default_runner().state(job)
    assert state.request["config"]["estimator"] == "paper"
    from pages._shared import job_label

    assert "estimator = paper" in job_label(state)
    paper_result = default_runner().result(job)
    assert [d.rank for d in paper_result.domains] == [
        sorted((x.mean for x in paper_result.domains), reverse=True).index(d.mean) + 1 for d in paper_result.domains]
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["Concept"]) and set(table["Concept"]) == {d["name"] for d in workspace.load_set_raw("Small")}
    assert {"Rank A", "Rank B", "Mean A", "Mean B"} <= set(table.columns)
    assert at.get("plotly_chart")
    # Beside the ranks, what the two runs read: here the same facts, so the difference is the settings.
    assert "Facts that differ" in [h.value for h in at.subheader]
    assert any(c.value.startswith("Both runs read the same domains and facts") for c in at.caption)


def test_bad_model_is_a_one_line_error(cache):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "hub"
    at.session_state["model"] = "no-such-org/no-such-model-xyz"
    at.run()
    assert not at.exception
    message = at.sidebar.error[0].value
    assert md_escape("no-such-org/no-such-model-xyz") in message and "\n" not in message
    # (A fresh AppTest per case: AppTest drops the sidebar on reruns, the browser does not.)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = "/no/such/folder"
    at.run()
    assert not at.exception
    from dowsing.access.models import NOT_ALLOWED

    assert at.sidebar.info[0].value == md_escape(NOT_ALLOWED)  # outside the model roots: not whether it exists




def test_cancel_stops_a_running_job(tiny):
    from dowsing import workspace
    from dowsing.domains import default_domains

    # The full default set takes long enough on the tiny model to be cancelled.
    before = workspace.active_set()
    workspace.save_set_raw("Big", [{"name": d.name, "facts": list(d.facts)} for d in default_domains()])
    workspace.set_active("Big")
    at = make_app(tiny, "pages/run.py")
    button(at, "Analyze").click()
    at.run()
    cancel = [b for b in at.button if b.label == "Cancel"]
    assert cancel, [s.value for s in at.success]
    cancel[0].click()
    at.run()
    assert any("cancelled" in w.value for w in at.warning)
    workspace.set_active(before)


def test_a_failing_worker_shows_its_error(tiny, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gpt2"}')
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(broken)
    at.switch_page("pages/run.py")
    at.run()
    button(at, "Analyze").click()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        messages = [e.value for e in at.error]
        if messages:
            break
        time.sleep(0.5)
    assert messages and len(messages[0].splitlines()) == 1, messages
    assert md_escape("broken-model") in messages[0] or "failed" in messages[0]
    # The app stays usable: the Analyze button is still there.
    assert button(at, "Analyze")


def test_validate_page_runs_a_validation_and_shows_leaderboard_charts_transfer_and_exactness(finished_job, tiny):
    """Start a real validation (a background job on the tiny model) from the
    page, poll until it is done, and check what the page shows against the
    job's stored result; then the transfer heatmap of the finished analysis
    and the exactness check."""
    from dowsing.validation.validate import ValidationResult
    from dowsing.background.jobs import default_runner

    _, job_id, _ = finished_job
    at = make_app(tiny, "pages/validate.py")
    assert at.title[0].value == "Validate"
    # An estimate before Start: at once with a cached calibration, else a button that makes one.
    assert (any(b.label == "Estimate time and memory" for b in at.button)
            or any(m.label == "Predicted time" for m in at.metric))
    if any(b.label == "Estimate time and memory" for b in at.button):
        button(at, "Estimate time and memory").click().run()
        assert any(m.label == "Predicted time" for m in at.metric), [e.value for e in at.error]
    button(at, "Start validation").click()
    at.run()
    run_id = at.session_state["validation_id"]
    assert at.query_params["validation"] in (run_id, [run_id])  # a refresh finds it again
    deadline = time.monotonic() + 180
    while not any(s.value == "Leaderboard" for s in at.subheader):
        assert time.monotonic() < deadline, f"validation did not finish: {default_runner().state(run_id)}"
        assert not at.error, at.error[0].value
        time.sleep(1.0)
        at.run()
    assert not at.exception, at.exception
    state = default_runner().state(run_id)
    assert state.kind == "validation" and state.status == "done"
    result = default_runner().result(run_id)
    assert isinstance(result, ValidationResult)
    shown = next(d.value for d in at.dataframe if "Estimator" in d.value.columns)  # after the estimate's stages
    assert list(shown["Estimator"]) == list(result.table()["Estimator"])
    assert len(shown) == len(result.estimators)

    specs = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    scatter = next(s for s in specs.values() if "realised held-out gain" in s["layout"]["title"]["text"])
    points = {(t["name"], t["x"][0], t["y"][0]) for t in scatter["data"]}
    default = result.estimators[0]
    for name, priority, gain in zip(result.domains, default["priority"], result.finetune["gain"]):
        assert (name, pytest.approx(priority), pytest.approx(gain)) in [(n, x, y) for n, x, y in points]
    assert any("Concept subspace" in s["layout"]["title"]["text"] for s in specs.values())

    # The analysis shown on Results gives the transfer heatmap here: its matrix.
    analysis = default_runner().result(at.query_params["job"][0] if isinstance(at.query_params["job"], list)
                                         else at.query_params["job"])
    heat = next(s for s in specs.values() if s["data"][0]["type"] == "heatmap")
    assert heat["data"][0]["z"] == analysis.extras["transfer"]["matrix"]

    button(at, "Run exactness check").click()
    at.run(timeout=120)
    assert not at.exception, at.exception
    check = at.session_state["exactness"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Relative error, CG vs dense"] == f"{check['rel_error']:.1e}"
    assert metrics["CG iterations"] == str(check["cg_iterations"])
    at.run()  # any later rerun (a widget, the progress poll) keeps the check on screen
    live = ("Available",)  # the estimate's free memory moves between reruns
    assert {k: v for k, v in ((m.label, m.value) for m in at.metric) if k not in live} == {
        k: v for k, v in metrics.items() if k not in live}


def test_run_page_runs_an_analysis_on_ray_after_showing_the_cluster(tiny):
    """The Executor choice: nonsense is a blocker, an address where nothing
    listens is a one-line error, Connect shows a local Ray's CPUs, and the job
    runs with the worker on Ray."""
    import os

    from dowsing import workspace
    from dowsing.background.jobs import JobStore

    before = workspace.active_set()
    workspace.save_set_raw("On Ray", [
        {"name": "Physics", "facts": ["Light travels faster than sound.", "Energy is conserved in a closed system."]},
        {"name": "Astronomy", "facts": ["The Moon orbits the Earth.", "The Sun is a star."]},
    ])
    workspace.set_active("On Ray")
    at = make_app(tiny, "pages/run.py")
    at.radio(key="run_executor").set_value("ray").run()
    at.text_input(key="run_ray_address").input("nonsense").run()
    assert any("Executor: " + md_escape("ray address 'nonsense'") in w.value for w in at.warning)
    assert button(at, "Analyze").disabled
    at.text_input(key="run_ray_address").input("127.0.0.1:1").run()
    at.button(key="run_connect").click().run()
    assert at.error and at.error[0].value.startswith(md_escape("could not reach Ray at 127.0.0.1:1"))
    assert button(at, "Analyze").disabled
    at.text_input(key="run_ray_address").input("").run()
    at.button(key="run_connect").click().run()
    assert not at.exception, at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown["Nodes"] == "1" and shown["CPUs"] == str(os.cpu_count()) and shown["GPUs"] == "0"
    assert not button(at, "Analyze").disabled
    button(at, "Analyze").click()
    at.run()
    job_id = at.query_params["job"][0] if isinstance(at.query_params["job"], list) else at.query_params["job"]
    run_until_done(at)
    state = JobStore().get(job_id)
    assert state.request["executor"]["kind"] == "ray"
    log = JobStore().log_path(job_id).read_text()
    assert f"ray: 1 node(s), {os.cpu_count()} CPU, 0 GPU" in log
    workspace.set_active(before)


def test_benchmark_page_shows_the_shipped_leaderboards_until_a_run_of_its_own(tiny):
    from dowsing.validation.evidence import evidence_rows, load_evidence
    from dowsing.background.jobs import default_runner

    if default_runner().history("benchmark"):
        pytest.skip("this module's cache already holds a benchmark run")
    at = make_app(tiny, "pages/benchmark.py")
    assert any(i.value.startswith("Shipped with dowsing, not run on this machine") for i in at.info)
    def shipped_board():  # after the estimate's stages, when a calibration is cached
        return next(d.value for d in at.dataframe if "Estimator" in d.value.columns)

    board = shipped_board()
    assert list(board["Estimator"]) == [r["Estimator"] for r in evidence_rows("all")]
    assert len(board) == len(load_evidence()["estimators"])
    for group in ("ordinary", "hard"):
        at.radio(key="shipped_group").set_value(group).run()
        assert list(shipped_board()["ρ"]) == [r["ρ"] for r in evidence_rows(group)]
    # The label's counts are the header's: the quick run reads 20 facts of each of its 11 domains.
    at.checkbox(key="bench_quick").check().run()
    label = at.checkbox(key="bench_quick").label
    n, per = map(int, re.match(r"Quick \((\d+) domains of (\d+) facts", label).groups())
    assert any(f"{n} domains · {n * per} facts" in m.value for m in at.markdown)
    assert "few minutes" not in label + at.checkbox(key="bench_quick").help


def test_benchmark_page_starts_its_run_on_the_chosen_executor_and_cancel_stops_it(tiny):
    from dowsing.background.jobs import default_runner, session_pids

    at = make_app(tiny, "pages/benchmark.py")
    at.checkbox(key="bench_quick").check().run()
    at.radio(key="bench_executor").set_value("ray").run()
    button(at, "Start benchmark").click()
    at.run()
    job = at.session_state["benchmark_id"]
    state = default_runner().state(job)
    assert state.kind == "benchmark" and state.request["executor"]["kind"] == "ray" and state.active
    # the quick benchmark: 20 facts a domain, a sample of 8, 4 test facts, doses of 4 and 8 pool facts
    quick = state.request["config"]
    assert (quick["max_facts"], quick["sample_facts"], quick["test_facts"], list(quick["doses"])) == (20, 8, 4, [4, 8])
    deadline = time.monotonic() + 60
    while state.pid is None and time.monotonic() < deadline:
        time.sleep(0.2)
        state = default_runner().state(job)
    at.run()
    cancel = [b for b in at.button if b.label == "Cancel"]
    assert cancel, [s.value for s in at.info]
    cancel[0].click()
    at.run()
    assert default_runner().state(job).status == "cancelled"
    assert session_pids(state.pid) == []
    assert any("The benchmark was cancelled." in w.value for w in at.warning)


def test_benchmark_page_checks_the_plan_by_training_and_shows_the_check(tiny):
    from dowsing.background.jobs import default_runner

    at = make_app(tiny, "pages/benchmark.py")
    at.checkbox(key="bench_quick").check().run()
    at.checkbox(key="bench_plan").check().run()
    button(at, "Start benchmark").click()
    at.run()
    job = at.session_state["benchmark_id"]
    # quick: 11 domains, pools of 8 facts: an eighth and a half of the pools, 1 and 4 a domain
    assert list(default_runner().state(job).request["config"]["plan_budgets"]) == [11, 44]
    deadline = time.monotonic() + 600
    while default_runner().state(job).active and time.monotonic() < deadline:
        time.sleep(1.0)
    assert default_runner().state(job).status == "done", default_runner().state(job).error
    at.run()
    assert not at.exception, at.exception
    assert "The collection plan, checked by training" in [h.value for h in at.subheader]
    tables = [t.value for t in at.dataframe]
    check = next(t for t in tables if "Allocation" in t.columns)
    from dowsing.validation.plan_check import ALLOCATION_LABELS

    assert list(check["Budget"]) == [11] * 6 + [44] * 6
    assert set(check["Allocation"]) == set(ALLOCATION_LABELS.values()) and len(ALLOCATION_LABELS) == 6
    assert any("Median error" in t.columns for t in tables)


def test_training_checkpoints_as_the_model_rank_by_a_checkpoint_estimator(cache, tiny_gpt2_dir, tmp_path):
    from test_checkpoints import _perturbed

    from dowsing import workspace

    steps = [_perturbed(tiny_gpt2_dir, tmp_path / "step1", 1), _perturbed(tiny_gpt2_dir, tmp_path / "step2", 2)]
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "checkpoints"
    at.session_state["checkpoints_text"] = str(steps[0])
    at.run()
    assert not at.exception
    assert "at least 2 checkpoints" in at.sidebar.info[0].value
    workspace.save_set_raw("Ckpt", [
        {"name": "Physics", "facts": ["Light travels faster than sound.", "A force changes the motion of a body.",
                                      "Energy is conserved in a closed system."]},
        {"name": "Astronomy", "facts": ["The Moon orbits the Earth.", "The Sun is a star.",
                                        "Jupiter is the largest planet of the Solar System."]},
    ])
    workspace.set_active("Ckpt")
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "checkpoints"
    at.session_state["checkpoints_text"] = f"# oldest first\n{tiny_gpt2_dir}\n{steps[0]}\n{steps[1]}\n"
    at.session_state["cfg_estimator"] = "vog"
    at.session_state["cfg_align_blocks"] = 1
    at.run()
    at.switch_page("pages/run.py")
    at.run()
    assert not at.exception, at.exception
    assert any("3 checkpoints of one gpt2, 2 layers model" in c.value for c in at.sidebar.caption)
    button(at, "Analyze").click()
    at.run()
    run_until_done(at)
    job = at.query_params["job"]
    job = job[0] if isinstance(job, list) else job
    from dowsing.background.jobs import default_runner

    state = default_runner().state(job)
    assert state.request["config"]["checkpoints"] == [str(tiny_gpt2_dir), str(steps[0]), str(steps[1])]
    assert state.request["model_id"] == str(Path(steps[1]).resolve())
    result = default_runner().result(job)
    assert result.extras["ranking"]["estimator"] == "vog"
    assert result.extras["ranking"]["details"]["trajectory"] == "user checkpoints"


def test_results_tell_one_story_on_the_hard_case_domains(tiny):
    """On the hard cases (noise, scrambled, contradicting, grab-bag, redundant
    facts) the diagnoses differ most from the paper's method: no sentence of
    the Results page about a domain may say otherwise than its diagnosis
    without naming the method it comes from. Near the end of this module: it
    and the tests after it add finished runs, which the tests that count runs
    would see."""
    from dowsing.presentation import verdict
    from dowsing.domains import Domain, hard_case_domains
    from dowsing.background.jobs import JobRequest, default_runner

    runner = default_runner()
    domains = [Domain(d.name, tuple(d.facts[:12])) for d in hard_case_domains(quick=True)]
    job = runner.submit(JobRequest(model_id=tiny, domains=domains, config=None))
    deadline = time.monotonic() + 300
    while (state := runner.state(job)).status != "done":
        assert state.status not in ("failed", "cancelled"), state.error
        assert time.monotonic() < deadline, "the analysis did not finish"
        time.sleep(0.5)
    result = runner.result(job)
    assert result.extras.get("diagnosis")
    at = results_page(tiny, job)
    shown = [e.value for kind in (at.markdown, at.caption, at.info, at.warning, at.metric) for e in kind]
    text = re.sub(r"<[^>]+>", " ", "\n".join(str(v) for v in shown))
    text = re.sub(r"\\(.)", r"\1", text).replace("**", "").replace("&#x27;", "'").replace("\u2060", "")  # Markdown escapes, bold
    assert verdict.contradictions(text, result) == []
    assert verdict.verdict(result).how_sure.replace("**", "") in text


def test_results_show_the_ranking_of_a_running_job_and_the_whole_result_once_it_ends(tiny):
    """A running job whose ranking and diagnosis are stored ahead (its partial
    result) and whose whole result is not: Results shows the verdict, the
    ranking and the diagnoses from it, marked, with "computing…" and the job's
    progress in the paper's section; once the run ends, the whole result."""
    import subprocess
    import sys

    from dowsing.presentation import charts, report, verdict
    from dowsing.pipelines.analysis import analyze
    from dowsing.config import AnalysisConfig
    from dowsing.domains import Domain
    from dowsing.background.jobs import JobRequest, JobState, default_runner, now_iso, request_summary, result_summary

    domains = [Domain(name, tuple(f"{name} fact number {i} holds here." for i in range(4)))
               for name in ("Optics", "Geology", "Botany")]
    config = AnalysisConfig()
    handed = []
    whole = analyze(tiny, domains, config, on_ranking=handed.append)  # the engine hands its ranking ahead
    early = handed[0]
    assert "partial" in early.extras and all(d.mean is None for d in early.domains)
    runner = default_runner()
    request = JobRequest(model_id=tiny, domains=domains, config=config, domain_set_name="Running set")
    job_id = request.job_id()
    assert runner.result(job_id) is None
    # A live process that the runner takes for this job's worker (its command line names both), so the job
    # stays "running" for as long as the test needs; the state and the partial file are written as the worker
    # writes them, through the job store.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "dowsing.background.worker", job_id])
    try:
        stamp = now_iso()
        runner.store.put(JobState(job_id=job_id, status="running", stage="solve", fraction=0.62,
                                  message="domain 2 of 3 solved", pid=stand_in.pid, created_at=stamp,
                                  started_at=stamp, request=request.to_dict(),
                                  summary=request_summary(request.to_dict()), run_id="run-1"))
        at = results_page(tiny, job_id)  # nothing handed ahead yet: the job's progress, polled
        assert any(i.value.startswith("This run is still running. Its ranking and diagnosis appear here")
                   for i in at.info)
        assert not [m for m in at.markdown if "dw-table" in m.value]

        runner.store.write_partial(job_id, "analysis", early)
        assert runner.state(job_id).status == "running" and runner.partial_result(job_id) is not None

        at = results_page(tiny, job_id)
        assert any(w.value.startswith("**The paper's quantities are still computing.**") for w in at.warning)
        found = verdict.verdict(early, esc=md_escape, strong=lambda s: f"**{s}**")
        assert any(m.value == f"### {found.headline}" for m in at.markdown)
        ranking = f"<style>{report.TABLE_CSS}</style>" + report.ranking_table_html(early, charts.result_colors(early))
        assert [m.value for m in at.markdown if "dw-table" in m.value] == [ranking]  # the ranking's; no paper table
        rows = report.diagnosis_rows(early)
        assert len(rows) == len(domains)
        for row in rows:
            assert any(md_escape(row["Diagnosis"]) in m.value for m in at.markdown), row["Diagnosis"]
        assert "The paper's concept-subspace method" in [h.value for h in at.header]
        assert any(m.value.startswith("**computing…**") for m in at.markdown)
        assert any("solve" in p.proto.text and "domain 2 of 3 solved" in p.proto.text for p in at.get("progress"))
        assert "saturation_chart" not in {c.key for c in at.get("plotly_chart")}
        assert not at.get("download_button")  # nothing to take away as if it were the whole result

        # The run ends as the worker ends it: the whole result stored under the job id, the partial file gone.
        runner.results.put(job_id, whole)
        runner.store.remove_partial(job_id, "analysis")
        runner.store.update(job_id, run_id="run-1", status="done", stage="done", fraction=1.0,
                            message="finished", finished_at=now_iso(),
                            summary=result_summary(request.to_dict(), whole))
        at.run()  # what the polling fragment's rerun of the page does
        assert not at.exception, at.exception
        assert not any("still computing" in w.value for w in at.warning)
        assert not any(m.value.startswith("**computing…**") for m in at.markdown)
        tables = "".join(m.value for m in at.markdown if "dw-table" in m.value)
        assert all(format_number(d.mean) in tables for d in whole.domains)
        assert {"Table (CSV)", "Result (JSON)", "Report (HTML)"} <= {d.label for d in at.get("download_button")}
    finally:
        stand_in.kill()
        stand_in.wait()


def pilot_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Pilot curves:"))


def test_run_page_says_which_domains_pilot_curves_come_from_cache(tiny):
    """Before Analyze the Run page says, from the stored units alone, how many
    domains' pilot curves the run computes: all of a new set, none after an
    analysis of it, and one after one fact of one domain is edited. Each
    count is `pilot_status` computed here on its own."""
    from dowsing import workspace
    from dowsing.pipelines.analysis import pilot_status
    from dowsing.config import AnalysisConfig

    before = workspace.active_set()
    raw = [{"name": name, "facts": [f"In {name.lower()}, fact {i} is stated plainly." for i in range(4)]}
           for name in ("Chemistry", "Zoology", "Music")]
    workspace.save_set_raw("Pilots", raw)
    workspace.set_active("Pilots")
    try:
        status = pilot_status(tiny, raw, AnalysisConfig())
        assert (status["computed"], status["reused"]) == (["Chemistry", "Zoology", "Music"], [])
        at = make_app(tiny, "pages/run.py")
        assert "**all 3 domains new, none from cache**" in pilot_caption(at)

        button(at, "Analyze").click()
        at.run()
        run_until_done(at)
        status = pilot_status(tiny, raw, AnalysisConfig())
        assert status["message"] == "all 3 domains from cache" and status["computed"] == []
        at = make_app(tiny, "pages/run.py")
        assert f"**{status['message']}**" in pilot_caption(at)

        edited = [dict(d, facts=list(d["facts"])) for d in raw]
        edited[1]["facts"][2] = "In zoology, a whale is a mammal."
        workspace.save_set_raw("Pilots", edited)
        status = pilot_status(tiny, edited, AnalysisConfig())
        assert (status["computed"], status["reused"]) == (["Zoology"], ["Chemistry", "Music"])
        assert status["message"] == "1 of 3 domains recomputed, 2 from cache"
        at = make_app(tiny, "pages/run.py")
        assert f"**{status['message']}** (to compute: Zoology)." in pilot_caption(at)
    finally:
        workspace.set_active(before)
