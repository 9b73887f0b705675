"""Background jobs: real worker processes on a tiny model, the runner lock,
cancel, crashes and a corrupt cached result."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from dowsing.config import AnalysisConfig
from dowsing.domains import Domain, default_domains
from dowsing.jobs import (
    ACTIVE,
    WAITING_MESSAGE,
    Executor,
    JobRequest,
    JobState,
    JobStore,
    LocalProcessExecutor,
    default_executor,
)
from dowsing.models import ModelError
from dowsing.result import DomainResult, Result

ENGINE_STAGES = {"concept vectors", "gradients", "curvature", "solve", "saturation"}

SMALL = [
    Domain("Physics", ("Light travels fast.", "Mass bends space.", "Heat flows to cold.")),
    Domain("Biology", ("Cells divide.", "DNA stores genes.", "Leaves make sugar.")),
]


@pytest.fixture
def executor(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    ex = LocalProcessExecutor()
    yield ex
    for state in ex.store.all():  # never leave a worker behind
        if state.active:
            ex.cancel(state.job_id)
    ex.store.close()


def test_the_engine_reports_every_stage_to_its_progress_callback(tiny_gpt2_dir, tmp_path, monkeypatch):
    from dowsing.analysis import run_analysis

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    reports = []
    run_analysis(str(tiny_gpt2_dir), list(SMALL), AnalysisConfig(), progress=reports.append, use_cache=False)
    stages = [p.stage for p in reports]
    assert stages[0] == "loading model" and stages[-1] == "done"
    assert {"concept vectors", "solve", "saturation"} <= set(stages) and set(stages) & ENGINE_STAGES
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def request(model_dir, domains=SMALL, name="Science") -> JobRequest:
    return JobRequest(model_id=str(model_dir), domains=list(domains), config=AnalysisConfig(), domain_set_name=name)


def wait(ex, job_id, until, timeout_s=90.0, interval_s=0.05) -> tuple[JobState, list[JobState]]:
    """Poll until `until(state)`; returns the last state and every state seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        state = ex.state(job_id)
        seen.append(state)
        if until(state):
            return state, seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last state {state}")
        time.sleep(interval_s)


def running(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process, read from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rindex(")") + 2:].startswith(("Z", "X"))


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_local_executor_is_an_executor(executor):
    assert isinstance(executor, Executor)
    assert isinstance(default_executor(), LocalProcessExecutor)


def test_request_and_state_round_trip_as_json(tiny_gpt2_dir):
    req = request(tiny_gpt2_dir)
    assert JobRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == req
    state = JobState(job_id="abc", status="running", stage="solve", fraction=0.5, request=req.to_dict())
    assert JobState.from_json(state.to_json()) == state


