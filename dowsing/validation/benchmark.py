"""The benchmark: does an estimator's ranking of domains predict what
collecting more of each domain really does, on enough domains (ordinary and
hard cases) for the answer to have power?

1. The collection protocol (`protocol.py`) cuts each domain's facts into a
   sample, test facts and a pool (seeded by name). Estimators see the sample
   only, split into two halves (training and held-out) where they need one.
2. Every estimator scores the domains from the sample (`dowsing.estimators`,
   each family a unit of the executor).
3. Ground truth: for each recipe and seed, a baseline fine-tune on every
   domain's sample and, per domain, runs that add n of its pool facts for
   each dose n; gain of k = test loss of k after the baseline - after the
   run at the largest dose. The second reading adds k's own sample instead.
   Its own noise is measured between seeds and readings.
4. Dose-response curves for a few domains beside the paper's predicted
   saturation.
5. Leaderboards (`leaderboard.py`): per estimator, Spearman's rho against
   the seed-averaged gain with an interval over resampled domains and the
   paired difference against mean loss, on all domains, the ordinary ones
   and the hard cases; `choose_default` applies the stated rule that picks
   the default ranking.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..access.checkpoints import checkpoint_fields
from ..domains import Domain, benchmark_domains, benchmark_groups, domain_set
from ..estimators import (PILOT_CURVE, EstimatorContext, EstimatorScore, build_context, by_family, check_names,
                          estimator_settings, family_unit, names)
from ..estimators.subspace import domain_terms_of
from ..pipelines.executor import LocalExecutor, Shared, Unit, UnitStore, fingerprint
from ..kernels.forward import split_pass
from ..access.models import LoadedModel, load_model
from ..progress import Progress
from ..records import ConfigRecord, ResultRecord
from ..settings import BootstrapSettings, InfluenceSettings, ModelSettings
from ..result import ENGINE_VERSION
from ..kernels.saturation import DenseSystem, mu_function, saturation
from ..kernels.solvers import damped, dense_solve
from ..kernels.splitting import split_domains
from ..kernels.curvature import structured_hessian
from ..kernels.subspace import find_anatomy
from ..kernels.training import Recipe, TailTrainer, build_trainer
from .finetune import measured_delta_n
from .leaderboard import (BASELINE, benchmark_leaderboard, choose_default, choose_winner, group_leaderboards,
                          reliability, stacked_scores)
from .plan_check import (ALLOCATION_LABELS, budget_summary, check_allocations, error_summary, extrapolation_row,
                         plan_curves, weighted_have)
from .protocol import (check_protocol_domains, collection_split, plan_units, protocol_gains, protocol_unit,
                       protocol_units)

LOW_POWER_DOMAINS = 5
PLAN_RESAMPLES = 1000  # bootstrap resamples of the plan check's learning-curve bands

# Every step: 8 facts of the users' samples plus 8 added facts, so the largest dose (32 facts) is
# seen twice in the recipe's 8 steps.
DEFAULT_RECIPES = (
    Recipe("adamw", "adamw", lr=3e-5, steps=8, blocks=4, batch=8, added_batch=8),
)
CURVE_DOMAINS = ("Cooking", "World geography", "Physics", "Heraldry", "Norwegian (Bokmål)",
                 "Invented: Kelvaran archipelago", "Noise: parcel scans", "Redundant: railways")


@dataclass(frozen=True)
class BenchmarkConfig(ConfigRecord):
    """Every knob of one benchmark run.

    seed / seeds: the first seed and how many seeds each recipe is run with
        (seeds seed, seed + 1, ...: the minibatches differ, the split not).
    sample_facts / test_facts / doses: the collection protocol: each
        domain's sample (all the estimators see), its test facts, and the
        numbers of pool facts added (the largest is the ranking target);
        a domain needs sample + test + max(doses) facts.
    second_reading: also run each domain with its own sample added (the
        earlier recipe's reading, on the same test facts).
    held_out_fraction: share of the sample in the estimators' held-out half.
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
    pilot_sizes: the pilot learning curve's nested sizes of a half.
    plan_budgets: budgets (examples) of the plan check (`plan_check.py`):
        per budget, fine-tunes on the plan's allocation (two: the sample
        counted as had, and at its weight in training), on the budget
        spread evenly and on it split in proportion to mean loss, every
        seed of the main recipe. Empty: no plan check. Needs the
        pilot_curve and mean_loss estimators.
    curve_domains: domains whose dose-response is set beside the paper's
        predicted saturation.
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
    sample_facts: int = 16
    test_facts: int = 12
    doses: tuple = (8, 32)
    second_reading: bool = True
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
    pilot_sizes: tuple = (2, 4, 8)
    plan_budgets: tuple = ()
    curve_domains: tuple = CURVE_DOMAINS
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
        object.__setattr__(self, "doses", tuple(sorted({int(n) for n in self.doses})))
        object.__setattr__(self, "pilot_sizes", tuple(int(n) for n in self.pilot_sizes))
        object.__setattr__(self, "plan_budgets", tuple(_budget(b) for b in self.plan_budgets))
        if self.plan_budgets and not {PILOT_CURVE, BASELINE} <= set(self.estimators):
            raise ValueError("the plan check (plan_budgets) needs the pilot_curve and mean_loss estimators")
        if not self.doses or self.doses[0] < 1:
            raise ValueError("doses must be positive numbers of pool facts")
        if self.sample_facts < 4:
            raise ValueError("sample_facts must be >= 4 (two halves of at least two facts)")
        if self.test_facts < 1:
            raise ValueError("test_facts must be >= 1")
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
        need = self.sample_facts + self.test_facts + self.doses[-1]
        if self.max_facts and self.max_facts < need:
            raise ValueError(f"max_facts must be 0 (all) or >= {need} (sample + test + largest dose)")
        # the shared fields are checked by the settings they belong to (`dowsing.settings`)
        self.model_settings()
        self.bootstrap_settings()
        self.influence_settings()

    def model_settings(self, device: str = "cpu") -> ModelSettings:
        """The model is loaded in float32 on the run's device (`benchmark`'s
        argument, not a field: it does not change what is measured)."""
        return ModelSettings(device, "float32", self.batch_size)

    def bootstrap_settings(self) -> BootstrapSettings:
        # 0 resamples: no intervals
        return BootstrapSettings(self.bootstrap, self.seed, 0, "bootstrap")

    def influence_settings(self) -> InfluenceSettings:
        return InfluenceSettings(self.damping, self.align_blocks, self.adam_batches, self.checkpoint_lr)

    @classmethod
    def quick(cls, **changes) -> "BenchmarkConfig":
        """The quick benchmark: six ordinary domains and one hard case of
        each kind, 20 facts each (a sample of 8, 4 test facts, doses 4 and
        8), a short recipe; what the tests run."""
        fields = dict(
            max_facts=20, sample_facts=8, test_facts=4, doses=(4, 8), pilot_sizes=(2, 4), bootstrap=500,
            adam_batches=4, recipes=(Recipe("adamw", "adamw", lr=3e-5, steps=4, blocks=2, batch=4, added_batch=4),),
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
    split: dict  # {"sample", "test", "pool", "train", "held_out"}: {name: [facts]}; train / held_out halve the sample
    estimators: list  # EstimatorScore.to_dict()
    truth: dict  # reading -> {"gains": [[per domain] per seed], "gain": seed mean, "baseline_drop", "seconds", ...}
    reliability: dict
    leaderboard: list
    winner: str | None
    curves: list  # per curve domain: measured dose-response, predicted mu ratio, delta n both ways
    timings: dict
    warnings: list = field(default_factory=list)
    created_at: str = ""
    execution: dict = field(default_factory=dict)  # executor, resources, per-unit node and times
    group_leaderboards: dict = field(default_factory=dict)  # "all" / "ordinary" / "hard" -> rows (main recipe)
    default: dict = field(default_factory=dict)  # the estimator the stated rule picks, the rule, and why
    plan_check: dict = field(default_factory=dict)  # plan vs simple allocations by training; extrapolation errors

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


    def group_table(self, group: str):
        """One set's leaderboard ("all", "ordinary", "hard"; main recipe) as a
        DataFrame, best rho first; empty when the run has no such set."""
        import pandas as pd

        rows = [{"Estimator": r["label"], "ρ": r["spearman"], "90% interval": interval_text(r["interval"]),
                 "ρ − mean loss": r["diff_vs_mean_loss"], "difference interval": interval_text(r["diff_interval"]),
                 "time (s)": r["time_s"]}
                for r in (self.group_leaderboards.get(group) or {}).get("rows", [])]
        return pd.DataFrame(rows)


def _budget(value) -> int:
    number = float(value)
    if not (math.isfinite(number) and number >= 1 and number == int(number)):
        raise ValueError(f"a plan budget must be a whole number of examples >= 1, got {value!r}")
    return int(number)


def interval_text(pair) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def check_domains(domains, config: "BenchmarkConfig") -> list:
    """Domains fit for the benchmark's collection protocol (after max_facts):
    each fills a sample, test facts and a pool for the largest dose. Raises
    ValueError (one line) naming the first domain that cannot."""
    if config.max_facts:
        domains = [Domain(d.name, tuple(d.facts[: config.max_facts])) for d in domains]
    domains = check_protocol_domains(domains, config.sample_facts, config.test_facts, config.doses)
    pools = sum(len(d.facts) - config.sample_facts - config.test_facts for d in domains)
    for budget in config.plan_budgets:
        if budget > pools:
            raise ValueError(f"The plan budget {budget} is more than the domains' pools hold ({pools} facts).")
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
    the shipped benchmark domains (ordinary and hard cases).

    executor: where the estimator families and the fine-tunes run
    (`dowsing.pipelines.executor`; in this process by default; on Ray each is a task,
    the families first). resume: keep each finished unit in the unit store
    under the run's fingerprint (model, domains, configuration, engine
    version) and reuse what an earlier, interrupted run of the same
    benchmark finished."""
    from datetime import datetime, timezone

    executor = executor or LocalExecutor()
    config = config or BenchmarkConfig()
    say = progress or (lambda p: None)
    clock = time.perf_counter()
    timings, notes = {}, []
    model, domains, checkpoints = _prepared(model, domains, config, device, say, timings, notes)
    run = _split(model, domains, config, resume, say, timings)
    scores, values, plan = _run_units(model, run, config, checkpoints, executor, say, should_stop, timings)
    unit_seconds = {r.key: r.end - r.start for r in executor.telemetry.records if not r.cached}
    truth = _truth(run, config, values, unit_seconds, timings)
    curves = _curves(model, run, config, checkpoints, truth, timings)
    checked = _plan_check(run, config, plan, values, truth, curves, unit_seconds) if plan else {}
    say(Progress("leaderboard", 0.96, "correlations and bootstrap"))
    gains = {name: t["gains"] for name, t in truth.items()}
    stacked = stacked_scores(scores, gains[config.main_recipe], timings.get("forward", 0.0))
    if stacked is not None:
        scores = scores + [stacked]
    board = benchmark_leaderboard(scores, gains, config.main_recipe, config.bootstrap, config.seed,
                                  config.interval_pct)
    groups = benchmark_groups()
    run_groups = {n: groups[n] for n in run.names if n in groups}
    by_group = group_leaderboards(scores, gains[config.main_recipe], [run_groups.get(n) for n in run.names],
                                  config.bootstrap, config.seed, config.interval_pct)
    if BASELINE not in config.estimators:
        notes.append("mean_loss is not among the estimators: no paired differences against it.")
    timings["total"] = time.perf_counter() - clock
    say(Progress("done", 1.0, "benchmark complete"))
    return BenchmarkResult(
        model=model.info.to_dict(), config=config.to_dict(), domains=run.names, groups=run_groups,
        split={part: {d.name: list(d.facts) for d in run.protocol[part]} for part in ("sample", "test", "pool")}
        | {"train": {d.name: list(d.facts) for d in run.train}, "held_out": {d.name: list(d.facts) for d in run.held}},
        estimators=[s.to_dict() for s in scores], truth=truth, reliability=reliability(gains), leaderboard=board,
        winner=choose_winner(board), curves=curves, timings=timings, warnings=notes,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        execution=_execution(executor, run, timings), group_leaderboards=by_group,
        default=choose_default(by_group, config.interval_pct), plan_check=checked,
    )


def _prepared(model, domains, config: BenchmarkConfig, device: str, say, timings: dict, notes: list):
    """(LoadedModel, domains, checked checkpoints or None), every input
    checked before the model is loaded."""
    checkpoints = None
    if config.checkpoints:
        from ..access.checkpoints import check_last_is_model, validate_checkpoints

        checkpoints = validate_checkpoints(config.checkpoints)
        check_last_is_model(checkpoints, model.info.id if isinstance(model, LoadedModel) else model)
    domains = check_domains(domains if domains is not None else benchmark_domains(), config)
    if len(domains) < LOW_POWER_DOMAINS:
        message = (f"Only {len(domains)} domains: Spearman's rho over so few has no power to tell estimators "
                   "apart; use at least 12.")
        warnings.warn(message, stacklevel=3)
        notes.append(message)
    if not isinstance(model, LoadedModel):
        say(Progress("loading model", 0.0, "loading model"))
        t0 = time.perf_counter()
        running = config.model_settings(device)
        model = load_model(model, running.device, running.dtype)
        timings["load_model"] = time.perf_counter() - t0
    return model, domains, checkpoints


@dataclass
class BenchmarkSplit:
    """The benchmark's split and its two forward passes: the collection
    protocol's sample / test / pool per domain, the sample's training and
    held-out halves (what the estimators see: `split`, block inputs captured
    `keep` blocks from the end), the ground truth's pass over sample + pool
    (training rows, the sample first) and test facts (held-out rows), the
    run's fingerprint and its unit store (None: nothing is resumed)."""

    protocol: dict
    train: list
    held: list
    names: list
    split: object
    truth: object
    keep: int
    namespace: str
    store: object


