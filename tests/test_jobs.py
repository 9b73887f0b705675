"""Background jobs of every kind: real worker processes on tiny models, the
runner lock shared by analyses, validations and benchmarks, cancel (the
whole process session, Ray's processes included), crashes, a refresh and
damaged stored results."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from dowsing.config import AnalysisConfig
from dowsing.domains import Domain, default_domains
from dowsing.background.jobs import (
    ACTIVE,
    WAITING_MESSAGE,
    JobRequest,
    JobRunner,
    JobState,
    JobStore,
    LocalJobRunner,
    default_runner,
)
from dowsing.access.models import ModelError
from tiny_models import stand_in_result

JOB2, JOB3 = "2" * 64, "3" * 64  # stand-in workers' job ids, of the one form a job id has
# where a running analysis reports itself once the model is loaded: the pilot fine-tunes of the ranking
# ("ranking") are most of a small model's run, the paper's stages the rest
ENGINE_STAGES = {"concept vectors", "gradients", "ranking", "diagnosis", "curvature", "solve", "saturation",
                 "uncertainty"}

SMALL = [
    Domain("Physics", ("Light travels fast.", "Mass bends space.", "Heat flows to cold.")),
    Domain("Biology", ("Cells divide.", "DNA stores genes.", "Leaves make sugar.")),
]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    jobs = LocalJobRunner()
    yield jobs
    for state in jobs.store.all():  # never leave a worker behind
        if state.active:
            jobs.cancel(state.job_id)
    jobs.store.close()


def test_the_engine_reports_every_stage_to_its_progress_callback(tiny_gpt2_dir, tmp_path, monkeypatch):
    from dowsing.pipelines.analysis import run_analysis

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    reports = []
    run_analysis(str(tiny_gpt2_dir), list(SMALL), AnalysisConfig(), progress=reports.append, use_cache=False)
    stages = [p.stage for p in reports]
    assert stages[0] == "loading model" and stages[-1] == "done"
    assert {"concept vectors", "solve", "saturation"} <= set(stages) and set(stages) & ENGINE_STAGES
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the default ranks before the paper's quantities: the bar's shares follow where the time goes, the pilots
    # from the end of the forward pass to 0.8, the paper's solve after them
    ranking = [p.fraction for p in reports if p.stage == "ranking"]
    solve = [p.fraction for p in reports if p.stage == "solve"]
    assert 0.2 <= min(ranking) and max(ranking) <= 0.8 <= min(solve)


# Three domains of four facts: the fewest a validation's rank correlation and split take.
THREE = [Domain(n, tuple(f"{n} fact number {i} is about {n.lower()}." for i in range(4)))
         for n in ("Alpha", "Beta", "Gamma")]
# Three domains of six facts: the fewest the benchmark's smallest collection protocol takes (a sample of 4,
# 1 test fact, a dose of 1).
THREE_SIX = [Domain(n, tuple(f"{n} fact number {i} is about {n.lower()}." for i in range(6)))
             for n in ("Alpha", "Beta", "Gamma")]


def request(model_dir, domains=SMALL, name="Science") -> JobRequest:
    return JobRequest(model_id=str(model_dir), domains=list(domains), config=AnalysisConfig(), domain_set_name=name)


def validation_request(model_dir, **fields) -> JobRequest:
    from dowsing.validation.validate import ValidationConfig

    config = ValidationConfig(estimators=("mean_loss",), bootstrap=0, subspace=False, finetune_steps=2,
                              finetune_blocks=1)
    return JobRequest(kind="validation", model_id=str(model_dir), domains=list(THREE), config=config,
                      domain_set_name="Three", **fields)


def benchmark_request(model_dir, **fields) -> JobRequest:
    from dowsing.kernels.training import Recipe
    from dowsing.validation.benchmark import BenchmarkConfig

    config = BenchmarkConfig.quick(estimators=("mean_loss", "alignment"), seeds=1, curve_domains=(),
                                   recipes=(Recipe("adamw", steps=1, blocks=1),), align_blocks=1, bootstrap=50,
                                   max_facts=0, sample_facts=4, test_facts=1, doses=(1,))
    return JobRequest(kind="benchmark", model_id=str(model_dir), domains=list(THREE_SIX), config=config,
                      domain_set_name="Three", **fields)


# Eight facts a domain: halves of four, so the pilots measure at n = 2 and 4.
EIGHT = [Domain(n, tuple(f"{n} item {i} is stored in box {w}{i * 7 % 5}." for i in range(8)))
         for n, w in (("Alpha", "red"), ("Beta", "green"))]


def plan_request(model_dir, domains=EIGHT, **fields) -> JobRequest:
    from dowsing.pipelines.plan import PilotConfig

    return JobRequest(kind="plan", model_id=str(model_dir), domains=list(domains), config=PilotConfig(),
                      domain_set_name="Eight", **fields)


def wait(jobs, job_id, until, timeout_s=90.0, interval_s=0.05) -> tuple[JobState, list[JobState]]:
    """Poll until `until(state)`; returns the last state and every state seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        state = jobs.state(job_id)
        seen.append(state)
        if until(state):
            return state, seen
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last state {state}")
        time.sleep(interval_s)


