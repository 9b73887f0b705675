"""Command line: `python -m dowsing analyze ...`.

Exit codes: 0 done, 2 bad input (a one-line message on stderr), 143 cancelled, 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import estimators
from .config import CURVATURES, DEFAULT_ESTIMATOR, DEVICES, DTYPES, SOLVERS, STAGES, AnalysisConfig
from .pipelines.executor import EXECUTORS
from .access.models import EMBEDDED_ID, ModelError
from .paths import atomic_write_text
from .result import Result, format_sci

BAD_INPUT = 2


def format_table(result: Result) -> str:
    """The ranked table as text: which estimator ranked the domains and what the
    benchmark measured for it, then Rank, Concept, Priority with its 90% interval,
    Share, the paper's Share of Mean (left out where Share already is it), the
    paper's Mean and Δn@10%, t vs rest and p."""
    from .presentation.charts import SATURATION_SOURCE, ranking_domains
    from .presentation.report import (evidence_text, format_interval, format_share, mean_share_is_share, mean_share_note,
                         mean_shares, ranking_statement)

    has_mean = any(d.mean is not None for d in result.domains)  # none after --stage ranking
    with_mean_share = has_mean and not mean_share_is_share(result)
    header = ["Rank", "Concept", "Priority [90% interval]", "Share"]
    header += ["Share of Mean, paper"] * with_mean_share + ["Mean (paper)", "Δn@10%", "t vs rest", "p"]
    intervals = ranking_domains(result)
    shares_of_mean = mean_shares(result)
    rows = []
    for d in result.ranked():
        interval = format_interval((intervals.get(d.name) or {}).get("priority_interval"))
        rows.append([
            str(d.rank), d.name, format_sci(d.ranking_priority) + (f" {interval}" if interval else ""),
            f"{d.share_pct:.1f}%", *[format_share(shares_of_mean[d.name])] * with_mean_share,
            format_sci(d.mean), format_sci(d.delta_n_10pct),
            "—" if d.t_vs_rest is None else f"{d.t_vs_rest:.2f}",
            "—" if d.p_value is None else f"{d.p_value:.2g}",
        ])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [ranking_statement(result), evidence_text(result), ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    notes = ([f"  {mean_share_note(result)}", f"  Mean (paper) and Δn@10% {SATURATION_SOURCE}."] if has_mean else
             ["  The analysis stopped after the ranking (--stage ranking): no Mean (paper) or Δn@10%."])
    notes += [f"  {d.name}: Δn is — because {d.delta_n_reason[0].lower()}{d.delta_n_reason[1:]}"
              for d in result.ranked() if d.delta_n_10pct is None and d.delta_n_reason and has_mean]
    return "\n".join(lines + ["", "Notes:"] + notes)


def _progress(p) -> None:
    print(f"[{p.fraction * 100:5.1f}%] {p.stage}: {p.message}", file=sys.stderr, flush=True)


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: every unit of work in this process (default); ray: units as Ray tasks "
                             "(fine-tunes, learning-curve points, per-domain solves)")
    parser.add_argument("--ray-address", default=None,
                        help="with --executor ray: absent, start Ray on this machine; auto, join the cluster this "
                             "machine belongs to; ray://host:10001, join a remote cluster")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="CPUs of a Ray started on this machine (default: every core)")


def executor_config(args, device: str = "cpu"):
    """The ExecutorConfig of the command line (ValueError on nonsense)."""
    from .pipelines.executor import ExecutorConfig

    if args.executor != "ray" and args.ray_cpus:
        raise ValueError("--ray-cpus needs --executor ray")
    return ExecutorConfig(kind=args.executor, address=args.ray_address, num_cpus=args.ray_cpus,
                          gpus_per_task=1.0 if (args.executor == "ray" and device == "cuda") else 0.0)


def open_executor(config, device: str = "cpu"):
    """The executor, with Ray started or joined; a one-line ValueError when
    Ray cannot be reached."""
    from .pipelines.executor import make_executor

    executor = make_executor(config, device)
    if config.kind == "ray":
        resources = executor.describe()
        print(f"ray: {resources['nodes']} node(s), {resources['CPU']} CPU, {resources['GPU']} GPU "
              f"(started or joined in {executor.startup_s:.1f} s)", file=sys.stderr)
    return executor