def _split(model, domains: list, config: BenchmarkConfig, resume: bool, say, timings: dict) -> BenchmarkSplit:
    protocol = collection_split(domains, config.seed, config.sample_facts, config.test_facts)
    train, held = split_domains(protocol["sample"], config.seed, config.held_out_fraction)
    namespace = fingerprint("benchmark", model.info.to_dict(), [(d.name, d.facts) for d in domains],
                            config.to_dict(), ENGINE_VERSION)
    depth = len(find_anatomy(model.model).down_projs)
    keep = min(depth, max([r.blocks for r in config.recipes] + [config.align_blocks]))
    n_sample = sum(len(d.facts) for d in protocol["sample"])
    say(Progress("forward", 0.01, f"forward pass over the {n_sample} sample facts"))
    split = split_pass(model, train, held, config.batch_size, capture_block=depth - keep)
    n_all = sum(len(d.facts) for part in protocol.values() for d in part)
    say(Progress("forward", 0.02, f"forward pass over all {n_all} facts for the ground truth"))
    grown = [Domain(s.name, s.facts + p.facts) for s, p in zip(protocol["sample"], protocol["pool"])]
    truth = split_pass(model, grown, protocol["test"], config.batch_size, capture_block=depth - keep)
    timings["forward"] = split.forward_s
    timings["forward_truth"] = truth.forward_s
    return BenchmarkSplit(protocol, train, held, [d.name for d in train], split, truth, keep, namespace,
                          UnitStore(namespace) if resume else None)


