"""End to end in a real browser: `streamlit run app.py` on a free localhost port,
driven by Debian's Chromium through Playwright. Edit a fact, pick the tiny
model, run an analysis, see the table and both charts, reload, still see them.
Screenshots go to test-output/."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seed_embedded_model(cache: Path) -> None:
    """Give the app an already converted embedded model, so the first page
    load (which loads the default model) takes a second instead of a ~40 s
    conversion in the middle of the test. Converts once into the repo cache
    on a fresh checkout (the CLI test reuses it), then copies it."""
    from dowsing.models import converted_dir, embedded_gguf_path

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
    port = _free_port()
    env = dict(os.environ, DOWSING_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(cache / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("streamlit did not start:\n" + (cache / "streamlit.log").read_text()[-3000:])
        time.sleep(0.3)
    yield {"url": url, "cache": cache, "tiny": str(tiny_gpt2_dir)}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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


def test_edit_run_results_and_reload(server, page):
    page.goto(server["url"])
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
    page.get_by_text("Finished.").wait_for(timeout=180_000)
    page.screenshot(path=str(SHOTS / "3-run-done.png"), full_page=True)

    # Results: the table and both charts.
    page.get_by_role("link", name="See the results").click()
    _check_results(page)
    page.screenshot(path=str(SHOTS / "4-results.png"), full_page=True)
    assert "job=" in page.url

    # A refresh shows the same result.
    page.reload()
    _check_results(page)
    page.screenshot(path=str(SHOTS / "5-results-after-reload.png"), full_page=True)


def _check_results(page) -> None:
    page.get_by_role("heading", name="Results").wait_for()
    table = page.locator("table.dw-table").first
    table.wait_for()
    rows = table.locator("tbody tr")
    assert rows.count() == 2
    text = table.inner_text()
    assert "Physics" in text and "Astronomy" in text and "×10" in text
    page.locator("[data-testid=stPlotlyChart] .js-plotly-plot").nth(1).wait_for()
    assert page.locator("[data-testid=stPlotlyChart] .js-plotly-plot").count() >= 2  # donut, curves, then more
    charts = page.locator("[data-testid=stPlotlyChart] .js-plotly-plot")
    assert charts.nth(0).locator(".pielayer .slice").count() == 2  # the donut, one slice per domain
    assert charts.nth(1).locator(".scatterlayer .trace").count() >= 2  # the saturation curves
    assert "μ(n)" in charts.nth(1).inner_text()
