"""Hostile inputs against the app and the CLI, from the outside.

Each case feeds one hostile value the way an attacker or a damaged disk would
(a crafted link, a domain set with Markdown in it, a formula cell, an
oversized file, a corrupt or pickled cache row) and checks what happened, not
how the code decided it: a file outside the cache still exists, a marker file
a pickle would create was not created, the HTML that Markdown renders to holds
no image or link, the CLI exited 2 with one line and wrote nothing. The probe
also checks that no file outside its own cache folder changed.

    .venv/bin/python benchmarks/probe_hostile.py          # prints a table, exit 1 if any case failed

tests/test_hostile_probe.py runs the same cases.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
BEACON = "127.0.0.1:9/beacon"  # a closed port: a fetch would go nowhere, and its text is easy to find


@dataclass
class Outcome:
    case: str
    ok: bool
    detail: str


class Probe:
    """One sandbox: `root/cache` is the app's cache (DOWSING_CACHE), `root/outside`
    holds files nothing may touch."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.outside = root / "outside"
        self.outside.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.outside / "victim.json").write_text('{"not": "a result"}')
        model = self.outside / "model"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text('{"model_type": "gpt2"}')
        self.marker = self.outside / "pickle-ran"
        # The embedded model's converted copy, where the tests keep it: shared, so that the
        # probe does not convert it again (read-only use; the probe never writes there).
        models = REPO / "cache" / "models"
        if models.is_dir() and not (self.cache / "models").exists():
            (self.cache / "models").symlink_to(models, target_is_directory=True)

    # -- helpers ---------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ, DOWSING_CACHE=str(self.cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        env.pop("DOWSING_MODEL_ROOTS", None)
        return env

    def app(self, query: dict | None = None, page: str | None = None):
        """An AppTest of the app with these URL parameters, run once (on `page` if given)."""
        from streamlit.testing.v1 import AppTest

        at = AppTest.from_file(APP, default_timeout=60)
        for key, value in (query or {}).items():
            at.query_params[key] = value
        at.run()
        if page:
            at.switch_page(page)
            at.run()
        return at

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dowsing", *args], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)


def _digest_tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _repo_changes() -> str:
    """Untracked or modified files of the repository outside cache/ (git's own view)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if not line[3:].startswith("cache/"))


def _rendered_html(at) -> str:
    """Every Markdown-rendered text of an AppTest run, turned into HTML by the
    same Markdown parser family Streamlit's front end uses (CommonMark)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    texts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "header", "subheader"):
        for element in at.get(kind):
            value = getattr(element, "value", None) or getattr(element, "body", None)
            if isinstance(value, str):
                texts.append(value)
    for kind in ("expander", "tabs"):
        for element in at.get(kind):
            label = getattr(element, "label", None)
            if isinstance(label, str):
                texts.append(label)
    return "\n".join(md.render(t) for t in texts)


# -- the cases ---------------------------------------------------------------

def _url_id_case(name: str, param: str, page: str, value_of):
    def case(probe: Probe) -> Outcome:
        value = value_of(probe)
        at = probe.app({param: value}, page=None)
        at.switch_page(page)
        at.query_params[param] = value
        at.run()
        victim = probe.outside / "victim.json"
        ok = victim.exists() and not at.exception
        return Outcome(name, ok, "victim kept, page answered" if ok
                       else f"victim exists={victim.exists()}, exception={at.exception}")
    case.__name__ = name
    return case


URL_CASES = [
    _url_id_case("results ?job= absolute path", "job", "pages/results.py", lambda p: str(p.outside / "victim")),
    _url_id_case("results ?job= ../ path", "job", "pages/results.py",
                 lambda p: "../../../../outside/victim"),
    _url_id_case("results ?job= with a slash", "job", "pages/results.py", lambda p: "a/b/c"),
    _url_id_case("results ?job= 5000 characters", "job", "pages/results.py", lambda p: "x" * 5000),
    _url_id_case("validate ?validation= absolute path", "validation", "pages/validate.py",
                 lambda p: str(p.outside / "victim")),
    _url_id_case("benchmark ?benchmark= absolute path", "benchmark", "pages/benchmark.py",
                 lambda p: str(p.outside / "victim")),
]


