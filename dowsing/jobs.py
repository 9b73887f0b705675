"""Background analysis jobs: a request goes in, a job id comes out, and the
state (stage, progress, error) can be polled from any process.

The pages only talk to the `Executor` protocol; `LocalProcessExecutor` runs
each job in its own worker process (`python -m dowsing.worker JOB_ID`) on this
machine, one at a time (a file lock), with state kept as JSON strings in a
diskcache under ``cache_dir()/"jobs"``. A distributed executor can replace it
by implementing the same six methods.

The job id is the engine's cache key, so one request is one job: a repeat of a
finished request returns the same id at once, and a second tab that submits
the same request while it runs attaches to the running job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from .config import AnalysisConfig
from .paths import cache_dir
from .result import Result

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
WAITING_MESSAGE = "waiting for another job"
# Lines the worker writes to its log for people reading it; skipped when the
# log is searched for the error of a worker that died.
LOG_NOTE_PREFIX = "# "
# A job whose worker has not reported its pid after this long never started.
START_TIMEOUT_S = 60.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of `text`, cut to `limit` characters."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


@dataclass(frozen=True)
class JobRequest:
    """What to analyse: a model, domains and a configuration.

    domain_set_name is only shown in the history; it is not part of the job id.
    """

    model_id: str | None
    domains: list  # list[Domain]
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    domain_set_name: str = ""
    executor: dict = field(default_factory=dict)  # ExecutorConfig.to_dict(); {} runs in the worker itself

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "domains": [{"name": d.name, "facts": list(d.facts)} for d in self.domains],
            "config": self.config.to_dict(),
            "domain_set_name": self.domain_set_name,
            "executor": dict(self.executor),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "JobRequest":
        from .domains import Domain

        return cls(
            model_id=data.get("model_id"),
            domains=[Domain(name=d["name"], facts=tuple(d["facts"])) for d in data["domains"]],
            config=AnalysisConfig.from_dict(data.get("config") or {}),
            domain_set_name=data.get("domain_set_name") or "",
            executor=data.get("executor") or {},
        )

    def job_id(self) -> str:
        """The engine's cache key of this request (where it runs does not
        change the result, so the executor is not part of it)."""
        from .analysis import cache_key

        return cache_key(self.model_id, list(self.domains), self.config)


@dataclass
class JobState:
    """One job as the pages see it. Times are ISO 8601 UTC strings.

    summary (for the history): model_id, domain_set_name, n_domains, and once
    done top_domain and model_parameters.
    run_id changes with every fresh run of the same job id, so a late write
    of an old worker cannot overwrite a newer run.
    """

    job_id: str
    status: str = "queued"
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    error: str | None = None
    pid: int | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    request: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    run_id: str = ""
    exit_code: int | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobState":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def request_summary(request: dict) -> dict:
    return {
        "model_id": request.get("model_id"),
        "domain_set_name": request.get("domain_set_name") or "",
        "n_domains": len(request.get("domains") or []),
    }


def result_summary(request: dict, result: Result) -> dict:
    summary = request_summary(request)
    ranked = result.ranked()
    summary["top_domain"] = ranked[0].name if ranked else None
    summary["model_parameters"] = (result.model or {}).get("parameters")
    return summary


class JobStore:
    """Job states as JSON strings in a diskcache (never pickles).

    Every change is a read-modify-write inside a diskcache transaction, so the
    page process and the worker can both write without losing fields.
    """

    PREFIX = "job:"

    def __init__(self, root: Path | None = None):
        import diskcache

        self.root = Path(root) if root is not None else cache_dir() / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        # eviction_policy none: job records are tiny and must never vanish.
        self.cache = diskcache.Cache(str(self.root), eviction_policy="none")

    @property
    def logs_dir(self) -> Path:
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, job_id: str) -> Path:
        return self.logs_dir / f"{job_id}.log"

    @property
    def lock_path(self) -> Path:
        return self.root / "runner.lock"

    def get(self, job_id: str) -> JobState | None:
        text = self.cache.get(self.PREFIX + job_id)
        if not isinstance(text, str):
            return None
        try:
            return JobState.from_json(text)
        except (ValueError, TypeError):
            return None

    def put(self, state: JobState) -> None:
        self.cache.set(self.PREFIX + state.job_id, state.to_json())

    def update(self, job_id: str, run_id: str | None = None, unless: tuple[str, ...] = (), **fields) -> JobState | None:
        """Set `fields` on the job, atomically; skip (return None) when the job
        is gone, belongs to another run than `run_id`, or its status is in `unless`."""
        with self.cache.transact():
            state = self.get(job_id)
            if state is None or (run_id is not None and state.run_id != run_id) or state.status in unless:
                return None
            for name, value in fields.items():
                setattr(state, name, value)
            self.put(state)
            return state

    def delete(self, job_id: str) -> None:
        self.cache.delete(self.PREFIX + job_id)

    def all(self) -> list[JobState]:
        states = []
        for key in list(self.cache.iterkeys()):
            if isinstance(key, str) and key.startswith(self.PREFIX):
                state = self.get(key[len(self.PREFIX):])
                if state is not None:
                    states.append(state)
        return states

    def close(self) -> None:
        self.cache.close()


@runtime_checkable
class Executor(Protocol):
    """What the pages need from a job runner."""

    def submit(self, request: JobRequest) -> str:
        """Start the job, or join it when the same request is queued, running
        or done; returns the job id (the engine's cache key) at once."""

    def state(self, job_id: str) -> JobState | None:
        """The job's current state; None for an unknown id."""

    def result(self, job_id: str) -> Result | None:
        """The finished job's Result; None until then (or if it was lost)."""

    def cancel(self, job_id: str) -> None:
        """Stop a queued or running job; its state is "cancelled" after."""

    def history(self) -> list[JobState]:
        """Every known job, newest first."""

    def delete(self, job_id: str) -> None:
        """Forget a job (cancelling it if needed)."""


def pid_alive(pid: int, job_id: str | None = None) -> bool:
    """Whether `pid` is a live (not zombie) process, and, where /proc can
    tell, still our worker for `job_id` rather than a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else: a reused pid, checked below
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc (not Linux): trust kill(0)
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2:].startswith(("Z", "X")):
            return False
        if job_id is not None:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            return b"dowsing.worker" in cmdline and job_id.encode() in cmdline
    except (OSError, ValueError):
        return False
    return True


def last_log_line(path: Path) -> str:
    """The last meaningful line of a worker log: for an uncaught exception,
    the 'TypeName: message' line that ends its traceback."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not line.startswith(LOG_NOTE_PREFIX) and not line.startswith("warnings.warn("):
            return one_line(line)
    return ""


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class LocalProcessExecutor:
    """Runs each job in a worker process on this machine, one at a time.

    grace_s: how long cancel waits after SIGTERM before SIGKILL.
    """

    def __init__(self, root: Path | None = None, grace_s: float = 3.0):
        self.store = JobStore(root)
        self.grace_s = grace_s
        # Workers started by this process, so their exit codes can be read
        # (and they are reaped rather than left as zombies).
        self._procs: dict[str, subprocess.Popen] = {}
        self._results = None

    @property
    def results(self):
        """The engine's ResultStore (opened on first use)."""
        if self._results is None:
            from .store import ResultStore

            self._results = ResultStore()
        return self._results

    # -- submit ---------------------------------------------------------
    def submit(self, request: JobRequest) -> str:
        """Start (or join) the job for `request`; returns its id at once.

        Raises what the engine's cache_key raises on bad input (ModelError,
        DomainError, ValueError) before anything starts.
        """
        job_id = request.job_id()
        current = self.store.get(job_id)
        if current is not None and current.active:
            current = self.state(job_id)  # a dead worker turns "failed" here
            if current is not None and current.active:
                return job_id
        request_dict = request.to_dict()
        stored = self.results.get(job_id)
        if stored is not None:
            if current is None or current.status != "done":
                self._put_done_from_cache(job_id, request_dict, stored)
            return job_id

        run_id = uuid.uuid4().hex
        with self.store.cache.transact():
            # Checked again inside the transaction: two tabs submitting at
            # the same moment must start one worker, not two.
            again = self.store.get(job_id)
            if again is not None and again.active:
                return job_id
            self.store.put(
                JobState(
                    job_id=job_id,
                    status="queued",
                    stage="queued",
                    message="starting worker",
                    created_at=now_iso(),
                    request=request_dict,
                    summary=request_summary(request_dict),
                    run_id=run_id,
                )
            )
        try:
            proc = self._spawn(job_id)
        except OSError as exc:
            error = f"The worker could not be started: {one_line(exc)}"
            self.store.update(job_id, run_id=run_id, status="failed", error=error, message=error, finished_at=now_iso())
            return job_id
        # Only the worker records its pid, once it runs: between fork and exec
        # /proc/PID/cmdline is still this process's, so a pid written here
        # could be judged "not our worker" (dead) by a poll in that window.
        # Until then this process knows the worker by its Popen handle.
        self._procs[job_id] = proc
        return job_id

    def _spawn(self, job_id: str) -> subprocess.Popen:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["DOWSING_CACHE"] = str(self.store.root.parent)
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.store.log_path(job_id), "wb")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "dowsing.worker", job_id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=package_root,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()

    def _put_done_from_cache(self, job_id: str, request_dict: dict, result: Result) -> None:
        stamp = now_iso()
        self.store.put(
            JobState(
                job_id=job_id,
                status="done",
                stage="done",
                fraction=1.0,
                message="cached result",
                created_at=stamp,
                started_at=stamp,
                finished_at=stamp,
                request=request_dict,
                summary=result_summary(request_dict, result),
                run_id=uuid.uuid4().hex,
            )
        )

    # -- state ----------------------------------------------------------
    def state(self, job_id: str) -> JobState | None:
        """The job's state; a worker that died without finishing is turned
        into "failed" here, with the last line of its log as the error."""
        state = self.store.get(job_id)
        if state is None:
            return None
        if state.status == "done":
            return self._check_done(state)
        if not state.active:
            return state
        proc = self._procs.get(job_id)
        exit_code = proc.poll() if proc is not None else None
        if proc is not None and exit_code is None:
            return state  # our own child and still running: the handle is authoritative
        if exit_code is None:
            if state.pid is None:
                # Started by another process and not yet reporting its pid.
                created = parse_time(state.created_at)
                if created is None or time.time() - created < START_TIMEOUT_S:
                    return state
            elif pid_alive(state.pid, job_id):
                return state
        return self._mark_dead(state, exit_code)

    def _check_done(self, state: JobState) -> JobState:
        """Never "done" without a readable result: the store drops a corrupt
        entry on read, and the job is then recomputed under the same id."""
        if self.results.get(state.job_id) is not None:
            return state
        try:
            request = JobRequest.from_dict(state.request)
            same_key = request.job_id() == state.job_id
        except Exception as exc:  # noqa: BLE001 - the model or domains are gone or invalid now
            same_key, why = False, one_line(exc)
        else:
            why = "the model, domains or engine have changed since"
        if same_key:
            self.submit(request)
            return self.store.get(state.job_id) or state
        reason = f"The stored result is missing or damaged and it cannot be recomputed as it was: {why}."
        updated = self.store.update(
            state.job_id, run_id=state.run_id, unless=ACTIVE, status="failed", error=reason, message=reason,
        )
        return updated if updated is not None else self.store.get(state.job_id) or state

    def _mark_dead(self, state: JobState, exit_code: int | None) -> JobState:
        if exit_code is not None and exit_code < 0:
            # Killed from outside: whatever the log ends with is not the cause.
            try:
                name = signal.Signals(-exit_code).name
            except ValueError:
                name = "unknown"
            reason = f"The worker was killed by signal {-exit_code} ({name}) before it finished."
        else:
            reason = last_log_line(self.store.log_path(state.job_id))
        if not reason:
            if exit_code is not None:
                reason = f"The worker exited with code {exit_code} before it finished."
            else:
                reason = "The worker process stopped before it finished (killed, or out of memory?)."
        updated = self.store.update(
            state.job_id,
            run_id=state.run_id,
            unless=("done", "failed", "cancelled"),
            status="failed",
            error=reason,
            message=reason,
            exit_code=exit_code,
            finished_at=now_iso(),
        )
        # None: the worker wrote its own final state in the meantime.
        return updated if updated is not None else self.store.get(state.job_id) or state

    def result(self, job_id: str) -> Result | None:
        return self.results.get(job_id)

    # -- cancel / history / delete ---------------------------------------
    def cancel(self, job_id: str) -> None:
        """SIGTERM the worker's process group, SIGKILL after grace_s; the
        state is "cancelled" when this returns."""
        state = self.store.get(job_id)
        if state is None or not state.active:
            return
        self.store.update(
            job_id, run_id=state.run_id, unless=("done", "failed", "cancelled"),
            status="cancelled", message="cancelled", finished_at=now_iso(),
        )
        pid = state.pid
        if pid is None:
            # Not started yet: wait briefly for the worker to report its pid.
            deadline = time.monotonic() + 2.0
            while pid is None and time.monotonic() < deadline:
                proc = self._procs.get(job_id)
                if proc is not None:
                    pid = proc.pid
                    break
                time.sleep(0.05)
                fresh = self.store.get(job_id)
                pid = fresh.pid if fresh is not None else None
        if pid is None:
            return
        self._signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if not self._worker_running(job_id, pid):
                return
            time.sleep(0.05)
        self._signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while self._worker_running(job_id, pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _worker_running(self, job_id: str, pid: int) -> bool:
        proc = self._procs.get(job_id)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return pid_alive(pid, job_id)

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            # start_new_session=True made the worker a group leader, so this
            # also reaches anything it started.
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def history(self) -> list[JobState]:
        """Every job, newest first (liveness refreshed for active ones)."""
        states = [self.state(s.job_id) if s.active else s for s in self.store.all()]
        return sorted((s for s in states if s is not None), key=lambda s: s.created_at or "", reverse=True)

    def delete(self, job_id: str) -> None:
        """Forget the job (cancelling it first if it runs). Its result stays
        in the result store, so the same request later is instant."""
        self.cancel(job_id)
        self.store.delete(job_id)
        self._procs.pop(job_id, None)
        self.store.log_path(job_id).unlink(missing_ok=True)


def default_executor() -> Executor:
    """The executor the app uses; swap here for a distributed one."""
    return LocalProcessExecutor()
