"""A run as the app's user sees it, in a real browser: `streamlit run app.py`
on a free localhost port (its own cache folder, the warm spare worker on, as
a fresh app has it), driven by Debian's Chromium through Playwright, with
the default domain set and the embedded default model.

Each step opens the Run page, waits until the page is idle (its script run
has ended) and the spare worker is warm (its CPU time has stopped growing
for a second, at most --warm-s), then clicks "Analyze". From that click:

  accepted_s   the Run page shows the job ("Current run") and the URL holds
               its id; the benchmark then clicks "Results" in the sidebar,
               as a user following the job would;
  ranking_s    the Results page shows the ranking table (table.dw-table, not
               stale) with one row per domain of the run and every domain's
               name in it: the partial result, under the "computing…" note;
  whole_s      the whole result is on the Results page: the "computing…"
               note is gone and "Facts that move each domain most" is shown.

Beside them, read from the job's store (not what the user sees): when the
job's partial result existed (job_ranking_s) and when its state was done
(job_done_s), polled as often as the page, so the lag between the job and
the page is on record. Every time includes the page's own polling (about a
second) and the browser's rendering; the browser and the server share the
machine's cores with the worker, as they do for a user. A screenshot of
the Results page after each step goes to benchmarks/out/.

Three steps, each timed so: the default set uncached; after editing one fact
of one domain (`bench_live_edit.edited`); after adding a fifth domain
(`bench_live_edit.fifth_domain`). Both edits are written to the active set
through `dowsing.workspace.save_set_raw`, which is what the Domains page
calls when it saves (its canvas grid is not driven here), and the Run page
is then opened again, as after an edit. The converted model is borrowed from
--models-from (default: the repository's cache), so its one-time conversion
is not timed.

  python benchmarks/bench_browser_run.py [--out browser-run.json] [--warm-s 60]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))  # the browser tests' server start, shared

import streamlit_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
POLL_MS = 250  # a user does not query the page ten times a second: the probe itself takes CPU from the run
STEP_TIMEOUT_S = 600  # a step that takes longer has hung: the uncached run is about a minute on two cores

# What the Results page shows, from the live (not stale) elements of the main column.
PROBE = """(names) => {
  const main = document.querySelector('[data-testid=stMain]');
  if (!main) return {ranking: false, computing: false, whole: false};
  const live = el => !el.closest('[data-stale="true"]');
  const clean = s => s.replace(/\\u2060/g, '');
  const onResults = [...main.querySelectorAll('h1')].filter(live).some(h => clean(h.innerText).trim().startsWith('Results'));
  const table = [...main.querySelectorAll('table.dw-table')].filter(live)[0];
  const ranking = onResults && !!table && table.querySelectorAll('tbody tr').length === names.length
    && names.every(n => clean(table.innerText).includes(n));
  const text = clean([...main.querySelectorAll('[data-testid=stElementContainer]')].filter(live)
    .map(e => e.innerText).join('\\n'));
  const computing = text.includes('computing…') || text.includes('still computing');
  const inView = !!table && table.getBoundingClientRect().top < window.innerHeight;
  return {ranking, computing, inView,
          whole: ranking && !computing && text.includes('Facts that move each domain most')};
}"""


def start_server(cache: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, DOWSING_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("DOWSING_SPARE_WORKER", None)  # the default: a warm spare
    return streamlit_server.start(REPO / "app.py", REPO, env, cache / "streamlit.log")


def idle(page, timeout_s: float = 180) -> None:
    """Wait until the script run ends (the "Running..." status widget is gone)."""
    page.wait_for_timeout(300)
    page.wait_for_selector("[data-testid=stStatusWidget]", state="detached", timeout=timeout_s * 1000)


def cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def spare_pid(server_pid: int) -> int | None:
    """The server's spare worker: a child running the worker with the spare flag."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"dowsing.background.worker" in argv and b"--spare" in argv:
            return int(entry.name)
    return None


def wait_for_spare(server_pid: int, limit_s: float) -> dict:
    """Until the spare has finished its imports (its CPU time stops growing:
    it then blocks on its stdin), at most limit_s."""
    t0 = time.perf_counter()
    last, pid = None, None
    while time.perf_counter() - t0 < limit_s:
        pid = spare_pid(server_pid)
        ticks = cpu_ticks(pid) if pid is not None else None
        if ticks is not None and ticks == last:
            return {"spare_warm_wait_s": round(time.perf_counter() - t0, 1), "spare_cpu_s": ticks / os.sysconf("SC_CLK_TCK")}
        last = ticks
        time.sleep(1.0)
    return {"spare_warm_wait_s": round(time.perf_counter() - t0, 1), "spare_found": pid is not None,
            "spare_warm": False}


def open_run_page(page) -> str:
    """The sidebar's Run link; returns the page's pilot-curve line (what the run would recompute)."""
    page.locator("[data-testid=stSidebar]").get_by_role("link", name="Run", exact=True).click()
    page.get_by_role("heading", name="Run an analysis").wait_for()
    idle(page)
    text = page.locator("[data-testid=stMain]").inner_text()
    return next((line.strip() for line in text.splitlines() if line.startswith("Pilot curves:")), "")