def cancel_on_sigterm() -> None:
    """SIGTERM (the app's Cancel) raises RunCancelled, so outstanding Ray tasks
    are cancelled on the way out instead of running on."""
    import signal

    from .pipelines.executor import RunCancelled

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RunCancelled()

    signal.signal(signal.SIGTERM, stop)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, last: str) -> None:
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="CHECKPOINT",
                        help="the model's training checkpoints, oldest first: local Hugging Face folders or hub "
                             f"steps owner/name@revision; the last is {last}")
    parser.add_argument("--checkpoint-lr", type=float, default=None,
                        help="step size of every interval between two checkpoints (learning rate times optimizer "
                             "steps) for TracIn and Diff-In (default: estimated from each step's length)")


def checked_model(args, models: list) -> list:
    """The model ids with --checkpoints applied: they are checked (a one-line
    CheckpointError otherwise) and, without --model, the last is the model."""
    if not args.checkpoints:
        return models
    from .access.checkpoints import check_last_is_model, validate_checkpoints

    checked = validate_checkpoints(args.checkpoints)
    if models == [None]:
        return [str(checked[-1].path)]
    if len(models) > 1:
        raise ValueError("--checkpoints describe one model: give at most one --model")
    check_last_is_model(checked, models[0])
    return models


def estimator_help() -> str:
    """--estimator's help, from the registry: each estimator an analysis
    offers with its one-phrase summary."""
    offered = "; ".join(f"{e.name}: {e.summary}" + (" (needs --checkpoints)" if "trajectory" in e.needs else "")
                        for e in (estimators.get(n) for n in estimators.names("analysis")))
    return (f"what ranks the domains (default: {DEFAULT_ESTIMATOR}, chosen by the benchmark against real "
            f"fine-tuning): {offered}. The paper's Mean and Δn are computed whatever it is")


ESTIMATE_HELP = "print the predicted wall time and peak memory on this machine, then exit without running"
IGNORE_MEMORY_HELP = ("start the run without first predicting its peak memory (by default a run whose predicted "
                      "peak exceeds the memory available is refused). The prediction can be pessimistic; but if the "
                      "run does need more than the machine has, the machine swaps, slowing the run and everything "
                      "else on it, or the system kills the run and its result is lost")


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--estimate", action="store_true", help=ESTIMATE_HELP)
    parser.add_argument("--ignore-memory-estimate", action="store_true", help=IGNORE_MEMORY_HELP)


