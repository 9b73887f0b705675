"""Live editing, timed as a user meets it: the default analysis (embedded
model, default domains) uncached, then after editing one fact of one domain,
after adding a fifth domain, a repeat of that request, the ranking stage
alone after another edit, a plan of the same domains right after, and the
five domains' request with no cache (what adding a domain saves).

Each step is one `run_analysis` / `run_plan` call in one process, model load
included, on a cache folder of its own (the model conversion is borrowed
from --models-from so it is not timed). --repo runs the same steps on
another checkout (say the code before per-domain units), so before and after
can be measured in one command on the same machine:

  python benchmarks/bench_live_edit.py --repo /path/to/old/checkout --repo .

Writes benchmarks/out/live-edit.json (--out) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def edited(domains, k: int, fact: int = 0, word: str = "(edited)"):
    from dowsing.domains import Domain

    out = list(domains)
    facts = list(out[k].facts)
    facts[fact] = f"{facts[fact]} {word}"
    out[k] = Domain(out[k].name, tuple(facts))
    return out


def fifth_domain(domains):
    from dowsing.domains import Domain

    base = domains[0]
    return list(domains) + [Domain("Geology", tuple(f"Geology note {i}: {f}" for i, f in enumerate(base.facts)))]


STEPS = ("uncached", "one_fact_edited", "fifth_domain_added", "repeat", "ranking_stage_after_edit",
         "plan_after_analysis", "five_domains_uncached")


def run_steps(facts_per_domain: int, only: tuple = STEPS) -> dict:
    """The steps in this process, on the checkout whose dowsing is imported."""
    import inspect

    from dowsing.pipelines.analysis import run_analysis
    from dowsing.config import AnalysisConfig
    from dowsing.domains import Domain, default_domains

    domains = default_domains()
    if facts_per_domain:
        domains = [Domain(d.name, tuple(d.facts[:facts_per_domain])) for d in domains]
    takes_ranking = "on_ranking" in inspect.signature(run_analysis).parameters
    steps = {}

    def analysis(name: str, doms, use_cache: bool = True, **config):
        if name not in only:
            return None
        ready = {}
        kwargs = {} if use_cache else {"use_cache": False}
        t0 = time.perf_counter()
        if takes_ranking:
            kwargs["on_ranking"] = lambda r: ready.setdefault("s", time.perf_counter() - t0)
        result = run_analysis(None, doms, AnalysisConfig(**config), **kwargs)
        wall = time.perf_counter() - t0
        steps[name] = {"wall_s": round(wall, 2), "ranking_ready_s": round(ready["s"], 2) if ready else None,
                       "stages_s": {k: round(v, 2) for k, v in result.timings.items()},
                       "units": result.extras.get("units"), "domains": len(doms),
                       "load_average_after": os.getloadavg()[0]}
        print(f"{name}: {wall:.1f} s" + (f" (ranking after {ready['s']:.1f} s)" if ready else ""), flush=True)
        return result

    analysis("uncached", domains)
    one_edit = edited(domains, 1)
    analysis("one_fact_edited", one_edit)
    five = fifth_domain(one_edit)
    analysis("fifth_domain_added", five)
    analysis("repeat", five)
    if "stage" in inspect.signature(AnalysisConfig).parameters:
        analysis("ranking_stage_after_edit", edited(five, 2), stage="ranking")
    if "plan_after_analysis" in only:
        from dowsing.pipelines.plan import PlanConfig, run_plan

        t0 = time.perf_counter()
        plan = run_plan(None, five, PlanConfig(budget=500))
        steps["plan_after_analysis"] = {"wall_s": round(time.perf_counter() - t0, 2),
                                        "forward_s": plan.pilot.get("forward_s"), "pilot_s": plan.pilot.get("pilot_s")}
        print(f"plan_after_analysis: {steps['plan_after_analysis']['wall_s']:.1f} s", flush=True)
    # the fifth domain's request computed from nothing: what the run after adding it is a share of
    analysis("five_domains_uncached", five, use_cache=False)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", action="append", default=None,
                        help="a checkout to time (repeatable; default: this one)")
    parser.add_argument("--models-from", default=None,
                        help="a cache folder whose models/ (the converted default model) is borrowed")
    parser.add_argument("--facts", type=int, default=0, help="first N facts of each default domain (0: all)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="comma-separated steps to time, in this order: " + ", ".join(STEPS))
    parser.add_argument("--out", default="live-edit.json", help="file name under benchmarks/out/")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("JSON " + json.dumps(run_steps(args.facts, tuple(args.steps.split(",")))), flush=True)
        return
    models = Path(args.models_from or os.environ.get("DOWSING_CACHE") or HERE.parent / "cache") / "models"
    report = {"torch_threads_env": os.environ.get("OMP_NUM_THREADS"), "load_average_before": os.getloadavg(),
              "runs": {}}
    for repo in args.repo or [str(HERE.parent)]:
        repo = str(Path(repo).resolve())
        with tempfile.TemporaryDirectory() as cache:
            if models.exists():
                os.symlink(models, Path(cache) / "models")
            env = {**os.environ, "DOWSING_CACHE": cache, "PYTHONPATH": repo}
            print(f"--- {repo}", flush=True)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--facts", str(args.facts),
                                  "--steps", args.steps],
                                 env=env, cwd=repo, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("JSON ")]
            print("\n".join(line for line in out.stdout.splitlines() if not line.startswith("JSON ")))
            if out.returncode or not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                continue
            report["runs"][repo] = json.loads(lines[-1][5:])
    report["load_average_after"] = os.getloadavg()
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
