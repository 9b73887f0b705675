"""The warm spare worker: real spare processes handed real jobs on a tiny
model, cancel of a job in a former spare, a killed spare, the spare's end
with its runner or its app, and liveness by pid and start time."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dowsing.background.jobs import (
    SPARE_ENV,
    JobState,
    LocalJobRunner,
    pid_alive,
    process_start_ticks,
    spare_wanted,
    worker_live,
)
from dowsing.background.spare import SpareWorker
from dowsing.domains import default_domains
from test_jobs import ENGINE_STAGES, JOB2, SMALL, request, running, session_members, wait

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    jobs = LocalJobRunner(spare=True)
    yield jobs
    for state in jobs.store.all():  # never leave a worker behind
        if state.active:
            jobs.cancel(state.job_id)
    jobs.close()
    jobs.store.close()


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def test_a_job_runs_in_the_spare_and_a_new_spare_waits_once_the_runner_is_idle(runner, tiny_gpt2_dir):
    spare = runner.spare_pid
    deadline = time.monotonic() + 5
    while b"--spare" not in cmdline(spare):  # read right at exec, the command line may still be empty
        assert time.monotonic() < deadline, cmdline(spare)
        time.sleep(0.02)
    # The spare is no job: not in the store, not in the history, and it holds no runner lock.
    assert runner.store.all() == [] and runner.history() == []
    with open(runner.store.lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    job_id = runner.submit(request(tiny_gpt2_dir))
    done, _ = wait(runner, job_id, lambda s: not s.active)
    assert done.status == "done", done
    assert done.pid == spare and done.pid_start_ticks is not None
    assert runner.result(job_id).ranked()[0].name in ("Physics", "Biology")
    # The job's log is its own, private, and holds what the former spare wrote once it had the job.
    log = runner.store.log_path(job_id)
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert f"worker pid {spare} for analysis job {job_id}" in log.read_text()
    # Once the runner's worker has ended, the next spare starts, with no page polling the runner: the pages
    # stop polling once the job is done, and its worker ends about a second after that.
    deadline = time.monotonic() + 30
    while runner.spare_pid in (None, spare):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert running(runner.spare_pid) and not running(spare)


def test_cancel_of_a_job_in_a_former_spare_ends_its_whole_session(runner, tiny_gpt2_dir):
    spare = runner.spare_pid
    job_id = runner.submit(request(tiny_gpt2_dir, default_domains(), "Science (paper)"))  # long enough to cancel
    state, _ = wait(runner, job_id, lambda s: s.stage in ENGINE_STAGES or not s.active)
    assert state.status == "running" and state.pid == spare, state
    assert os.getsid(spare) == spare and session_members(spare)  # the spare leads its own session
    # The page after an app restart: a runner that did not start the worker knows it by pid and start
    # time (its command line names no job), sees it running, and its cancel reaches the whole session.
    page = LocalJobRunner()
    assert page.state(job_id).status == "running" and page.state(job_id).pid_start_ticks is not None
    page.cancel(job_id)
    assert page.state(job_id).status == "cancelled" and runner.state(job_id).status == "cancelled"
    assert session_members(spare) == [] and not running(spare)
    time.sleep(0.5)  # a late write of the dying worker must not undo the cancel
    assert runner.state(job_id).status == "cancelled"


def test_a_killed_spare_is_passed_over_and_the_job_runs_in_a_fresh_worker(runner, tiny_gpt2_dir):
    spare = runner.spare_pid
    os.kill(spare, signal.SIGKILL)
    assert gone_within(spare, 5)
    job_id = runner.submit(request(tiny_gpt2_dir, SMALL, "After a crash"))
    state, _ = wait(runner, job_id, lambda s: s.pid is not None or not s.active)
    assert state.pid != spare
    try:
        assert job_id.encode() in cmdline(state.pid)  # a cold worker names its job
    except FileNotFoundError:
        pass  # already finished
    done, _ = wait(runner, job_id, lambda s: not s.active)
    assert done.status == "done" and done.pid == state.pid, done


def test_a_spare_started_under_another_environment_is_not_used(runner, tiny_gpt2_dir, monkeypatch):
    spare = runner.spare_pid
    monkeypatch.setenv("DOWSING_SOME_SETTING", "changed after the spare started")
    job_id = runner.submit(request(tiny_gpt2_dir))
    state, _ = wait(runner, job_id, lambda s: s.pid is not None or not s.active)
    assert state.pid != spare and gone_within(spare, 5)
    assert wait(runner, job_id, lambda s: not s.active)[0].status == "done"


def test_closing_the_runner_ends_its_spare_and_keeps_none(runner):
    spare = runner.spare_pid
    runner.close()
    assert gone_within(spare, 3) and runner.spare_pid is None
    runner.history()  # an idle poll starts no new one once closed
    assert runner.spare_pid is None


def test_a_spare_exits_doing_nothing_at_eof_or_on_a_line_that_is_no_job_id(tmp_path):
    jobs = LocalJobRunner(tmp_path / "jobs")
    env, cwd = jobs._worker_env()
    jobs.store.close()
    at_eof, bad_line = SpareWorker(env, cwd), SpareWorker(env, cwd)
    at_eof.proc.stdin.close()
    bad_line.proc.stdin.write(b"../../etc/passwd\n")
    bad_line.proc.stdin.close()
    assert at_eof.proc.wait(timeout=60) == 0 and bad_line.proc.wait(timeout=60) == 0
    assert not (tmp_path / "jobs" / "logs").exists() or not any((tmp_path / "jobs" / "logs").iterdir())


def test_a_spare_does_not_outlive_its_app(tmp_path):
    """The app process killed outright: the kernel closes its end of the
    spare's stdin, and the spare, at EOF, exits."""
    app = ("import sys, time; from dowsing.background.jobs import LocalJobRunner; "
           f"r = LocalJobRunner({str(tmp_path / 'jobs')!r}, spare=True); print(r.spare_pid, flush=True); "
           "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", app], stdout=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    spare = int(proc.stdout.readline())
    assert running(spare)
    proc.kill()
    proc.wait()
    assert gone_within(spare, 60)  # it may still be importing when its app dies