def estimate_first(args, build, models: list, device: str, dtype: str, threads: int | None = None) -> int | None:
    """What a command does before its real run. With --estimate: `report`
    prints the estimates (`build()`, a list of Estimate) and its exit code
    is the command's. Otherwise the same estimates are checked against the
    memory this machine has available: 2 after one line of refusal and one
    on how to run anyway when a predicted peak exceeds it, or after the
    run's one-line error on bad input; None to go on to the run, also when
    the estimate itself fails (one note says why) and with
    --ignore-memory-estimate (nothing is estimated). models, device, dtype,
    threads: the calibrations the estimates read, so the first one, measured
    on the model here, is announced (a progress line: not with --quiet)
    rather than waited out in silence."""
    from .domains import DomainError
    from .estimates import cost_report
    from .estimates.calibration import cached_calibration, default_threads

    if args.estimate:
        return cost_report.report(build)
    if args.ignore_memory_estimate:
        return None
    try:
        threads = int(threads or default_threads())
        if not args.quiet and any(cached_calibration(m, device, dtype, threads) is None for m in models):
            print("note: measuring this machine once for the memory check (a short calibration on the model, kept "
                  "under cache/estimates/; about half a minute on the default model)…", file=sys.stderr, flush=True)
        estimates = build()
    except (ModelError, DomainError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except Exception as exc:  # the estimate's own failure is no reason to refuse the run
        reason = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
        print(f"note: no memory check before this run, its estimate failed ({reason}); running anyway",
              file=sys.stderr)
        return None
    for estimate in estimates:
        refusal = cost_report.memory_refusal(estimate, cost_report.available_memory_bytes(estimate.device))
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            print("To run anyway, add --ignore-memory-estimate (the estimate can be pessimistic, but a run that "
                  "runs out of memory swaps or is killed).", file=sys.stderr)
            return BAD_INPUT
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dowsing",
        description="Which concept domain would gain most from more training data: influence functions restricted "
                    "to each domain's concept direction (the Data Dowsing method). docs/METHOD.md has every formula.",
        epilog="Exit codes: 0 done, 2 bad input (one line on stderr, nothing written), 143 cancelled (SIGTERM), "
               "1 anything else.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_analyze_command(sub)
    add_validate_command(sub)
    add_benchmark_command(sub)
    add_plan_command(sub)
    cluster = sub.add_parser("cluster", help="what an executor would run on: CPUs, GPUs and nodes, as JSON")
    add_executor_arguments(cluster)
    return parser


def add_analyze_command(sub) -> None:
    analyze = sub.add_parser("analyze", help="rank domains by the ranking estimator, with the paper's "
                                             "concept-subspace influence and saturation beside it")
    defaults = AnalysisConfig()
    analyze.add_argument("--model", action="append", default=None,
                         help=f"HF id, local directory or .gguf (default: {EMBEDDED_ID}); give it several times to "
                              "analyse several models (one unit of work each: side by side with --executor ray)")
    analyze.add_argument("--domains", default=None, help="JSON or CSV domain file (default: the paper's four domains)")
    analyze.add_argument("--out", default=None, help="write the full result as JSON here")
    analyze.add_argument("--damping", type=float, default=defaults.damping,
                         help=f"λ in (H + λI) z = g (default: {defaults.damping:g})")
    analyze.add_argument("--blocks", type=int, default=defaults.blocks,
                         help=f"last B blocks whose MLP output projection carries the concept adapter "
                              f"(default: {defaults.blocks})")
    analyze.add_argument("--solver", choices=SOLVERS, default=defaults.solver,
                         help="auto: fastest exact method (structured Hessian for B = 1); cg: conjugate gradient "
                              "on Hessian-vector products; exact: dense solve (default: %(default)s)")
    analyze.add_argument("--curvature", choices=CURVATURES, default=defaults.curvature,
                         help="hessian: exact second derivative; ggn: Gauss-Newton, positive semi-definite "
                              "(default: %(default)s)")
    analyze.add_argument("--device", choices=DEVICES, default=defaults.device, help="(default: %(default)s)")
    analyze.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                         help="model precision; solves are float64 always; bfloat16 needs cuda (default: %(default)s)")
    analyze.add_argument("--estimator", choices=estimators.names("analysis"), default=defaults.estimator,
                         help=estimator_help())
    analyze.add_argument("--align-blocks", type=int, default=defaults.align_blocks,
                         help=f"last blocks (plus the final norm) whose parameters the alignment estimators use "
                              f"(default: {defaults.align_blocks})")
    add_checkpoint_arguments(analyze, "the model analysed (then --model may be left out)")
    analyze.add_argument("--stage", choices=STAGES, default=defaults.stage,
                         help="where to stop: 'ranking' stops after the ranking and the diagnosis (no paper's "
                              "curvature, solve, Mean, Δn or saturation; not with --estimator paper); "
                              "(default: %(default)s)")
    analyze.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    analyze.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_estimate_arguments(analyze)
    add_executor_arguments(analyze)


def add_validate_command(sub) -> None:
    validate = sub.add_parser("validate", help="check the ranking against ground truth by training; rival estimators")
    validate.add_argument("--model", default=None, help=f"HF id, local directory or .gguf (default: {EMBEDDED_ID})")
    validate.add_argument("--domains", default=None, help="JSON or CSV domain file (default: the paper's four domains)")
    validate.add_argument("--held-out", default=None, help="JSON or CSV domain file of held-out facts (default: a seeded half)")
    validate.add_argument("--config", default=None, help="JSON file of ValidationConfig fields")
    validate.add_argument("--seed", type=int, default=None, help="seed of the split, fine-tuning and bootstrap")
    validate.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    validate.add_argument("--out", default=None, help="write the full validation result as JSON here")
    validate.add_argument("--progress-file", default=None, help="keep the latest progress as JSON here")
    validate.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_estimate_arguments(validate)
    add_checkpoint_arguments(validate, "the model validated (then --model may be left out); the trajectory "
                                       "estimators read them instead of the baseline fine-tune")
    add_executor_arguments(validate)