def test_a_job_runs_a_repeat_is_instant_a_corrupt_result_reruns_and_jobs_queue(executor, tiny_gpt2_dir, tmp_path):
    req = request(tiny_gpt2_dir)
    job_id = executor.submit(req)
    assert job_id == req.job_id()
    state, seen = wait(executor, job_id, lambda s: not s.active)
    assert state.status == "done", state
    assert (state.stage, state.fraction, state.error) == ("done", 1.0, None)
    # Worker progress reaches the job state; which engine stages a 50 ms poll
    # catches on a tiny model is timing, so those are checked in-process below.
    stages = {s.stage for s in seen}
    assert "loading model" in stages, stages
    running = [s.fraction for s in seen if s.status == "running"]
    assert running == sorted(running)  # never goes back; the rise itself is checked in-process
    # State is JSON text in diskcache, never a pickle.
    assert isinstance(executor.store.cache.get(JobStore.PREFIX + job_id), str)

    result = executor.result(job_id)
    assert [d.name for d in result.domains] == ["Physics", "Biology"]
    assert state.summary == {
        "model_id": str(tiny_gpt2_dir), "domain_set_name": "Science", "n_domains": 2,
        "top_domain": result.ranked()[0].name, "model_parameters": result.model["parameters"],
    }
    # Another process (a second tab) sees the same job.
    assert LocalProcessExecutor().state(job_id).status == "done"

    started = time.monotonic()
    assert executor.submit(req) == job_id
    assert time.monotonic() - started < 2.0
    again = executor.state(job_id)
    assert (again.status, again.run_id, again.pid) == ("done", state.run_id, state.pid)
    assert [s.job_id for s in executor.history()] == [job_id]

    executor.delete(job_id)
    assert executor.history() == [] and executor.state(job_id) is None
    assert executor.result(job_id) is not None  # the result stays cached
    executor.submit(req)  # so the same request is done at once, no worker
    assert executor.state(job_id).pid is None and executor.state(job_id).status == "done"

    # A corrupt cached result is never shown as done: it is recomputed...
    import diskcache

    from dowsing.store import ResultStore

    entries = diskcache.Cache(str(ResultStore().folder))
    entries.set(job_id, entries.get(job_id)[:-40])  # a truncated write
    entries.close()
    recomputing = executor.state(job_id)
    assert recomputing.status in ACTIVE and recomputing.run_id != state.run_id
    assert executor.result(job_id) is None
    # ...and a different request submitted meanwhile waits for it; this one
    # names a model folder that cannot load, so it then fails with the
    # loader's one-line message.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    other_id = executor.submit(request(broken, SMALL, "Broken"))
    assert other_id != job_id
    saw_waiting = False
    deadline = time.monotonic() + 120
    while True:
        a, b = executor.state(job_id), executor.state(other_id)
        assert not (a.status == "running" and b.status == "running")
        if a.status == "running" and b.status == "queued" and b.message == WAITING_MESSAGE:
            saw_waiting = True
        if not a.active and not b.active:
            break
        assert time.monotonic() < deadline, (a, b)
        time.sleep(0.05)
    assert saw_waiting
    assert (a.status, b.status) == ("done", "failed")
    assert ts(b.started_at) >= ts(a.finished_at)
    assert [d.name for d in executor.result(job_id).domains] == ["Physics", "Biology"]
    assert b.error.startswith("Model ") and "could not be loaded" in b.error, b.error
    assert "\n" not in b.error and executor.result(other_id) is None
    assert [s.job_id for s in executor.history()] == [other_id, job_id]


def test_a_queued_job_waits_for_the_runner_lock_and_can_be_cancelled(executor, tiny_gpt2_dir):
    with open(executor.store.lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another job holds the machine
        job_id = executor.submit(request(tiny_gpt2_dir))
        state, _ = wait(executor, job_id, lambda s: s.message == WAITING_MESSAGE, timeout_s=60)
        assert state.status == "queued" and state.pid is not None
        started = time.monotonic()
        executor.cancel(job_id)
        assert executor.state(job_id).status == "cancelled"
        assert time.monotonic() - started < 10
        assert not running(state.pid)


def test_a_just_spawned_worker_is_not_declared_dead(executor, tiny_gpt2_dir, monkeypatch):
    """Between fork and exec a worker's /proc cmdline is still its parent's.
    A child that is alive but not (yet) recognisable as a worker stands in for
    that window: the executor must trust its own process handle, not /proc."""
    import subprocess
    import sys

    def spawn_not_yet_a_worker(job_id):
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)

    monkeypatch.setattr(executor, "_spawn", spawn_not_yet_a_worker)
    job_id = executor.submit(request(tiny_gpt2_dir))
    for _ in range(20):
        state = executor.state(job_id)
        assert state.status == "queued", state
        time.sleep(0.05)
    proc = executor._procs[job_id]
    proc.kill()
    proc.wait()
    # Once the child has exited, the same handle reports it as dead.
    state = executor.state(job_id)
    assert state.status == "failed" and "signal 9" in state.error, state


def test_a_killed_worker_fails_and_a_running_job_cancels(executor, tiny_gpt2_dir):
    req = request(tiny_gpt2_dir, default_domains(), "Science (paper)")  # long enough to interrupt
    job_id = executor.submit(req)
    state, _ = wait(executor, job_id, lambda s: s.status == "running" or not s.active)
    assert state.status == "running"
    os.kill(state.pid, signal.SIGKILL)
    # A fresh executor (the page after a restart) reads the dead pid...
    other, _ = wait(LocalProcessExecutor(), job_id, lambda s: not s.active, timeout_s=10)
    assert other.status == "failed" and other.error and "\n" not in other.error
    # ...and the one that started it knows the exit signal.
    failed = executor.state(job_id)
    assert failed.status == "failed" and "\n" not in failed.error

    # A failed job can be submitted again: same id, a fresh run.
    assert executor.submit(req) == job_id
    state, _ = wait(executor, job_id, lambda s: s.stage in ENGINE_STAGES or not s.active, timeout_s=90)
    assert state.status == "running" and state.run_id != failed.run_id, state
    started = time.monotonic()
    executor.cancel(job_id)
    assert executor.state(job_id).status == "cancelled"
    assert time.monotonic() - started < 10
    assert not running(state.pid)
    time.sleep(0.5)  # a late write of the dying worker must not undo the cancel
    assert executor.state(job_id).status == "cancelled"


