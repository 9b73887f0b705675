"""A run as the app's user meets it: the default analysis (embedded model,
default domains) submitted to the app's job runner, timed from the click
(submit) to the ranking being readable by the Results page (the job's
partial result) and to the whole result, uncached, then after editing one
fact of one domain, then after adding a fifth domain.

The runner is the app's: one worker process per job, with the warm spare
worker (`--cold` starts every worker cold instead). Each run has a cache
folder of its own; the converted model is borrowed from --models-from so
its one-time conversion is not timed. Before each click the benchmark
does what the Run page does when it shows the run (untimed): it says
which domains the run would recompute (`analysis.pilot_status`), which
also imports the engine into the app's process, so the click pays no
imports. The page's own polling (about a second) comes on top.

  python benchmarks/bench_app_run.py [--cold] [--out app-run.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

POLL_S = 0.05
SPARE_WARM_S = 30.0  # the longest the spare is given to finish its imports before the first click


def wait_for_spare(runner) -> float:
    """Seconds until the spare has finished its imports: its CPU time stops
    growing (it then blocks on its stdin)."""
    t0 = time.perf_counter()
    last = None
    while time.perf_counter() - t0 < SPARE_WARM_S:
        runner.history()  # what the app's pages call as they poll: it starts the next spare once nothing runs
        pid = runner.spare_pid
        if pid is None:
            time.sleep(0.2)
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if ticks == last:
            return time.perf_counter() - t0
        last = ticks
        time.sleep(1.0)
    return time.perf_counter() - t0


def timed_run(runner, request) -> dict:
    """Submit, then poll: seconds to the ranking (partial result) and to done."""
    t0 = time.perf_counter()
    job_id = runner.submit(request)
    ranking = None
    while True:
        state = runner.state(job_id)
        if ranking is None and (runner.partial_result(job_id) is not None or state.status == "done"):
            ranking = time.perf_counter() - t0
        if state.status in ("done", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    if state.status != "done":
        raise RuntimeError(f"the run ended {state.status}: {state.error}")
    done = time.perf_counter() - t0
    log = runner.store.log_path(job_id)
    if os.environ.get("BENCH_SHOW_LOG") and log.exists():
        print(log.read_text()[-3000:], flush=True)
    timings = getattr(runner.result(job_id), "timings", None) or {}
    return {"ranking_s": round(ranking, 2), "done_s": round(done, 2), "load_average": round(os.getloadavg()[0], 2),
            "stages_s": {k: round(v, 2) for k, v in timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", action="store_true", help="no spare worker: every job starts a fresh process")
    parser.add_argument("--models-from", default=None, help="a cache folder whose models/ is borrowed")
    parser.add_argument("--out", default="app-run.json", help="file name under benchmarks/out/")
    args = parser.parse_args()
    models = Path(args.models_from or os.environ.get("DOWSING_CACHE") or HERE.parent / "cache") / "models"
    with tempfile.TemporaryDirectory() as cache:
        if models.exists():
            os.symlink(models, Path(cache) / "models")
        os.environ["DOWSING_CACHE"] = cache
        from bench_live_edit import edited, fifth_domain

        from dowsing.background.jobs import JobRequest, LocalJobRunner
        from dowsing.domains import default_domains
        from dowsing.pipelines.analysis import pilot_status

        runner = LocalJobRunner(spare=not args.cold)
        report = {"spare": not args.cold, "load_average_before": os.getloadavg()[0], "steps": {}}
        try:
            domains = default_domains()
            one_edit = edited(domains, 1)
            for name, doms in (("uncached", domains), ("one_fact_edited", one_edit),
                               ("fifth_domain_added", fifth_domain(one_edit))):
                if not args.cold:
                    report["steps"].setdefault("spare_warm_s", {})[name] = round(wait_for_spare(runner), 1)
                # what the Run page computes as it shows the run, before the click
                report["steps"].setdefault("run_page_says", {})[name] = pilot_status(None, doms)["message"]
                step = timed_run(runner, JobRequest(model_id=None, domains=doms))
                report["steps"][name] = step
                print(f"{name}: ranking after {step['ranking_s']} s, done after {step['done_s']} s "
                      f"(load {step['load_average']}); the run's own stages: {step['stages_s']}", flush=True)
        finally:
            runner.close()
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