def add_benchmark_command(sub) -> None:
    bench = sub.add_parser("benchmark", help="does an estimator's ranking predict fine-tuning? the leaderboard "
                                             "over the shipped benchmark domains, with power")
    bench.add_argument("--model", default=None, help=f"HF id, local directory or .gguf (default: {EMBEDDED_ID})")
    bench.add_argument("--domains", default=None,
                       help="JSON or CSV domain file (default: the 27 shipped benchmark domains, "
                            "dowsing/data/benchmark.json)")
    bench.add_argument("--quick", action="store_true",
                       help="six domains of 12 facts, short recipes: a few minutes on a small model")
    bench.add_argument("--config", default=None, help="JSON file of BenchmarkConfig fields")
    bench.add_argument("--seed", type=int, default=None, help="first seed of the split, fine-tunes and bootstrap")
    bench.add_argument("--out", default=None, help="write the full benchmark result as JSON here")
    bench.add_argument("--plan-budgets", default=None,
                       help="comma-separated budgets in examples, e.g. 148,592: check the collection plan by "
                            "training on it against spreading each budget evenly and in proportion to mean loss")
    bench.add_argument("--progress-file", default=None, help="keep the latest progress as JSON here")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice, one per core); 1 is far faster when "
                            "other processes share the cores")
    bench.add_argument("--evidence", action="store_true",
                       help="also write the per-estimator summary the app quotes "
                            "(dowsing/data/benchmark_evidence.json)")
    bench.add_argument("--device", choices=DEVICES, default="cpu",
                       help="where the model and its fine-tunes run; with Ray, cuda makes every task ask for a GPU "
                            "(default: %(default)s)")
    bench.add_argument("--no-cache", action="store_true",
                       help="recompute every fine-tune; by default the fine-tunes an interrupted run of the same "
                            "benchmark finished are reused")
    add_checkpoint_arguments(bench, "the model benchmarked (then --model may be left out); the trajectory "
                                    "estimators read them instead of the main recipe's baseline fine-tune")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_estimate_arguments(bench)
    add_executor_arguments(bench)


def add_plan_command(sub) -> None:
    plan = sub.add_parser("plan", help="how many more examples of each domain a budget should buy, and the "
                                       "predicted gain, from learning curves fitted to pilot fine-tunes")
    plan.add_argument("--budget", type=float, required=True,
                      help="what may be spent: a number of examples, or money when --costs is given")
    plan.add_argument("--costs", default=None,
                      help="cost per example of each domain, CSV (domain,value) or JSON ({domain: value}); the "
                           "budget is then money (default: every example costs 1)")
    plan.add_argument("--weights", default=None,
                      help="how much each domain's gain counts, CSV or JSON as --costs (default: 1 each)")
    plan.add_argument("--caps", default=None,
                      help="the most examples of each domain to collect, CSV or JSON as --costs (default: none)")
    plan.add_argument("--have", default="0",
                      help="how many of each domain's facts are already in the model's training data: a whole "
                           "number for every domain, or a CSV or JSON file as --costs (domains not named: 0). "
                           "Default 0: your facts are examples the model has not been trained on, so the first "
                           "facts collected carry the curve's steep start")
    plan.add_argument("--collected", default=None,
                      help="plan the next round: how many examples of each domain were collected since the plan of "
                           "--budget, CSV or JSON as --costs (domains not named: 0). The budget left is --budget "
                           "minus their cost, the caps shrink by them, and each curve is read from --have plus "
                           "them; add the collected facts to --domains so their pilots are measured again")
    plan.add_argument("--rule", choices=("expected", "point"), default="expected",
                      help="split the budget on the mean gain over the bootstrap curves (expected) or on the "
                           "fitted curves alone (point) (default: %(default)s)")
    plan.add_argument("--shrink", action="store_true",
                      help="pool the learning curves' shapes across domains (empirical Bayes); off by default")
    plan.add_argument("--transfer", action="store_true",
                      help="value each domain's examples by their gain on every weighted domain, from a transfer "
                           "matrix of the pilots (two more fine-tunes per domain); off by default")
    plan.add_argument("--model", default=None, help=f"HF id, local directory or .gguf (default: {EMBEDDED_ID})")
    plan.add_argument("--domains", default=None, help="JSON or CSV domain file (default: the paper's four domains)")
    plan.add_argument("--seed", type=int, default=0, help="seed of the halves, the pilots and the bootstrap")
    plan.add_argument("--device", choices=DEVICES, default="cpu", help="(default: %(default)s)")
    plan.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    plan.add_argument("--out", default=None, help="write the plan as JSON here")
    plan.add_argument("--progress-file", default=None, help="keep the latest progress as JSON here")
    plan.add_argument("--no-cache", action="store_true", help="rerun the pilot fine-tunes even if cached")
    plan.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_estimate_arguments(plan)


