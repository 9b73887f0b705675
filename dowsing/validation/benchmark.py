"""The benchmark: does an estimator's ranking of domains predict what
fine-tuning really does, on enough domains for the answer to have power?

1. Each domain's facts are split (seeded) into a training and a held-out half.
2. Every estimator scores the domains (`estimators.py`); the held-out facts'
   losses after training are never seen by any of them.
3. Ground truth (`finetune.py`): for each recipe and seed, a baseline
   fine-tune on all training halves and one run per domain that adds that
   domain's training facts; realised gain of k = held-out loss of k after the
   baseline - after run k. Its own noise is measured between seeds and
   between recipes (`leaderboard.reliability`).
4. Learning curves: for a few domains, the held-out loss after adding
   n = 0, 4, 8, 16, 32 facts, beside the engine's predicted saturation curve.
5. Leaderboard (`leaderboard.py`): per estimator and recipe, Spearman's rho
   against the seed-averaged gain with an interval over resampled domains,
   and the paired difference against mean loss.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..checkpoints import checkpoint_fields
from ..domains import Domain, as_domains, benchmark_domains, benchmark_groups
from ..estimators import (EstimatorContext, EstimatorScore, EstimatorSettings, build_context, by_family,
                          check_names, family_unit, names)
from ..estimators.subspace import domain_terms_of
from ..executor import LocalExecutor, Shared, Unit, UnitStore, fingerprint
from ..forward import split_pass
from ..models import LoadedModel, load_model
from ..progress import Progress
from ..records import ConfigRecord, ResultRecord
from ..result import ENGINE_VERSION
from ..saturation import DenseSystem, mu_function, saturation
from ..solvers import damped, dense_solve
from ..splitting import split_domains
from ..curvature import structured_hessian
from ..subspace import find_anatomy
from ..training import Recipe, TailTrainer, build_trainer
from .finetune import counterfactual_gains, curve_units, finetune_unit, gains_from_losses, measured_delta_n, truth_units
from .leaderboard import BASELINE, benchmark_leaderboard, choose_winner, reliability

MIN_FACTS = 4
LOW_POWER_DOMAINS = 5

DEFAULT_RECIPES = (
    Recipe("adamw", "adamw", lr=3e-5, steps=8, blocks=4),
    Recipe("sgd", "sgd", lr=3e-3, steps=8, blocks=4),
    Recipe("adamw_hi", "adamw", lr=1e-4, steps=8, blocks=2),
)
CURVE_DOMAINS = ("Cooking", "World geography", "Physics", "Heraldry", "Norwegian (Bokmål)",
                 "Invented: Kelvaran archipelago")


@dataclass(frozen=True)
class BenchmarkConfig(ConfigRecord):
    """Every knob of one benchmark run.

    seed / seeds: the first seed and how many seeds each recipe is run with
        (seeds seed, seed + 1, ...: the minibatches differ, the split not).
    held_out_fraction: share of each domain's facts held out.
    max_facts: use at most this many facts per domain (0: all).
    recipes: the fine-tuning recipes of the ground truth; main_recipe names
        the one the winner is chosen on.
    estimators: which estimators go on the leaderboard (default: every
        registered estimator offered to the benchmark).
    damping: lambda of the influence estimators in S_k.
    align_blocks: the last blocks (plus the final norm) whose parameters the
        alignment estimators use.
    ekfac_blocks / ekfac_fit_facts: the last blocks whose Linear layers the
        EK-FAC estimator uses, and how many training facts (a seeded sample)
        its curvature is fitted on; both bound its cost, which grows with
        the blocks times the facts.
    adam_batches: minibatches that estimate Adam's second moment.
    curve_domains / curve_sizes / curve_held_out: the learning curves.
    bootstrap / interval_pct: resamples of domains for the intervals.
    checkpoints / checkpoint_lr: the user's training checkpoints of the model
        (oldest first, the last the model benchmarked) and the step size of
        every interval between two; the trajectory estimators read them
        instead of the main recipe's baseline fine-tune. Empty: that
        fine-tune is the trajectory.
    """

    record_name = "benchmark config"

    seed: int = 0
    seeds: int = 2
    held_out_fraction: float = 0.5
    max_facts: int = 0
    recipes: tuple = DEFAULT_RECIPES
    main_recipe: str = "adamw"
    estimators: tuple = field(default_factory=lambda: names("benchmark"))
    damping: float = 1e-3
    align_blocks: int = 4
    adam_batches: int = 8
    ekfac_blocks: int = 2
    ekfac_fit_facts: int = 128
    curve_domains: tuple = CURVE_DOMAINS
    curve_sizes: tuple = (0, 4, 8, 16, 32)
    curve_held_out: int = 8
    bootstrap: int = 2000
    interval_pct: float = 90.0
    batch_size: int = 16
    checkpoints: tuple = ()
    checkpoint_lr: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", checkpoint_fields(self.checkpoints, self.checkpoint_lr))
        recipes = tuple(r if isinstance(r, Recipe) else Recipe(**r) for r in self.recipes)
        object.__setattr__(self, "recipes", recipes)
        for name in ("estimators", "curve_domains"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "curve_sizes", tuple(int(n) for n in self.curve_sizes))
        if not recipes:
            raise ValueError("the benchmark needs at least one recipe")
        if len({r.name for r in recipes}) != len(recipes):
            raise ValueError("recipe names must be unique")
        if self.main_recipe not in {r.name for r in recipes}:
            raise ValueError(f"main_recipe {self.main_recipe!r} is not one of the recipes")
        check_names(self.estimators)
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError("held_out_fraction must be in (0, 1)")
        if self.max_facts and self.max_facts < MIN_FACTS:
            raise ValueError(f"max_facts must be 0 (all) or >= {MIN_FACTS}")
        if self.bootstrap < 0:
            raise ValueError("bootstrap must be >= 0")

    @classmethod
    def quick(cls, **changes) -> "BenchmarkConfig":
        """The quick benchmark: six domains of 12 facts, short recipes, small
        learning curves; what the tests run."""
        fields = dict(
            max_facts=12, bootstrap=500, adam_batches=4, curve_sizes=(0, 2, 4, 8), curve_held_out=4,
            recipes=(Recipe("adamw", "adamw", lr=3e-5, steps=4, blocks=2),
                     Recipe("sgd", "sgd", lr=3e-3, steps=4, blocks=2),
                     Recipe("adamw_hi", "adamw", lr=1e-4, steps=4, blocks=1)),
            align_blocks=2, ekfac_blocks=1, ekfac_fit_facts=32, curve_domains=CURVE_DOMAINS[:3],
        )
        fields.update(changes)
        return cls(**fields)


@dataclass
class BenchmarkResult(ResultRecord):
    model: dict
    config: dict
    domains: list  # names
    groups: dict  # name -> familiarity group (shipped domains only)
    split: dict  # {"train": {name: [facts]}, "held_out": {name: [facts]}}
    estimators: list  # EstimatorScore.to_dict()
    truth: dict  # recipe -> {"gains": [[per domain] per seed], "gain": seed mean, "baseline_drop", "seconds"}
    reliability: dict
    leaderboard: list
    winner: str | None
    curves: list  # per curve domain: measured points, predicted mu ratio, delta n both ways
    timings: dict
    warnings: list = field(default_factory=list)
    created_at: str = ""
    execution: dict = field(default_factory=dict)  # executor, resources, per-unit node and times

    def recipe_names(self) -> list:
        return [r["name"] for r in self.config["recipes"]]

    def table(self, recipe: str | None = None):
        """The leaderboard for one recipe (the main one by default) as a
        DataFrame, best rho first."""
        import pandas as pd

        recipe = recipe or self.config["main_recipe"]
        rows = []
        for r in self.leaderboard:
            cell = r["recipes"][recipe]
            rows.append({
                "Estimator": r["label"],
                "ρ": cell["spearman"],
                "90% interval": interval_text(cell["interval"]),
                "ρ − mean loss": cell["diff_vs_mean_loss"],
                "difference interval": interval_text(cell["diff_interval"]),
                "time (s)": r["time_s"],
            })
        frame = pd.DataFrame(rows)
        return frame.sort_values("ρ", ascending=False, na_position="last").reset_index(drop=True)


def interval_text(pair) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def check_domains(domains) -> list:
    """Domains fit for the benchmark: each has at least MIN_FACTS facts, so
    both halves of the split have at least two. Raises ValueError (one line)."""
    domains = as_domains(domains)
    for d in domains:
        if len(d.facts) < MIN_FACTS:
            raise ValueError(f"Domain {d.name!r} has {len(d.facts)} facts; the benchmark needs at least "
                             f"{MIN_FACTS} per domain (half train, half held out).")
    if len(domains) < 2:
        raise ValueError("The benchmark needs at least 2 domains.")
    return domains


def predicted_curve(split, terms, k: int, damping: float, sizes) -> dict:
    """The engine's saturation prediction for domain k from its training half:
    mu(n) = g_k^T (H + (n - N_k)/M Hbar_k + lambda I)^-1 g_k (exact Hessian,
    as the analysis) with n facts of k in the mixture; the ratio
    mu(n) / mu(n_1) at the curve's sizes (n_1 the first non-zero one), to set
    beside the measured marginal gain relative to the first added facts; and
    the engine's delta n at 10% beyond N_k (or its reason)."""
    tokens = split.tokens
    rows = split.train_rows[k]
    t = terms[k]
    n_total = split.n_train
    in_k = torch.isin(tokens.token_fact, torch.tensor(rows, device=tokens.token_fact.device))
    hbar_k = structured_hessian(tokens.x[in_k], tokens.token_scale[in_k] / len(rows), t.c[in_k])
    # t.hessian is the Hessian of the mean training loss, the analysis' H_k with M = the training facts
    system = DenseSystem(damped(t.hessian, damping), hbar_k, len(rows), n_total)
    g_bar = t.grads[rows].mean(dim=0)
    mu = mu_function(system, g_bar)
    mean = float(g_bar @ dense_solve(damped(t.hessian, damping), g_bar).x)
    sat = saturation(mu, len(rows), mean, 24, 1000.0)
    # the curve's n counts k's facts in the training mixture from zero, as mu's n does
    added = [n for n in sizes if n > 0]
    first = mu(added[0]) if added else None
    ratio = [[n, mu(n) / first if first else None] for n in added]
    return {"n_facts": len(rows), "mean": mean, "ratio": ratio, "delta_n_10pct": sat["delta_n_10pct"],
            "reason": sat["reason"]}


