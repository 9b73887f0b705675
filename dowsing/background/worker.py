"""The worker process of one job, whatever its kind: ``python -m dowsing.background.worker JOB_ID``,
or, started before there is a job, ``... worker --spare`` (`serve_as_spare`).

It reads the job's request from the job store, waits for the machine's runner
lock (one heavy run at a time, whatever its kind; meanwhile the job stays
"queued" and says behind which run), opens the unit executor the request
names (in this process, or Ray), and runs the kind's engine call
(`run_analysis`, `validate`, `run_benchmark` or a plan's `pilot_measurements`)
in this process with one progress writer that puts stage / fraction / message
into the job state. It ends with the state "done" (exit 0), "failed" with a
one-line error (exit 1) or, on SIGTERM, "cancelled" (exit 143). An
analysis's result lands in the engine's ResultStore through run_analysis;
the other kinds' results are written here, as JSON, to the job store.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time
import traceback

from ..pipelines.executor import RunCancelled
from .jobs import (
    LOG_NOTE_PREFIX,
    JobRequest,
    JobState,
    JobStore,
    is_job_id,
    now_iso,
    one_line,
    process_start_ticks,
    result_summary,
    waiting_message,
    worker_live,
)
from .spare import SPARE_FLAG

FINAL = ("done", "failed", "cancelled")
# At most this many progress writes per second reach the job store.
WRITES_PER_S = 5.0
LOCK_POLL_S = 0.25
CANCELLED_EXIT = 128 + signal.SIGTERM


class JobCancelled(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no `except
    Exception` in the engine swallows it."""


def _on_sigterm(signum, frame):
    # One cancellation is enough: ignore repeats while cleaning up.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise JobCancelled()


def note(text: str) -> None:
    print(f"{LOG_NOTE_PREFIX}{time.strftime('%H:%M:%S')} {text}", flush=True)