def main_recipe(config: BenchmarkConfig) -> Recipe:
    return next(r for r in config.recipes if r.name == config.main_recipe)


def estimator_context(model, run: BenchmarkSplit, config: BenchmarkConfig, checkpoints) -> EstimatorContext:
    """What the estimator families read: the sample's split pass, the user's
    checkpoints, and the settings; the trajectory estimators read the user's
    checkpoints when given, else a baseline fine-tune of the main recipe on
    the samples' training halves (first seed), the trajectory a user
    without checkpoints of their own would have."""
    settings = estimator_settings(config, blocks=min(config.align_blocks, run.keep),
                                  ekfac_blocks=min(config.ekfac_blocks, run.keep),
                                  ekfac_fit_facts=config.ekfac_fit_facts or None, recipe=main_recipe(config),
                                  pilot_sizes=config.pilot_sizes, pilot_target=config.doses[-1])
    return EstimatorContext(model, run.split, settings, checkpoints)


def _seed_units(run: BenchmarkSplit, config: BenchmarkConfig, recipe: Recipe, seed: int) -> list:
    return protocol_units(recipe, seed, len(run.names), config.doses, config.sample_facts, config.second_reading)


def _fine_tune_units(run: BenchmarkSplit, config: BenchmarkConfig) -> list:
    """The ground truth's fine-tunes: every recipe, seed, domain and dose."""
    return [u for recipe in config.recipes for s in range(config.seeds)
            for u in _seed_units(run, config, recipe, config.seed + s)]


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
    trainer = TailTrainer(model, run.truth)
    trainer.check()
    units = _fine_tune_units(run, config)
    timings["payload_mb"] = trainer.payload_bytes() / 2 ** 20

    def on_family(key, value, finished, total):
        say(Progress("estimators", 0.03 + 0.27 * finished / total, f"estimators {finished} of {total} families "
                                                                    f"done ({key.split('/', 1)[1]})"))

    def on_fine_tune(key, value, finished, total):
        say(Progress("ground truth", 0.3 + 0.65 * finished / total,
                     f"fine-tune {finished} of {total} done ({key.split('/', 1)[1]})"))

    def on_plan_run(key, value, finished, total):
        say(Progress("plan check", 0.95, f"fine-tune {finished} of {total} done ({key.split('/', 1)[1]})"))

    shared = Shared(f"benchmark-estimators/{run.namespace}", payload=None if local else context.payload(),
                    build=build_context, context=context if local else None)
    pending_estimators = executor.start(family_unit, families, shared, store=run.store, on_done=on_family,
                                        should_stop=should_stop)
    shared = Shared(f"benchmark-truth/{run.namespace}", payload=None if local else trainer.payload(),
                    build=build_trainer, context=trainer if local else None)
    pending = executor.start(protocol_unit, units, shared, store=run.store, on_done=on_fine_tune,
                             should_stop=should_stop)
    pendings, plan = [pending_estimators, pending], None
    try:
        by_key = pending_estimators.wait()
        scores = {s["name"]: EstimatorScore.from_dict(s) for unit in families for s in by_key[unit.key]}
        if config.plan_budgets:
            plan = _plan_allocations(run, config, scores)
            pendings.append(executor.start(protocol_unit, plan["units"], shared, store=run.store,
                                           on_done=on_plan_run, should_stop=should_stop))
        values = pending.wait()
        if plan is not None:
            values = {**values, **pendings[-1].wait()}
    except BaseException:
        for p in pendings:
            p.cancel()
        raise
    timings["units_wall"] = time.perf_counter() - t0
    timings["estimators"] = sum(r.end - r.start for r in executor.telemetry.records
                                if r.key.startswith("estimators/") and not r.cached)
    return [scores[name] for name in config.estimators], values, plan