def run_benchmark(model, domains=None, config: BenchmarkConfig | None = None,
                  progress: Callable[[Progress], None] | None = None, executor=None, resume: bool = False,
                  should_stop: Callable[[], bool] | None = None, device: str = "cpu") -> BenchmarkResult:
    """Run the whole benchmark. model: a LoadedModel, or an id / path (None:
    the embedded default), loaded in float32 on `device`. domains: None for
    the shipped benchmark domains.

    executor: where the estimator families, the fine-tunes and the
    learning-curve points run (`dowsing.executor`; in this process by
    default; on Ray each is a task, the families first). resume: keep each
    finished unit in the unit store under the run's fingerprint (model,
    domains, configuration, engine version) and reuse what an earlier,
    interrupted run of the same benchmark finished."""
    from datetime import datetime, timezone

    executor = executor or LocalExecutor()
    config = config or BenchmarkConfig()
    say = progress or (lambda p: None)
    clock = time.perf_counter()
    timings, notes = {}, []
    model, domains, checkpoints = _prepared(model, domains, config, device, say, timings, notes)
    run = _split(model, domains, config, resume, say, timings)
    scores, values = _run_units(model, run, config, checkpoints, executor, say, should_stop, timings)
    unit_seconds = {r.key: r.end - r.start for r in executor.telemetry.records if not r.cached}
    truth = _truth(run, config, values, unit_seconds, timings)
    curves = _curves(model, run, config, checkpoints, values, unit_seconds, timings)
    say(Progress("leaderboard", 0.96, "correlations and bootstrap"))
    gains = {name: t["gains"] for name, t in truth.items()}
    board = benchmark_leaderboard(scores, gains, config.main_recipe, config.bootstrap, config.seed,
                                  config.interval_pct)
    if BASELINE not in config.estimators:
        notes.append("mean_loss is not among the estimators: no paired differences against it.")
    timings["total"] = time.perf_counter() - clock
    say(Progress("done", 1.0, "benchmark complete"))
    groups = benchmark_groups()
    return BenchmarkResult(
        model=model.info.to_dict(), config=config.to_dict(), domains=run.names,
        groups={n: groups[n] for n in run.names if n in groups},
        split={"train": {d.name: list(d.facts) for d in run.train},
               "held_out": {d.name: list(d.facts) for d in run.held}},
        estimators=[s.to_dict() for s in scores], truth=truth, reliability=reliability(gains), leaderboard=board,
        winner=choose_winner(board), curves=curves, timings=timings, warnings=notes,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        execution=_execution(executor, run, timings),
    )


