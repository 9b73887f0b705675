"""End to end in a real browser: `streamlit run app.py` on a free localhost port,
driven by Debian's Chromium through Playwright. A newcomer's first ten
minutes: the start page, edit a fact (and see it saved), pick the tiny model,
run an analysis (and see it running), read the Results (the verdict, every
diagnosis in full, no sentence against a diagnosis, nothing wider than the
page), reload, open Plan and Benchmark (the shipped leaderboard).
Screenshots go to test-output/."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamlit_server

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-output"
SMALL_CSV = """domain,fact
Physics,Light travels faster than sound.
Physics,A force changes the motion of a body.
Physics,Energy is conserved in a closed system.
Astronomy,The Moon orbits the Earth.
Astronomy,The Sun is a star.
Astronomy,Jupiter is the largest planet of the Solar System.
"""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium; .ci/run does it)",
)


def _seed_embedded_model(cache: Path) -> None:
    """Give the app an already converted embedded model, so the first page
    load (which loads the default model) takes a second instead of a 10-15 s
    conversion in the middle of the test. Converts once into the repo cache
    on a fresh checkout (the CLI test reuses it), then copies it."""
    from dowsing.access.models import converted_dir, embedded_gguf_path

    saved = os.environ.get("DOWSING_CACHE")
    os.environ["DOWSING_CACHE"] = str(REPO / "cache")
    try:
        folder = converted_dir(embedded_gguf_path())
    finally:
        if saved is None:
            os.environ.pop("DOWSING_CACHE")
        else:
            os.environ["DOWSING_CACHE"] = saved
    shutil.copytree(folder, cache / "models" / folder.name)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gpt2_dir, converted_embedded_model):
    cache = tmp_path_factory.mktemp("browser-cache")
    _seed_embedded_model(cache)
    # cold workers: a warm spare runs the tiny model's analysis in half a second, before the page's first look,
    # and this test reads the progress the page shows while a job runs (the spare has tests of its own)
    env = dict(os.environ, DOWSING_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               DOWSING_SPARE_WORKER="0")
    proc, url = streamlit_server.start(REPO / "app.py", REPO, env, cache / "streamlit.log")
    yield {"url": url, "cache": cache, "tiny": str(tiny_gpt2_dir)}
    streamlit_server.stop(proc)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1800})
        tab.set_default_timeout(60_000)
        yield tab
        browser.close()


def _idle(page, timeout_s: float = 60) -> None:
    """Wait until the script run ends (the "Running..." status widget is gone)."""
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=timeout_s * 1000)


def _saved_facts(cache: Path) -> list[dict]:
    code = ("import json; from dowsing import workspace; "
            "print(json.dumps(workspace.load_set_raw(workspace.active_set())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, DOWSING_CACHE=str(cache)),
                         capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout)


def _job_result(cache: Path, job_id: str) -> dict:
    """The finished analysis `job_id` as the app's job store holds it."""
    import json

    code = ("import sys; from dowsing.background.jobs import default_runner; "
            "print(default_runner().result(sys.argv[1]).to_json())")
    out = subprocess.run([sys.executable, "-c", code, job_id], cwd=REPO,
                         env=dict(os.environ, DOWSING_CACHE=str(cache)), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _fits_the_page(page) -> None:
    """Nothing wider than the page: the document, the main column and every table."""
    widths = page.evaluate("""() => {
        const main = document.querySelector('[data-testid=stMain]');
        return {doc: [document.documentElement.scrollWidth, document.documentElement.clientWidth],
                main: main ? [main.scrollWidth, main.clientWidth] : [0, 0],
                tables: [...document.querySelectorAll('.dw-scroll')].map(e => [e.scrollWidth, e.clientWidth])};
    }""")
    assert widths["doc"][0] <= widths["doc"][1], widths
    assert widths["main"][0] <= widths["main"][1], widths
    assert all(scroll <= client + 1 for scroll, client in widths["tables"]), widths


def test_edit_run_results_and_reload(server, page):
    page.goto(server["url"])
    # The start page: what dowsing answers, the three steps with the run's time before any click.
    page.get_by_role("heading", name="Which data should you collect next?").wait_for()
    page.get_by_text("Why you can trust the ranking").wait_for()
    _idle(page, 120)
    start = page.locator("[data-testid=stMain]").inner_text()
    assert "1 · Domains" in start and "2 · Run" in start and "3 · Results" in start
    assert re.search(r"One analysis of the active set: (about \d+ min|[\d.]+ (s|min))", start), start
    assert "ρ = 0.88" in start
    page.screenshot(path=str(SHOTS / "0-start.png"), full_page=True)
    page.get_by_role("link", name="Edit domains").click()
    page.get_by_role("heading", name="Domains").wait_for()
    _idle(page, 120)

    # A small domain set keeps the run short: paste it as CSV.
    page.get_by_text("Paste JSON or CSV instead").click()
    page.get_by_label("Domains as JSON or CSV").fill(SMALL_CSV)
    page.get_by_role("button", name="Import pasted text").click()
    page.get_by_text("Imported 2 domains").wait_for()
    _idle(page)

    # Edit the first fact of the first domain in its table (a canvas grid):
    # select the cell, type over it, Enter commits.
    new_fact = "Light travels about a million times faster than sound."
    try:
        page.locator("[data-testid=stDataFrame]").nth(1).wait_for()
    except Exception:
        page.screenshot(path=str(SHOTS / "failed-editors.png"), full_page=True)
        raise
    editor = page.locator("[data-testid=stDataFrame]").first
    editor.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    box = editor.bounding_box()
    page.mouse.dblclick(box["x"] + 200, box["y"] + 35 + 17)
    overlay = page.locator("textarea.gdg-input")
    overlay.wait_for()
    overlay.fill(new_fact)
    overlay.press("Enter")
    _idle(page)
    deadline = time.monotonic() + 20
    while _saved_facts(server["cache"])[0]["facts"][0] != new_fact:
        if time.monotonic() > deadline:
            page.screenshot(path=str(SHOTS / "failed-edit.png"), full_page=True)
            raise AssertionError(_saved_facts(server["cache"]))
        time.sleep(0.3)
    page.get_by_text(re.compile(r"Saved at \d\d:\d\d:\d\d")).wait_for()  # the edit says it was saved
    page.screenshot(path=str(SHOTS / "1-domains.png"), full_page=True)

    # Pick the tiny model by typing its folder into the model picker.
    sidebar = page.locator("[data-testid=stSidebar]")
    sidebar.get_by_text("Local model folder").click()
    field = sidebar.get_by_role("textbox", name="Local model folder")
    field.fill(server["tiny"])
    field.press("Enter")
    sidebar.get_by_text("GPT2LMHeadModel").wait_for(timeout=120_000)

    # Run it.
    sidebar.get_by_role("link", name="Run", exact=True).click()
    page.get_by_role("heading", name="Run an analysis").wait_for()
    page.get_by_role("button", name="Analyze").click()
    page.locator("[data-testid=stProgress]").first.wait_for()
    page.screenshot(path=str(SHOTS / "2-run-progress.png"), full_page=True)
    # While it runs, the job says so (not "queued"), and no progress line repeats its stage.
    seen = []
    deadline = time.monotonic() + 180
    while not page.get_by_text("Finished.").count():
        assert time.monotonic() < deadline, seen[-5:]
        bars = page.locator("[data-testid=stProgress]")
        if bars.count():
            try:
                seen.append(bars.first.inner_text(timeout=1000))
            except Exception:  # the bar went between count() and inner_text()
                pass
        page.wait_for_timeout(200)
    assert any(line.startswith("running") for line in seen), seen
    assert not any("loading model — loading model" in line for line in seen), seen
    _idle(page)
    page.wait_for_timeout(2500)  # the History's own poll
    history = page.locator("[data-testid=stMain]").inner_text().split("History")[-1]
    assert "running" not in history and "top: " in history, history
    page.screenshot(path=str(SHOTS / "3-run-done.png"), full_page=True)

    # Results: the verdict, the tables and the charts, one story.
    page.get_by_role("link", name="See the results").click()
    _check_results(page, server["cache"])
    page.screenshot(path=str(SHOTS / "4-results.png"), full_page=True)
    assert "job=" in page.url

    # A refresh shows the same result.
    page.reload()
    _check_results(page, server["cache"])
    page.screenshot(path=str(SHOTS / "5-results-after-reload.png"), full_page=True)

    # Plan and Benchmark open; a fresh install's Benchmark shows the shipped leaderboard.
    sidebar = page.locator("[data-testid=stSidebar]")
    sidebar.get_by_role("link", name="Plan", exact=True).click()
    page.get_by_role("heading", name=re.compile("plan", re.I)).first.wait_for()
    _idle(page, 120)
    _fits_the_page(page)
    page.screenshot(path=str(SHOTS / "6-plan.png"), full_page=True)
    sidebar.get_by_role("link", name="Benchmark", exact=True).click()
    page.get_by_role("heading", name="The shipped benchmark").wait_for()
    page.get_by_text("Shipped with dowsing, not run on this machine").wait_for()
    board = page.locator("[data-testid=stDataFrame]").last
    board.wait_for()
    _idle(page, 120)
    _fits_the_page(page)
    page.screenshot(path=str(SHOTS / "7-benchmark.png"), full_page=True)


def _check_results(page, cache: Path) -> None:
    from dowsing.presentation import verdict
    from dowsing.result import Result

    page.get_by_role("heading", name="Results").wait_for()
    table = page.locator("table.dw-table").first
    table.wait_for()
    _idle(page, 120)
    rows = table.locator("tbody tr")
    assert rows.count() == 2
    text = table.inner_text()
    assert "Physics" in text and "Astronomy" in text and "×10" not in text and "(nats)" in text
    page.locator("[data-testid=stPlotlyChart] .js-plotly-plot").nth(1).wait_for()
    charts = page.locator("[data-testid=stPlotlyChart] .js-plotly-plot")
    assert charts.count() >= 2  # donut, pilot curves or rank stability, the paper's curves, then more
    assert charts.nth(0).locator(".pielayer .slice").count() == 2  # the donut, one slice per domain
    texts = [charts.nth(k).inner_text() for k in range(charts.count())]
    assert any("μ(n)" in t for t in texts)  # the paper's saturation curves, in its section

    job = re.search(r"job=([^&]+)", page.url).group(1)
    result = Result.from_dict(_job_result(cache, job))
    # (without the invisible word joiners that escaping puts around colons in user-derived text)
    main = page.locator("[data-testid=stMain]").inner_text().replace("\u2060", "")
    # The verdict first, in plain words; the paper's section after the ranking.
    found = verdict.verdict(result)
    assert found.headline in main and main.index(found.headline) < main.index("The ranking")
    assert main.index("The ranking") < main.index("The paper's concept-subspace method")
    # Every diagnosis in full, on screen.
    for row in (result.extras or {}).get("diagnosis") or []:
        assert " ".join(row["sentence"].split()) in " ".join(main.split()), row["sentence"]
    # No sentence about a domain against its diagnosis, unless it names its method.
    assert verdict.contradictions(main, result) == []
    _fits_the_page(page)