def test_liveness_pairs_the_pid_with_its_start_time_and_old_states_use_the_command_line(tmp_path):
    # A live process whose command line names no job, as a former spare's does not.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = process_start_ticks(other.pid)
        assert isinstance(ticks, int) and ticks > 0
        mine = JobState(job_id=JOB2, status="running", pid=other.pid, pid_start_ticks=ticks)
        assert worker_live(mine) and pid_alive(other.pid, JOB2, ticks)
        # The same pid with another start time is a reused pid: not our worker.
        reused = JobState(job_id=JOB2, status="running", pid=other.pid, pid_start_ticks=ticks - 1)
        assert not worker_live(reused)
        # A state from before start times were kept falls back to the command line.
        assert not worker_live(JobState(job_id=JOB2, status="running", pid=other.pid))
    finally:
        other.kill()
        other.wait()
    assert not worker_live(mine)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dowsing.background.worker",
                                 JOB2])
    try:
        jobs = LocalJobRunner(tmp_path / "jobs")
        jobs.store.put(JobState(job_id=JOB2, status="running", pid=stand_in.pid, run_id="old"))
        assert jobs.state(JOB2).status == "running"
        jobs.store.put(JobState(job_id=JOB2, status="running", pid=stand_in.pid, run_id="wrong",
                                pid_start_ticks=process_start_ticks(stand_in.pid) + 7))
        assert jobs.state(JOB2).status == "failed"
        jobs.store.close()
    finally:
        stand_in.kill()
        stand_in.wait()


def test_the_spare_is_on_unless_switched_off(monkeypatch):
    monkeypatch.delenv(SPARE_ENV, raising=False)
    assert spare_wanted()
    monkeypatch.setenv(SPARE_ENV, "0")
    assert not spare_wanted()


def test_two_pages_submitting_at_once_share_one_spare_and_closing_spares_their_jobs(runner, tiny_gpt2_dir):
    """The app's pages run in threads of one process and share its runner:
    of two submits at the same moment one gets the spare and the other a
    fresh worker; closing the runner then ends no job, only the spare."""
    import threading

    spare = runner.spare_pid
    requests = [request(tiny_gpt2_dir, SMALL, "First"), request(tiny_gpt2_dir, list(reversed(SMALL)), "Second")]
    ids, start = [None, None], threading.Barrier(2)

    def submit(i):
        start.wait()
        ids[i] = runner.submit(requests[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ids[0] != ids[1]
    runner.close()
    done = [wait(runner, job_id, lambda s: not s.active)[0] for job_id in ids]
    assert [s.status for s in done] == ["done", "done"], done
    assert sorted(s.pid == spare for s in done) == [False, True]


def test_a_preloaded_model_is_the_next_load_of_it_once_and_another_model_frees_it(tiny_gpt2_dir, tiny_llama_dir,
                                                                                   tmp_path):
    """What a spare loads before its job is what the job's load_model gets,
    once, while the model's files are unchanged; a job that wants another
    model (or dtype) gets that one, and the preloaded copy is let go."""
    import shutil

    from dowsing.access import models

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2_dir, folder)
    kept = models.preload(str(folder))
    assert models.load_model(str(folder)) is kept
    again = models.load_model(str(folder))  # taken once: this one is loaded
    assert again is not kept and again.info.fingerprint == kept.info.fingerprint

    for other in (lambda: models.load_model(str(tiny_llama_dir)), lambda: models.load_model(str(folder), dtype="float64")):
        kept = models.preload(str(folder))
        assert other() is not kept and models._preloaded == {}

    kept = models.preload(str(folder))
    config = folder / "config.json"
    config.write_text(config.read_text().replace("}", ', "dowsing_note": 1}', 1))  # its files changed since
    assert models.load_model(str(folder)) is not kept and models._preloaded == {}


def test_the_default_is_preloaded_only_where_its_converted_copy_exists(tmp_path, monkeypatch,
                                                                       converted_embedded_model):
    from dowsing.access import models

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "empty"))
    assert models.preload_default() is False and models._preloaded == {}
    assert not (tmp_path / "empty" / "models").exists()  # nothing converted by a waiting worker
    monkeypatch.setenv("DOWSING_CACHE", str(converted_embedded_model.parent.parent))
    assert models.preload_default() is True
    kept = next(iter(models._preloaded.values()))
    assert kept.info.id == models.EMBEDDED_ID and models.load_model(None) is kept and models._preloaded == {}