def _prepared(model, domains, config: BenchmarkConfig, device: str, say, timings: dict, notes: list):
    """(LoadedModel, domains, checked checkpoints or None), every input
    checked before the model is loaded."""
    checkpoints = None
    if config.checkpoints:
        from ..checkpoints import check_last_is_model, validate_checkpoints

        checkpoints = validate_checkpoints(config.checkpoints)
        check_last_is_model(checkpoints, model.info.id if isinstance(model, LoadedModel) else model)
    domains = check_domains(domains if domains is not None else benchmark_domains())
    if config.max_facts:
        domains = [Domain(d.name, d.facts[: config.max_facts]) for d in domains]
    if len(domains) < LOW_POWER_DOMAINS:
        message = (f"Only {len(domains)} domains: Spearman's rho over so few has no power to tell estimators "
                   "apart; use at least 12.")
        warnings.warn(message, stacklevel=3)
        notes.append(message)
    if not isinstance(model, LoadedModel):
        say(Progress("loading model", 0.0, "loading model"))
        t0 = time.perf_counter()
        model = load_model(model, device, "float32")
        timings["load_model"] = time.perf_counter() - t0
    return model, domains, checkpoints


@dataclass
class BenchmarkSplit:
    """The benchmark's split and its forward pass: the training and held-out
    halves, the domains' names, the split pass (block inputs captured at the
    first block any recipe or estimator trains, `keep` blocks from the end),
    the run's fingerprint and its unit store (None: nothing is resumed)."""

    train: list
    held: list
    names: list
    split: object
    keep: int
    namespace: str
    store: object


