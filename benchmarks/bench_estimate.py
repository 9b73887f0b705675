"""The estimate against a measurement: predicted wall time and peak resident
memory of `python -m dowsing analyze` (embedded default model, default
domains, computed afresh) and `python -m dowsing benchmark --quick` (the same
model, eleven domains of 20 facts), then each command run in a child process:
its wall time, and its peak RSS from the kernel's accounting of that child
(os.wait4). The machine's load average is recorded before and after each run.

  python benchmarks/bench_estimate.py                    # both, torch's default threads
  python benchmarks/bench_estimate.py --only analyze
  python benchmarks/bench_estimate.py --threads 1        # one torch thread in every process (a shared machine)
  python benchmarks/bench_estimate.py --documented       # estimates only, of the two full benchmarks that
                                                         # docs/VALIDATION.md measured (54 min and 98 min)

The estimates are made first (calibrating once if needed), in a child
process as `--estimate` would, so the runs start from the same state. Writes
benchmarks/out/estimate.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ESTIMATE_CODE = """
import json, sys, time
t0 = time.perf_counter()
from dowsing.estimates import estimate
from dowsing.config import AnalysisConfig
from dowsing.domains import benchmark_domains, default_domains
from dowsing.validation.benchmark import BenchmarkConfig
if sys.argv[1] == "analyze":
    got = estimate.estimate_analysis(None, default_domains(), AnalysisConfig(), use_cache=False)
else:
    got = estimate.estimate_benchmark(None, benchmark_domains(quick=True), BenchmarkConfig.quick())
print(json.dumps({"estimate": got.to_dict(), "seconds": time.perf_counter() - t0}))
"""

# The two full benchmarks docs/VALIDATION.md measured on this machine: the 54-minute run with one thread,
# before the trajectory and AirRep estimators joined, and the evidence run (main recipe only, every estimator,
# two threads on an idle machine, 98 min). Both are estimated with one thread: a calibration with two threads
# is only meaningful on an idle machine (the shared cores stall them otherwise).
DOCUMENTED_CODE = """
import json, sys
from dowsing.estimates import estimate
from dowsing.estimators import names
from dowsing.validation.benchmark import BenchmarkConfig
costly = ("diffin", "tracin_ckpt", "alignment", "alignment_adam", "alignment_heldout", "alignment_heldout_adam")
runs = {
    "collection protocol, 37 domains, estimators <= 5x mean loss and the pilots, 1 thread":
        (BenchmarkConfig(estimators=tuple(e for e in names("benchmark") if e not in costly)), 1),
}
out = {}
for name, (config, threads) in runs.items():
    got = estimate.estimate_benchmark(None, None, config, threads=threads)
    out[name] = got.to_dict()
# On paper: the memory of SmolLM2-1.7B (24 blocks of 67.1M parameters, d_model 2048, MLP 8192, the same
# vocabulary, tied embeddings) from the default model's calibration with that shape put in; its times are not
# meaningful (the rates are the small model's), its bytes are (they follow from the shape).
import dataclasses
from dowsing.config import AnalysisConfig
from dowsing.domains import default_domains
small, _ = estimate.calibrate(None, threads=1)
shape = dict(n_params=24 * 67_119_104 + 49152 * 2048 + 2048, n_layers=24, d_model=2048, d_ff=8192,
             block_params=67_119_104, head_params=49152 * 2048, model_bytes=0,
             linear_shapes=((2048, 2048),) * 4 + ((2048, 8192),) * 2 + ((8192, 2048),))
big = dataclasses.replace(small, model="SmolLM2-1.7B (shape only)", **shape)
tokenizer = estimate.load_tokenizer(None)
analysis = estimate.estimate_analysis(None, default_domains(), AnalysisConfig(), use_cache=False, calibration=big,
                                      tokenizer=tokenizer)