def test_a_missing_model_is_refused_before_any_worker_starts(executor, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        executor.submit(request(tmp_path / "no-such-model"))
    assert executor.history() == []


# --- the worker in this process, with the engine replaced ---------------------

def _queued_job(store: JobStore, model_dir) -> str:
    store.put(JobState(job_id="job1", status="queued", request=request(model_dir).to_dict(), run_id="run1"))
    return "job1"


def _fake_result() -> Result:
    domain = DomainResult(
        name="Biology", rank=1, mean=1.0, share_pct=100.0, t_vs_rest=None, p_value=None, n_facts=3,
        delta_n_10pct=None, delta_n_direct=None, delta_n_reason="test", saturation={}, solver={},
        concept_vector_norm=1.0,
    )
    return Result(model={"parameters": 7}, config={}, domains=[domain], per_example=[], timings={})


def test_worker_throttles_progress_and_writes_the_last(tmp_path, monkeypatch, tiny_gpt2_dir):
    from dowsing import analysis, worker

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    store = JobStore()
    job_id = _queued_job(store, tiny_gpt2_dir)
    writes = []
    real_update = store.update

    def counting_update(*args, **fields):
        if "fraction" in fields:
            writes.append(fields)
        return real_update(*args, **fields)

    def fake_run(model_id, domains, config=None, progress=None, use_cache=True, executor=None):
        for i in range(2000):  # ~1 s of chatty progress
            progress(analysis.Progress("solve", i / 2000, f"iteration {i}"))
            time.sleep(0.0005)
        progress(analysis.Progress("saturation", 0.99, "last word"))
        return _fake_result()

    monkeypatch.setattr(store, "update", counting_update)
    monkeypatch.setattr(analysis, "run_analysis", fake_run)
    started = time.monotonic()
    assert worker.run_job(job_id, store) == 0
    seconds = time.monotonic() - started
    progress_writes = [w for w in writes if w.get("stage") not in ("starting", "done")]
    assert 1 <= len(progress_writes) <= worker.WRITES_PER_S * seconds + 2
    assert progress_writes[-1]["message"] == "last word"
    state = store.get(job_id)
    assert (state.status, state.summary["top_domain"], state.pid) == ("done", "Biology", os.getpid())


@pytest.mark.parametrize(
    "error, expected",
    [(ModelError("Model 'x' could not be loaded: gone."), "Model 'x' could not be loaded: gone."),
     (ValueError("damping must be >= 0"), "damping must be >= 0"),
     (RuntimeError("boom\nsecond line"), "RuntimeError: boom")],
)
def test_worker_failures_are_one_line(tmp_path, monkeypatch, tiny_gpt2_dir, error, expected):
    from dowsing import analysis, worker

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    store = JobStore()
    job_id = _queued_job(store, tiny_gpt2_dir)

    def fake_run(*args, **kwargs):
        raise error

    monkeypatch.setattr(analysis, "run_analysis", fake_run)
    assert worker.run_job(job_id, store) == 1
    state = store.get(job_id)
    assert (state.status, state.error) == ("failed", expected)
    assert state.status not in ACTIVE


def test_cancel_kills_a_worker_that_ignores_sigterm(executor):
    import subprocess
    import sys

    # A stand-in worker stuck where SIGTERM cannot reach Python code; the
    # trailing arguments make it look like `dowsing.worker job2` in /proc.
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)", "dowsing.worker", "job2"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    assert stuck.stdout.readline().strip() == b"ready"
    executor.store.put(JobState(job_id="job2", status="running", pid=stuck.pid, run_id="run2"))
    executor.grace_s = 0.5
    assert executor.state("job2").status == "running"  # alive, checked through /proc
    executor.cancel("job2")
    assert stuck.wait(timeout=5) == -signal.SIGKILL
    assert executor.state("job2").status == "cancelled"
