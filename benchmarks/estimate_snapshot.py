"""Every number the estimates print, for a fixed calibration and a word-count
tokenizer, over configurations of the analysis, the plan, the validation and
the benchmark: a snapshot to compare before and after a change of the cost
code (nothing is measured or run, so it takes seconds).

  python benchmarks/estimate_snapshot.py out.json            # write a snapshot
  python benchmarks/estimate_snapshot.py out.json --compare before.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dowsing.estimates import estimate as est  # noqa: E402
from dowsing.config import AnalysisConfig  # noqa: E402
from dowsing.domains import benchmark_domains, default_domains  # noqa: E402
from dowsing.estimators import names  # noqa: E402
from dowsing.pipelines.executor import ExecutorConfig  # noqa: E402
from dowsing.pipelines.plan import PilotConfig, PlanConfig  # noqa: E402
from dowsing.validation.benchmark import BenchmarkConfig  # noqa: E402
from dowsing.validation.validate import ValidationConfig  # noqa: E402

CAL = dict(
    model="snapshot", fingerprint="snapshot", device="cpu", dtype="float32", threads=2, n_params=135_000_000,
    n_layers=30, d_model=576, d_ff=1536, vocab=49152, max_positions=2048, block_params=3_540_000,
    head_params=28_311_552, linear_shapes=((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536),
                                           (576, 1536), (1536, 576)),
    dtype_bytes=4, start_s=3.1, load_s=1.7, forward_s_per_token=2.1e-4,
    line_s_per_token=4.4e-4, tail_s_per_param_token=1.3e-11, grad_call_s=0.012, vector_s_per_element=1.1e-9,
    copy_s=0.41, matmul_flops=3.1e10, matmul32_flops=6.7e10, factor_flops=1.9e10, substitution_size=1536,
    substitution_1_s=3.2e-4, substitution_32_s=2.1e-3, bootstrap_s_per_curve=2.3e-4,
    leaderboard_s_per_resample=1.7e-4, base_bytes=420_000_000, model_bytes=560_000_000,
    forward_bytes_per_token=210_000.0, coef_bytes_per_token=61_000.0, step_bytes_per_token=330_000.0,
    seconds=9.0, created_at="2026-01-01T00:00:00", load_average=0.1)


class WordTokenizer:
    """Tokens per fact from its words and characters: deterministic, no files."""

    def __call__(self, text):
        return {"input_ids": list(range(1 + len(text.split()) + len(text) // 11))}


def cases():
    tok, cal = WordTokenizer(), est.Calibration(**CAL)
    ray = ExecutorConfig(kind="ray", num_cpus=4)
    far = ExecutorConfig(kind="ray", address="auto", num_cpus=3)
    d = default_domains()
    analysis = [("default", AnalysisConfig(), None)]
    for name in names("analysis"):
        analysis.append((f"ranking {name}", AnalysisConfig(estimator=name), None))
        analysis.append((f"ranking {name}, no diagnosis", AnalysisConfig(estimator=name, diagnose=False), None))
    analysis += [("exact B=2", AnalysisConfig(solver="exact", blocks=2), None),
                 ("exact B=2 ray", AnalysisConfig(solver="exact", blocks=2), ray),
                 ("structured ray", AnalysisConfig(), ray),
                 ("cg B=2", AnalysisConfig(solver="cg", blocks=2, cg_maxiter=50), None),
                 ("cg B=1", AnalysisConfig(solver="cg", blocks=1), None),
                 ("align 2, batch 4", AnalysisConfig(estimator="alignment_heldout_adam", align_blocks=2,
                                                     batch_size=4, adam_batches=3), None)]
    for label, config, executor in analysis:
        yield f"analysis: {label}", lambda c=config, x=executor: est.estimate_analysis(
            None, d, c, executor=x, use_cache=False, calibration=cal, tokenizer=tok)
    quick = benchmark_domains(quick=True)
    bench = [("quick", BenchmarkConfig.quick(), quick, None), ("quick ray", BenchmarkConfig.quick(), quick, ray),
             ("quick far ray", BenchmarkConfig.quick(), quick, far),
             ("quick plan check", BenchmarkConfig.quick(plan_budgets=(16, 40)), quick, None),
             ("quick one reading", BenchmarkConfig.quick(second_reading=False, seeds=1), quick, None),
             ("full", BenchmarkConfig(), None, None)]
    for family in ("subspace", "alignment", "ekfac", "trajectory", "airrep", "pilot"):
        from dowsing.estimators import ESTIMATORS

        members = tuple(n for n, e in ESTIMATORS.items() if e.family == family and e.in_benchmark)
        bench.append((f"quick {family} only", BenchmarkConfig.quick(estimators=members, curve_domains=()), quick,
                      None))
    bench.append(("quick alignment_adam", BenchmarkConfig.quick(estimators=("alignment_adam", "mean_loss")), quick,
                  None))
    bench.append(("quick pilot_gain", BenchmarkConfig.quick(estimators=("pilot_gain", "lookahead_sign")), quick,
                  None))
    for label, config, domains, executor in bench:
        yield f"benchmark: {label}", lambda c=config, dm=domains, x=executor: est.estimate_benchmark(
            None, dm, c, executor=x, calibration=cal, tokenizer=tok)
    valid = [("default", ValidationConfig(), None), ("ray", ValidationConfig(), ray),
             ("no fine-tune", ValidationConfig(finetune=False), None),
             ("no subspace", ValidationConfig(subspace=False), None),
             ("few", ValidationConfig(estimators=("mean_loss", "alignment", "vog")), None),
             ("paper only", ValidationConfig(estimators=("paper",)), None),
             ("lissa", ValidationConfig(estimators=("influence_lissa", "influence_cg", "grad_norm"),
                                        lissa_depth=500), None),
             ("diffin blocks 2", ValidationConfig(estimators=("diffin", "alignment_heldout_adam"),
                                                  finetune_blocks=2), None)]
    for label, config, executor in valid:
        yield f"validation: {label}", lambda c=config, x=executor: est.estimate_validation(
            None, d, c, executor=x, calibration=cal, tokenizer=tok)
    plans = [("pilots", PilotConfig()), ("pilots 2,4", PilotConfig(pilot_sizes=(2, 4), batch_size=8)),
             ("plan", PlanConfig(budget=100))]
    for label, config in plans:
        yield f"plan: {label}", lambda c=config: est.estimate_plan(None, d, c, use_cache=False, calibration=cal,
                                                                   tokenizer=tok)


def snapshot() -> dict:
    out = {}
    for label, build in cases():
        try:
            estimate = build()
        except Exception as exc:  # the refusal is part of the behaviour
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[label] = {"estimate": estimate.to_dict(), "text": est.format_estimate(estimate, 8_000_000_000)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--compare")
    args = parser.parse_args()
    got = snapshot()
    Path(args.out).write_text(json.dumps(got, indent=1))
    print(f"{len(got)} estimates, {sum('error' in v for v in got.values())} refused")
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    same = [k for k in before if got.get(k) == before[k]]
    differ = [k for k in before if k in got and got[k] != before[k]]
    missing = [k for k in before if k not in got]
    print(f"identical: {len(same)} of {len(before)}; different: {len(differ)}; missing: {len(missing)}")
    for k in differ[:10]:
        print("  differs:", k)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