def model_from_url(probe: Probe) -> Outcome:
    at = probe.app({"source": "directory", "model": str(probe.outside / "model")})
    texts = " ".join(str(getattr(e, "value", "")) for kind in ("error", "info", "warning", "markdown", "caption")
                     for e in at.sidebar.get(kind))
    source = at.session_state["source"] if "source" in at.session_state else "embedded"
    ok = source != "directory" and str(probe.outside) not in texts
    return Outcome("model folder from ?source=&model=", ok,
                   "the URL did not pick the model" if ok else f"source={source}; sidebar: {texts[:160]}")


def _set_active_domains(probe: Probe, domains: list[dict]) -> None:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing import workspace

    name = "Probe"
    if name not in workspace.list_sets():
        workspace.create_set(name, [])
    workspace.save_set_raw(name, domains)
    workspace.set_active(name)


def _markdown_case(name: str, domains: list[dict], page: str):
    def case(probe: Probe) -> Outcome:
        _set_active_domains(probe, domains)
        at = probe.app(page=page)
        html = _rendered_html(at)
        leaked = [bad for bad in ("<img", BEACON, "javascript:", "<script") if bad in html]
        ok = not leaked and not at.exception
        return Outcome(name, ok, "rendered as text" if ok else f"rendered HTML has {leaked}; exception={at.exception}")
    case.__name__ = name
    return case


_FACTS = ["The Moon orbits the Earth.", "The Sun is a star.", "Mars is red."]
MARKDOWN_CASES = [
    _markdown_case("Markdown image in a domain name (Domains)",
                   [{"name": f"![b](http://{BEACON}.png)", "facts": _FACTS},
                    {"name": "Plain", "facts": _FACTS}], "pages/domains.py"),
    _markdown_case("HTML image in a fact (Domains)",
                   [{"name": "Html", "facts": [f"<img src='http://{BEACON}.gif'> x", *_FACTS]},
                    {"name": "Plain", "facts": _FACTS}], "pages/domains.py"),
    _markdown_case("javascript link in a domain name (Run)",
                   [{"name": "[click](javascript:alert(1))", "facts": _FACTS},
                    {"name": "Plain", "facts": _FACTS}], "pages/run.py"),
    _markdown_case("Markdown image in a domain name (Plan)",
                   [{"name": f"![b](http://{BEACON}.png)", "facts": _FACTS},
                    {"name": "Plain", "facts": _FACTS}], "pages/plan.py"),
]

FORMULAS = ['=HYPERLINK("http://127.0.0.1:9/x","click")', "+1+1", "-2+3", "@SUM(A1:A9)", "=cmd|' /C calc'!A0"]


def formula_cells_domains_csv(probe: Probe) -> Outcome:
    from dowsing.domains import Domain, domains_to_csv, parse_domains_csv

    domains = [Domain("=evil()", FORMULAS), Domain("Plain", _FACTS)]
    text = domains_to_csv(domains)
    cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
    live = [c for c in cells if c[:1] in ("=", "+", "-", "@")]
    back = parse_domains_csv(text)
    round_trip = [d.name for d in back] == ["=evil()", "Plain"] and list(back[0].facts) == FORMULAS
    ok = not live and round_trip
    return Outcome("formula cells in the domains CSV", ok,
                   "neutralised, and read back as written" if ok else f"live cells {live}; round trip {round_trip}")


def _write_domains(probe: Probe, name: str, domains: list[dict]) -> Path:
    path = probe.outside / name
    path.write_text(json.dumps({"domains": domains}))
    return path


def _cli_refusal_case(name: str, make_args):
    def case(probe: Probe) -> Outcome:
        out = probe.outside / "never-written.json"
        proc = probe.cli(*make_args(probe, out))
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        ok = proc.returncode == 2 and len(lines) == 1 and not out.exists()
        return Outcome(name, ok, f"exit 2: {lines[0][:100]}" if ok
                       else f"exit {proc.returncode}, {len(lines)} stderr lines, out written={out.exists()}: "
                            f"{proc.stderr.strip()[-200:]}")
    case.__name__ = name
    return case