def plan_config(args, domains: list):
    """The PlanConfig of the command line, its files read and matched to the
    domains (a one-line ValueError for anything wrong)."""
    from .pipelines.plan import PlanConfig, check_plan, load_values, match_domains, next_round

    names = [d.name for d in domains]
    given = {}
    for what in ("costs", "weights", "caps"):
        path = getattr(args, what)
        if path:
            given[what] = match_domains(load_values(path, what), names, what, path)
    have_text = str(getattr(args, "have", "0")).strip()
    if have_text.lower().endswith((".csv", ".json")):
        given["have_by_domain"] = match_domains(load_values(have_text, "have"), names, "have", have_text)
    else:
        try:
            given["have"] = float(have_text)
        except ValueError:
            raise ValueError(f"--have must be a whole number of facts >= 0 or a .csv/.json file, got {have_text!r}") \
                from None
    config = PlanConfig(budget=args.budget, budget_unit="money" if args.costs else "examples", seed=args.seed,
                        device=args.device, dtype=args.dtype, rule=getattr(args, "rule", "expected"),
                        shrink=bool(getattr(args, "shrink", False)), transfer=bool(getattr(args, "transfer", False)),
                        **given)
    check_plan(config, domains)
    path = getattr(args, "collected", None)
    if path:
        counts = match_domains(load_values(path, "collected counts"), names, "collected counts", path)
        config = next_round(config, counts, names)
    return config