class ProgressWriter:
    """The progress callback: keeps the latest Progress in memory and a
    background thread writes it to the job state at most WRITES_PER_S times a
    second, so a chatty engine never waits on the disk; `close()` writes the last."""

    def __init__(self, store: JobStore, job_id: str, run_id: str):
        self.store = store
        self.job_id = job_id
        self.run_id = run_id
        self._latest = None
        self._written = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress-writer", daemon=True)
        self._thread.start()

    def __call__(self, progress) -> None:
        fraction = min(1.0, max(0.0, float(getattr(progress, "fraction", 0.0) or 0.0)))
        item = (str(getattr(progress, "stage", "")), fraction, str(getattr(progress, "message", "")))
        with self._lock:
            self._latest = item

    def partial(self, result) -> None:
        """Keep what the run has finished so far (an analysis's ranking) in
        the job store at once, for the pages to show while the rest computes.
        A failure to write it is noted and the run goes on: the whole result
        still comes."""
        try:
            self.store.write_partial(self.job_id, "analysis", result)
        except (OSError, ValueError) as exc:
            note(f"the ranking could not be kept ahead of the result: {exc}")

    def _loop(self) -> None:
        while not self._stop.wait(1.0 / WRITES_PER_S):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            item = self._latest
        if item is None or item == self._written:
            return
        stage, fraction, message = item
        self.store.update(self.job_id, run_id=self.run_id, unless=FINAL, stage=stage, fraction=fraction, message=message)
        self._written = item

    def close(self, flush: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        if flush:
            self.flush()


def queue_position(store: JobStore, me: JobState) -> tuple[list[JobState], JobState | None]:
    """(the live jobs queued before `me`, oldest first; the job `me` waits
    behind: the one running, else the oldest of those). Jobs start in the
    order they were submitted, not as the lock happens to fall."""
    mine = (me.created_at, me.job_id)
    running, before = None, []
    for other in store.all():
        if other.job_id == me.job_id or other.status not in ("queued", "running") or not worker_live(other):
            continue
        if other.status == "running":
            running = other
        elif (other.created_at, other.job_id) < mine:
            before.append(other)
    before.sort(key=lambda s: (s.created_at, s.job_id))
    return before, running or (before[0] if before else None)


def _acquire_runner_lock(store: JobStore, job_id: str, run_id: str):
    """Block until this process holds the machine's runner lock; the job
    stays "queued" meanwhile and says behind which run. Returns the open
    lock file (closing it releases)."""
    handle = open(store.lock_path, "a+")
    shown = None
    while True:
        me = store.get(job_id)
        if me is None or me.run_id != run_id or me.status in FINAL:
            handle.close()
            raise JobCancelled()  # cancelled or deleted while waiting
        before, ahead = queue_position(store, me)
        if not before:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                pass
        others_before = len(before) - 1 if ahead is not None and ahead.status == "queued" else len(before)
        waiting = (ahead.job_id if ahead is not None else None, waiting_message(ahead, others_before))
        if waiting != shown:
            shown = waiting
            note(waiting[1])
            store.update(job_id, run_id=run_id, unless=FINAL, stage="queued", waiting_for=waiting[0],
                         message=waiting[1])
        time.sleep(LOCK_POLL_S)


def open_executor(request: JobRequest):
    """The unit executor the request names, with Ray started or joined (as
    the command line's `open_executor`); what it runs on goes to the log."""
    from ..pipelines.executor import ExecutorConfig, make_executor

    previous = signal.getsignal(signal.SIGTERM)
    try:
        executor = make_executor(ExecutorConfig.from_dict(request.executor), request.run_device)
    finally:
        # ray.init puts in a SIGTERM handler that exits at once; the worker's
        # own one cancels the run's Ray tasks and records "cancelled"
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if executor.kind != "local":
        resources = executor.describe()
        note(f"ray: {resources['nodes']} node(s), {resources['CPU']} CPU, {resources['GPU']} GPU")
    return executor


def check_model_paths(request: JobRequest) -> None:
    """A job's model and checkpoints come from the app, so they must lie
    under the model roots (`models.allowed_model`); ModelError or
    CheckpointError, one line, otherwise."""
    from ..access.checkpoints import allowed_checkpoints
    from ..access.models import allowed_model

    allowed_model(request.model_id)
    allowed_checkpoints(getattr(request.config, "checkpoints", None) or ())


def run_request(request: JobRequest, store: JobStore, job_id: str, progress):
    """Run the request's kind in this process and keep its result: the
    engine keeps an analysis's; the others are written to the job store."""
    check_model_paths(request)
    executor = open_executor(request)
    try:
        result = request.job_kind.run(request, progress, executor)
    finally:
        executor.shutdown()
    if not request.job_kind.engine_cache:
        store.write_result(job_id, request.kind, result)
    return result


def run_job(job_id: str, store: JobStore | None = None) -> int:
    """Run one queued job to its end; the process exit code."""
    store = store or JobStore()
    state = store.get(job_id)
    if state is None:
        print(f"No job {job_id} in {store.root}.", flush=True)
        return 1
    if state.status != "queued":
        note(f"job {job_id} is {state.status}; nothing to do")
        return 0
    run_id = state.run_id
    # the start time with the pid: a later process given the same pid is not taken for this worker
    store.update(job_id, run_id=run_id, unless=FINAL, pid=os.getpid(), pid_start_ticks=process_start_ticks(os.getpid()))
    note(f"worker pid {os.getpid()} for {state.kind} job {job_id}")
    lock = None
    writer = None
    started = time.monotonic()
    try:
        lock = _acquire_runner_lock(store, job_id, run_id)
        store.update(
            job_id, run_id=run_id, unless=FINAL, status="running", stage="starting", fraction=0.0,
            message="starting the engine", started_at=now_iso(), waiting_for=None,
        )
        note("running")
        request = JobRequest.from_dict(state.request)
        writer = ProgressWriter(store, job_id, run_id)
        result = run_request(request, store, job_id, writer)
        writer.close()
        store.remove_partial(job_id, state.kind)  # the whole result supersedes it
        seconds = time.monotonic() - started
        store.update(
            job_id, run_id=run_id, unless=FINAL, status="done", stage="done", fraction=1.0,
            message=f"finished in {seconds:.1f} s", error=None, finished_at=now_iso(),
            summary=result_summary(state.request, result),
        )
        note(f"done in {seconds:.1f} s")
        return 0
    except (JobCancelled, RunCancelled):
        _stopped(store, job_id, run_id, writer)
        return CANCELLED_EXIT
    except Exception as exc:  # noqa: BLE001 - every failure must reach the job state
        _failed(store, job_id, run_id, writer, exc)
        return 1
    finally:
        if lock is not None:
            lock.close()


def _stopped(store: JobStore, job_id: str, run_id: str, writer) -> None:
    if writer is not None:
        writer.close(flush=False)
    store.update(job_id, run_id=run_id, unless=FINAL, status="cancelled", message="cancelled", finished_at=now_iso())
    note("cancelled")


def _failed(store: JobStore, job_id: str, run_id: str, writer, exc: Exception) -> None:
    if writer is not None:
        writer.close(flush=False)
    error = _error_line(exc)
    if not _is_input_error(exc):
        traceback.print_exc()
    print(error, flush=True)
    store.update(
        job_id, run_id=run_id, unless=FINAL, status="failed", error=error, message=error, exit_code=1,
        finished_at=now_iso(),
    )


def _is_input_error(exc: BaseException) -> bool:
    from ..domains import DomainError
    from ..access.models import ModelError

    return isinstance(exc, (ModelError, DomainError, ValueError))


def _error_line(exc: BaseException) -> str:
    """Input errors keep their own one-line message; anything else is
    'TypeName: message' so a bug is recognisable."""
    text = one_line(str(exc))
    if _is_input_error(exc):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def warm_up() -> None:
    """Import what every run imports first, so a spare handed a job starts
    computing at once: torch, the engine's pipelines, and the pieces of
    transformers `load_model` takes (the Auto classes and the default
    model's Llama classes). About 5 s in a fresh process; `load_model` of the
    default model then takes 0.6 s instead of 5. Then the default model
    itself, where its converted copy exists (`models.preload_default`): most
    runs use it, and its job's `load_model` then takes none of those 0.6 s.
    A job that wants another model frees it first, so the spare's memory is
    the default model's (about 0.5 GB) only while it waits."""
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import configuration_llama, modeling_llama, tokenization_llama  # noqa: F401

    from ..access import models
    from ..kernels import diagnosis  # noqa: F401
    from ..pipelines import analysis, plan  # noqa: F401
    from ..storage import store  # noqa: F401
    from ..validation import benchmark, validate  # noqa: F401

    models.preload_default()


def await_job(stream) -> str | None:
    """The job id of the one line read from `stream`; None at EOF (the
    runner closed, or its process died) or for anything that is not a job id."""
    line = stream.readline()
    if isinstance(line, bytes):
        line = line.decode("ascii", errors="replace")
    job_id = line.strip()
    return job_id if is_job_id(job_id) else None


def take_over_output(log_path) -> None:
    """Point fd 1 and 2 at the job's log (appended to: the runner has
    created it, 0600) and fd 0 at /dev/null, as a cold worker's are, so what
    this process and its children write lands in the job's log."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
    finally:
        os.close(log)
        os.close(null)


def serve_as_spare(stream=None) -> int:
    """Warm up, wait for one job id on stdin, then run that job as a cold
    worker would; exit 0 at once without one."""
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - the job's own run reports what is broken, in its log
        pass
    job_id = await_job(stream if stream is not None else sys.stdin.buffer)
    if job_id is None:
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    take_over_output(JobStore().log_path(job_id))
    return run_job(job_id)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == [SPARE_FLAG]:
        # until it has a job, SIGTERM ends a spare as it ends any process: it has nothing to clean up
        try:
            return serve_as_spare()
        except (JobCancelled, RunCancelled):
            return CANCELLED_EXIT
    signal.signal(signal.SIGTERM, _on_sigterm)
    if len(args) != 1 or not is_job_id(args[0]):
        print("usage: python -m dowsing.background.worker JOB_ID (a job id: 64 hex digits)", file=sys.stderr)
        return 2
    try:
        return run_job(args[0])
    except (JobCancelled, RunCancelled):
        return CANCELLED_EXIT


if __name__ == "__main__":
    sys.exit(main())