def _plan_allocations(run: BenchmarkSplit, config: BenchmarkConfig, scores: dict) -> dict:
    """The plan check's allocations from the estimators' pilot curves and
    mean losses (the sample only), and its fine-tunes: {"curves", "budgets":
    {budget: `plan_check.check_allocations`}, "units"}."""
    fits, losses = scores[PILOT_CURVE].details["fits"], scores[BASELINE].priority
    curves = plan_curves(run.names, fits, losses, config.sample_facts, config.seed, PLAN_RESAMPLES)
    have = weighted_have(config.sample_facts, config.sample_facts * len(run.names), config.doses[-1],
                         main_recipe(config).added_weight)
    weighted = plan_curves(run.names, fits, losses, have, config.seed, PLAN_RESAMPLES)
    caps = [len(p.facts) for p in run.protocol["pool"]]
    ranking = scores[PILOT_CURVE].priority
    budgets = {b: check_allocations(curves, b, caps, weighted, ranking) for b in config.plan_budgets}
    # allocations with the same counts (the recommendation is the plan or the even split) share one run
    wanted, alias = {}, {}
    for b, check in budgets.items():
        for name, counts in check["counts"].items():
            first = next((key for key, c in wanted.items() if key[0] == b and list(c) == list(counts)), None)
            if first is None:
                wanted[b, name] = counts
            alias[b, name] = first or (b, name)
    runs, units = {}, []  # runs: (budget, allocation, seed) -> its unit
    for s in range(config.seeds):
        seed = config.seed + s
        made = dict(zip(wanted, plan_units(main_recipe(config), seed, config.doses, config.sample_facts, wanted)))
        units += list(made.values())
        runs.update({(b, name, seed): made[alias[b, name]] for b, name in alias})
    return {"curves": curves, "weighted": weighted, "have": {"sample": config.sample_facts, "weighted": have},
            "budgets": budgets, "runs": runs, "units": units}


