"""Background jobs: a request goes in, a job id comes out, and the state
(stage, progress, error) can be polled from any process.

A request has a kind: an analysis, a validation, a benchmark or a plan's
pilot measurements. What differs
between the kinds (their configuration, the engine call that runs them,
where their result is kept, what the history says about them) is one
`JobKind` in KINDS; a new kind is one more entry there. Everything else is
shared by every kind: one worker (`python -m dowsing.background.worker JOB_ID`), one
runner lock, one cancel path and one liveness check. The app's runner keeps one
worker started and warmed ahead of the next job (`spare.SpareWorker`), so a
run does not first wait for torch to import.

The pages only talk to the `JobRunner` protocol. `LocalJobRunner` runs each
job in its own worker process on this machine, one heavy run at a time
whatever its kind (a file lock: the others stay "queued" and say behind
what), with state kept as JSON strings in a diskcache under
``cache_dir()/"jobs"``. A distributed runner can replace it by implementing
the same methods. (A job runner places whole runs; the unit executors of
`dowsing.pipelines.executor` place the units of work inside one run, in-process or on
Ray, as the request's `executor` says.)

The job id is a stable hash of the request (for an analysis, the engine's
cache key), so one request is one job: a repeat of a finished request
returns the same id at once, and a second tab that submits the same request
while it runs attaches to the running job. An analysis's result is kept by
the engine's ResultStore; a validation's, benchmark's or plan's as a JSON
file under ``cache_dir()/"jobs"/"results"``. A plan job measures the pilots
only (`plan.pilot_measurements`, keyed by `plan.plan_key`): the allocation
under a budget, costs, weights and caps is instant and left to its caller.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from ..storage.caches import DataCache, StoreDamaged
from ..config import DEVICES, AnalysisConfig
from ..paths import cache_dir, private_dir
from .spare import SpareWorker

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
WAITING_MESSAGE = "queued: another run holds the machine"
# Lines the worker writes to its log for people reading it; skipped when the
# log is searched for the error of a worker that died.
LOG_NOTE_PREFIX = "# "
# A job whose worker has not reported its pid after this long never started.
START_TIMEOUT_S = 60.0
# The most jobs queued and running at once: each waiting worker holds about
# 100 MB, so a submit past this is refused rather than started.
MAX_ACTIVE_JOBS = 8
# Every kind's job id is a sha256 hex digest (`JobRequest.job_id`). An id from
# a URL or a form is checked against this before it is used as a key or in a path.
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{64}")
NO_SUCH_JOB = "No such job: the id is not one this app makes."


class QueueFull(ValueError):
    """A submit past MAX_ACTIVE_JOBS; its message is for the user."""


def is_job_id(value) -> bool:
    """Whether `value` has the exact form of a job id (64 lowercase hex)."""
    return isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value) is not None


def checked_job_id(value) -> str:
    """`value` when it is a job id; else ValueError(NO_SUCH_JOB)."""
    if not is_job_id(value):
        raise ValueError(NO_SUCH_JOB)
    return value


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of `text`, cut to `limit` characters."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


# --- the kinds ------------------------------------------------------------------
# The engine is imported inside these functions: the pages import this module
# on every rerun and must not pay for torch until a job actually runs.

def _analysis_config() -> type:
    return AnalysisConfig


def _validation_config() -> type:
    from ..validation.validate import ValidationConfig

    return ValidationConfig


def _benchmark_config() -> type:
    from ..validation.benchmark import BenchmarkConfig

    return BenchmarkConfig


def _plan_config() -> type:
    from ..pipelines.plan import PilotConfig

    return PilotConfig


def _analysis_result() -> type:
    from ..result import Result

    return Result


def _validation_result() -> type:
    from ..validation.validate import ValidationResult

    return ValidationResult


def _benchmark_result() -> type:
    from ..validation.benchmark import BenchmarkResult

    return BenchmarkResult


def _plan_result() -> type:
    from ..pipelines.plan import PilotMeasurements

    return PilotMeasurements


def _analysis_key(request: "JobRequest") -> str:
    from ..pipelines.analysis import cache_key

    return cache_key(request.model_id, list(request.domains), request.config)


def _plan_key(request: "JobRequest") -> str:
    # the pilots' own cache key: a plan job and `run_plan` (the CLI) share one measurement
    from ..pipelines.plan import plan_key

    return plan_key(request.model_id, list(request.domains), request.config)


def request_key(request: "JobRequest") -> str:
    """sha256 over the kind, its settings and the engine's cache key of the
    request's model, domains and checkpoints under default analysis settings.
    That key holds the model's fingerprint, what the checkpoints hold and the
    engine version, so a model trained further in the same folder is a new
    job, not a stale result. Where the units run is left out: it does not
    change the numbers."""
    from ..pipelines.analysis import cache_key

    checkpoints = getattr(request.config, "checkpoints", ())
    inputs = cache_key(request.model_id, list(request.domains), AnalysisConfig(checkpoints=checkpoints))
    payload = {k: v for k, v in request.to_dict().items() if k not in ("model_id", "domains", "domain_set_name",
                                                                         "executor")}
    payload["inputs"] = inputs
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _run_analysis(request: "JobRequest", progress, executor):
    from ..pipelines.analysis import run_analysis

    # the ranking reaches the job state before the paper's quantities (`ProgressWriter.partial`)
    return run_analysis(request.model_id, list(request.domains), request.config, progress=progress, use_cache=True,
                        executor=executor, on_ranking=getattr(progress, "partial", None))


def _run_validation(request: "JobRequest", progress, executor):
    from ..validation.validate import validate

    return validate(request.model_id, list(request.domains), request.config, held_out=request.held_out,
                    progress=progress, executor=executor)


def _run_benchmark(request: "JobRequest", progress, executor):
    from ..validation.benchmark import run_benchmark

    # resume: a benchmark cancelled or killed half-way reuses the fine-tunes it finished
    return run_benchmark(request.model_id, list(request.domains), request.config, progress=progress,
                         executor=executor, resume=True, device=request.device)


def _run_plan(request: "JobRequest", progress, executor):
    from ..pipelines.plan import pilot_measurements

    # the pilots run in this process: they are a few seconds per domain
    return pilot_measurements(request.model_id, list(request.domains), request.config, progress=progress)


def _analysis_summary(result) -> dict:
    ranked = result.ranked()
    return {"top_domain": ranked[0].name if ranked else None,
            "model_parameters": (result.model or {}).get("parameters")}


def _validation_summary(result) -> dict:
    # the leaderboard comes sorted by rho against fine-tuning; None when that ground truth was off
    best = next((r for r in result.leaderboard if r.get("spearman_finetune") is not None), None)
    return {"winner": best["label"] if best else None, "model_parameters": (result.model or {}).get("parameters")}


def _benchmark_summary(result) -> dict:
    labels = {r["estimator"]: r["label"] for r in result.leaderboard}
    return {"winner": labels.get(result.winner, result.winner),
            "model_parameters": (result.model or {}).get("parameters")}


def _plan_summary(result) -> dict:
    return {"pilots": sum(1 for d in result.domains if d.get("sizes")),
            "model_parameters": (result.model or {}).get("parameters")}


@dataclass(frozen=True)
class JobKind:
    """What differs between kinds of job.

    config_type / result_type: the configuration class (to_dict, from_dict)
        and the result class (to_json, from_json), imported when asked for.
    key: the job id of a request. run: (request, progress, executor) ->
        result, in the worker. summary: result -> the fields the history shows.
    extras: the request fields only this kind takes ("held_out", "device").
    engine_cache: the engine keeps the result itself under the job id; else
        the worker writes it as JSON to the job store.
    """

    name: str
    config_type: Callable[[], type]
    result_type: Callable[[], type]
    key: Callable
    run: Callable
    summary: Callable
    extras: tuple = ()
    engine_cache: bool = False


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("analysis", _analysis_config, _analysis_result, _analysis_key, _run_analysis, _analysis_summary,
            engine_cache=True),
    JobKind("validation", _validation_config, _validation_result, request_key, _run_validation,
            _validation_summary, extras=("held_out",)),
    JobKind("benchmark", _benchmark_config, _benchmark_result, request_key, _run_benchmark, _benchmark_summary,
            extras=("device",)),
    JobKind("plan", _plan_config, _plan_result, _plan_key, _run_plan, _plan_summary),
)}


@dataclass(frozen=True)
class JobRequest:
    """What to run: a kind, a model, domains and the kind's configuration
    (None: its defaults).

    executor: `ExecutorConfig.to_dict()` of where the run's units go ({}: in
    the worker itself). held_out (validation only): {domain: [facts]} held
    out instead of a seeded half. device (benchmark only): where the model
    and its fine-tunes run. domain_set_name is only shown in the history; it
    is not part of the job id.
    """

    model_id: str | None
    domains: list  # list[Domain]
    config: object = None
    kind: str = "analysis"
    domain_set_name: str = ""
    executor: dict = field(default_factory=dict)
    held_out: dict | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}; choose from {', '.join(KINDS)}")
        config_type = self.job_kind.config_type()
        if self.config is None:
            object.__setattr__(self, "config", config_type())
        elif not isinstance(self.config, config_type):
            raise ValueError(f"{self.kind} jobs take a {config_type.__name__}, not a {type(self.config).__name__}")
        if self.held_out is not None and "held_out" not in self.job_kind.extras:
            raise ValueError(f"{self.kind} jobs take no held-out facts")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device != "cpu" and "device" not in self.job_kind.extras:
            raise ValueError(f"{self.kind} jobs take no device of their own (an analysis's is in its configuration)")

    @property
    def job_kind(self) -> JobKind:
        return KINDS[self.kind]

    @property
    def run_device(self) -> str:
        """Where the run's model goes: an analysis's configuration says it."""
        return getattr(self.config, "device", None) or self.device

    def to_dict(self) -> dict:
        data = {
            "kind": self.kind,
            "model_id": self.model_id,
            "domains": [{"name": d.name, "facts": list(d.facts)} for d in self.domains],
            "config": self.config.to_dict(),
            "domain_set_name": self.domain_set_name,
            "executor": dict(self.executor),
        }
        if "held_out" in self.job_kind.extras:
            data["held_out"] = None if self.held_out is None else {k: list(v) for k, v in self.held_out.items()}
        if "device" in self.job_kind.extras:
            data["device"] = self.device
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "JobRequest":
        from ..domains import Domain

        kind = data.get("kind") or "analysis"  # records from before there were kinds are analyses
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}; choose from {', '.join(KINDS)}")
        return cls(
            kind=kind,
            model_id=data.get("model_id"),
            domains=[Domain(name=d["name"], facts=tuple(d["facts"])) for d in data["domains"]],
            config=KINDS[kind].config_type().from_dict(data.get("config") or {}),
            domain_set_name=data.get("domain_set_name") or "",
            executor=data.get("executor") or {},
            held_out=data.get("held_out"),
            device=data.get("device") or "cpu",
        )

    def job_id(self) -> str:
        """The kind's stable hash of this request. Raises what the engine's
        cache key raises on bad input (ModelError, DomainError, ValueError)."""
        return self.job_kind.key(self)


@dataclass
class JobState:
    """One job as the pages see it. Times are ISO 8601 UTC strings.

    summary (for the history): kind, model_id, domain_set_name, n_domains,
    and once done model_parameters and top_domain (an analysis), winner
    (a validation or benchmark) or pilots (a plan: the domains measured).
    run_id changes with every fresh run of the same job id, so a late write
    of an old worker cannot overwrite a newer run.
    pid_start_ticks: when the worker `pid` started (clock ticks after boot,
    /proc/PID/stat field 22), so a later process with the same pid is not
    taken for it; None in states from before it was recorded.
    waiting_for: while queued, the job it waits behind (None: unknown).
    """

    job_id: str
    status: str = "queued"
    stage: str = ""
    fraction: float = 0.0
    message: str = ""
    error: str | None = None
    pid: int | None = None
    pid_start_ticks: int | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    request: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    run_id: str = ""
    exit_code: int | None = None
    waiting_for: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def kind(self) -> str:
        return (self.request or {}).get("kind") or "analysis"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobState":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def request_summary(request: dict) -> dict:
    return {
        "kind": request.get("kind") or "analysis",
        "model_id": request.get("model_id"),
        "domain_set_name": request.get("domain_set_name") or "",
        "n_domains": len(request.get("domains") or []),
    }


def result_summary(request: dict, result) -> dict:
    summary = request_summary(request)
    summary.update(KINDS[summary["kind"]].summary(result))
    return summary


def job_title(state: JobState) -> str:
    """'benchmark of gpt2 on 6 domains (job 1a2b3c4d)': which run this is,
    for people."""
    summary = state.summary or request_summary(state.request or {})
    model = summary.get("model_id") or "the embedded default"
    if len(model) > 40:
        model = "…" + model[-39:]
    n = summary.get("n_domains") or 0
    return f"{state.kind} of {model} on {n} domain{'' if n == 1 else 's'} (job {state.job_id[:8]})"


def waiting_message(ahead: JobState | None, queued_before: int = 0) -> str:
    """What a queued job tells the pages: behind which run it waits, and how
    many more wait before it."""
    if ahead is None:
        return WAITING_MESSAGE
    where = "running" if ahead.status == "running" else "queued"
    more = f"; {queued_before} more queued before this one" if queued_before else ""
    return f"queued behind the {where} {job_title(ahead)}{more}"


class JobStore:
    """Job states as JSON strings in a diskcache (never pickles), and the
    JSON results of the kinds the engine does not cache itself.

    Every change of a state is a read-modify-write inside a diskcache
    transaction, so the page process and the worker can both write without
    losing fields.
    """

    PREFIX = "job:"

    def __init__(self, root: Path | None = None):
        self.root = private_dir(Path(root) if root is not None else cache_dir() / "jobs")
        # eviction_policy none: job records are small and must never vanish. disk_min_file_size: every
        # state stays in the SQLite row, never in a file of its own; a state over diskcache's default of
        # 32 KiB (a request with many facts) went to a file that an update replaces and deletes, and a
        # read in another process between the two found the old file gone and returned nothing.
        # owns_folder False: a damaged store moves only its SQLite files aside, not the logs and results.
        self.cache = DataCache(self.root, owns_folder=False, eviction_policy="none", disk_min_file_size=2 ** 26)

    @property
    def logs_dir(self) -> Path:
        return private_dir(self.root / "logs")

    def log_path(self, job_id: str) -> Path:
        """The job's log; ValueError for anything but a job id, so no other
        file can be named."""
        return self.logs_dir / f"{checked_job_id(job_id)}.log"

    @property
    def lock_path(self) -> Path:
        return self.root / "runner.lock"

    def results_dir(self, kind: str) -> Path:
        # one folder per kind: the file alone says which class reads it
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        return self.root / "results" / kind

    def result_path(self, job_id: str, kind: str) -> Path:
        """Where the job's result is kept; ValueError for anything but a job
        id, so no other file can be named."""
        return self.results_dir(kind) / f"{checked_job_id(job_id)}.json"

    def write_result(self, job_id: str, kind: str, result) -> None:
        from ..paths import atomic_write_text

        atomic_write_text(self.result_path(job_id, kind), result.to_json())

    def partial_path(self, job_id: str, kind: str) -> Path:
        """Where a running job keeps what it has finished so far (an
        analysis: the ranking before the paper's quantities)."""
        return self.results_dir(kind) / f"{checked_job_id(job_id)}.partial.json"

    def write_partial(self, job_id: str, kind: str, result) -> None:
        from ..paths import atomic_write_text

        path = self.partial_path(job_id, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, result.to_json())

    def read_partial(self, job_id: str, kind: str):
        """The partial result, or None (none written, or unreadable)."""
        if not is_job_id(job_id):
            return None
        try:
            return KINDS[kind].result_type().from_json(self.partial_path(job_id, kind).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def remove_partial(self, job_id: str, kind: str) -> None:
        if is_job_id(job_id):
            self.partial_path(job_id, kind).unlink(missing_ok=True)

    def read_result(self, job_id: str, kind: str):
        """The stored result, or None; a damaged file is removed, so the job
        is recomputed rather than shown half."""
        if not is_job_id(job_id):
            return None
        path = self.result_path(job_id, kind)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            return None
        try:
            return KINDS[kind].result_type().from_json(text)
        except (ValueError, TypeError, KeyError, AttributeError):
            # removed only where this store keeps results (a link is not followed out of it)
            folder = self.results_dir(kind).resolve()
            if path.resolve().parent == folder:
                path.unlink(missing_ok=True)
            return None

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
        is gone, belongs to another run than `run_id`, or its status is in `unless`
        (a store found damaged here has been started empty: the job is gone too)."""
        try:
            with self.cache.transact():
                state = self.get(job_id)
                if state is None or (run_id is not None and state.run_id != run_id) or state.status in unless:
                    return None
                for name, value in fields.items():
                    setattr(state, name, value)
                self.put(state)
                return state
        except StoreDamaged:
            return None

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
class JobRunner(Protocol):
    """What the pages need from a job runner."""

    def submit(self, request: JobRequest) -> str:
        """Start the job, or join it when the same request is queued, running
        or done; returns the job id at once."""

    def state(self, job_id: str) -> JobState | None:
        """The job's current state; None for an unknown id."""

    def result(self, job_id: str):
        """The finished job's result (a Result, ValidationResult,
        BenchmarkResult or PilotMeasurements, by its kind); None until then
        (or if it was lost)."""

    def partial_result(self, job_id: str):
        """While the job runs, what it has finished so far (an analysis: the
        ranking and the diagnosis, the paper's fields None); None otherwise."""

    def cancel(self, job_id: str) -> None:
        """Stop a queued or running job; its state is "cancelled" after."""

    def history(self, kind: str | None = None) -> list[JobState]:
        """Every known job (of one kind), newest first."""

    def delete(self, job_id: str) -> None:
        """Forget a job (cancelling it if needed)."""


# --- liveness -------------------------------------------------------------------

def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid,
    pgrp, ...); None when there is no such process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: it ends at the last ")".
    return stat[stat.rindex(")") + 2:].split()


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat
    field 22); None without such a process or /proc. A pid and this together
    name one process: a pid reused later has a later start."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, job_id: str | None = None, start_ticks: int | None = None) -> bool:
    """Whether `pid` is a live (not zombie) process, and, where /proc can
    tell, still our worker rather than a reused pid: the process that
    started at `start_ticks` when that is known, else one whose command line
    names the worker and `job_id` (states that only have a pid; a worker
    that was a spare has no job id in its command line, but always records
    its start)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else: a reused pid, checked below
    if not Path("/proc").is_dir():
        return True  # no /proc (not Linux): trust kill(0)
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    if start_ticks is not None:
        return process_start_ticks(pid) == start_ticks
    if job_id is not None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"dowsing.background.worker" in cmdline and job_id.encode() in cmdline
    return True


def session_pids(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`. A worker leads its
    own session and process group, so these are the worker and whatever it
    started, including processes that moved to process groups of their own
    (a local Ray's task workers do)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(sid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [sid]
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(entry)
            if fields is not None and fields[3] == str(sid) and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def signal_session(sid: int, sig: int) -> None:
    """Send `sig` to the worker's process group and to every other process
    of its session."""
    try:
        os.killpg(sid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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


def worker_live(state: JobState) -> bool:
    """Whether the job's worker is (still, or about to be) alive, judged from
    the store alone: its pid is our live worker, or it was submitted so
    recently that it may not have reported its pid yet."""
    if state.pid is None:
        created = parse_time(state.created_at)
        return created is not None and time.time() - created < START_TIMEOUT_S
    return pid_alive(state.pid, state.job_id, state.pid_start_ticks)


# Set to 0 to start every job in a fresh worker, without a warm spare.
SPARE_ENV = "DOWSING_SPARE_WORKER"


def spare_wanted() -> bool:
    """Whether the app's runner keeps a warm spare worker (DOWSING_SPARE_WORKER
    unset or anything but 0)."""
    return os.environ.get(SPARE_ENV, "1").strip() != "0"


class LocalJobRunner:
    """Runs each job in a worker process on this machine, one at a time.

    grace_s: how long cancel waits after SIGTERM before SIGKILL.
    spare: keep one worker started and warmed for the next job, handed the
        job at submit (the app's runner does; a runner made to read states,
        clear results or poll from a test does not need one). The spare is
        started here, and again whenever this runner has no worker of its
        own running: a spare warming up next to a running job would take a
        core from it. `close()` ends it.
    """

    def __init__(self, root: Path | None = None, grace_s: float = 3.0, spare: bool = False):
        self.store = JobStore(root)
        self.grace_s = grace_s
        self.keeps_spare = spare
        self._spare: SpareWorker | None = None
        # the app's pages share one runner across threads: one of them takes the spare, or starts one
        self._spare_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        # Workers started by this process, so their exit codes can be read
        # (and they are reaped rather than left as zombies: `_reap`).
        self._procs: dict[str, subprocess.Popen] = {}
        self._exit_codes: dict[str, int] = {}  # of reaped workers, by job id, until the job is looked at
        self._results = None
        if spare:
            self._ensure_spare()

    def _reap(self) -> None:
        """Collect every worker of ours that has ended, without waiting
        (waitpid WNOHANG through Popen.poll), keeping its exit code. Called
        on every submit, state and history, and as each worker ends, so a
        finished worker does not stay a zombie under a long-lived app
        process; once none runs, a spare is started again."""
        with self._reap_lock:  # the pages' threads and the threads awaiting each worker's end
            for job_id, proc in list(self._procs.items()):
                code = proc.poll()
                if code is not None:
                    self._exit_codes[job_id] = code
                    if self._procs.get(job_id) is proc:
                        del self._procs[job_id]
            idle = not self._procs
        if self.keeps_spare and self._spare is None and idle:
            self._ensure_spare()

    def _ensure_spare(self) -> None:
        """Start a spare unless one is kept already (a spare that died is
        found at the next submit, which then starts its job cold)."""
        with self._spare_lock:
            if self._spare is not None or not self.keeps_spare:
                return
            try:
                self._spare = SpareWorker(*self._worker_env())
            except OSError:
                pass  # jobs then start cold, as without a spare

    @property
    def spare_pid(self) -> int | None:
        """The pid of the spare waiting for the next job, if one is."""
        spare = self._spare
        return spare.pid if spare is not None and spare.alive() else None

    def close(self) -> None:
        """End the spare worker (jobs already running are not touched) and
        keep none from now on."""
        with self._spare_lock:
            self.keeps_spare = False
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    @property
    def results(self):
        """The engine's ResultStore (opened on first use)."""
        if self._results is None:
            from ..storage.store import ResultStore

            self._results = ResultStore()
        return self._results

    def _stored_result(self, kind: str, job_id: str):
        if KINDS[kind].engine_cache:
            return self.results.get(job_id)
        return self.store.read_result(job_id, kind)

    # -- submit ---------------------------------------------------------
    def submit(self, request: JobRequest) -> str:
        """Start (or join) the job for `request`; returns its id at once.

        Raises what the engine's cache_key raises on bad input (ModelError,
        DomainError, ValueError) before anything starts, and QueueFull (a
        ValueError) when MAX_ACTIVE_JOBS jobs are queued or running already.
        """
        self._reap()
        job_id = request.job_id()
        current = self.store.get(job_id)
        if current is not None and current.active:
            current = self.state(job_id)  # a dead worker turns "failed" here
            if current is not None and current.active:
                return job_id
        request_dict = request.to_dict()
        stored = self._stored_result(request.kind, job_id)
        if stored is not None:
            if current is None or current.status != "done":
                self._put_done_from_cache(job_id, request_dict, stored)
            return job_id

        # Dead workers turn "failed" here, so they do not hold places in the queue.
        for other in self.store.all():
            if other.active:
                self.state(other.job_id)
        run_id = uuid.uuid4().hex
        for attempt in (1, 2):  # a store found damaged has been started empty: once more in the new one
            try:
                with self.store.cache.transact():
                    # Checked again inside the transaction: two tabs submitting at
                    # the same moment must start one worker, not two.
                    again = self.store.get(job_id)
                    if again is not None and again.active:
                        return job_id
                    active = sum(1 for s in self.store.all() if s.active)
                    if active >= MAX_ACTIVE_JOBS:
                        raise QueueFull(
                            f"{active} runs are queued or running already, the most this machine takes "
                            f"({MAX_ACTIVE_JOBS}): wait for one to finish, or cancel one, and start this again.")
                    self.store.put(JobState(
                        job_id=job_id, status="queued", stage="queued", message="starting worker",
                        created_at=now_iso(), request=request_dict, summary=request_summary(request_dict),
                        run_id=run_id,
                    ))
                break
            except StoreDamaged:
                if attempt == 2:
                    raise
        self._exit_codes.pop(job_id, None)
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
        if self.keeps_spare:
            # the next spare starts when this worker ends, not at the next page's poll: the pages stop polling
            # once a job is done, and a worker ends about a second after its job does, so a spare that waited
            # for a poll could still be importing, or not started, when the user next clicks
            threading.Thread(target=self._after_exit, args=(proc,), daemon=True, name=f"await-{job_id[:8]}").start()
        return job_id

    def _after_exit(self, proc: subprocess.Popen) -> None:
        proc.wait()
        self._reap()

    def _worker_env(self) -> tuple[dict, str]:
        """(environment, working folder) of every worker, cold or spare."""
        package_root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["DOWSING_CACHE"] = str(self.store.root.parent)
        env["PYTHONUNBUFFERED"] = "1"
        return env, package_root

    def _spawn(self, job_id: str) -> subprocess.Popen:
        """The job's worker: the spare, handed the job id, when one waits
        with this job's environment; else a fresh process."""
        env, package_root = self._worker_env()
        # 0600: the log holds the user's facts in its error lines
        log = os.fdopen(os.open(self.store.log_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            proc = spare.hand_over(job_id) if spare.matches(env, package_root) else None
            if proc is not None:
                log.close()
                return proc
            spare.close()  # dead, or started under another environment: this job starts cold
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "dowsing.background.worker", job_id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=package_root,
                # its own session and process group, so cancel reaches everything it starts
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()

    def _put_done_from_cache(self, job_id: str, request_dict: dict, result) -> None:
        stamp = now_iso()
        self.store.put(JobState(
            job_id=job_id, status="done", stage="done", fraction=1.0, message="cached result", created_at=stamp,
            started_at=stamp, finished_at=stamp, request=request_dict, summary=result_summary(request_dict, result),
            run_id=uuid.uuid4().hex,
        ))

    # -- state ----------------------------------------------------------
    def state(self, job_id: str) -> JobState | None:
        """The job's state; a worker that died without finishing is turned
        into "failed" here, with the last line of its log as the error.
        None for an unknown id, and for anything that is not a job id (never
        looked up)."""
        if not is_job_id(job_id):
            return None
        self._reap()
        state = self.store.get(job_id)
        if state is None:
            return None
        if state.status == "done":
            return self._check_done(state)
        if not state.active:
            return state
        proc = self._procs.get(job_id)
        exit_code = proc.poll() if proc is not None else self._exit_codes.get(job_id)
        if proc is not None and exit_code is None:
            return state  # our own child and still running: the handle is authoritative
        if exit_code is None and worker_live(state):
            return state
        return self._mark_dead(state, exit_code)

    def _check_done(self, state: JobState) -> JobState:
        """Never "done" without a readable result: a damaged one is dropped
        on read, and the job is then recomputed under the same id."""
        if self._stored_result(state.kind, state.job_id) is not None:
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
            state.job_id, run_id=state.run_id, unless=("done", "failed", "cancelled"), status="failed", error=reason,
            message=reason, exit_code=exit_code, finished_at=now_iso(),
        )
        # None: the worker wrote its own final state in the meantime.
        return updated if updated is not None else self.store.get(state.job_id) or state

    def result(self, job_id: str):
        """The result of the job's kind; for a job no longer in the history,
        whichever kind kept a result under its id. None for anything that
        is not a job id (never looked up)."""
        if not is_job_id(job_id):
            return None
        state = self.store.get(job_id)
        for kind in [state.kind] if state is not None else list(KINDS):
            found = self._stored_result(kind, job_id)
            if found is not None:
                return found
        return None

    def partial_result(self, job_id: str):
        """While the job runs, what it has finished so far: for an analysis
        the ranking, its interval and the diagnosis, with the paper's fields
        None and extras["partial"] naming what is still computing. None once
        the job has ended (its result is then whole), or before anything is
        ready."""
        state = self.state(job_id) if is_job_id(job_id) else None
        if state is None or not state.active:
            return None
        return self.store.read_partial(job_id, state.kind)

    # -- cancel / history / delete ---------------------------------------
    def cancel(self, job_id: str) -> None:
        """SIGTERM the worker's process group and everything else it started
        (its session), SIGKILL what is left after grace_s; the state is
        "cancelled" when this returns. Anything that is not a job id is
        ignored."""
        if not is_job_id(job_id):
            return
        state = self.store.get(job_id)
        if state is None or not state.active:
            return
        self.store.update(
            job_id, run_id=state.run_id, unless=("done", "failed", "cancelled"),
            status="cancelled", message="cancelled", finished_at=now_iso(),
        )
        pid = self._worker_pid(job_id, state)
        if pid is not None:
            self._stop_session(job_id, pid)

    def _worker_pid(self, job_id: str, state: JobState) -> int | None:
        """The worker's pid; a worker just spawned gets a moment to report it."""
        pid = state.pid
        deadline = time.monotonic() + 2.0
        while pid is None and time.monotonic() < deadline:
            proc = self._procs.get(job_id)
            if proc is not None:
                return proc.pid
            time.sleep(0.05)
            fresh = self.store.get(job_id)
            pid = fresh.pid if fresh is not None else None
        return pid

    def _stop_session(self, job_id: str, pid: int) -> None:
        # Signalled only while its leader is our worker, or while members
        # outlive a dead leader: Linux hands out no pid that is still some
        # session's or group's id, so then they are still ours. A session that
        # is gone entirely is never signalled: its id may be reused.
        members = session_pids(pid)
        if not self._worker_running(job_id, pid) and (not members or pid in members):
            return
        signal_session(pid, signal.SIGTERM)
        if self._wait_session_gone(job_id, pid, self.grace_s):
            return
        signal_session(pid, signal.SIGKILL)
        self._wait_session_gone(job_id, pid, 2.0)

    def _wait_session_gone(self, job_id: str, pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._worker_running(job_id, pid) or session_pids(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _worker_running(self, job_id: str, pid: int) -> bool:
        proc = self._procs.get(job_id)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # also reaps it, so it does not linger as a zombie
        state = self.store.get(job_id)
        start_ticks = state.pid_start_ticks if state is not None and state.pid == pid else None
        return pid_alive(pid, job_id, start_ticks)

    def history(self, kind: str | None = None) -> list[JobState]:
        """Every job (of `kind`), newest first (liveness refreshed for active ones)."""
        self._reap()
        states = [self.state(s.job_id) if s.active else s for s in self.store.all() if kind in (None, s.kind)]
        return sorted((s for s in states if s is not None), key=lambda s: s.created_at or "", reverse=True)

    def delete(self, job_id: str) -> None:
        """Forget the job (cancelling it first if it runs). Its result stays
        stored, so the same request later is instant. Anything that is not a
        job id is ignored."""
        if not is_job_id(job_id):
            return
        self.cancel(job_id)
        self.store.delete(job_id)
        for kind in KINDS:
            self.store.remove_partial(job_id, kind)
        self._procs.pop(job_id, None)
        self._exit_codes.pop(job_id, None)
        self.store.log_path(job_id).unlink(missing_ok=True)


def newest_match(runner: JobRunner, kind: str, domain_names, fingerprint: str | None):
    """(state, result) of the newest finished job of `kind` on the same domain
    names (in any order) whose result's model has `fingerprint`; None when
    there is none. A job whose result is gone is passed over."""
    names = sorted(domain_names)
    for state in runner.history(kind):
        request = state.request or {}
        if state.status != "done" or sorted(d.get("name") for d in request.get("domains") or []) != names:
            continue
        result = runner.result(state.job_id)
        if result is not None and (result.model or {}).get("fingerprint") == fingerprint:
            return state, result
    return None


def default_runner(spare: bool = False) -> JobRunner:
    """The job runner the app uses; swap here for a distributed one. spare:
    keep a warm worker for the next job (the app's one runner per server
    process asks for it, as `spare_wanted` says; a runner made only to look
    at jobs does not)."""
    return LocalJobRunner(spare=spare)


# The stores that hold computed results, under the cache folder; clear_results empties them.
RESULT_STORES = ("results", "units", "domain_units", "plans")


def clear_results(cache: Path | None = None) -> dict:
    """Forget every computed result: empty the result, unit and plan stores
    (in place, so a running app sees them empty at once), remove the JSON
    results of validations, benchmarks and plans, the stores once moved aside
    as damaged, and the finished jobs with their logs. The domain sets
    (``workspace/``), model conversions (``models/``), the estimates'
    calibrations and any settings are never touched. Refused (ValueError)
    while a job is queued or running: it would write into what is cleared.
    Returns how much went: {"entries", "files", "jobs"}."""
    import shutil

    root = Path(cache) if cache is not None else cache_dir()
    runner = LocalJobRunner(root / "jobs")
    try:
        states = runner.history()
        busy = [s for s in states if s.active]
        if busy:
            raise ValueError(f"{len(busy)} job{'' if len(busy) == 1 else 's'} queued or running: "
                             "cancel them or let them finish, then clear the results.")
        entries = files = 0
        for name in RESULT_STORES:
            if (root / name / "cache.db").is_file():
                store = DataCache(root / name)
                entries += store.clear()
                store.close()
        results = runner.store.root / "results"
        aside = [p for p in root.glob("*.damaged-*") if p.name.split(".damaged-")[0] in RESULT_STORES]
        aside += list(runner.store.root.glob("cache.damaged-*"))
        for path in ([results] if results.exists() else []) + aside:
            # only what lies in the cache folder itself (a link is removed, never followed)
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            elif path.resolve().is_relative_to(root.resolve()):
                files += sum(1 for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
        for state in states:
            runner.delete(state.job_id)
        return {"entries": entries, "files": files, "jobs": len(states)}
    finally:
        runner.store.close()


# What clear_results keeps: the user's domain sets, model conversions and the estimates' calibrations.
KEPT_FOLDERS = ("workspace", "models", "estimates")


def cache_usage(cache: Path | None = None) -> dict:
    """Bytes on disk under the cache folder: {"results": what clear_results
    can free (results, units, plans, jobs and their logs), "kept": the domain
    sets, model conversions and calibrations it keeps}. Links are not followed."""
    root = Path(cache) if cache is not None else cache_dir()
    usage = {"results": 0, "kept": 0}
    for top in root.iterdir() if root.is_dir() else ():
        part = "kept" if top.name in KEPT_FOLDERS else "results"
        files = [top] if not top.is_dir() or top.is_symlink() else top.rglob("*")
        for path in files:
            try:
                if path.is_file() and not path.is_symlink():
                    usage[part] += path.stat().st_size
            except OSError:  # removed while counting
                pass
    return usage
