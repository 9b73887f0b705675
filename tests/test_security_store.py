"""Safe by default, for the stores, the jobs and the network: ids from a link
name no file, the cache never unpickles, a damaged store is moved aside and
rebuilt, the cache is private, workers are reaped, the job queue is bounded
and the app listens on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import os
import pathlib
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import diskcache
import pytest

from dowsing.storage import caches
from dowsing.domains import Domain
from dowsing.background.jobs import MAX_ACTIVE_JOBS, JobRequest, JobState, JobStore, LocalJobRunner, QueueFull, now_iso
from tiny_models import stand_in_result

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
HOSTILE_IDS = ["/tmp/victim", "../../victim", "..", "a" * 63, "A" * 64, "a" * 65, "job:" + "a" * 60,
               "a" * 64 + "/../x", "a" * 64 + "\n", "", None, 7]


class Marker:
    """Unpickling this creates `path`: proof that a row was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DOWSING_CACHE", str(folder))
    caches.damage_notes()  # forget notes of earlier tests
    return folder


@pytest.fixture
def runner(cache):
    jobs = LocalJobRunner()
    yield jobs
    for state in jobs.store.all():  # never leave a worker behind
        if state.active:
            jobs.cancel(state.job_id)
    jobs.store.close()


# --- ids from a link or a form ------------------------------------------------

def test_an_id_that_is_not_a_job_id_is_never_looked_up_and_removes_nothing(runner, tmp_path):
    victim = tmp_path / "outside" / "victim.json"
    victim.parent.mkdir()
    victim.write_text("not a result")
    for kind in ("validation", "benchmark", "plan"):  # each kind's result folder exists, as after real runs
        (runner.store.root / "results" / kind).mkdir(parents=True, exist_ok=True)
    for job_id in [str(victim.with_suffix(""))] + HOSTILE_IDS:
        assert runner.state(job_id) is None
        assert runner.result(job_id) is None
        runner.cancel(job_id)
        runner.delete(job_id)
    assert victim.read_text() == "not a result"
    for job_id in [str(victim.with_suffix("")), "../../x", "a" * 63]:
        with pytest.raises(ValueError, match="No such job"):
            runner.store.result_path(job_id, "validation")
        with pytest.raises(ValueError, match="No such job"):
            runner.store.log_path(job_id)
    # a well-formed id names a file inside the folder that owns it
    good = "0" * 64
    assert runner.store.result_path(good, "validation").parent == runner.store.root / "results" / "validation"


def test_the_worker_refuses_an_id_that_is_not_a_job_id(cache):
    from dowsing.background import worker

    for job_id in ["../x", "/tmp/x", "a" * 63]:
        assert worker.main([job_id]) == 2