def _truth(run: BenchmarkSplit, config: BenchmarkConfig, values: dict, unit_seconds: dict, timings: dict) -> dict:
    """Per recipe: the dose-response of each domain per seed, the gain at
    the largest dose (the ranking target) and its seed mean, the baseline's
    own drop, the baseline's test loss, and the fine-tunes' seconds; with
    the second reading, "<recipe>_sample": the gain of adding the sample."""
    truth, n = {}, len(run.names)
    for recipe in config.recipes:
        dose = {str(d): [] for d in config.doses}
        sample, drops, baseline_loss, seconds = [], [], [], 0.0
        for s in range(config.seeds):
            units = _seed_units(run, config, recipe, config.seed + s)
            out = protocol_gains(run.truth.held_rows, values, units, n, config.doses)
            for d in config.doses:
                dose[str(d)].append(out["dose"][d])
            if out["sample"] is not None:
                sample.append(out["sample"])
            drops.append(out["baseline_drop"])
            base = values[units[0].key]["baseline"]
            baseline_loss.append(_per_domain_means(base, run.truth.held_rows))
            seconds += sum(unit_seconds.get(u.key, 0.0) for u in units)
        top = dose[str(config.doses[-1])]
        truth[recipe.name] = {
            "label": f"{recipe.label()}, {config.doses[-1]} pool facts added", "doses": list(config.doses),
            "dose_gains": dose, "gains": top, "gain": np.mean(np.asarray(top), axis=0).tolist(),
            "baseline_drop": np.mean(np.asarray(drops), axis=0).tolist(),
            "baseline_loss": np.mean(np.asarray(baseline_loss), axis=0).tolist(), "seconds": seconds}
        if sample:
            truth[f"{recipe.name}_sample"] = {
                "label": f"{recipe.label()}, the domain's sample added (second reading)", "gains": sample,
                "gain": np.mean(np.asarray(sample), axis=0).tolist(),
                "baseline_drop": truth[recipe.name]["baseline_drop"], "seconds": 0.0}
    timings["ground_truth"] = sum(t["seconds"] for t in truth.values())
    return truth