def _split(model, domains: list, config: BenchmarkConfig, resume: bool, say, timings: dict) -> BenchmarkSplit:
    train, held = split_domains(domains, config.seed, config.held_out_fraction)
    namespace = fingerprint("benchmark", model.info.to_dict(), [(d.name, d.facts) for d in train],
                            [(d.name, d.facts) for d in held], config.to_dict(), ENGINE_VERSION)
    depth = len(find_anatomy(model.model).down_projs)
    keep = min(depth, max([r.blocks for r in config.recipes] + [config.align_blocks]))
    say(Progress("forward", 0.01, f"forward pass over {sum(len(d.facts) for d in train + held)} facts"))
    split = split_pass(model, train, held, config.batch_size, capture_block=depth - keep)
    timings["forward"] = split.forward_s
    return BenchmarkSplit(train, held, [d.name for d in train], split, keep, namespace,
                          UnitStore(namespace) if resume else None)


def main_recipe(config: BenchmarkConfig) -> Recipe:
    return next(r for r in config.recipes if r.name == config.main_recipe)


def estimator_context(model, run: BenchmarkSplit, config: BenchmarkConfig, checkpoints) -> EstimatorContext:
    """What the estimator families read: the split pass, the user's
    checkpoints, and the settings; the trajectory estimators read the user's
    checkpoints when given, else the main recipe's baseline fine-tune (first
    seed), the trajectory a user without checkpoints of their own would have."""
    settings = EstimatorSettings(damping=config.damping, blocks=min(config.align_blocks, run.keep),
                                 adam_batches=config.adam_batches, seed=config.seed,
                                 ekfac_blocks=min(config.ekfac_blocks, run.keep),
                                 ekfac_fit_facts=config.ekfac_fit_facts or None, batch_size=config.batch_size,
                                 recipe=main_recipe(config), checkpoint_lr=config.checkpoint_lr)
    return EstimatorContext(model, run.split, settings, checkpoints)


def _fine_tune_units(run: BenchmarkSplit, config: BenchmarkConfig) -> list:
    """The ground truth's fine-tunes (every recipe and seed) and the
    learning curves' points."""
    units = []
    for recipe in config.recipes:
        for s in range(config.seeds):
            units += truth_units(recipe, config.seed + s, len(run.names))
    for name in (n for n in config.curve_domains if n in run.names):
        units += _curve_units(run, config, name)
    return units


def _curve_units(run: BenchmarkSplit, config: BenchmarkConfig, name: str) -> list:
    k = run.names.index(name)
    pool = len(run.split.train_rows[k]) + len(run.split.held_rows[k]) - config.curve_held_out
    return curve_units(main_recipe(config), config.seed, k, name, config.curve_sizes, config.curve_held_out,
                       len(run.split.train_rows[k]), pool)


