"""Validation and benchmark runs in their own process, for the app.

`python -m dowsing validate|benchmark` runs in a child process (its own
session, so Cancel can stop it and everything it started) that writes
progress.json and then result.json under cache/<kind>/<run id>/; when it
dies without a result, the last line of its log says why. The page polls
`background_state`; a refresh or a second tab finds the run again by its
folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from ..domains import as_domains
from ..models import atomic_write_text
from ..paths import REPO_ROOT, cache_dir

KINDS = ("validation", "benchmark")


def runs_dir(kind: str = "validation"):
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    path = cache_dir() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_background(model_id: str | None, domains, config, kind: str = "validation",
                     extra_args: tuple = ()) -> str:
    """Start `python -m dowsing <validate|benchmark>` in its own process and
    return the run id. domains: the domain list (written to domains.json);
    config: a ValidationConfig or BenchmarkConfig (written to config.json)."""
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = runs_dir(kind) / run_id
    folder.mkdir(parents=True)
    doms = as_domains(domains)
    atomic_write_text(folder / "domains.json",
                      json.dumps({"domains": [{"name": d.name, "facts": list(d.facts)} for d in doms]}))
    atomic_write_text(folder / "config.json", json.dumps(config.to_dict()))
    command = "validate" if kind == "validation" else "benchmark"
    cmd = [sys.executable, "-m", "dowsing", command, "--domains", str(folder / "domains.json"),
           "--config", str(folder / "config.json"), "--out", str(folder / "result.json"),
           "--progress-file", str(folder / "progress.json"), "--quiet", *extra_args]
    if model_id:
        cmd += ["--model", model_id]
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (folder / "pid").write_text(str(proc.pid))
    return run_id


def background_state(run_id: str, kind: str = "validation") -> dict:
    """{"status": running|done|failed|cancelled, "fraction", "stage",
    "message", "result"}; result is the parsed result.json (a dict) once done."""
    folder = runs_dir(kind) / run_id
    state = {"status": "running", "fraction": 0.0, "stage": "starting", "message": "", "result": None}
    if (folder / "progress.json").exists():
        try:
            state.update(json.loads((folder / "progress.json").read_text()))
        except (OSError, ValueError):
            pass
    if (folder / "result.json").exists():
        state["status"] = "done"
        state["result"] = json.loads((folder / "result.json").read_text())
        return state
    if (folder / "cancelled").exists():
        state["status"] = "cancelled"
        state["message"] = "cancelled"
        return state
    if not _alive(folder):
        state["status"] = "failed"
        log = (folder / "log.txt").read_text() if (folder / "log.txt").exists() else ""
        state["message"] = (log.strip().splitlines() or [f"the {kind} process ended without a result"])[-1]
    return state


def cancel(run_id: str, kind: str = "validation") -> bool:
    """Stop a running run (its whole process group). True if it was running."""
    folder = runs_dir(kind) / run_id
    if (folder / "result.json").exists() or not _alive(folder):
        return False
    (folder / "cancelled").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        os.killpg(int((folder / "pid").read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
    return True


def _alive(folder) -> bool:
    try:
        pid = int((folder / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def latest_runs(kind: str = "validation") -> list[str]:
    return sorted((p.name for p in runs_dir(kind).iterdir() if p.is_dir()), reverse=True)