def session_members(sid: int) -> list[str]:
    """The live processes of session `sid` as `ps` lists them (not as the
    runner reads /proc): a worker and everything it started."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.split()[1] == str(sid) and not line.split()[2].startswith(("Z", "X"))]


def running(pid: int) -> bool:
    """Whether `pid` is a live (non-zombie) process, read from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rindex(")") + 2:].startswith(("Z", "X"))


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_a_large_state_never_reads_as_absent_while_another_process_updates_it(tmp_path):
    """A state over 32 KiB (a request with many facts) is read while another
    store object (as the worker's) updates it over and over: every read
    finds it."""
    import threading

    from dowsing.background.jobs import JobState, JobStore

    writer, reader = JobStore(tmp_path), JobStore(tmp_path)
    request = {"kind": "plan", "domains": [[f"D{i}", [f"fact {j} " + "x" * 60 for j in range(40)]] for i in range(20)]}
    writer.put(JobState(job_id="big", request=request))
    assert len(writer.get("big").to_json()) > 2 ** 15
    done, absent, reads = threading.Event(), [], 0

    def update():
        for i in range(300):
            writer.update("big", message=f"step {i}")
        done.set()

    thread = threading.Thread(target=update)
    thread.start()
    while not done.is_set():
        reads += 1
        if reader.get("big") is None:
            absent.append(reads)
    thread.join()
    assert reads > 10 and absent == [] and reader.get("big").message == "step 299"


def test_the_local_runner_is_a_job_runner(runner):
    assert isinstance(runner, JobRunner)
    assert isinstance(default_runner(), LocalJobRunner)


def test_request_and_state_round_trip_as_json(tiny_gpt2_dir):
    for req in (request(tiny_gpt2_dir), validation_request(tiny_gpt2_dir, held_out={"Alpha": ["Alpha is first."]}),
                benchmark_request(tiny_gpt2_dir, executor={"kind": "ray", "address": "auto"}, device="cuda"),
                plan_request(tiny_gpt2_dir)):
        again = JobRequest.from_dict(json.loads(json.dumps(req.to_dict())))
        assert again == req and again.job_id() == req.job_id()
        state = JobState(job_id="abc", status="running", stage="solve", fraction=0.5, request=req.to_dict())
        assert JobState.from_json(state.to_json()) == state and state.kind == req.kind
    # Where the units run is not part of the job: the numbers are the same.
    assert benchmark_request(tiny_gpt2_dir).job_id() == benchmark_request(
        tiny_gpt2_dir, executor={"kind": "ray"}).job_id()
    assert validation_request(tiny_gpt2_dir).job_id() != benchmark_request(tiny_gpt2_dir).job_id()
    # A record from before there were kinds is an analysis.
    legacy = {k: v for k, v in request(tiny_gpt2_dir).to_dict().items() if k != "kind"}
    assert JobRequest.from_dict(legacy) == request(tiny_gpt2_dir)