CLI_CASES = [
    _cli_refusal_case("100,000 facts in one domain", lambda p, out: [
        "analyze", "--domains", str(_write_domains(p, "huge.json", [
            {"name": "Huge", "facts": [f"Fact number {i} is here." for i in range(100_000)]},
            {"name": "Small", "facts": _FACTS}])), "--out", str(out)]),
    _cli_refusal_case("a 1 MB fact", lambda p, out: [
        "analyze", "--domains", str(_write_domains(p, "wide.json", [
            {"name": "Wide", "facts": ["word " * 200_000, "A second fact.", "A third fact."]},
            {"name": "Small", "facts": _FACTS}])), "--out", str(out)]),
    _cli_refusal_case("1,000 domains", lambda p, out: [
        "analyze", "--domains", str(_write_domains(p, "many.json", [
            {"name": f"D{i}", "facts": [f"Fact {i} a.", f"Fact {i} b."]} for i in range(1000)])),
        "--out", str(out)]),
    _cli_refusal_case("--out is a folder (analyze)", lambda p, out: ["analyze", "--out", str(p.outside)]),
    _cli_refusal_case("--out in a missing folder (validate)",
                      lambda p, out: ["validate", "--out", str(p.outside / "no" / "such" / "v.json")]),
    _cli_refusal_case("--out is a folder (plan)", lambda p, out: ["plan", "--budget", "10", "--out", str(p.outside)]),
]