def _plan_check(run: BenchmarkSplit, config: BenchmarkConfig, plan: dict, values: dict, truth: dict, curves: list,
                unit_seconds: dict) -> dict:
    """The plan check's report (`plan_check.py`): per budget each
    allocation's realised gains (per seed: baseline test loss minus after
    the run, per domain) with the plan's paired differences; the learning
    curves' extrapolation errors to the largest dose per group; the
    paper's delta n at 10% beside the measured one where computed."""
    recipe = main_recipe(config)
    seeds = [config.seed + s for s in range(config.seeds)]
    baseline = {seed: _per_domain_means(values[_seed_units(run, config, recipe, seed)[0].key]["baseline"],
                                        run.truth.held_rows) for seed in seeds}
    budgets = []
    for budget, check in plan["budgets"].items():
        realised = {}
        for name in check["counts"]:
            realised[name] = [
                [b - a for b, a in zip(baseline[seed], _per_domain_means(values[plan["runs"][budget, name, seed].key],
                                                                         run.truth.held_rows))]
                for seed in seeds]
        budgets.append({"budget": budget, **budget_summary(check, realised, config.bootstrap, config.seed,
                                                            config.interval_pct)})
    groups = benchmark_groups()
    sets = [domain_set(groups.get(n)) for n in run.names]
    main = truth[config.main_recipe]
    doses = list(config.doses)
    rows = [extrapolation_row(dc, doses, {d: float(np.mean([g[k] for g in main["dose_gains"][str(d)]]))
                                          for d in doses}, plan["weighted"][k])
            for k, dc in enumerate(plan["curves"])]
    saturation = {c["domain"]: {"paper_delta_n_10pct": c["predicted"]["delta_n_10pct"],
                                "paper_reason": c["predicted"]["reason"], "measured": c["measured_saturation"]}
                  for c in curves}
    seconds = sum(unit_seconds.get(u.key, 0.0) for u in plan["units"])
    return {"recipe": recipe.label(), "allocations": dict(ALLOCATION_LABELS), "have": plan["have"], "budgets": budgets,
            "curves": {dc.name: dc.curve.to_dict() for dc in plan["curves"]},
            "extrapolation": {"fit_doses": doses[:-1], "target": doses[-1], "rows": rows, "sets": sets,
                              "summary": error_summary(rows, sets)},
            "saturation": saturation, "seconds": seconds}