def _run_units(model, run: BenchmarkSplit, config: BenchmarkConfig, checkpoints, executor, say, should_stop,
               timings: dict):
    """(estimator scores in the configured order, fine-tune values by key):
    each estimator family and each fine-tune is a unit of the executor. The
    families are submitted first: on Ray they are the longest units."""
    t0 = time.perf_counter()
    local = executor.kind == "local"
    context = estimator_context(model, run, config, checkpoints)
    families = [Unit(f"estimators/{family}", (family, tuple(members)))
                for family, members in by_family(config.estimators).items()]
    trainer = TailTrainer(model, run.split)
    trainer.check()
    units = _fine_tune_units(run, config)
    timings["payload_mb"] = trainer.payload_bytes() / 2 ** 20

    def on_family(key, value, finished, total):
        say(Progress("estimators", 0.03 + 0.27 * finished / total, f"estimators {finished} of {total} families "
                                                                    f"done ({key.split('/', 1)[1]})"))

    def on_fine_tune(key, value, finished, total):
        say(Progress("ground truth", 0.3 + 0.65 * finished / total,
                     f"fine-tune {finished} of {total} done ({key.split('/', 1)[1]})"))

    shared = Shared(f"benchmark-estimators/{run.namespace}", payload=None if local else context.payload(),
                    build=build_context, context=context if local else None)
    pending_estimators = executor.start(family_unit, families, shared, store=run.store, on_done=on_family,
                                        should_stop=should_stop)
    shared = Shared(f"benchmark-tail/{run.namespace}", payload=None if local else trainer.payload(),
                    build=build_trainer, context=trainer if local else None)
    pending = executor.start(finetune_unit, units, shared, store=run.store, on_done=on_fine_tune,
                             should_stop=should_stop)
    try:
        by_key = pending_estimators.wait()
        values = pending.wait()
    except BaseException:
        pending_estimators.cancel()
        pending.cancel()
        raise
    timings["units_wall"] = time.perf_counter() - t0
    scores = {s["name"]: EstimatorScore.from_dict(s) for unit in families for s in by_key[unit.key]}
    timings["estimators"] = sum(r.end - r.start for r in executor.telemetry.records
                                if r.key.startswith("estimators/") and not r.cached)
    return [scores[name] for name in config.estimators], values


def _truth(run: BenchmarkSplit, config: BenchmarkConfig, values: dict, unit_seconds: dict, timings: dict) -> dict:
    """Per recipe: the realised gain of each domain per seed and their mean,
    the baseline's own drop, and the fine-tunes' seconds."""
    truth = {}
    for recipe in config.recipes:
        runs, drops, seconds = [], [], 0.0
        for s in range(config.seeds):
            keys = [u.key for u in truth_units(recipe, config.seed + s, len(run.names))]
            out = gains_from_losses(run.split.held_rows, values[keys[0]], [values[key] for key in keys[1:]])
            runs.append(out["gain"])
            drops.append(out["baseline_drop"])
            seconds += sum(unit_seconds.get(key, 0.0) for key in keys)
        truth[recipe.name] = {"label": recipe.label(), "gains": runs,
                              "gain": np.mean(np.asarray(runs), axis=0).tolist(),
                              "baseline_drop": np.mean(np.asarray(drops), axis=0).tolist(), "seconds": seconds}
    timings["ground_truth"] = sum(t["seconds"] for t in truth.values())
    return truth


def _curves(model, run: BenchmarkSplit, config: BenchmarkConfig, checkpoints, values: dict, unit_seconds: dict,
            timings: dict) -> list:
    """The measured learning curves beside the engine's predicted saturation."""
    wanted = [n for n in config.curve_domains if n in run.names]
    terms = domain_terms_of(estimator_context(model, run, config, checkpoints)) if wanted else None
    curves, seconds = [], 0.0
    for name in wanted:
        k = run.names.index(name)
        mine = _curve_units(run, config, name)
        seconds += sum(unit_seconds.get(u.key, 0.0) for u in mine)
        pool = len(run.split.train_rows[k]) + len(run.split.held_rows[k]) - config.curve_held_out
        measured = {"points": [[u.args[4], float(values[u.key])] for u in mine],
                    "held_out_facts": config.curve_held_out, "pool": pool}
        curves.append({"domain": name, "recipe": config.main_recipe, "measured": measured,
                       "measured_saturation": measured_delta_n(measured["points"]),
                       "predicted": predicted_curve(run.split, terms, k, config.damping, config.curve_sizes)})
    timings["learning_curves"] = seconds
    return curves