bench = estimate.estimate_benchmark(None, None, BenchmarkConfig(), calibration=big, tokenizer=tokenizer)
out["SmolLM2-1.7B, default analysis (memory only)"] = analysis.to_dict()
out["SmolLM2-1.7B, full benchmark (memory only)"] = bench.to_dict()
print(json.dumps(out))
"""

CASES = {
    "analyze": ["analyze", "--no-cache"],
    # --no-cache: every fine-tune is computed, none taken from an earlier run's unit store
    "benchmark": ["benchmark", "--quick", "--quiet", "--no-cache"],
}


def child_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# progress stage or message -> the estimate's stage of the same work
STAGE_NAMES = (("loading model", "load model"), ("concept vectors", "forward pass"), ("forward", "forward pass"),
               ("curvature", "solve"), ("solve", "solve"), ("saturation", "saturation"),
               ("uncertainty", "bootstrap"), ("ranking", "ranking"), ("derivatives", "subspace estimators"),
               ("estimators for", "subspace estimators"), ("gradient alignment", "alignment estimators"),
               ("Adam", "alignment estimators"), ("EK-FAC", "EK-FAC"), ("recording", "trajectory estimators"),
               ("Diff-In", "trajectory estimators"), ("checkpoint", "trajectory estimators"),
               ("AirRep", "AirRep"), ("ground truth", "fine-tunes"), ("leaderboard", "leaderboard"))


def _stage_of(log: Path, progress: Path) -> str:
    """The estimate's name for what the run is doing now, from its progress
    file (benchmark) or the last progress line it printed ("[ 12.0%]
    stage: message")."""
    try:
        if progress.is_file():
            state = json.loads(progress.read_text())
            stage, message = state["stage"], state["message"]
        else:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[")]
            if not lines:
                return "start-up"
            stage, _, message = lines[-1].split("] ", 1)[1].partition(": ")
    except (OSError, ValueError, KeyError, IndexError):
        return "start-up"
    text = message if stage == "estimators" else stage
    return next((name for key, name in STAGE_NAMES if text.startswith(key) or key in text), stage)


def run_measured(cmd: list, env: dict, folder: Path) -> dict:
    """The command in a child: its wall time, its own peak RSS (wait4), and
    the largest RSS seen in each of its progress stages (sampled every
    0.2 s, so short peaks can be missed; the wait4 peak is exact)."""
    log, progress = folder / "log.txt", folder / "progress.json"
    per_stage: dict = {}
    done = threading.Event()
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=handle, stderr=subprocess.STDOUT)

        def sample():
            while not done.is_set():
                stage = _stage_of(log, progress)
                per_stage[stage] = max(per_stage.get(stage, 0), _rss_bytes(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    tail = log.read_text(errors="replace")[-2000:]
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "rc": os.waitstatus_to_exitcode(status),
            "log_tail": tail, "peak_rss_by_stage": per_stage}


def measured_stages(case: str, out_file: Path) -> dict:
    """The run's own per-stage timings from its JSON result."""
    if not out_file.is_file():
        return {}
    data = json.loads(out_file.read_text())
    timings = data.get("timings", {})
    if case == "benchmark":
        timings["estimators_by_name"] = {e["name"]: e["time_s"] for e in data.get("estimators", [])}
    return timings


def one_case(case: str, env: dict) -> dict:
    estimate = subprocess.run([sys.executable, "-c", ESTIMATE_CODE, case], cwd=str(REPO), env=env,
                              capture_output=True, text=True, check=True)
    predicted = json.loads(estimate.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "out.json"
        extra = ["--progress-file", str(Path(tmp) / "progress.json")] if case == "benchmark" else []
        load_before = os.getloadavg()
        measured = run_measured([sys.executable, "-m", "dowsing", *CASES[case], "--out", str(out_file), *extra], env,
                                Path(tmp))
        load_after = os.getloadavg()
        stages = measured_stages(case, out_file)
    est = predicted["estimate"]
    return {"case": case, "estimate_took_s": predicted["seconds"], "predicted_s": est["total_s"],
            "predicted_peak_bytes": est["peak_bytes"], "predicted_stages_s": est["stages_s"],
            "predicted_memory_bytes": est["memory_bytes"], "measured_s": measured["wall_s"],
            "measured_peak_bytes": measured["peak_rss_bytes"], "measured_stages_s": stages, "rc": measured["rc"],
            "measured_peak_by_stage": measured["peak_rss_by_stage"],
            "time_ratio": measured["wall_s"] / est["total_s"],
            "memory_ratio": measured["peak_rss_bytes"] / est["peak_bytes"],
            "load_average_before": load_before, "load_average_after": load_after,
            "log_tail": measured["log_tail"] if measured["rc"] else ""}


def documented() -> None:
    proc = subprocess.run([sys.executable, "-c", DOCUMENTED_CODE], cwd=str(REPO), env=dict(os.environ),
                          capture_output=True, text=True, check=True)
    estimates = json.loads(proc.stdout.strip().splitlines()[-1])
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "estimate-documented.json").write_text(json.dumps(estimates, indent=2))
    for name, est in estimates.items():
        print(f"{name}: {est['total_s'] / 60:.0f} min, peak {est['peak_bytes'] / 1e9:.1f} GB")
        for stage, seconds in est["stages_s"].items():
            print(f"  {stage:28} {seconds:8.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every child (default: unset)")
    parser.add_argument("--documented", action="store_true",
                        help="only estimate the two full benchmarks docs/VALIDATION.md measured; run nothing")
    args = parser.parse_args()
    env = child_env(args.threads)
    if args.documented:
        documented()
        return
    rows = [one_case(case, env) for case in ([args.only] if args.only else list(CASES))]
    report = {"threads": args.threads, "cpus": os.cpu_count(), "cases": rows}
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(report, indent=2))
    print(f"{'case':10} {'predicted':>10} {'measured':>10} {'ratio':>6}   {'peak pred.':>10} {'peak meas.':>10} "
          f"{'ratio':>6}   load before/after")
    for r in rows:
        print(f"{r['case']:10} {r['predicted_s']:9.0f}s {r['measured_s']:9.0f}s {r['time_ratio']:6.2f}   "
              f"{r['predicted_peak_bytes'] / 1e9:8.2f}GB {r['measured_peak_bytes'] / 1e9:8.2f}GB "
              f"{r['memory_ratio']:6.2f}   {r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f}")
        if r["rc"]:
            print(f"  the run exited {r['rc']}:\n{r['log_tail']}")


if __name__ == "__main__":
    main()