def run_plan_command(args) -> int:
    from .domains import DomainError, default_domains, load_domains
    from .pipelines.plan import format_plan, run_plan

    try:
        domains = load_domains(args.domains) if args.domains else default_domains()
        config = plan_config(args, domains)
        from .estimates.estimate import estimate_plan

        stop = estimate_first(args, lambda: [estimate_plan(args.model, domains, config, use_cache=not args.no_cache)],
                              [args.model], config.device, config.dtype)
        if stop is not None:
            return stop
        result = run_plan(args.model, domains, config, progress=_progress_writer(args), use_cache=not args.no_cache)
    except (ModelError, DomainError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(format_plan(result))
    if args.out:
        atomic_write_text(Path(args.out), result.to_json())
        print(f"\nwrote {args.out}")
    return 0


def run_analyze(args) -> int:
    from .pipelines.analysis import cache_key, run_analysis
    from .storage.store import ResultStore
    from .domains import DomainError, default_domains, load_domains

    try:
        models = checked_model(args, args.model or [None])
        config = AnalysisConfig(damping=args.damping, blocks=args.blocks, solver=args.solver,
                                curvature=args.curvature, device=args.device, dtype=args.dtype,
                                estimator=args.estimator, align_blocks=args.align_blocks,
                                checkpoints=tuple(args.checkpoints or ()), checkpoint_lr=args.checkpoint_lr,
                                stage=args.stage)
        domains = load_domains(args.domains) if args.domains else default_domains()
        from .estimates.estimate import estimate_analysis

        on = executor_config(args, config.device)
        # a stored result is printed as it is: nothing loads, so there is no memory to check
        stored = not args.estimate and not args.no_cache and all(
            ResultStore().get(cache_key(m, domains, config)) is not None for m in models)
        stop = None if stored else estimate_first(
            args, lambda: [estimate_analysis(m, domains, config, on, use_cache=not args.no_cache) for m in models],
            models, config.device, config.dtype)
        if stop is not None:
            return stop
        executor = open_executor(on, config.device)
        cancel_on_sigterm()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            if len(models) == 1:
                results = [run_analysis(models[0], domains, config, None if args.quiet else _progress,
                                        use_cache=not args.no_cache, executor=executor)]
            else:
                from .pipelines.analysis import run_analyses

                results = run_analyses(models, domains, config, executor, None if args.quiet else _progress)
    except (ModelError, DomainError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    for model, result in zip(models, results):
        if len(results) > 1:
            print(f"\n== {model} ==")
        print(format_table(result))
    if args.out:
        import json

        text = results[0].to_json() if len(results) == 1 else json.dumps(
            {"results": [json.loads(r.to_json()) for r in results]}, indent=2)
        atomic_write_text(Path(args.out), text)
        print(f"\nwrote {args.out}")
    return 0


def run_validate(args) -> int:
    from .domains import DomainError, default_domains, load_domains
    from .validation.validate import ValidationConfig, validate

    try:
        fields = config_fields(args, finetune_steps=args.steps)
        model = checked_model(args, [args.model])[0]
        config = ValidationConfig.from_dict(fields)
        domains = load_domains(args.domains) if args.domains else default_domains()
        held_out = {d.name: list(d.facts) for d in load_domains(args.held_out)} if args.held_out else None
        from .estimates.estimate import estimate_validation

        on = executor_config(args)
        stop = estimate_first(args, lambda: [estimate_validation(model, domains, config, held_out, on)], [model],
                              "cpu", "float32")
        if stop is not None:
            return stop
        executor = open_executor(on)
    except (DomainError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT

    progress = _progress_writer(args)
    cancel_on_sigterm()
    try:
        result = validate(model, domains, config, held_out=held_out, progress=progress, executor=executor)
    except (ModelError, DomainError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(result.table().to_string(index=False))
    if args.out:
        atomic_write_text(Path(args.out), result.to_json())
        print(f"\nwrote {args.out}")
    return 0


def config_fields(args, **overrides) -> dict:
    """The configuration's fields: the --config JSON file's, then the
    command line's --seed, --checkpoints and --checkpoint-lr, then the
    command's own overrides (those given, not None)."""
    import json

    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    given = {"seed": args.seed, "checkpoints": args.checkpoints or None, "checkpoint_lr": args.checkpoint_lr,
             **overrides}
    fields.update({name: value for name, value in given.items() if value is not None})
    return fields


# The files a command writes, checked before it runs: a run of hours must not
# end in an error that loses its result.
OUTPUT_OPTIONS = ("out", "progress_file")


def output_problem(path: str, option: str) -> str | None:
    """Why `path` cannot take a command's output file (None when it can): a
    directory, a missing parent folder, or a folder where no file can be
    created (tried with a temporary file, so it holds for every user)."""
    import os
    import tempfile

    out = Path(path).expanduser()
    if out.is_dir():
        return f"{option} {out} is a directory; give a file name."
    parent = out.parent
    if not parent.exists():
        return f"{option}: the folder {parent} does not exist."
    if not parent.is_dir():
        return f"{option}: {parent} is not a folder."
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
    except OSError as exc:
        return f"{option}: no file can be written in {parent} ({exc.strerror or type(exc).__name__})."
    os.close(fd)
    os.unlink(probe)
    return None


def _progress_writer(args):
    import json

    def progress(p) -> None:
        if not args.quiet:
            _progress(p)
        if args.progress_file:
            atomic_write_text(Path(args.progress_file), json.dumps(
                {"stage": p.stage, "fraction": p.fraction, "message": p.message}))

    return progress


def run_benchmark_command(args) -> int:
    import json

    from .domains import DomainError, load_domains
    from .validation.benchmark import BenchmarkConfig, check_domains, run_benchmark
    from .domains import benchmark_domains

    try:
        fields = config_fields(args, plan_budgets=_budgets(args.plan_budgets))
        model = checked_model(args, [args.model])[0]
        config = BenchmarkConfig.quick(**fields) if args.quick else BenchmarkConfig.from_dict(fields)
        domains = load_domains(args.domains) if args.domains else benchmark_domains(quick=args.quick)
        check_domains(domains, config)
        from .estimates.estimate import estimate_benchmark

        on = executor_config(args, args.device)
        stop = estimate_first(args, lambda: [estimate_benchmark(model, domains, config, args.device, args.threads, on)],
                              [model], args.device, "float32", args.threads)
        if stop is not None:
            return stop
        executor = open_executor(on, args.device)
    except (DomainError, ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cancel_on_sigterm()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            result = run_benchmark(model, domains, config, progress=_progress_writer(args), executor=executor,
                                   resume=not args.no_cache, device=args.device)
    except (ModelError, DomainError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    main = config.main_recipe
    print(f"Leaderboard, recipe {main} ({len(result.domains)} domains; ρ against the seed-averaged realised gain):")
    print(result.table(main).to_string(index=False))
    ceiling = result.reliability["between_seeds"][main]
    print(f"\nGround truth between seeds: ρ = {_num(ceiling['spearman'])} "
          f"(reliability of the seed mean {_num(ceiling['spearman_brown'])}).")
    print(f"Winner: {result.winner}")
    for group in ("ordinary", "hard"):
        if group in result.group_leaderboards:
            print(f"\n{group.capitalize()} domains only ({result.group_leaderboards[group]['n_domains']}):")
            print(result.group_table(group).to_string(index=False))
    if result.default:
        print(f"\nDefault ranking by the rule ({result.default['rule']}): {result.default['estimator']}; "
              f"{result.default['reason']}.")
    _print_plan_check(result.plan_check)
    print(f"Time: {result.timings.get('total', 0.0) / 60:.1f} min in all.")
    if args.out:
        atomic_write_text(Path(args.out), result.to_json())
        print(f"\nwrote {args.out}")
    if args.evidence:
        from .validation.evidence import EVIDENCE_FILE
        from .validation.benchmark import evidence_from_result

        atomic_write_text(EVIDENCE_FILE, json.dumps(evidence_from_result(result), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {EVIDENCE_FILE}")
    return 0


def _budgets(text: str | None) -> list | None:
    """--plan-budgets: whole numbers separated by commas (checked by the config)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--plan-budgets must be numbers separated by commas, got {text!r}") from None


def _print_plan_check(check: dict) -> None:
    if not check:
        return
    from .validation.plan_check import extrapolation_table, plan_table

    print(f"\nPlan check ({check['recipe']}; realised gain = test loss after the baseline minus after the run, "
          "mean over domains):")
    print(plan_table(check).to_string(index=False))
    ex = check["extrapolation"]
    print(f"\nExtrapolation to {ex['target']} added facts (relative error of the predicted gain):")
    print(extrapolation_table(check).to_string(index=False))


def run_cluster(args) -> int:
    import json

    try:
        executor = open_executor(executor_config(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(json.dumps(executor.describe()))
    return 0


def _num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


CANCELLED = 143  # 128 + SIGTERM, as a process killed by it


def main(argv=None) -> int:
    from .pipelines.executor import RunCancelled

    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except RunCancelled:
        print("cancelled: outstanding units were cancelled; finished ones are kept in cache/units", file=sys.stderr)
        return CANCELLED


def run_command(args) -> int:
    for name in OUTPUT_OPTIONS:
        path = getattr(args, name, None)
        problem = output_problem(path, "--" + name.replace("_", "-")) if path else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return BAD_INPUT
    if args.command == "analyze":
        return run_analyze(args)
    if args.command == "validate":
        return run_validate(args)
    if args.command == "benchmark":
        return run_benchmark_command(args)
    if args.command == "plan":
        return run_plan_command(args)
    if args.command == "cluster":
        return run_cluster(args)
    return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