class _Payload:
    """Unpickling this runs `touch MARKER`: what a hostile cache row would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _pickled_row_case(name: str, folder: str, read, key: str = "hostile"):
    def case(probe: Probe) -> Outcome:
        import diskcache

        path = probe.cache / folder
        path.mkdir(parents=True, exist_ok=True)
        read(probe)  # the store creates its tables as dowsing opens it
        db = path / "cache.db"
        con = sqlite3.connect(db)
        blob = pickle.dumps(_Payload(probe.marker))
        con.execute("INSERT OR REPLACE INTO Cache (key, raw, store_time, expire_time, access_time, access_count,"
                    " tag, size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, NULL, 0, ?, NULL, ?)",
                    (key, diskcache.core.MODE_PICKLE, sqlite3.Binary(blob)))
        con.commit()
        con.close()
        try:
            read(probe)
            error = None
        except Exception as exc:  # a refusal may raise; what matters is that nothing ran
            error = f"{type(exc).__name__}: {exc}"[:120]
        ok = not probe.marker.exists()
        probe.marker.unlink(missing_ok=True)
        return Outcome(name, ok, ("refused" + (f" ({error})" if error else "")) if ok else "the pickle ran")
    case.__name__ = name
    return case


def _read_jobs(probe: Probe) -> None:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing.background.jobs import JobStore

    store = JobStore()
    try:
        store.all()
        store.get("hostile")
    finally:
        store.close()


def _read_results(probe: Probe) -> None:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing.storage.store import ResultStore

    ResultStore().get("hostile")


def _read_plan_store(probe: Probe) -> None:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing.storage.store import JsonStore

    JsonStore("probe-json").get("hostile")


PICKLE_CASES = [
    _pickled_row_case("pickled row in the job store", "jobs", _read_jobs, key="job:hostile"),
    _pickled_row_case("pickled row in the result store", "results", _read_results),
    _pickled_row_case("pickled row in a JSON store", "probe-json", _read_plan_store),
]


def corrupt_sqlite_page(probe: Probe) -> Outcome:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing.storage.store import ResultStore

    store = ResultStore()
    folder = Path(store.folder)
    del store
    db = folder / "cache.db"
    data = bytearray(db.read_bytes())
    data[16:min(len(data), 4096)] = os.urandom(min(len(data), 4096) - 16)  # the header and first page
    db.write_bytes(bytes(data))
    try:
        result = ResultStore().get("anything")
    except Exception as exc:
        return Outcome("damaged SQLite page in the result store", False, f"{type(exc).__name__}: {exc}"[:160])
    aside = [p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name) and p != folder]
    ok = result is None and bool(aside)
    return Outcome("damaged SQLite page in the result store", ok,
                   f"moved aside as {aside[0]}, rebuilt" if ok else f"result={result!r}, aside={aside}")


def tampered_active_set(probe: Probe) -> Outcome:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing import workspace

    workspace.list_sets()  # creates the workspace
    files = list(probe.cache.rglob("workspace.json"))
    if not files:
        return Outcome("../ in the workspace's active set", False, "no workspace.json found")
    state = json.loads(files[0].read_text())
    state["active"] = "../../outside/victim"
    files[0].write_text(json.dumps(state))
    try:
        active = workspace.active_set()
        workspace.load_set_raw(active)
    except Exception as exc:
        return Outcome("../ in the workspace's active set", False, f"{type(exc).__name__}: {exc}"[:160])
    ok = "/" not in active and ".." not in active and (probe.outside / "victim.json").exists()
    return Outcome("../ in the workspace's active set", ok, f"fell back to {active!r}" if ok else f"active={active!r}")


def long_set_name(probe: Probe) -> Outcome:
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    from dowsing import workspace

    try:
        workspace.create_set("🪄" * 80, [])
    except workspace.WorkspaceError as exc:
        return Outcome("80 emoji as a set name", True, f"refused: {str(exc)[:80]}")
    except OSError as exc:
        return Outcome("80 emoji as a set name", False, f"{type(exc).__name__}: {exc}"[:160])
    return Outcome("80 emoji as a set name", True, "stored (within the byte limit)")


CASES = [*URL_CASES, model_from_url, *MARKDOWN_CASES, formula_cells_domains_csv, *CLI_CASES, *PICKLE_CASES,
         corrupt_sqlite_page, tampered_active_set, long_set_name]


def run_probe(root: Path, cases=CASES) -> list[Outcome]:
    """Run every case in a sandbox under root; the last row says whether any
    file outside the sandbox's cache folder changed."""
    import streamlit as st

    probe = Probe(root)
    saved_env = {name: os.environ.get(name) for name in ("DOWSING_CACHE", "DOWSING_MODEL_ROOTS")}
    os.environ["DOWSING_CACHE"] = str(probe.cache)
    os.environ.pop("DOWSING_MODEL_ROOTS", None)  # the app's own default roots, as a user has them
    st.cache_resource.clear()
    before_outside, before_repo = _digest_tree(probe.outside), _repo_changes()
    rows = []
    try:
        for case in cases:
            try:
                rows.append(case(probe))
            except Exception as exc:
                rows.append(Outcome(case.__name__, False, f"probe error {type(exc).__name__}: {exc}"[:200]))
            os.environ["DOWSING_CACHE"] = str(probe.cache)
    finally:
        st.cache_resource.clear()
        for name, value in saved_env.items():  # as the caller had them: a test process runs other tests after
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    after_outside = _digest_tree(probe.outside)
    # The CLI cases write their own input files under outside/ before they run; anything else is a change.
    inputs = {"huge.json", "wide.json", "many.json"}
    changed = sorted(k for k in set(before_outside) | set(after_outside)
                     if k not in inputs and before_outside.get(k) != after_outside.get(k))
    repo_changed = _repo_changes() != before_repo
    rows.append(Outcome("no file outside the cache changed", not changed and not repo_changed,
                        "unchanged" if not changed and not repo_changed
                        else f"changed outside: {changed}; repository changed: {repo_changed}"))
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dowsing-probe-") as tmp:
        rows = run_probe(Path(tmp))
    width = max(len(r.case) for r in rows)
    for r in rows:
        print(f"{'ok  ' if r.ok else 'FAIL'}  {r.case:<{width}}  {r.detail}")
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