def timed_step(page, store, server_pid: int, names: list[str], previous_job: str | None, warm_s: float) -> dict:
    step = {"run_page_says": open_run_page(page)}
    step.update(wait_for_spare(server_pid, warm_s))
    step["load_average_before"] = round(os.getloadavg()[0], 2)
    button = page.get_by_role("button", name="Analyze")
    t0 = time.perf_counter()
    button.click()
    # the job is accepted once the Run page shows it and the URL holds its id
    job_id = None
    while job_id is None:
        url_job = page.evaluate("() => new URLSearchParams(location.search).get('job')")
        if url_job and url_job != previous_job and page.get_by_text("Current run").count():
            job_id = url_job
        elif time.perf_counter() - t0 > 60:
            raise RuntimeError("the Run page did not show the new job within a minute")
        else:
            page.wait_for_timeout(POLL_MS)
    step["accepted_s"] = round(time.perf_counter() - t0, 2)
    step["job"] = job_id
    page.locator("[data-testid=stSidebar]").get_by_role("link", name="Results", exact=True).click()

    partial_file = store.partial_path(job_id, "analysis")
    seen = {}
    while "whole_s" not in seen:
        now = time.perf_counter() - t0
        if now > STEP_TIMEOUT_S:
            page.screenshot(path=str(HERE / "out" / "browser-run-timeout.png"), full_page=True)
            raise RuntimeError(f"no whole result on screen after {STEP_TIMEOUT_S} s: {seen}")
        if "job_done_s" not in seen:
            state = store.get(job_id)
            if state is not None and state.status in ("failed", "cancelled"):
                raise RuntimeError(f"the run ended {state.status}: {state.error}")
            done = state is not None and state.status == "done"
            if "job_ranking_s" not in seen and (done or partial_file.exists()):
                seen["job_ranking_s"] = round(now, 2)
            if done:
                seen["job_done_s"] = round(now, 2)
        try:
            shown = page.evaluate(PROBE, names)
        except Exception:  # the page navigated in the middle of the probe
            shown = {}
        now = time.perf_counter() - t0
        if shown.get("ranking") and "ranking_s" not in seen:
            seen["ranking_s"] = round(now, 2)
            seen["ranking_in_view"] = shown["inView"]
            seen["ranking_shown_as_partial"] = shown["computing"]
        if shown.get("whole"):
            seen["whole_s"] = round(now, 2)
        page.wait_for_timeout(POLL_MS)
    step.update(seen)
    step["load_average"] = round(os.getloadavg()[0], 2)
    idle(page)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-from", default=None, help="a cache folder whose models/ is borrowed")
    parser.add_argument("--warm-s", type=float, default=60.0,
                        help="the longest the spare worker is given to warm up before each click")
    parser.add_argument("--out", default="browser-run.json", help="file name under benchmarks/out/")
    parser.add_argument("--headed", action="store_true", help="show the browser window")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    models = Path(args.models_from or os.environ.get("DOWSING_CACHE") or REPO / "cache") / "models"
    (HERE / "out").mkdir(exist_ok=True)
    report = {"waited_for": {
        "before_click": "the Run page idle (no script run), then the spare worker's CPU time unchanged over 1 s",
        "ranking_on_screen": "Results page (opened from the sidebar once the Run page shows the job): the ranking "
                             "table with one row per domain, every name in it",
        "whole_result_on_screen": "Results page: no 'computing…' note, 'Facts that move each domain most' shown"},
        "poll_ms": POLL_MS, "load_average_at_start": round(os.getloadavg()[0], 2), "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        if models.exists():
            os.symlink(models, cache / "models")
        os.environ["DOWSING_CACHE"] = str(cache)  # the edits below go to the server's workspace
        from bench_live_edit import edited, fifth_domain
        from playwright.sync_api import sync_playwright

        from dowsing import workspace
        from dowsing.background.jobs import JobStore
        from dowsing.domains import default_domains

        proc, url = start_server(cache)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=not args.headed,
                                             args=["--no-sandbox", "--disable-gpu",
                                                   "--disable-background-networking"])
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(180_000)
                t_open = time.perf_counter()
                page.goto(url)
                page.get_by_role("heading", name="Which data should you collect next?").wait_for()
                idle(page)  # the first look loads the default model into the server
                report["start_page_idle_s"] = round(time.perf_counter() - t_open, 1)
                set_name = workspace.active_set()
                domains = default_domains()
                stored = workspace.load_set_raw(set_name)
                if [(d["name"], list(d["facts"])) for d in stored] != [(d.name, list(d.facts)) for d in domains]:
                    raise RuntimeError(f"the fresh app's active set {set_name!r} is not the default domain set")
                one_edit = edited(domains, 1)
                store = JobStore()  # the server's, from DOWSING_CACHE
                job = None
                for name, doms in (("uncached", domains), ("one_fact_edited", one_edit),
                                   ("fifth_domain_added", fifth_domain(one_edit))):
                    if name != "uncached":  # what the Domains page's save does
                        workspace.save_set_raw(set_name, [{"name": d.name, "facts": list(d.facts)} for d in doms])
                    step = timed_step(page, store, proc.pid,
                                      [d.name for d in doms], job, args.warm_s)
                    job = step["job"]
                    report["steps"][name] = step
                    print(f"{name}: ranking on screen after {step.get('ranking_s')} s, whole result after "
                          f"{step['whole_s']} s (job: ranking {step.get('job_ranking_s')} s, done "
                          f"{step.get('job_done_s')} s; load {step['load_average_before']} → {step['load_average']}; "
                          f"spare waited {step['spare_warm_wait_s']} s)", flush=True)
                    page.screenshot(path=str(HERE / "out" / f"browser-run-{name}.png"), full_page=True)
                browser.close()
        finally:
            streamlit_server.stop(proc)
    (HERE / "out" / args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