def test_a_request_takes_only_its_own_kind_of_settings(tiny_gpt2_dir):
    from dowsing.validation.validate import ValidationConfig

    with pytest.raises(ValueError, match="unknown job kind"):
        JobRequest(model_id=None, domains=list(SMALL), kind="nonsense")
    with pytest.raises(ValueError, match="take a BenchmarkConfig"):
        JobRequest(model_id=None, domains=list(SMALL), config=ValidationConfig(), kind="benchmark")
    with pytest.raises(ValueError, match="no held-out facts"):
        JobRequest(model_id=None, domains=list(SMALL), kind="benchmark", held_out={"Physics": ["x."]})
    with pytest.raises(ValueError, match="no device of their own"):
        JobRequest(model_id=None, domains=list(SMALL), kind="validation", device="cuda")
    assert isinstance(JobRequest(model_id=None, domains=list(SMALL), kind="validation").config, ValidationConfig)


def test_a_job_runs_a_repeat_is_instant_a_corrupt_result_reruns_and_jobs_queue(runner, tiny_gpt2_dir, tmp_path):
    req = request(tiny_gpt2_dir)
    job_id = runner.submit(req)
    assert job_id == req.job_id()
    state, seen = wait(runner, job_id, lambda s: not s.active)
    assert state.status == "done", state
    assert (state.stage, state.fraction, state.error) == ("done", 1.0, None)
    # Worker progress reaches the job state; which engine stages a 50 ms poll
    # catches on a tiny model is timing, so those are checked in-process below.
    stages = {s.stage for s in seen}
    assert "loading model" in stages, stages
    running = [s.fraction for s in seen if s.status == "running"]
    assert running == sorted(running)  # never goes back; the rise itself is checked in-process
    # State is JSON text in diskcache, never a pickle.
    assert isinstance(runner.store.cache.get(JobStore.PREFIX + job_id), str)

    result = runner.result(job_id)
    assert [d.name for d in result.domains] == ["Physics", "Biology"]
    assert state.summary == {
        "kind": "analysis", "model_id": str(tiny_gpt2_dir), "domain_set_name": "Science", "n_domains": 2,
        "top_domain": result.ranked()[0].name, "model_parameters": result.model["parameters"],
    }
    # Another process (a second tab) sees the same job.
    assert LocalJobRunner().state(job_id).status == "done"

    started = time.monotonic()
    assert runner.submit(req) == job_id
    assert time.monotonic() - started < 2.0
    again = runner.state(job_id)
    assert (again.status, again.run_id, again.pid) == ("done", state.run_id, state.pid)
    assert [s.job_id for s in runner.history()] == [job_id]

    runner.delete(job_id)
    assert runner.history() == [] and runner.state(job_id) is None
    assert runner.result(job_id) is not None  # the result stays cached
    runner.submit(req)  # so the same request is done at once, no worker
    assert runner.state(job_id).pid is None and runner.state(job_id).status == "done"

    # A corrupt cached result is never shown as done: it is recomputed...
    import diskcache

    from dowsing.storage.store import ResultStore

    entries = diskcache.Cache(str(ResultStore().folder))
    entries.set(job_id, entries.get(job_id)[:-40])  # a truncated write
    entries.close()
    recomputing = runner.state(job_id)
    assert recomputing.status in ACTIVE and recomputing.run_id != state.run_id
    assert runner.result(job_id) is None
    # ...and a different request submitted meanwhile waits for it; this one
    # names a model folder that cannot load, so it then fails with the
    # loader's one-line message.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    other_id = runner.submit(request(broken, SMALL, "Broken"))
    assert other_id != job_id
    saw_waiting = False
    deadline = time.monotonic() + 120
    while True:
        a, b = runner.state(job_id), runner.state(other_id)
        assert not (a.status == "running" and b.status == "running")
        if a.status == "running" and b.status == "queued" and b.waiting_for == job_id:
            assert job_id[:8] in b.message
            saw_waiting |= b.message.startswith("queued behind the running analysis of ")
        if not a.active and not b.active:
            break
        assert time.monotonic() < deadline, (a, b)
        time.sleep(0.05)
    assert saw_waiting
    assert (a.status, b.status) == ("done", "failed")
    assert ts(b.started_at) >= ts(a.finished_at)
    assert [d.name for d in runner.result(job_id).domains] == ["Physics", "Biology"]
    assert b.error.startswith("Model ") and "could not be loaded" in b.error, b.error
    assert "\n" not in b.error and runner.result(other_id) is None
    assert [s.job_id for s in runner.history()] == [other_id, job_id]


