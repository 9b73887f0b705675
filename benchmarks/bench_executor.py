"""How the executor scales: the benchmark's fine-tunes in one process against
Ray, on this machine and on a simulated multi-node cluster.

    python benchmarks/bench_executor.py speedup [--model M] [--domains N] [--seeds S]
    python benchmarks/bench_executor.py cluster [--model M] [--nodes K]
    python benchmarks/bench_executor.py startup

speedup: the ground truth of the benchmark (every domain, the main recipe,
    S seeds: (N + 1) * S fine-tunes; the --estimators, each family one unit
    of work, no learning curves) in one process with one thread, then on a
    local Ray with 2 single-threaded workers; wall times, ratio, and the
    largest difference between the two runs' gains and priorities.
cluster: the same work on `ray.cluster_utils.Cluster` with K nodes of one
    CPU each on this machine; per node, the units it ran and its idle share
    after warm-up (from its first unit's start to the last unit's end, the
    share of time it ran none).
startup: seconds to start a local Ray and to run a first trivial task.

Each writes JSON under benchmarks/out/ and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dowsing.domains import Domain  # noqa: E402
from dowsing.pipelines.executor import ExecutorConfig, make_executor  # noqa: E402
from dowsing.access.models import load_model  # noqa: E402
from dowsing.validation.benchmark import DEFAULT_RECIPES, BenchmarkConfig, run_benchmark  # noqa: E402
from dowsing.domains import benchmark_domains  # noqa: E402

OUT = ROOT / "benchmarks" / "out"


def truth_config(seeds: int, estimators: tuple = ("mean_loss",), max_facts: int = 0) -> BenchmarkConfig:
    return BenchmarkConfig(estimators=estimators, seeds=seeds, recipes=DEFAULT_RECIPES[:1], curve_domains=(),
                           bootstrap=200, max_facts=max_facts)


def gains(result) -> np.ndarray:
    return np.asarray([g for t in result.truth.values() for g in np.ravel(t["gains"])])


def idle_by_node(records) -> dict:
    """Per node: units, busy seconds, and idle share between its first unit's
    start (after warm-up: the context is built by then) and the last end."""
    done = [r for r in records if not r.cached]
    end = max(r.end for r in done)
    out = {}
    for node in sorted({r.node for r in done}):
        mine = sorted((r for r in done if r.node == node), key=lambda r: r.start)
        busy = sum(r.end - r.start for r in mine[1:])  # the first unit also built the trainer
        window = end - mine[1].start if len(mine) > 1 else 0.0
        out[node[:12]] = {"units": len(mine), "workers": len({r.pid for r in mine}), "busy_s": busy,
                          "window_s": window,
                          "idle_pct": 100.0 * (1 - busy / (window * len({r.pid for r in mine}))) if window else None}
    return out


def speedup(args) -> dict:
    torch.set_num_threads(1)
    model = load_model(args.model, "cpu", "float32")
    domains = benchmark_domains()[: args.domains]
    config = truth_config(args.seeds, tuple(args.estimators.split(",")), args.max_facts)
    t0 = time.perf_counter()
    local = run_benchmark(model, domains, config)
    local_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    executor = make_executor(ExecutorConfig(kind="ray", num_cpus=2))
    ray_result = run_benchmark(model, domains, config, executor=executor)
    ray_s = time.perf_counter() - t0
    diff = np.abs(gains(local) - gains(ray_result)).max() / np.abs(gains(local)).max()
    scores_differ = max(abs(a - b) / max(abs(a), 1e-12)
                        for x, y in zip(local.estimators, ray_result.estimators)
                        for a, b in zip(x["priority"], y["priority"]))
    return {"model": model.info.id, "domains": len(domains), "estimators": config.estimators,
            "units": ray_result.execution["units"], "max_relative_priority_difference": scores_differ,
            "local_s": local_s, "local_stages_s": local.timings, "ray_s": ray_s, "ray_stages_s": ray_result.timings,
            "ray_startup_s": executor.startup_s, "speedup": local_s / ray_s,
            "fine_tune_stage_speedup": local.timings["units_wall"] / ray_result.timings["units_wall"],
            "max_relative_gain_difference": float(diff), "nodes": idle_by_node(executor.telemetry.records)}


def cluster(args) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        sim.add_node(num_cpus=1)
    sim.wait_for_nodes()
    model = load_model(args.model, "cpu", "float32")
    domains = [Domain(d.name, d.facts[:12]) for d in benchmark_domains()[: args.domains]]
    config = truth_config(args.seeds)
    executor = make_executor(ExecutorConfig(kind="ray", address=sim.address))
    t0 = time.perf_counter()
    result = run_benchmark(model, domains, config, executor=executor)
    wall = time.perf_counter() - t0
    out = {"model": model.info.id, "nodes_requested": args.nodes, "resources": executor.describe(),
           "fine_tunes": result.execution["units"], "wall_s": wall, "join_s": executor.startup_s,
           "nodes": idle_by_node(executor.telemetry.records)}
    ray.shutdown()
    sim.shutdown()
    return out


def startup(args) -> dict:
    import ray

    t0 = time.perf_counter()
    executor = make_executor(ExecutorConfig(kind="ray", num_cpus=2))
    started = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.get(ray.remote(lambda: 1).remote())
    first = time.perf_counter() - t0
    ray.shutdown()
    return {"ray_init_s": started, "first_task_s": first, "reported_startup_s": executor.startup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speedup", "cluster", "startup"))
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--domains", type=int, default=27)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--max-facts", type=int, default=0, help="speedup: at most this many facts per domain")
    parser.add_argument("--estimators", default="mean_loss",
                        help="speedup: comma-separated estimators; each family is one unit of work beside the "
                             "fine-tunes (default: mean_loss)")
    args = parser.parse_args()
    report = {"speedup": speedup, "cluster": cluster, "startup": startup}[args.what](args)
    report["cpu_count"] = os.cpu_count()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"executor_{args.what}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