def app_without_model():
    """The app with no model chosen, so that no model loads after the page."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "hub"
    at.session_state["model"] = ""
    return at


def test_a_link_with_a_path_as_job_id_deletes_nothing_and_says_no_such_job(cache, tmp_path):
    import streamlit as st

    victim = tmp_path / "somewhere" / "victim.json"
    victim.parent.mkdir()
    victim.write_text("{}")
    st.cache_resource.clear()  # the job runner is cached per process: open it on this cache
    try:
        for page, param in (("pages/results.py", "job"), ("pages/validate.py", "job"),
                            ("pages/validate.py", "validation")):
            at = app_without_model()
            at.query_params[param] = str(victim.with_suffix(""))
            at.switch_page(page)
            at.run()
            assert not at.exception, at.exception
            assert victim.exists(), page
            assert any("No such job" in w.value for w in at.warning), [w.value for w in at.warning]
    finally:
        st.cache_resource.clear()


# --- the cache never unpickles ---------------------------------------------------

def test_a_pickled_job_row_is_refused_unread_and_dropped(runner, tmp_path):
    marker = tmp_path / "unpickled"
    job_id = "1" * 64
    plain = diskcache.Cache(str(runner.store.root))  # diskcache's own Disk: writes the pickle
    plain.set(JobStore.PREFIX + job_id, Marker(marker))
    plain.set(Marker(marker), "a pickled key")
    plain.close()
    assert runner.store.all() == []
    assert runner.history() == []
    assert runner.state(job_id) is None
    assert not marker.exists()
    assert runner.store.cache.get(JobStore.PREFIX + job_id) is None
    assert any("pickle" in note for note in caches.damage_notes())
    # the store still works, and a state is stored as text
    runner.store.put(JobState(job_id=job_id, status="failed"))
    assert runner.state(job_id).status == "failed"


def test_a_pickled_result_or_unit_row_is_refused_unread(cache, tmp_path):
    from dowsing.pipelines.executor import UnitStore
    from dowsing.storage.store import JsonStore, ResultStore

    marker = tmp_path / "unpickled"
    for folder, key in ((cache / "results", "k"), (cache / "plans", "k"), (cache / "units", "run/u0")):
        folder.parent.mkdir(parents=True, exist_ok=True)
        plain = diskcache.Cache(str(folder))
        plain.set(key, Marker(marker))
        plain.close()
    assert ResultStore().get("k") is None
    assert JsonStore("plans").get("k") is None
    assert UnitStore("run").get("u0") is None
    assert not marker.exists()
    # and they still store what they store
    store = ResultStore()
    store.put("k", stand_in_result())
    assert store.get("k").domains[0].name == "Biology"


def test_the_caches_never_write_a_pickle(tmp_path):
    store = caches.DataCache(tmp_path / "store")
    for value in ({"a": 1}, [1], (1,), object()):
        with pytest.raises(TypeError, match="never a pickle"):
            store.set("k", value)
    with pytest.raises(TypeError):
        store.set(("a", "tuple"), "x")
    for value in ("text", b"bytes", 3, 2.5):
        store.set("k", value)
        assert store.get("k") == value


# --- a damaged store ---------------------------------------------------------

def _damage_header(db: Path) -> None:
    db.write_bytes(b"this is not a database" * 500)


def _damage_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for offset in range(8192, len(data) - 4096, 4096):  # every page past the first two
        data[offset:offset + 256] = b"\xff" * 256
    db.write_bytes(bytes(data))


def test_a_store_that_is_not_a_database_is_moved_aside_and_rebuilt(cache):
    from dowsing.storage.store import ResultStore

    ResultStore().put("k", stand_in_result())
    _damage_header(cache / "results" / "cache.db")
    store = ResultStore()  # opens without a traceback
    assert store.get("k") is None
    store.put("k", stand_in_result())
    assert store.get("k") is not None
    aside = [p.name for p in cache.iterdir() if p.name.startswith("results.damaged-")]
    assert len(aside) == 1
    notes = caches.damage_notes()
    assert len(notes) == 1 and "moved aside" in notes[0] and "\n" not in notes[0]


def test_a_store_damaged_while_open_is_moved_aside_on_read_and_works(cache):
    from dowsing.storage.store import ResultStore

    store = ResultStore()
    for i in range(300):
        store.put(f"k{i}", stand_in_result())
    store._cache.close()
    _damage_pages(cache / "results" / "cache.db")
    reopened = ResultStore()
    assert [reopened.get(f"k{i}") for i in range(300)] == [None] * 300  # recovered on the first damaged read
    reopened.put("k", stand_in_result())
    assert reopened.get("k") is not None
    assert any(p.name.startswith("results.damaged-") for p in cache.iterdir())
    assert caches.damage_notes()


def test_a_damaged_job_store_keeps_its_logs_and_the_runner_works(runner, cache):
    job_id = "4" * 64
    runner.store.put(JobState(job_id=job_id, status="failed", created_at=now_iso()))
    runner.store.log_path(job_id).write_text("a log")
    runner.store.close()
    _damage_header(runner.store.root / "cache.db")
    fresh = LocalJobRunner()
    assert fresh.history() == []
    assert fresh.state(job_id) is None
    assert fresh.store.log_path(job_id).read_text() == "a log"
    assert any(p.name.startswith("cache.damaged-") for p in fresh.store.root.iterdir())
    fresh.store.put(JobState(job_id=job_id, status="failed"))
    assert fresh.state(job_id).status == "failed"
    fresh.store.close()


def test_a_page_over_a_damaged_store_says_so_and_does_not_crash(cache):
    import streamlit as st

    jobs = JobStore()
    jobs.put(JobState(job_id="5" * 64, status="failed"))
    jobs.close()
    _damage_header(cache / "jobs" / "cache.db")
    st.cache_resource.clear()
    try:
        at = app_without_model()
        at.switch_page("pages/results.py")
        at.run()
        assert not at.exception, at.exception
        at.run()  # the note shows on the run after the one that found the damage
        assert any("moved aside" in w.value for w in at.warning), [w.value for w in at.warning]
    finally:
        st.cache_resource.clear()


# --- a private cache -------------------------------------------------------------

def test_the_cache_folder_stores_and_logs_are_private(cache, runner):
    from dowsing.paths import cache_dir
    from dowsing.storage.store import ResultStore

    os.chmod(cache, 0o755)  # as a fresh checkout's cache/ is
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700
    ResultStore().put("k", stand_in_result())
    for folder in (cache / "results", runner.store.root, runner.store.logs_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for db in (cache / "results" / "cache.db", runner.store.root / "cache.db"):
        assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0, db
    job_id = "6" * 64  # not in the store: the worker says so in its log and exits
    proc = runner._spawn(job_id)
    assert proc.wait(timeout=60) == 1
    assert stat.S_IMODE(runner.store.log_path(job_id).stat().st_mode) == 0o600


# --- workers and the queue ---------------------------------------------------------

def _zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            if fields[0] == "Z" and fields[1] == str(pid):
                found.append(int(entry))
    return found


def test_a_finished_worker_is_reaped(runner, monkeypatch, tiny_gpt2_dir):
    """A worker that wrote its final state and exited must not stay <defunct>
    under the app's process once the app looks at its jobs again."""
    def spawn_quick_worker(job_id):
        return subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)

    monkeypatch.setattr(runner, "_spawn", spawn_quick_worker)
    request = JobRequest(model_id=str(tiny_gpt2_dir), domains=[Domain("A", ("One fact.", "Two facts."))])
    job_id = runner.submit(request)
    pid = runner._procs[job_id].pid
    runner.store.update(job_id, status="cancelled")  # what the worker writes before it exits
    deadline = time.monotonic() + 30
    while pid not in _zombies_of(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid in _zombies_of(os.getpid())
    runner.history()
    assert pid not in _zombies_of(os.getpid())


def test_a_submit_past_the_queue_limit_is_refused_and_starts_nothing(runner, monkeypatch, tiny_gpt2_dir):
    def no_spawn(job_id):
        raise AssertionError("no worker may start past the queue limit")

    monkeypatch.setattr(runner, "_spawn", no_spawn)
    for i in range(MAX_ACTIVE_JOBS):  # queued moments ago: live until START_TIMEOUT_S
        runner.store.put(JobState(job_id=f"{i:064x}", status="queued", created_at=now_iso()))
    request = JobRequest(model_id=str(tiny_gpt2_dir), domains=[Domain("A", ("One fact.", "Two facts."))])
    with pytest.raises(QueueFull, match=f"most this machine takes \\({MAX_ACTIVE_JOBS}\\)"):
        runner.submit(request)
    assert runner.state(request.job_id()) is None
    assert isinstance(QueueFull("x"), ValueError)  # the pages show a ValueError's message
    for i in range(MAX_ACTIVE_JOBS):  # no workers to cancel: they never started
        runner.store.delete(f"{i:064x}")


# --- the network -------------------------------------------------------------------

def test_make_run_and_the_config_bind_to_localhost_unless_told():
    def make_run(*args):
        out = subprocess.run(["make", "-n", "run", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return next(line for line in out.stdout.splitlines() if "streamlit run" in line)

    assert "--server.address 127.0.0.1" in make_run()
    assert "--server.address 0.0.0.0" in make_run("HOST=0.0.0.0")
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"


def test_tables_export_only_through_the_apps_neutralising_csv_buttons():
    """A dataframe's built-in CSV download and copy write cells as they are,
    so a hostile domain name would reach a spreadsheet as a formula: the
    config turns them off, and the app's own CSV neutralises such cells."""
    from dowsing.domains import Domain, domains_to_csv

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["disableDataExport"] is True
    import csv
    import io

    rows = list(csv.reader(io.StringIO(domains_to_csv([Domain("=HYPERLINK(\"http://x\")", ("a fact",))]))))
    assert rows[1][0] == "'=HYPERLINK(\"http://x\")"  # text to a spreadsheet, not a formula


def test_with_a_login_configured_nothing_shows_before_the_visitor_logs_in(cache):
    at = app_without_model()
    at.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x",
                          "client_id": "x", "client_secret": "x",
                          "server_metadata_url": "https://example.invalid/.well-known/openid-configuration"}
    at.switch_page("pages/results.py")
    at.run()
    assert not at.exception, at.exception
    assert [b.label for b in at.button] == ["Log in"]
    assert [t.value for t in at.title] == ["Data dowsing"]
    open_app = app_without_model()  # without a login configured the app opens as before
    open_app.switch_page("pages/results.py")
    open_app.run()
    assert [t.value for t in open_app.title] == ["Results"]


# --- clearing the results ---------------------------------------------------------

def test_clear_results_empties_the_result_stores_but_never_the_domains_or_models(cache, runner):
    from dowsing import workspace
    from dowsing.pipelines.executor import UnitStore
    from dowsing.background.jobs import clear_results
    from dowsing.storage.store import JsonStore, ResultStore

    results, units, plans = ResultStore(), UnitStore("run"), JsonStore("plans")  # open, as in a running app
    domain_units = JsonStore("domain_units")
    results.put("k", stand_in_result())
    units.put("u0", {"w": 1})
    plans.put("p", {"a": 1})
    domain_units.put("d", {"drop": [0.1]})
    job_id = "7" * 64
    runner.store.put(JobState(job_id=job_id, status="done", created_at=now_iso()))
    runner.store.log_path(job_id).write_text("a log")
    kept = runner.store.result_path(job_id, "validation")
    kept.parent.mkdir(parents=True)
    kept.write_text("{}")
    sets = workspace.Workspace()
    sets_before = sorted(p.name for p in sets.sets_dir.iterdir())
    model = cache / "models" / "m" / "config.json"
    model.parent.mkdir(parents=True)
    model.write_text("{}")

    running = "8" * 64
    runner.store.put(JobState(job_id=running, status="queued", created_at=now_iso()))
    with pytest.raises(ValueError, match="1 job queued or running"):
        clear_results()
    assert results.get("k") is not None
    runner.store.delete(running)

    removed = clear_results()
    assert removed["entries"] == 4 and removed["jobs"] == 1
    assert results.get("k") is None and units.get("u0") is None and plans.get("p") is None
    assert domain_units.get("d") is None
    assert ResultStore().get("k") is None
    assert not kept.exists() and not runner.store.log_path(job_id).exists()
    assert runner.store.get(job_id) is None
    assert sorted(p.name for p in workspace.Workspace().sets_dir.iterdir()) == sets_before and sets_before
    assert model.read_text() == "{}"
    results.put("k", stand_in_result())  # the stores go on working
    assert results.get("k") is not None


def test_the_run_page_shows_the_cache_size_and_clears_results_but_not_the_domains(cache, runner):
    import streamlit as st

    from dowsing import workspace
    from dowsing.background.jobs import cache_usage
    from dowsing.storage.store import JsonStore, ResultStore

    st.cache_resource.clear()  # the app's job runner, pointed at this test's cache
    ResultStore().put("k", stand_in_result())
    JsonStore("plans").put("p", {"a": 1})
    job_id = "6" * 64
    runner.store.put(JobState(job_id=job_id, status="done", created_at=now_iso()))
    sets_before = workspace.list_sets()

    def by_hand() -> int:  # counted independently: every file under the cache but the kept folders
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and not p.is_symlink()
                   and p.relative_to(cache).parts[0] not in ("workspace", "models", "estimates"))

    assert cache_usage()["results"] == by_hand() > 0

    at = app_without_model()
    at.run()
    at.switch_page("pages/run.py")
    at.run()
    assert not at.exception, at.exception
    caption = next(c.value for c in at.caption if "Computed results" in c.value)
    shown_mb = float(re.search(r"\*\*([0-9.,]+) MB\*\*", caption).group(1).replace(",", ""))
    # SQLite folds its write-ahead log into the store as the page opens and closes it: the size moves a little
    assert shown_mb == pytest.approx(by_hand() / 1e6, abs=0.15)
    next(b for b in at.button if b.label == "Clear results").click()
    at.run()
    assert not at.exception, at.exception
    assert any("Cleared" in s.value for s in at.success), [s.value for s in at.success]
    assert ResultStore().get("k") is None and JsonStore("plans").get("p") is None
    assert runner.store.get(job_id) is None
    assert workspace.list_sets() == sets_before and sets_before
    st.cache_resource.clear()