def test_a_queued_job_waits_for_the_runner_lock_and_can_be_cancelled(runner, tiny_gpt2_dir):
    with open(runner.store.lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another job holds the machine
        job_id = runner.submit(request(tiny_gpt2_dir))
        state, _ = wait(runner, job_id, lambda s: s.message == WAITING_MESSAGE, timeout_s=60)
        assert state.status == "queued" and state.pid is not None
        started = time.monotonic()
        runner.cancel(job_id)
        assert runner.state(job_id).status == "cancelled"
        assert time.monotonic() - started < 10
        assert not running(state.pid)


def test_a_just_spawned_worker_is_not_declared_dead(runner, tiny_gpt2_dir, monkeypatch):
    """Between fork and exec a worker's /proc cmdline is still its parent's.
    A child that is alive but not (yet) recognisable as a worker stands in for
    that window: the runner must trust its own process handle, not /proc."""
    def spawn_not_yet_a_worker(job_id):
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)

    monkeypatch.setattr(runner, "_spawn", spawn_not_yet_a_worker)
    job_id = runner.submit(request(tiny_gpt2_dir))
    for _ in range(20):
        state = runner.state(job_id)
        assert state.status == "queued", state
        time.sleep(0.05)
    proc = runner._procs[job_id]
    proc.kill()
    proc.wait()
    # Once the child has exited, the same handle reports it as dead.
    state = runner.state(job_id)
    assert state.status == "failed" and "signal 9" in state.error, state


def test_a_killed_worker_fails_and_a_running_job_cancels(runner, tiny_gpt2_dir):
    req = request(tiny_gpt2_dir, default_domains(), "Science (paper)")  # long enough to interrupt
    job_id = runner.submit(req)
    state, _ = wait(runner, job_id, lambda s: s.status == "running" or not s.active)
    assert state.status == "running"
    os.kill(state.pid, signal.SIGKILL)
    # A fresh runner (the page after a restart) reads the dead pid...
    other, _ = wait(LocalJobRunner(), job_id, lambda s: not s.active, timeout_s=10)
    assert other.status == "failed" and other.error and "\n" not in other.error
    # ...and the one that started it knows the exit signal.
    failed = runner.state(job_id)
    assert failed.status == "failed" and "\n" not in failed.error

    # A failed job can be submitted again: same id, a fresh run.
    assert runner.submit(req) == job_id
    state, _ = wait(runner, job_id, lambda s: s.stage in ENGINE_STAGES or not s.active, timeout_s=90)
    assert state.status == "running" and state.run_id != failed.run_id, state
    started = time.monotonic()
    runner.cancel(job_id)
    assert runner.state(job_id).status == "cancelled"
    assert time.monotonic() - started < 10
    assert not running(state.pid)
    time.sleep(0.5)  # a late write of the dying worker must not undo the cancel
    assert runner.state(job_id).status == "cancelled"