def _per_domain_means(losses, held_rows: list) -> list:
    out, start = [], 0
    for rows in held_rows:
        out.append(float(np.mean(np.asarray(losses[start: start + len(rows)], dtype=float))))
        start += len(rows)
    return out


def _curves(model, run: BenchmarkSplit, config: BenchmarkConfig, checkpoints, truth: dict, timings: dict) -> list:
    """The measured dose-response (test loss after the baseline and after
    each dose, main recipe, seed mean) beside the engine's predicted
    saturation from the sample's training half."""
    wanted = [n for n in config.curve_domains if n in run.names]
    terms = domain_terms_of(estimator_context(model, run, config, checkpoints)) if wanted else None
    main = truth[config.main_recipe]
    curves = []
    for name in wanted:
        k = run.names.index(name)
        base = main["baseline_loss"][k]
        points = [[0, base]] + [[d, base - float(np.mean([g[k] for g in main["dose_gains"][str(d)]]))]
                                for d in config.doses]
        measured = {"points": points, "test_facts": config.test_facts, "pool": len(run.protocol["pool"][k].facts)}
        curves.append({"domain": name, "recipe": config.main_recipe, "measured": measured,
                       "measured_saturation": measured_delta_n(points),
                       "predicted": predicted_curve(run.split, terms, k, config.damping, (0,) + config.doses)})
    timings["learning_curves"] = 0.0
    return curves


def _execution(executor, run: BenchmarkSplit, timings: dict) -> dict:
    records = executor.telemetry.records
    return {"executor": executor.config.to_dict(), "resources": executor.describe(),
            "startup_s": getattr(executor, "startup_s", 0.0), "units": len(records),
            "cached_units": sum(r.cached for r in records), "payload_mb": timings.pop("payload_mb"),
            "telemetry": executor.telemetry.to_dict()["units"]}


def evidence_from_result(result: BenchmarkResult) -> dict:
    """The summary the app quotes next to a ranking (`dowsing.validation.evidence`):
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
        "default": result.default,
        "groups": {name: {"n_domains": board["n_domains"],
                          "estimators": {r["estimator"]: {k: r[k] for k in ("spearman", "interval", "diff_vs_mean_loss",
                                                                             "diff_interval")}
                                         for r in board["rows"]}}
                   for name, board in result.group_leaderboards.items()},
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


def rebuild_leaderboards(result: BenchmarkResult) -> BenchmarkResult:
    """The result's leaderboards, per-group leaderboards, stacked estimator,
    winner and default computed again from its stored scores and ground
    truth (deterministic given them), for a result written by an earlier
    version of the leaderboard code."""
    config = BenchmarkConfig.from_dict(result.config)
    scores = [EstimatorScore.from_dict(e) for e in result.estimators if e["name"] != "stacked_cv"]
    gains = {name: t["gains"] for name, t in result.truth.items()}
    stacked = stacked_scores(scores, gains[config.main_recipe], result.timings.get("forward", 0.0))
    if stacked is not None:
        scores = scores + [stacked]
    board = benchmark_leaderboard(scores, gains, config.main_recipe, config.bootstrap, config.seed,
                                  config.interval_pct)
    by_group = group_leaderboards(scores, gains[config.main_recipe], [result.groups.get(n) for n in result.domains],
                                  config.bootstrap, config.seed, config.interval_pct)
    return dataclasses.replace(result, estimators=[s.to_dict() for s in scores], leaderboard=board,
                               winner=choose_winner(board), group_leaderboards=by_group,
                               default=choose_default(by_group, config.interval_pct))
