"""What the pilot estimators cost against mean loss, in one run on the
default model: the benchmark's estimator pass (each domain's sample of 16
facts split in halves) over the first N shipped domains, then each estimator
computed alone in this process. Every time includes the shared forward pass,
as the leaderboard's times do.

    python benchmarks/bench_pilots.py --domains 8 --threads 1 --out pilots.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dowsing.domains import benchmark_domains
    from dowsing.estimators import EstimatorContext, compute
    from dowsing.kernels.forward import split_pass
    from dowsing.access.models import load_model
    from dowsing.kernels.splitting import split_domains
    from dowsing.kernels.subspace import find_anatomy
    from dowsing.validation.benchmark import BenchmarkConfig, estimator_context
    from dowsing.validation.protocol import collection_split

    config = BenchmarkConfig()
    loaded = load_model(None, "cpu", "float32")
    domains = benchmark_domains()[: args.domains]
    sample = collection_split(domains, config.seed, config.sample_facts, config.test_facts)["sample"]
    train, held = split_domains(sample, config.seed, config.held_out_fraction)
    depth = len(find_anatomy(loaded.model).down_projs)
    split = split_pass(loaded, train, held, config.batch_size, capture_block=depth - 4)

    class Run:  # what estimator_context reads of a benchmark split
        pass

    run = Run()
    run.split, run.keep = split, 4
    ctx = estimator_context(loaded, run, config, None)
    out = {"domains": args.domains, "threads": args.threads, "load": os.getloadavg()[0],
           "forward_s": split.forward_s, "seconds": {}}
    for name in ("mean_loss", "pilot_gain", "pilot_curve", "lookahead_sign"):
        t0 = time.perf_counter()
        score = compute(EstimatorContext(loaded, split, ctx.settings), [name])[0]
        out["seconds"][name] = score.time_s
        print(f"{name}: {score.time_s:.1f} s (own work {time.perf_counter() - t0:.1f} s)", flush=True)
    base = out["seconds"]["mean_loss"]
    out["ratio_vs_mean_loss"] = {k: v / base for k, v in out["seconds"].items()}
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out["ratio_vs_mean_loss"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