def test_a_missing_model_is_refused_before_any_worker_starts(runner, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        runner.submit(request(tmp_path / "no-such-model"))
    assert runner.history() == []


# --- every kind through one runner ------------------------------------------------

def test_an_analysis_and_a_validation_take_turns_and_give_the_numbers_of_each_run_alone(runner, tiny_gpt2_dir):
    from dowsing.pipelines.analysis import run_analysis
    from dowsing.validation.validate import ValidationResult, validate

    analysis, check = request(tiny_gpt2_dir), validation_request(tiny_gpt2_dir)
    first, second = runner.submit(analysis), runner.submit(check)  # as two pages would, one after the other
    assert (first, second) == (analysis.job_id(), check.job_id())
    saw_queued_behind = False
    deadline = time.monotonic() + 240
    while True:
        a, v = runner.state(first), runner.state(second)
        assert not (a.status == "running" and v.status == "running")
        if a.status == "running" and v.status == "queued" and v.waiting_for == first:
            # the worker polls the queue, so it may still say the analysis is queued for a moment
            assert v.message.startswith(("queued behind the running analysis of ",
                                         "queued behind the queued analysis of ")) and first[:8] in v.message
            saw_queued_behind |= v.message.startswith("queued behind the running analysis of ")
        if not a.active and not v.active:
            break
        assert time.monotonic() < deadline, (a, v)
        time.sleep(0.05)
    assert (a.status, v.status) == ("done", "done"), (a.error, v.error)
    assert saw_queued_behind
    assert ts(a.started_at) < ts(a.finished_at) <= ts(v.started_at) < ts(v.finished_at)
    assert v.waiting_for is None and v.summary["kind"] == "validation" and v.summary["winner"]
    assert [s.job_id for s in runner.history("validation")] == [second]

    alone = run_analysis(str(tiny_gpt2_dir), list(SMALL), AnalysisConfig(), use_cache=False)
    queued = runner.result(first)
    assert [(d.name, d.rank) for d in queued.domains] == [(d.name, d.rank) for d in alone.domains]
    for mine, ref in zip(queued.domains, alone.domains):
        assert (mine.mean, mine.priority) == pytest.approx((ref.mean, ref.priority), rel=1e-6)
    validated = runner.result(second)
    assert isinstance(validated, ValidationResult)
    ref = validate(str(tiny_gpt2_dir), list(THREE), check.config)
    assert validated.finetune["gain"] == pytest.approx(ref.finetune["gain"], rel=1e-6, abs=1e-12)
    assert [e["name"] for e in validated.estimators] == [e["name"] for e in ref.estimators]
    for mine, theirs in zip(validated.estimators, ref.estimators):
        assert mine["priority"] == pytest.approx(theirs["priority"], rel=1e-6, abs=1e-12)


def test_a_benchmark_job_survives_a_refresh_and_its_result_round_trips(runner, tiny_llama_dir):
    from dowsing.validation.benchmark import BenchmarkResult

    req = benchmark_request(tiny_llama_dir)
    job_id = runner.submit(req)
    wait(runner, job_id, lambda s: s.status == "running" or not s.active)
    # A refresh: a new runner, which did not start the worker, finds the job
    # by its id, and the same request attaches to it instead of starting another.
    page = LocalJobRunner()
    assert page.state(job_id).active and page.submit(req) == job_id
    assert [s.job_id for s in page.history("benchmark")] == [job_id] and page.history("analysis") == []
    done, _ = wait(page, job_id, lambda s: not s.active, timeout_s=240)
    assert done.status == "done", done
    assert done.summary["kind"] == "benchmark" and done.summary["winner"]

    result = page.result(job_id)
    assert isinstance(result, BenchmarkResult) and result.domains == ["Alpha", "Beta", "Gamma"]
    path = page.store.result_path(job_id, "benchmark")
    assert json.loads(path.read_text(encoding="utf-8"))["leaderboard"]  # JSON on disk, not a pickle
    assert BenchmarkResult.from_json(result.to_json()).to_dict() == result.to_dict() == runner.result(job_id).to_dict()

    started = time.monotonic()
    again = LocalJobRunner()
    assert again.submit(req) == job_id  # a repeat is the stored result, at once, without a worker
    assert time.monotonic() - started < 2.0
    assert (again.state(job_id).run_id, again.state(job_id).pid) == (done.run_id, done.pid)
    # A damaged result file is never shown: the job runs again under its id.
    path.write_text(path.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    rerun = again.state(job_id)
    assert rerun.status in ACTIVE and rerun.run_id != done.run_id
    assert again.result(job_id) is None
    again.cancel(job_id)
    assert again.state(job_id).status == "cancelled"


def test_a_plan_job_measures_the_pilots_run_plan_would_and_cancels_like_the_others(runner, tiny_llama_dir):
    """The plan kind: its product is the pilot measurements (JSON in the job
    store, and the same cache entry `run_plan` reads), any budget's plan on
    them is `run_plan`'s, a repeat is instant, and Cancel stops it mid-pilots."""
    from dowsing.domains import benchmark_domains
    from dowsing.pipelines.plan import PilotMeasurements, PlanConfig, plan_from_pilots, plan_key, run_plan

    req = plan_request(tiny_llama_dir)
    job_id = runner.submit(req)
    assert job_id == plan_key(str(tiny_llama_dir), EIGHT, PlanConfig(budget=1))  # the pilots' own cache key
    done, seen = wait(runner, job_id, lambda s: not s.active, timeout_s=120)
    assert done.status == "done", done
    assert {"loading model", "pilots"} & {s.stage for s in seen}
    assert done.summary == {"kind": "plan", "model_id": str(tiny_llama_dir), "domain_set_name": "Eight",
                            "n_domains": 2, "pilots": 2, "model_parameters": done.summary["model_parameters"]}
    pilots = runner.result(job_id)
    assert isinstance(pilots, PilotMeasurements) and not pilots.cached
    path = runner.store.result_path(job_id, "plan")
    assert json.loads(path.read_text(encoding="utf-8"))["domains"][0]["sizes"] == [2, 4]  # JSON, not a pickle
    assert PilotMeasurements.from_json(pilots.to_json()).to_dict() == pilots.to_dict()
    # Another budget on the job's pilots is run_plan's plan, which reads the pilots the job cached.
    config = PlanConfig(budget=25, budget_unit="money", costs={"Alpha": 2.0})
    from_job, from_cli = plan_from_pilots(pilots, config), run_plan(str(tiny_llama_dir), EIGHT, config)
    assert from_cli.pilot["cached"] and from_cli.pilot["cache_key"] == job_id
    assert [d["collect"] for d in from_job.domains] == [d["collect"] for d in from_cli.domains]
    assert from_job.totals == from_cli.totals
    started = time.monotonic()
    assert LocalJobRunner().submit(req) == job_id and time.monotonic() - started < 2.0

    # Ten shipped domains of 40 facts: pilots long enough to be cancelled.
    long_id = runner.submit(plan_request(tiny_llama_dir, benchmark_domains()[:10]))
    state, _ = wait(runner, long_id, lambda s: s.stage == "pilots" or not s.active, timeout_s=120)
    assert state.status == "running", state
    runner.cancel(long_id)
    assert runner.state(long_id).status == "cancelled" and not running(state.pid)
    assert runner.result(long_id) is None


def test_cancel_leaves_no_process_of_a_run_on_ray_behind(runner, tiny_llama_dir):
    """A benchmark on a Ray the worker starts for it: the worker's session
    then also holds Ray's GCS, raylet and task workers (some in process
    groups of their own). Cancel ends every one of them."""
    job_id = runner.submit(benchmark_request(tiny_llama_dir, executor={"kind": "ray", "num_cpus": 1}))
    state, _ = wait(runner, job_id, lambda s: s.stage not in ("", "queued", "starting") or not s.active,
                    timeout_s=180)
    assert state.status == "running", state
    started = session_members(state.pid)
    assert any(line.endswith("raylet") for line in started), started
    runner.cancel(job_id)
    assert runner.state(job_id).status == "cancelled"
    assert session_members(state.pid) == [] and not running(state.pid)
    log = runner.store.log_path(job_id).read_text()
    assert "ray: 1 node(s), 1 CPU" in log


def test_cancel_kills_what_the_worker_started_when_that_ignores_sigterm(runner):
    """A stand-in worker (it looks like `dowsing.background.worker JOB3` in /proc) that
    exits on SIGTERM, with a child in a process group of its own (as Ray's
    task workers are) that ignores SIGTERM: cancel must not stop at the worker."""
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
            "time.sleep(60)"
    worker = ("import os, subprocess, sys, time; "
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
              "preexec_fn=os.setpgrp); c.stdout.readline(); print(c.pid, flush=True); time.sleep(60)")
    stand_in = subprocess.Popen([sys.executable, "-c", worker, "dowsing.background.worker", JOB3], stdout=subprocess.PIPE,
                                start_new_session=True)
    child_pid = int(stand_in.stdout.readline())
    assert os.getpgid(child_pid) != stand_in.pid and len(session_members(stand_in.pid)) == 2
    runner.store.put(JobState(job_id=JOB3, status="running", pid=stand_in.pid, run_id="run3"))
    runner.grace_s = 0.5
    runner.cancel(JOB3)
    assert stand_in.wait(timeout=5) == -signal.SIGTERM
    assert not running(child_pid) and session_members(stand_in.pid) == []
    assert runner.state(JOB3).status == "cancelled"


# --- the worker in this process, with the engine replaced ---------------------

def _queued_job(store: JobStore, model_dir) -> str:
    store.put(JobState(job_id="job1", status="queued", request=request(model_dir).to_dict(), run_id="run1"))
    return "job1"


def test_worker_throttles_progress_and_writes_the_last(tmp_path, monkeypatch, tiny_gpt2_dir):
    from dowsing.pipelines import analysis
    from dowsing.background import worker

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    store = JobStore()
    job_id = _queued_job(store, tiny_gpt2_dir)
    writes = []
    real_update = store.update

    def counting_update(*args, **fields):
        if "fraction" in fields:
            writes.append(fields)
        return real_update(*args, **fields)

    def fake_run(model_id, domains, config=None, progress=None, use_cache=True, executor=None, on_ranking=None):
        for i in range(2000):  # ~1 s of chatty progress
            progress(analysis.Progress("solve", i / 2000, f"iteration {i}"))
            time.sleep(0.0005)
        progress(analysis.Progress("saturation", 0.99, "last word"))
        return stand_in_result()

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


def test_a_running_analysis_job_shows_its_ranking_before_the_paper_and_drops_it_when_done(tmp_path, monkeypatch,
                                                                                           tiny_gpt2_dir):
    from dowsing.pipelines import analysis
    from dowsing.background import worker

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    store = JobStore()
    job_id = "a" * 64  # a job id of the app's own format: the partial result's file is named by it
    store.put(JobState(job_id=job_id, status="queued", request=request(tiny_gpt2_dir).to_dict(), run_id="run1"))
    seen = []

    def fake_run(model_id, domains, config=None, progress=None, use_cache=True, executor=None, on_ranking=None):
        early = stand_in_result()
        early.extras["partial"] = {"computing": ["mean"]}
        on_ranking(early)
        seen.append(store.read_partial(job_id, "analysis"))
        return stand_in_result()

    monkeypatch.setattr(analysis, "run_analysis", fake_run)
    assert worker.run_job(job_id, store) == 0
    assert seen[0] is not None and seen[0].extras["partial"] == {"computing": ["mean"]}
    assert seen[0].ranked()[0].name == "Biology"
    assert store.read_partial(job_id, "analysis") is None


@pytest.mark.parametrize(
    "error, expected",
    [(ModelError("Model 'x' could not be loaded: gone."), "Model 'x' could not be loaded: gone."),
     (ValueError("damping must be >= 0"), "damping must be >= 0"),
     (RuntimeError("boom\nsecond line"), "RuntimeError: boom")],
)
def test_worker_failures_are_one_line(tmp_path, monkeypatch, tiny_gpt2_dir, error, expected):
    from dowsing.pipelines import analysis
    from dowsing.background import worker

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


def test_cancel_kills_a_worker_that_ignores_sigterm(runner):
    # A stand-in worker stuck where SIGTERM cannot reach Python code; the
    # trailing arguments make it look like `dowsing.background.worker JOB2` in /proc.
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)", "dowsing.background.worker", JOB2],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    assert stuck.stdout.readline().strip() == b"ready"
    runner.store.put(JobState(job_id=JOB2, status="running", pid=stuck.pid, run_id="run2"))
    runner.grace_s = 0.5
    assert runner.state(JOB2).status == "running"  # alive, checked through /proc
    runner.cancel(JOB2)
    assert stuck.wait(timeout=5) == -signal.SIGKILL
    assert runner.state(JOB2).status == "cancelled"