def _execution(executor, run: BenchmarkSplit, timings: dict) -> dict:
    records = executor.telemetry.records
    return {"executor": executor.config.to_dict(), "resources": executor.describe(),
            "startup_s": getattr(executor, "startup_s", 0.0), "units": len(records),
            "cached_units": sum(r.cached for r in records), "payload_mb": timings.pop("payload_mb"),
            "telemetry": executor.telemetry.to_dict()["units"]}


def evidence_from_result(result: BenchmarkResult) -> dict:
    """The summary the app quotes next to a ranking (`dowsing.evidence`):
    per estimator, rho on the main recipe with its interval and the paired
    difference against mean loss, plus the ground truth's own ceiling."""
    main = result.config["main_recipe"]
    model = result.model
    return {
        "model": model.get("id") or "model",
        "n_domains": len(result.domains),
        "recipe": main,
        "recipe_label": result.truth[main]["label"],
        "created_at": result.created_at,
        "command": "python -m dowsing benchmark --evidence",
        "winner": result.winner,
        "ceiling": result.reliability["between_seeds"][main],
        "estimators": {
            row["estimator"]: {
                "label": row["label"], "spearman": row["recipes"][main]["spearman"],
                "interval": row["recipes"][main]["interval"],
                "diff_vs_mean_loss": row["recipes"][main]["diff_vs_mean_loss"],
                "diff_interval": row["recipes"][main]["diff_interval"],
                "time_s": row["time_s"],
            } for row in result.leaderboard
        },
    }


def rerun_recipe(model, result: BenchmarkResult, recipe: Recipe,
                 progress: Callable[[Progress], None] | None = None) -> BenchmarkResult:
    """The same benchmark with one recipe's ground truth measured again (a
    recipe that diverged, say), everything else kept: the estimators are
    deterministic given the model, the split and the seed, so their scores
    are reused, and the leaderboard, reliability and winner are rebuilt. The
    result's warnings say which recipe was replaced and by what."""
    say = progress or (lambda p: None)
    if not isinstance(model, LoadedModel):
        model = load_model(model, "cpu", "float32")
    config = BenchmarkConfig.from_dict(result.config)
    old = next((r for r in config.recipes if r.name == recipe.name), None)
    if old is None:
        raise ValueError(f"the result has no recipe named {recipe.name!r}")
    train = [Domain(n, tuple(result.split["train"][n])) for n in result.domains]
    held = [Domain(n, tuple(result.split["held_out"][n])) for n in result.domains]
    depth = len(find_anatomy(model.model).down_projs)
    keep = min(depth, max([r.blocks for r in config.recipes] + [recipe.blocks, config.align_blocks]))
    say(Progress("forward", 0.0, f"forward pass over {sum(len(d.facts) for d in train + held)} facts"))
    split = split_pass(model, train, held, config.batch_size, capture_block=depth - keep)
    trainer = TailTrainer(model, split)
    trainer.check()
    runs, drops, seconds = [], [], 0.0
    for s in range(config.seeds):
        seed = config.seed + s
        out = counterfactual_gains(trainer, recipe, seed, lambda f, m, seed=seed: say(
            Progress("ground truth", 0.1 + 0.85 * (s + f) / config.seeds, f"{recipe.name}, seed {seed}: {m}")))
        runs.append(out["gain"])
        drops.append(out["baseline_drop"])
        seconds += out["seconds"]
    truth = dict(result.truth)
    truth[recipe.name] = {"label": recipe.label(), "gains": runs, "gain": np.mean(np.asarray(runs), axis=0).tolist(),
                          "baseline_drop": np.mean(np.asarray(drops), axis=0).tolist(), "seconds": seconds}
    recipes = tuple(recipe if r.name == recipe.name else r for r in config.recipes)
    config = dataclasses.replace(config, recipes=recipes)
    scores = [EstimatorScore.from_dict(e) for e in result.estimators]
    gains = {name: t["gains"] for name, t in truth.items()}
    board = benchmark_leaderboard(scores, gains, config.main_recipe, config.bootstrap, config.seed,
                                  config.interval_pct)
    note = (f"Recipe {recipe.name!r} was measured again as {recipe.label()} (it was {old.label()}); "
            "the estimators' scores and the other recipes are from the original run.")
    timings = dict(result.timings, rerun_forward=split.forward_s, rerun_ground_truth=seconds)
    return dataclasses.replace(result, config=config.to_dict(), truth=truth, reliability=reliability(gains),
                               leaderboard=board, winner=choose_winner(board), timings=timings,
                               warnings=list(result.warnings) + [note])
