"""The collection plan: how many more examples of each domain a budget
should buy, and what the model is predicted to gain.

Each domain's learning curve G_k(n) (`dowsing.kernels.curves`) is fitted to pilot
fine-tunes on the user's own facts (`dowsing.kernels.pilots.pilot_curve`): one
forward pass over every domain's two seeded halves, then, per domain,
AdamW on the last blocks trained on n facts of one half and the drop of the
other half's loss measured, both ways, at n = 2, 4, 8 (their shapes may be
pooled across domains, `curves.shrink_curves`, off by default). The gain of
collecting m more examples of domain k, h_k of whose facts are already in
the model's training data (`have`, default 0), is

  gain_k(m) = G_k(h_k + m) - G_k(h_k),   G_k(0) = 0.

In a later round (`next_round`) h_k + C_k replaces h_k, C_k the examples
collected in the rounds before: they will be trained on with the next
ones, so the next examples' gain starts there; the budget and caps are
what the collected examples left.

G_k is in the pilot recipe's units: the drop a few AdamW steps on the last
blocks buy. Its shape across domains is what ranks them and splits the
budget; its absolute nats are the pilot's, not those of a full training run
(`pilot_scale` says how far apart they were on the benchmark).

With `transfer` (off by default) the pilots also measure what each domain's
half does to every other domain's held-out half (the matrix T), and the
objective counts the gain on all weighted domains through effective
weights w~_j = sum_i w_i clip(T[i][j] / T[j][j]) (docs/METHOD.md section 14).

`allocate` spends the budget greedily on the largest weighted gain per unit
cost, by default the mean gain over the curves' bootstrap resamples
(`gain_function`); `verdict` says whether the plan is shown to beat
spreading evenly, and `recommendation` recommends spreading evenly where it
is not. The pilot measurements are cached (cache/plans) under the
model, the domains and the settings the curves depend on, so a repeat with
another budget, costs, caps, weights or have refits and reallocates in
milliseconds.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from ..kernels.curves import BAND, LearningCurve, fit_curve, predict_from_zero, shrink_curves
from ..domains import as_domains
from ..kernels.pilots import PILOT_RECIPE, PILOT_SIZES, pilot_curve
from ..progress import Progress
from ..records import ConfigRecord, ResultRecord
from ..result import ENGINE_VERSION, finite_or_none
from ..settings import BootstrapSettings, ModelSettings

BUDGET_UNITS = ("examples", "money")
# How the budget is split: "expected" maximises the mean over the bootstrap
# curves of the weighted gain; "point" reads the fitted curve alone.
RULES = ("expected", "point")
MIN_RESAMPLES = 100  # the curves' 90% bands are too coarse below this many bootstrap resamples
MIN_HALF = 2  # a pilot trains on one half and measures the other: two facts each at least
# The greedy takes one example at a time up to this many steps, then steps
# of several examples (the reported gap bound covers what stepping costs).
MAX_STEPS = 100_000
PLAN_VERSION = 1  # bump when what the cached pilot measurements hold changes
# A measured domain's mean loss, as stored in the pilot measurements and the plan's rows.
MEAN_LOSS_FIELD = "mean_loss"
# The simple split in proportion to each domain's mean loss (a key of the plan's
# totals and of what it recommends). Both are stored spellings that happen to be
# the mean-loss estimator's name; neither is that estimator, so neither follows it.
MEAN_LOSS_RULE = "mean_loss"


def _pairs(values, kind=float) -> tuple:
    """{domain: value} or [(domain, value)] as a tuple of pairs sorted by
    domain: hashable, and the same whatever order the user gave."""
    items = values.items() if isinstance(values, dict) else (values or ())
    return tuple(sorted((str(name), kind(value)) for name, value in items))


@dataclass(frozen=True)
class PlanConfig(ConfigRecord):
    """Every knob of one collection plan.

    budget: what may be spent, in budget_unit: "examples" (every example
        costs 1) or "money" (domain k's example costs costs[k]).
    costs / caps / weights: (domain, value) pairs (a dict is accepted);
        a domain not named costs 1, has no cap (the most examples of it to
        collect) and weighs 1 (its gain counts weight times).
    pilot_sizes: the pilot's nested sizes (`pilots.pilot_sizes` cuts the
        largest to the smaller half's size; no run trains on more).
    seed: the halves, the pilot's minibatches and the bootstrap.
    bootstrap_resamples: resamples of the facts' per-fact drops for the bands.
    device / dtype / batch_size: how the model runs, as in an analysis.
    have: how many of each domain's facts are already in the model's training
        data (0: the facts are examples the model has not been trained on);
        have_by_domain: (domain, count) pairs that override it. The curve is
        read from have + collected to have + collected + m.
    collected / round: in a later round (`next_round`), the (domain, count)
        pairs collected in the rounds before, which will be trained on with
        this round's examples, and the round's number (1: the first plan).
        A later round's budget and caps are what is left of the first's, so
        its budget may be 0.
    rule: "expected" (the mean gain over the bootstrap curves) or "point"
        (the fitted curve alone); see RULES.
    shrink: pool the curves' shapes across domains (`curves.shrink_curves`);
        off by default: in simulations it lost gain (docs/METHOD.md section 14).
    transfer: value a domain's facts by what they gain every weighted domain,
        through the pilots' transfer matrix (`transfer_ratios`,
        `effective_weights`); off by default: it has not been shown to buy
        more on the benchmark's plan check (docs/METHOD.md section 14).
    """

    record_name = "plan"

    budget: float
    budget_unit: str = "examples"
    costs: tuple = ()
    caps: tuple = ()
    weights: tuple = ()
    pilot_sizes: tuple = PILOT_SIZES
    seed: int = 0
    bootstrap_resamples: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    have: int = 0
    have_by_domain: tuple = ()
    rule: str = "expected"
    shrink: bool = False
    collected: tuple = ()
    round: int = 1
    transfer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "have_by_domain", _pairs(self.have_by_domain, _have))
        object.__setattr__(self, "have", _have(self.have))
        object.__setattr__(self, "collected", _pairs(self.collected, _collected))
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            raise ValueError(f"round must be a whole number >= 1, got {self.round!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        object.__setattr__(self, "costs", _pairs(self.costs))
        object.__setattr__(self, "weights", _pairs(self.weights))
        object.__setattr__(self, "caps", _pairs(self.caps, _whole))
        object.__setattr__(self, "pilot_sizes", tuple(int(n) for n in self.pilot_sizes))
        # a later round may have spent the whole budget: it then plans nothing
        later = self.round > 1
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget)
                and (self.budget >= 0 if later else self.budget > 0)):
            raise ValueError(f"the budget must be a number {'>= 0' if later else '> 0'}, got {self.budget!r}")
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"budget_unit must be one of {', '.join(BUDGET_UNITS)}, got {self.budget_unit!r}")
        for name, cost in self.costs:
            if not (math.isfinite(cost) and cost > 0):
                raise ValueError(f"the cost of {name!r} must be a number > 0, got {cost!r}")
        if self.budget_unit == "examples" and any(cost != 1.0 for _, cost in self.costs):
            raise ValueError("costs per example other than 1 need budget_unit money (a budget in money)")
        for name, weight in self.weights:
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"the weight of {name!r} must be a number >= 0, got {weight!r}")
        self.bootstrap_settings()
        _check_pilot_settings(self)

    def model_settings(self) -> ModelSettings:
        return ModelSettings(self.device, self.dtype, self.batch_size)

    def bootstrap_settings(self) -> BootstrapSettings:
        return BootstrapSettings(self.bootstrap_resamples, self.seed, MIN_RESAMPLES, "bootstrap_resamples")

    def cost(self, name: str) -> float:
        return dict(self.costs).get(name, 1.0)

    def cap(self, name: str) -> int | None:
        return dict(self.caps).get(name)

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, 1.0)

    def have_of(self, name: str) -> int:
        """How many of the domain's facts are already in training."""
        return dict(self.have_by_domain).get(name, self.have)

    def collected_of(self, name: str) -> int:
        """How many of the domain's examples the rounds before collected."""
        return dict(self.collected).get(name, 0)

    def start_of(self, name: str) -> int:
        """Where the domain's curve is read from: have + collected."""
        return self.have_of(name) + self.collected_of(name)

    def pilot_config(self) -> "PilotConfig":
        """The part of the plan the pilot measurements depend on."""
        return PilotConfig(pilot_sizes=self.pilot_sizes, seed=self.seed, device=self.device, dtype=self.dtype,
                           batch_size=self.batch_size, transfer=self.transfer)

    def curve_settings(self) -> dict:
        """What the pilot measurements depend on (their cache key's settings):
        not the budget, costs, caps, weights or resamples, which only refit
        and reallocate."""
        return self.pilot_config().curve_settings()


@dataclass(frozen=True)
class PilotConfig(ConfigRecord):
    """The settings the pilot measurements depend on, and nothing else: what
    a plan job (`dowsing.background.jobs`, kind "plan") runs and caches. A PlanConfig
    with the same fields has the same curve_settings, so the job and
    `run_plan` share one cached measurement. transfer: measure the transfer
    matrix as well (`measure_pilots`)."""

    record_name = "pilot"

    pilot_sizes: tuple = PILOT_SIZES
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16
    transfer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pilot_sizes", tuple(int(n) for n in self.pilot_sizes))
        _check_pilot_settings(self)

    def model_settings(self) -> ModelSettings:
        return ModelSettings(self.device, self.dtype, self.batch_size)

    def curve_settings(self) -> dict:
        settings = {"pilot_sizes": list(self.pilot_sizes), "seed": self.seed, "device": self.device,
                    "dtype": self.dtype, "batch_size": self.batch_size, "recipe": PILOT_RECIPE.label()}
        # named only when on, so the measurements stored without the matrix keep their keys
        return {**settings, "transfer": True} if self.transfer else settings


def _check_pilot_settings(config) -> None:
    """A one-line ValueError for pilot sizes, device, dtype or batch size that cannot run
    (the last three checked by `settings.ModelSettings`)."""
    if not config.pilot_sizes or min(config.pilot_sizes) < 1:
        raise ValueError(f"pilot_sizes must be integers >= 1, got {config.pilot_sizes!r}")
    config.model_settings()


def _whole(value) -> int:
    """A cap: a whole number of examples >= 0."""
    number = float(value)
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"a cap must be a whole number of examples >= 0, got {value!r}")
    return int(number)


def _have(value) -> int:
    """A have: a whole number of facts >= 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"have must be a whole number of facts >= 0, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"have must be a whole number of facts >= 0, got {value!r}")
    return int(number)


def _collected(value) -> int:
    """A collected count: a whole number of examples >= 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a collected count must be a whole number of examples >= 0, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"a collected count must be a whole number of examples >= 0, got {value!r}")
    return int(number)


def next_round(config: PlanConfig, collected, names) -> PlanConfig:
    """The next round's config after collecting c_k examples of each domain
    (`collected`: {domain: count} or pairs; a domain not named: 0) under
    `config`: budget B' = max(0, B - sum_k c_k cost_k), caps cap_k' =
    max(0, cap_k - c_k), collected_k' = collected_k + c_k (so the curve is
    read from have_k + collected_k', where the next examples, trained on
    with the collected ones, start) and round + 1. A one-line ValueError for
    a count that is not a whole number >= 0, a name not among `names`, or
    counts that cost more than B."""
    counts = _pairs(collected, _collected)
    unknown = [name for name, _ in counts if name not in set(names)]
    if unknown:
        raise ValueError(f"the collected counts name domain(s) not among the domains: "
                         f"{', '.join(map(repr, unknown))} (domains: {', '.join(sorted(names))})")
    spent = sum(m * config.cost(name) for name, m in counts)
    if spent > config.budget * (1 + 1e-9):
        raise ValueError(f"the collected examples cost {spent:g} {config.budget_unit}, more than the budget of "
                         f"{config.budget:g}: give the counts collected under this plan's budget")
    done = dict(counts)
    caps = {name: max(0, cap - done.get(name, 0)) for name, cap in config.caps}
    total = {name: config.collected_of(name) + done.get(name, 0)
             for name in {*dict(config.collected), *done}}
    return replace(config, budget=max(0.0, float(config.budget) - spent), caps=caps,
                   collected={n: m for n, m in total.items() if m}, round=config.round + 1)


def check_plan(config: PlanConfig, domains) -> None:
    """A one-line ValueError when the costs, caps, weights or have name a
    domain that is not among `domains`, or a domain's have is more than its
    facts."""
    domains = as_domains(domains)
    names = {d.name for d in domains}
    for what, pairs in (("costs", config.costs), ("caps", config.caps), ("weights", config.weights),
                        ("have", config.have_by_domain), ("collected counts", config.collected)):
        unknown = [name for name, _ in pairs if name not in names]
        if unknown:
            raise ValueError(f"the {what} name domain(s) not among the domains: {', '.join(map(repr, unknown))} "
                             f"(domains: {', '.join(sorted(names))})")
    for d in domains:
        if config.have_of(d.name) > len(d.facts):
            raise ValueError(f"have {config.have_of(d.name)} for {d.name!r} is more than its {len(d.facts)} facts: "
                             "have counts the domain's facts already in the model's training data")


# --- the pilot measurements and the curves -----------------------------------

def measure_pilots(loaded, domains, config: PlanConfig | PilotConfig,
                   progress: Callable[[Progress], None] | None = None, units=None) -> dict:
    """Each domain's two-way pilot curve (`pilots.pilot_curve`,
    `PILOT_RECIPE` on a TailTrainer over its seeded halves): from `units`
    (a `units.DomainUnits`: an analysis or a plan that ran the same domain
    under the same model, seed, sizes and recipe) when it holds it, else
    measured after one forward pass over the domains still to measure (the
    inputs of the first of the last 4 blocks kept) and kept there.
    JSON-able: the model, per domain its facts' count, mean loss, the pilot
    sizes, drops and per-fact drops per size, and the halves' sizes
    (held-out half B first, as the per-fact drops are laid out).

    With config.transfer, also "transfer" (`measure_transfer`): the matrix
    T[i][j] of what each domain's half does to every domain's other half at
    the source's largest pilot size, each entry a unit keyed by both
    domains; when one is missing, the forward pass covers every domain."""
    from ..kernels.pilots import pilot_sizes
    from ..kernels.splitting import split_domains
    from ..kernels.subspace import find_anatomy
    from ..storage.units import loaded_identity, pilot_key, recomputed_message

    report = progress or (lambda p: None)
    domains = as_domains(domains)
    t0 = time.perf_counter()
    train, held = split_domains(domains, config.seed)
    depth = len(find_anatomy(loaded.model).down_projs)
    blocks = min(PILOT_RECIPE.blocks, depth)
    recipe = replace(PILOT_RECIPE, blocks=blocks)
    if units is not None:
        units.model = units.model or loaded_identity(loaded.info)
        units.note_blocks(depth)
    curves = []
    for a, b in zip(train, held):
        key = (pilot_key(units.model, a.facts, b.facts, recipe.label(), config.seed,
                         pilot_sizes(config.pilot_sizes, len(a.facts), len(b.facts))) if units is not None else None)
        curves.append({"key": key, "curve": units.get("pilot", key, a.name) if key is not None else None})
    todo = [k for k, c in enumerate(curves) if c["curve"] is None]
    report(Progress("pilots", 0.02, f"pilot fine-tunes: {recomputed_message(len(todo), len(domains))}"))
    pairs = _transfer_pairs(train, held, config, recipe, units) if getattr(config, "transfer", False) else None
    missing = {}  # source j -> the targets i whose entry T[i][j] is not stored
    for (i, j), pair in sorted((pairs or {}).items()):
        if pair["value"] is None:
            missing.setdefault(j, []).append(i)
    sources = sorted(missing)
    # an entry of T reads two domains' block inputs: a missing one needs the forward pass over all of them
    need = list(range(len(domains))) if sources else todo
    forward_s = transfer_s = 0.0
    if need:
        split = _forward(loaded, [train[k] for k in need], [held[k] for k in need], config.batch_size,
                         depth - blocks, report)
        forward_s, row = split.forward_s, {k: p for p, k in enumerate(need)}
        # a source whose pilot runs now is read on its missing targets from the pilot's own largest runs
        reads = [missing.get(j) for j in todo]
        trainer = _measure_curves(loaded, split, [row[k] for k in todo], [train[k] for k in todo],
                                  [curves[k] for k in todo], config, recipe, units, report,
                                  [[row[i] for i in r] if r else None for r in reads])
        for j, targets in zip(todo, reads):
            curve = curves[j]["curve"]
            transfer_s += curve.pop("transfer_s", 0.0)
            for i, value in zip(targets or [], curve.pop("transfer", [])):
                _keep_pair(pairs, i, j, value, train, units)
        rest = [j for j in sources if j not in todo]  # their pilots were stored: two fine-tunes each
        if rest:
            t1 = time.perf_counter()
            measure_transfer(trainer or _pilot_trainer(loaded, split), split, [row[k] for k in range(len(domains))],
                             {j: missing[j] for j in rest}, pairs, train, config, recipe, units, report)
            transfer_s += time.perf_counter() - t1
    out = {"model": loaded.info.to_dict(), "recipe": recipe.label(), "forward_s": forward_s,
           "pilot_s": time.perf_counter() - t0 - forward_s - transfer_s,
           "domains": _measured_entries(domains, train, held, curves)}
    if pairs is not None:
        out["transfer"] = _transfer_record(domains, pairs, sources, transfer_s)
    report(Progress("pilots", 0.95, "pilot fine-tunes done"))
    return finite_or_none(out)


def _measured_entries(domains: list, train: list, held: list, curves: list) -> list:
    """Per domain what `fit_pilots` reads: its facts' count, mean loss, the
    pilot sizes, drops, per-fact drops per size, seconds and the halves'
    sizes (held-out half B first)."""
    measured = []
    for domain, a, b, c in zip(domains, train, held, curves):
        curve = c["curve"]
        entry = {"name": domain.name, "n_facts": len(domain.facts),
                 MEAN_LOSS_FIELD: float(np.mean(curve["losses_a"] + curve["losses_b"])),
                 "sizes": [], "drop": [], "per_fact_by_size": [], "strata": [], "seconds": []}
        if curve.get("sizes"):
            entry.update({key: curve[key] for key in ("sizes", "drop", "per_fact_by_size", "seconds")},
                         strata=[len(b.facts), len(a.facts)])
        measured.append(entry)
    return measured


def _transfer_record(domains: list, pairs: dict, sources: list, transfer_s: float) -> dict:
    """The measured transfer matrix T[i][j] with each source's size, and
    which sources this run computed."""
    k, sizes = len(domains), {j: pair["size"] for (_, j), pair in pairs.items()}
    return {"domains": [d.name for d in domains], "transfer_s": transfer_s,
            "sizes": [sizes.get(j) for j in range(k)],
            "matrix": [[pairs[(i, j)]["value"]["drop"] if (i, j) in pairs else None for j in range(k)]
                       for i in range(k)],
            "computed_sources": [domains[j].name for j in sources]}


def _transfer_pairs(train: list, held: list, config, recipe, units) -> dict:
    """{(i, j): {"key", "size", "value"}} for every target i and every
    source j whose halves can hold a pilot (MIN_HALF facts each): the size
    is the source's largest pilot size, the value the stored unit or None."""
    from ..kernels.pilots import pilot_sizes
    from ..storage.units import transfer_key

    pairs = {}
    for j, (a_j, b_j) in enumerate(zip(train, held)):
        if min(len(a_j.facts), len(b_j.facts)) < MIN_HALF:
            continue
        size = pilot_sizes(config.pilot_sizes, len(a_j.facts), len(b_j.facts))[-1]
        for i, (a_i, b_i) in enumerate(zip(train, held)):
            key = (transfer_key(units.model, (a_j.facts, b_j.facts), (a_i.facts, b_i.facts), recipe.label(),
                                config.seed, size) if units is not None else None)
            value = units.get("transfer", key, f"{a_j.name} -> {a_i.name}") if key is not None else None
            pairs[(i, j)] = {"key": key, "size": size, "value": value}
    return pairs


def measure_transfer(trainer, split, rows: list, missing: dict, pairs: dict, train: list, config, recipe, units,
                     report) -> None:
    """The entries T[i][j] of the transfer matrix for each source j in
    `missing` and each of its targets i there (`pilots.transfer_drops`: two
    fine-tunes on the source's halves cut to its largest pilot size, then
    each target's halves read through the trained blocks), into
    pairs[(i, j)]["value"] and kept in `units`. rows[k]: domain k's
    position in `split`."""
    from ..kernels.pilots import transfer_drops

    for step, (j, targets) in enumerate(sorted(missing.items())):
        report(Progress("pilots", 0.95, f"transfer fine-tunes, domain {step + 1} of {len(missing)}: {train[j].name}"))
        size = pairs[(targets[0], j)]["size"]
        got = transfer_drops(trainer, recipe, config.seed, list(split.train_rows[rows[j]]),
                             list(split.held_rows[rows[j]]), size,
                             [(list(split.train_rows[rows[i]]), list(split.held_rows[rows[i]])) for i in targets])
        for i, value in zip(targets, got):
            _keep_pair(pairs, i, j, value, train, units)


def _keep_pair(pairs: dict, i: int, j: int, value: dict, train: list, units) -> None:
    pairs[(i, j)]["value"] = value
    if units is not None:
        units.put("transfer", pairs[(i, j)]["key"], f"{train[j].name} -> {train[i].name}", value)


def _forward(loaded, train: list, held: list, batch_size: int, capture_block: int, report):
    """One forward pass over these domains' halves keeping the inputs of
    `capture_block`; a one-line ValueError where a fact's loss is not finite."""
    import torch

    from ..kernels.forward import split_pass

    report(Progress("forward", 0.03, f"forward pass over {sum(len(a.facts) + len(b.facts) for a, b in zip(train, held))} facts"))
    split = split_pass(loaded, train, held, batch_size, capture_block=capture_block)
    bad = (~torch.isfinite(split.tokens.fact_losses)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the model's loss is not finite on {len(bad)} fact(s): the weights may be corrupt or the "
                         "dtype too narrow")
    return split


def _measure_curves(loaded, split, rows: list, train: list, curves: list, config, recipe, units, report,
                    reads: list | None = None):
    """Each of these domains' pilot curve (none for a domain whose halves
    cannot hold MIN_HALF facts) into curves[j]["curve"] with its halves'
    per-fact losses, kept in `units`; rows[j] is domain j's position in
    `split`. reads[j]: the positions in `split` of the domains the pilot's
    largest runs are also read on (`pilot_curve`'s targets), their entries
    left in the curve under "transfer" and "transfer_s", not in the unit.
    Returns the pilots' trainer pool (None if no pilot ran)."""
    losses = split.tokens.fact_losses
    trainer = None
    for j, domain in enumerate(train):
        report(Progress("pilots", 0.05 + 0.9 * j / len(train),
                        f"pilot fine-tunes, domain {j + 1} of {len(train)} to measure: {domain.name}"))
        rows_a, rows_b = list(split.train_rows[rows[j]]), list(split.held_rows[rows[j]])
        curve = {}
        if min(len(rows_a), len(rows_b)) >= MIN_HALF:
            trainer = trainer or _pilot_trainer(loaded, split)
            targets = reads[j] if reads else None
            extra = {"targets": [(list(split.train_rows[t]), list(split.held_rows[t])) for t in targets]} \
                if targets else {}
            curve = pilot_curve(trainer, recipe, config.seed, rows_a, rows_b, config.pilot_sizes, **extra)
        curve.update(losses_a=[float(losses[r]) for r in rows_a], losses_b=[float(losses[r]) for r in rows_b])
        curves[j]["curve"] = curve
        if units is not None and curve.get("sizes"):
            # the pilot unit reads its own domain alone: what it read of the others is kept apart
            units.put("pilot", curves[j]["key"], domain.name,
                      {k: v for k, v in curve.items() if k not in ("transfer", "transfer_s")})
    return trainer


def _pilot_trainer(loaded, split):
    """The pilots' TailTrainer, checked to reproduce the model's losses, in
    a pool that runs a curve's fine-tunes side by side; a one-line
    ValueError for an architecture it cannot cut."""
    from ..kernels.side_by_side import TrainerPool, pool_workers
    from ..kernels.training import TailTrainer

    try:
        trainer = TailTrainer(loaded, split)
        trainer.check()
    except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"the pilot fine-tunes cannot run on this model: {exc}") from exc
    return TrainerPool(trainer, pool_workers(trainer.device.type))


@dataclass
class DomainCurve:
    """One domain's learning curve with what the plan reads beside it. have:
    the facts already in training, where the curve is read from (None: all
    n_facts)."""

    name: str
    n_facts: int
    mean_loss: float
    curve: LearningCurve
    have: float | None = None

    @property
    def start(self) -> float:
        """Where the gain of collecting more is read from: have, else n_facts."""
        return self.n_facts if self.have is None else self.have


def domain_seed(seed: int, name: str) -> int:
    """The bootstrap seed of one domain: from (seed, name), so a domain's
    band does not move when other domains are added or reordered."""
    return int.from_bytes(hashlib.sha256(f"plan:{seed}:{name}".encode()).digest()[:8], "little")


def fit_pilots(measured: dict, config: PlanConfig) -> list:
    """Each measured domain's `curves.fit_curve` (halves resampled
    separately, `config.bootstrap_resamples` resamples seeded by
    `domain_seed`), with config.shrink their shapes pooled across the
    domains (`curves.shrink_curves`); a domain too small for a pilot gets
    no curve and says why."""
    out = []
    for entry in measured["domains"]:
        if entry["sizes"]:
            per_fact = [[np.nan if v is None else v for v in row] for row in entry["per_fact_by_size"]]
            curve = fit_curve(entry["sizes"], per_fact, entry["strata"], config.bootstrap_resamples,
                              domain_seed(config.seed, entry["name"]))
        else:
            curve = LearningCurve([], [], reason=f"too few facts for a pilot: each half needs {MIN_HALF} "
                                                 f"(the domain has {entry['n_facts']})")
        out.append(DomainCurve(entry["name"], entry["n_facts"], entry[MEAN_LOSS_FIELD], curve))
    if config.shrink:
        shrunk = shrink_curves([dc.curve for dc in out])
        out = [replace(dc, curve=curve) for dc, curve in zip(out, shrunk)]
    return out


def learning_curves(loaded, domains, config: PlanConfig, progress: Callable[[Progress], None] | None = None) -> list:
    """Each domain's DomainCurve: `measure_pilots` then `fit_pilots`."""
    return fit_pilots(measure_pilots(loaded, domains, config, progress), config)


# --- the allocation ----------------------------------------------------------

@dataclass
class Allocation:
    """What `allocate` bought: examples per domain, what they cost, the
    weighted gain sum_k w_k gain_k(m_k), the step it took them in, and
    gap_bound: the best allocation's weighted gain is at most total +
    gap_bound (a Lagrangian bound, `upper_bound`)."""

    counts: list
    spent: float
    total: float
    step: int
    gap_bound: float


def most_examples(budget: float, cost: float, cap: int | None) -> int:
    """The most examples of one domain the budget alone buys, within its cap."""
    affordable = math.floor(budget / cost + 1e-9)
    return affordable if cap is None else min(cap, affordable)


def allocate(gains: list, budget: float, costs=None, caps=None, weights=None, step: int | None = None) -> Allocation:
    """Greedy allocation: repeatedly buy the step (one example, or `step`
    examples when the budget buys more than MAX_STEPS) with the largest
    w_k (gain_k(m_k + s) - gain_k(m_k)) / (c_k s) that the budget and the cap
    still allow (a step the budget or cap cuts short is re-valued at its
    shorter length), until nothing with a gain above 0 is affordable.

    gains[k]: m -> gain of m more examples of domain k (gain(0) = 0), or
    None (not identifiable: nothing is spent on it). It must be concave
    (each example adds no more than the one before): a step that adds more
    per example than the domain's previous step raises ValueError. Both
    fitted forms are concave by construction (b > 0; 0 < beta <= 1), so
    their concave hull is the curve itself. With every cost equal and step
    1 the greedy is optimal; otherwise gap_bound says how far it can be."""
    n = len(gains)
    costs = [1.0] * n if costs is None else [float(c) for c in costs]
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    caps = [None] * n if caps is None else list(caps)
    limits = [0 if gains[k] is None or weights[k] <= 0 else most_examples(budget, costs[k], caps[k]) for k in range(n)]
    step = step or max(1, math.ceil(max(limits, default=0) / MAX_STEPS))
    counts, left, last_rate = [0] * n, float(budget), [math.inf] * n

    def candidate(k):
        size = min(step, limits[k] - counts[k], math.floor(left / costs[k] + 1e-9))
        if size <= 0:
            return None
        added = weights[k] * (gains[k](counts[k] + size) - gains[k](counts[k]))
        return (-added / (costs[k] * size), k, size) if added > 0 else None

    heap = [c for c in (candidate(k) for k in range(n)) if c is not None]
    heapq.heapify(heap)
    while heap:
        _, k, size = heapq.heappop(heap)
        fresh = candidate(k)
        if fresh is None:
            continue
        if fresh[2] != size:  # the budget cut the step short since it was valued
            heapq.heappush(heap, fresh)
            continue
        rate = -fresh[0] * costs[k]
        if rate > last_rate[k] * (1 + 1e-9) + 1e-15:
            raise ValueError(f"the gain of domain {k} is not concave: example {counts[k] + 1} adds more than the "
                             "one before")
        counts[k], left, last_rate[k] = counts[k] + size, left - costs[k] * size, rate
        again = candidate(k)
        if again is not None:
            heapq.heappush(heap, again)
    total = sum(weights[k] * gains[k](counts[k]) for k in range(n) if gains[k] is not None and counts[k])
    bound = min(upper_bound(gains, budget, costs, weights, limits, lam)
                for lam in _multipliers(gains, costs, weights, limits, counts))
    return Allocation(counts, float(budget) - left, float(total), step, max(0.0, bound - total))


def _multipliers(gains, costs, weights, limits, counts) -> list:
    """Candidate multipliers for `upper_bound`: 0, and each domain's weighted
    gain per unit cost of its last example bought and of its next one."""
    out = [0.0]
    for k, gain in enumerate(gains):
        if gain is None:
            continue
        m = counts[k]
        if m > 0:
            out.append(weights[k] * (gain(m) - gain(m - 1)) / costs[k])
        if m < limits[k]:
            out.append(max(0.0, weights[k] * (gain(m + 1) - gain(m)) / costs[k]))
    return out


def upper_bound(gains, budget: float, costs, weights, limits, lam: float) -> float:
    """lam B + sum_k max_{0 <= m <= M_k} [w_k gain_k(m) - lam c_k m], M_k the
    most examples of k the budget and cap allow: for any lam >= 0 no
    allocation within the budget gains more (weak duality). For a concave
    gain the inner maximum is where the increments fall below lam c_k / w_k,
    found by bisection."""
    bound = lam * budget
    for k, gain in enumerate(gains):
        if gain is None or limits[k] <= 0:
            continue
        lo, hi = 0, limits[k]
        while lo < hi:  # the first m whose next example is worth less than it costs at lam
            mid = (lo + hi) // 2
            if weights[k] * (gain(mid + 1) - gain(mid)) - lam * costs[k] >= 0:
                lo = mid + 1
            else:
                hi = mid
        bound += max(0.0, weights[k] * gain(lo) - lam * costs[k] * lo)
    return bound


def concave_from_zero(gain: Callable, limit: int) -> Callable:
    """The least concave majorant on m = 0..limit of a gain with gain(0) = 0
    that is concave from m = 1 on (a log curve read from have = 0: G(0) = 0
    but G(1) = a may lie below the line through G(2)): the chord from 0 to
    m* = argmax_{1 <= j <= limit} gain(j) / j, then the gain itself. gain(j)/j
    rises then falls (its sign of change is that of j gain'(j) - gain(j),
    which falls where gain is concave), so m* is the first j whose next ratio
    is smaller, found by bisection. All ratios <= 0: nothing to gain (0)."""
    if limit < 1:
        return gain
    lo, hi = 1, int(limit)
    while lo < hi:
        mid = (lo + hi) // 2
        if gain(mid + 1) / (mid + 1) >= gain(mid) / mid:
            lo = mid + 1
        else:
            hi = mid
    top, slope = lo, gain(lo) / lo
    if slope <= 0:
        return lambda m: 0.0
    return lambda m: slope * m if m <= top else gain(m)


def gain_function(dc: DomainCurve, rule: str = "expected", limit: int = 0) -> Callable | None:
    """m -> the gain the allocation reads for m more examples of dc, from
    dc.start (have) on: "point", the fitted curve's G(have + m) - G(have);
    "expected", the mean of that over the bootstrap curves, each read as
    flat where it falls (`rising_draws`; concave as a mean of concave
    curves). From have = 0, its least concave majorant on 0..limit
    (`concave_from_zero`). None without a curve."""
    if not dc.curve.identifiable:
        return None
    curve, start = dc.curve, dc.start
    if rule == "point" or curve.draws is None or not len(curve.draws):
        def raw(m):
            return curve.gain(start, m)
    else:
        params, seen = rising_draws(curve.form, curve.draws).T, {}

        def raw(m):
            if m not in seen:
                seen[m] = float(np.mean(predict_from_zero(curve.form, params, start + m)
                                        - predict_from_zero(curve.form, params, start)))
            return seen[m]
    return concave_from_zero(raw, limit) if start <= 0 else raw


def rising_draws(form: str, draws: np.ndarray) -> np.ndarray:
    """The bootstrap curves as the allocation reads them: a resample whose
    curve falls is read as flat from where it was measured (log: b_r < 0 ->
    0; power: beta_r clipped to [0, 1], c_r >= 0), so every resample's curve
    is concave and nondecreasing and so is their mean, which keeps the
    greedy exact. The bands and totals keep the resamples as they are."""
    out = np.array(draws, dtype=float, copy=True)
    if form == "power":
        out[:, 0] = np.maximum(out[:, 0], 0.0)
        out[:, 1] = np.clip(out[:, 1], 0.0, 1.0)
    else:
        out[:, 1] = np.maximum(out[:, 1], 0.0)
    return out


# --- the plan ----------------------------------------------------------------

@dataclass
class PlanResult(ResultRecord):
    """A collection plan. domains: per domain (in the domains' order) the
    examples to collect and their cost, the predicted gain (unweighted; the
    totals weigh it) with its 90% band,
    the gain of the last example bought and of the next, the fit (form,
    parameters, leave-one-out error) or why there is none. totals: the
    plan's weighted gain against spreading the budget evenly and putting it
    all on the domain of highest mean loss, each with its band, and the
    plan's total minus each baseline's with its paired band. even_domains:
    the same lines for spreading the budget evenly, what the plan
    recommends instead where it is not shown to beat that
    (`verdict`, `recommendation`). transfer (with PlanConfig.transfer,
    `transfer_section`): the matrix, the ratios, the effective weights the
    allocation and totals used, and each domain's predicted gain from every
    domain's collected examples."""

    model: dict
    config: dict
    domains: list
    totals: dict
    allocation: dict
    pilot: dict
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)
    created_at: str = ""
    even_domains: list = field(default_factory=list)
    simple_domains: dict = field(default_factory=dict)

    def row(self, name: str) -> dict:
        return next(d for d in self.domains if d["domain"] == name)


def total_draws(curves: list, counts: list, weights: list) -> tuple:
    """(sum_k w_k gain_k(m_k) over the domains with a curve, the same total
    for every bootstrap resample r: resample r of every domain together, the
    domains' resamples being independent; 0.0 where nothing is bought)."""
    gain, draws = 0.0, 0.0
    for dc, m, w in zip(curves, counts, weights):
        if dc.curve.identifiable and m > 0:
            gain += w * dc.curve.gain(dc.start, m)
            draws = draws + w * dc.curve.gain_draws(dc.start, m)
    return float(gain), draws


def _band(point: float, draws) -> list:
    """The 90% band of resampled values (a point without resamples: itself)."""
    return [float(b) for b in (np.quantile(draws, BAND) if np.ndim(draws) else (point, point))]


def _mean(point: float, draws) -> float:
    return float(np.mean(draws)) if np.ndim(draws) else float(point)


def predicted_total(curves: list, counts: list, weights: list) -> dict:
    """A plan's weighted total gain (the fitted curves'), its mean over the
    bootstrap curves ("expected"), its 90% band (`total_draws`) and its counts."""
    gain, draws = total_draws(curves, counts, weights)
    return {"gain": gain, "expected": _mean(gain, draws), "band": _band(gain, draws),
            "counts": {dc.name: int(m) for dc, m in zip(curves, counts)}}


def paired_difference(curves: list, counts: list, other: list, weights: list) -> dict:
    """The plan's total minus another plan's, its mean and the 90% band of
    the difference over the same resamples (paired: what both plans share
    of a curve's uncertainty cancels), and "shown": whether the band lies
    above 0 (else the plan is not shown to beat the other)."""
    gain, draws = total_draws(curves, counts, weights)
    base, base_draws = total_draws(curves, other, weights)
    band = _band(gain - base, np.subtract(draws, base_draws))
    return {"gain": gain - base, "expected": _mean(gain - base, np.subtract(draws, base_draws)), "band": band,
            "shown": bool(band[0] > 0)}


def even_counts(budget: int, caps: list) -> list:
    """B split as evenly as the caps allow: every domain with room takes one
    example in turn (a capped domain drops out), so the counts of the
    domains below their caps differ by one at most and the last round's
    examples go to the first domains in the domains' order."""
    counts = [0] * len(caps)
    left = int(budget)
    while left > 0:
        room = [k for k in range(len(caps)) if counts[k] < caps[k]]
        if not room:
            break
        if left < len(room):
            for k in room[:left]:
                counts[k] += 1
            break
        # whole rounds at once: as many as the budget and the fullest domain's room allow
        rounds = min(left // len(room), min(caps[k] - counts[k] for k in room))
        for k in room:
            counts[k] += rounds
        left -= rounds * len(room)
    return counts


def proportional_counts(budget: int, scores: list, caps: list) -> list:
    """B split in proportion to max(score_k, 0), in whole examples: a domain
    whose share would pass its cap gets the cap and the rest is split again
    over the others; the whole numbers are the floors of the shares plus
    one for the largest remainders (ties: the domains' order) until B is
    spent or every domain is at its cap."""
    weights = [max(float(s), 0.0) if math.isfinite(float(s)) else 0.0 for s in scores]
    share = [0.0] * len(caps)
    fixed, left = set(), float(budget)
    while True:
        free = [k for k in range(len(caps)) if k not in fixed and weights[k] > 0]
        total = sum(weights[k] for k in free)
        if not free or total <= 0:
            break
        over = [k for k in free if left * weights[k] / total > caps[k]]
        if not over:
            for k in free:
                share[k] = left * weights[k] / total
            break
        for k in over:
            share[k], left = float(caps[k]), left - caps[k]
            fixed.add(k)
    counts = [min(caps[k], math.floor(share[k] + 1e-9)) for k in range(len(caps))]
    order = sorted(range(len(caps)), key=lambda k: (-(share[k] - math.floor(share[k] + 1e-9)), k))
    for k in order:
        if sum(counts) >= budget:
            break
        if counts[k] < caps[k] and share[k] > counts[k]:
            counts[k] += 1
    return counts


def baseline_counts(curves: list, config: PlanConfig) -> dict:
    """The plans the greedy one is set against: "even", the budget split
    equally, m_k = min(cap_k, floor(B / (K c_k))) on every domain (money);
    "mean_loss", the budget split in proportion to max(mean loss, 0),
    m_k = min(cap_k, floor(B l_k / (sum_j l_j c_k))); and "highest_loss",
    m = min(cap, floor(B / c)) on the domain of highest mean loss alone.
    A budget in examples is spent whole: "even" by `even_counts`, "mean_loss"
    by `proportional_counts` (largest remainders, caps refilled)."""
    if config.budget_unit == "examples":
        budget = math.floor(config.budget + 1e-9)
        even = even_counts(budget, [budget if config.cap(dc.name) is None else config.cap(dc.name) for dc in curves])
    else:
        share = config.budget / len(curves)
        even = [most_examples(share, config.cost(dc.name), config.cap(dc.name)) for dc in curves]
    scores = ranking_scores(curves)
    # no positive score says nothing about where to collect: the ranking split is then the even one
    by_rank = proportional_split(scores, config, curves) if any(v > 0 for v in scores) else even
    top = max(range(len(curves)), key=lambda k: curves[k].mean_loss)
    highest = [0] * len(curves)
    highest[top] = most_examples(config.budget, config.cost(curves[top].name), config.cap(curves[top].name))
    return {"even": even, MEAN_LOSS_RULE: proportional_split([dc.mean_loss for dc in curves], config, curves),
            "ranking": by_rank, "highest_loss": highest, "highest_loss_domain": curves[top].name}


# the default ranking reads each pilot curve's line in ln n at the benchmark's largest dose
RANKING_TARGET = 32


def ranking_scores(curves: list) -> list:
    """Each domain's default-ranking score from its pilot points (the
    pilot_curve estimator's priority): the least-squares line a + b ln n
    through the pilot drops, read at n = RANKING_TARGET; 0 where the domain
    has fewer than two pilot sizes."""
    from ..kernels.pilots import log_fit

    out = []
    for dc in curves:
        sizes, drops = dc.curve.sizes, dc.curve.drops
        if len(set(sizes)) < 2:
            out.append(0.0)
            continue
        a, b = log_fit(sizes, drops)
        out.append(a + b * math.log(RANKING_TARGET))
    return out


def proportional_split(scores: list, config: PlanConfig, curves: list) -> list:
    """The budget split in proportion to max(score, 0): in examples by
    `proportional_counts` (largest remainders, caps refilled); in money,
    m_k = min(cap_k, floor(B s_k / (sum_j s_j c_k))). Nothing anywhere when
    no score is positive."""
    positive = [max(float(v), 0.0) if math.isfinite(v) else 0.0 for v in scores]
    names = [dc.name for dc in curves]
    if config.budget_unit == "examples":
        budget = math.floor(config.budget + 1e-9)
        return proportional_counts(budget, positive, [budget if config.cap(n) is None else config.cap(n)
                                                      for n in names])
    total = sum(positive)
    return [most_examples(config.budget * v / total, config.cost(n), config.cap(n)) if total > 0 else 0
            for n, v in zip(names, positive)]


def domain_row(dc: DomainCurve, m: int, config: PlanConfig) -> dict:
    """One domain's line of the plan: its round, the facts in training
    (have) and collected in the rounds before, what to collect, the gain
    read from dc.start (have + collected) to dc.start + m (the fitted
    curve's, its mean over the bootstrap curves and its band), and how far
    that reads beyond the largest pilot size."""
    curve, have = dc.curve, dc.start
    largest = max(curve.sizes) if curve.sizes else None
    row = {"domain": dc.name, "round": config.round, "n_facts": dc.n_facts, "have": config.have_of(dc.name),
           "collected_before": config.collected_of(dc.name), "reads_from": have, MEAN_LOSS_FIELD: dc.mean_loss,
           "collect": int(m),
           "cost": m * config.cost(dc.name), "cost_per_example": config.cost(dc.name),
           "weight": config.weight(dc.name), "cap": config.cap(dc.name), "identifiable": curve.identifiable,
           "form": curve.form, "fit_error": curve.loo_error, "reason": curve.reason, "fit": curve.to_dict(),
           "gain": None, "expected_gain": None, "gain_band": None, "marginal_gain_last": None,
           "marginal_gain_next": None, "reads_to": have + m, "largest_pilot": largest,
           "extrapolation": (have + m) / largest if largest else None}
    if curve.identifiable:
        draws = curve.gain_draws(have, m)
        row.update(gain=curve.gain(have, m), expected_gain=float(np.mean(draws)) if len(draws) else None,
                   gain_band=list(curve.form_band(have, m)),
                   marginal_gain_last=curve.gain(have + m - 1, 1) if m > 0 else None,
                   marginal_gain_next=curve.gain(have + m, 1))
    setting = setting_of(row["have"])
    value, band = in_training_nats(row["expected_gain"], row["gain_band"], training_calibration(setting))
    row.update(training_setting=setting, training_gain=value, training_band=band)
    return row


# A source's facts are valued on another domain at most as much as on its own, and at most as much harm: a
# ratio beyond that rests on a small own drop T[j][j], where the pilot's noise dominates.
RATIO_CLIP = (-1.0, 1.0)


def transfer_ratios(matrix: list, clip: tuple = RATIO_CLIP) -> list:
    """ratio[i][j] = min(max(T[i][j] / T[j][j], clip[0]), clip[1]): how much
    of what domain j's facts gain domain j they gain domain i. 0 where
    T[j][j] is missing, not finite or not positive (the source's own drop
    cannot scale anything) or T[i][j] is missing; the diagonal is 1 (a
    domain's own gain is its curve, whatever its pilot drop)."""
    k = len(matrix)
    out = [[0.0] * k for _ in range(k)]
    for j in range(k):
        own = matrix[j][j]
        for i in range(k):
            if i == j:
                out[i][j] = 1.0
            elif own is not None and math.isfinite(own) and own > 0 and matrix[i][j] is not None \
                    and math.isfinite(matrix[i][j]):
                out[i][j] = min(max(matrix[i][j] / own, clip[0]), clip[1])
    return out


def effective_weights(ratios: list, weights: list) -> list:
    """w~_j = sum_i w_i ratio[i][j]: the weight of domain j's gain when its
    facts count on every weighted domain, so that
    sum_i w_i sum_j ratio[i][j] gain_j(m_j) = sum_j w~_j gain_j(m_j)."""
    return [float(sum(weights[i] * ratios[i][j] for i in range(len(weights)))) for j in range(len(weights))]


def transfer_section(curves: list, counts: list, matrix: list, ratios: list, weights: list, effective: list,
                     measured: dict) -> dict:
    """The plan's transfer block: the matrix T (rows: the domain whose
    held-out loss drops; columns: the domain trained on), the ratios, the
    weights and effective weights, and per domain i its predicted gain from
    every domain's collected examples, sum_j ratio[i][j] gain_j(m_j) (the
    fitted curves' "gain" and the mean over the bootstrap curves'
    "expected"), with each source's part."""
    own, mean = [], []
    for dc, m in zip(curves, counts):
        if dc.curve.identifiable and m > 0:
            draws = dc.curve.gain_draws(dc.start, m)
            own.append(dc.curve.gain(dc.start, m))
            mean.append(float(np.mean(draws)) if len(draws) else own[-1])
        else:
            own.append(0.0)
            mean.append(0.0)
    names = [dc.name for dc in curves]
    gain_on = [{"domain": names[i], "weight": weights[i],
                "gain": float(sum(ratios[i][j] * own[j] for j in range(len(names)))),
                "expected": float(sum(ratios[i][j] * mean[j] for j in range(len(names)))),
                "by_source": {names[j]: float(ratios[i][j] * mean[j]) for j in range(len(names))}}
               for i in range(len(names))]
    return {"domains": names, "matrix": matrix, "ratio": ratios, "clip": list(RATIO_CLIP),
            "sizes": measured.get("sizes"), "weights": list(weights), "effective_weights": list(effective),
            "gain_on": gain_on, "transfer_s": measured.get("transfer_s")}


BASELINES = {"even": "spreading evenly", MEAN_LOSS_RULE: "splitting by mean loss",
             "ranking": "splitting by the ranking's score",
             "highest_loss": "all on the highest mean loss"}


# the simple splits a plan can recommend instead of its own counts, and how the page names them
SIMPLE_RULES = {"even": "spread evenly", MEAN_LOSS_RULE: "split by mean loss",
                "ranking": "split by the ranking's score"}


def verdict(totals: dict, evidence: dict | None = None) -> dict:
    """Whether the plan is shown to beat each simple split (the paired 90%
    band of plan minus it lies above 0), and the sentence that says so;
    "recommend": "plan" when it beats spreading evenly, else "even". Then
    what training found (`check_evidence`): where the benchmark's check of
    this setting, at the checked budget nearest this one, realised less for
    the plan than for a simple split, that split (the one that realised
    most) is recommended, whatever the curves predict, with a sentence that
    gives the realised numbers."""
    out = {"recommend": "plan", "sentences": []}
    for key in ("even", MEAN_LOSS_RULE):
        diff = totals[key]["plan_minus_this"]
        band = f"{diff['expected']:+.3g}, 90% band [{diff['band'][0]:+.3g}, {diff['band'][1]:+.3g}]"
        if diff["shown"]:
            out["sentences"].append(f"The plan is predicted to beat {BASELINES[key]} (plan minus it {band}).")
        else:
            out["sentences"].append(f"The plan is not shown to beat {BASELINES[key]} (plan minus it {band}, a band "
                                    f"that holds 0): {BASELINES[key]} is as good a choice.")
            if key == "even":
                out["recommend"] = "even"
    if evidence:
        realised = evidence["realised"]
        best = max((k for k in SIMPLE_RULES if k in realised), key=lambda k: realised[k])
        if realised[best] > realised["plan"]:
            out["recommend"] = best
            out["evidence"] = evidence
            out["sentences"].append(
                f"When the model was trained on what each split collects, on the benchmark's check "
                f"{SETTING_TEXT[evidence['setting']]} at {evidence['per_domain']:g} examples a domain, the plan "
                f"realised {100 * (1 - realised['plan'] / realised[best]):.0f}% less than the best simple split "
                f"({realised['plan']:.3g} against {realised[best]:.3g} nats per domain, {evidence['seeds']} "
                f"seed(s)): {SIMPLE_RULES[best]} is recommended, and the plan's counts are shown as the curves' "
                "preference.")
    return out


def check_evidence(setting: str, per_domain: float) -> dict | None:
    """The benchmark's realised gains by allocation (`data/plan_calibration.json`,
    "checks") in one setting at the checked budget nearest per_domain
    examples a domain (nearest in ln); None where the setting has no check."""
    checks = (_calibration_data().get("checks") or {}).get(setting)
    if not checks or per_domain <= 0:
        return None
    nearest = min(checks["budgets"], key=lambda b: abs(math.log(float(b)) - math.log(per_domain)))
    entry = checks["budgets"][nearest]
    return {"setting": setting, "per_domain": float(nearest), "seeds": entry["seeds"],
            "realised": {k: v for k, v in entry["realised"].items()}}


def build_plan(curves: list, config: PlanConfig, measured: dict | None = None) -> PlanResult:
    """The plan from the domains' curves, each read from its have plus what
    the rounds before collected (`config.start_of`): `allocate` on `gain_function` (the config's rule)
    with the config's costs, caps and weights, each domain's line
    (`domain_row`), the totals of the plan and of the baselines
    (`predicted_total`) and the `verdict`. Instant: no model.

    With config.transfer the weights are the effective weights
    (`effective_weights` of `transfer_ratios` of measured["transfer"]'s
    matrix), in the allocation and in every total alike: the objective is
    the weighted gain on all domains, sum_j w~_j gain_j(m_j)."""
    t0 = time.perf_counter()
    curves = [replace(dc, have=config.start_of(dc.name)) for dc in curves]
    names = [dc.name for dc in curves]
    costs = [config.cost(n) for n in names]
    caps = [config.cap(n) for n in names]
    own_weights = [config.weight(n) for n in names]
    weights, transfer = own_weights, {}
    if config.transfer:
        measured_transfer = (measured or {}).get("transfer") or {}
        if measured_transfer.get("domains") != names:
            raise ValueError("a plan with transfer needs the pilots' transfer matrix over the same domains: "
                             "measure the pilots with transfer on")
        ratios = transfer_ratios(measured_transfer["matrix"])
        weights = effective_weights(ratios, own_weights)
    gains = [gain_function(dc, config.rule, most_examples(config.budget, c, cap))
             for dc, c, cap in zip(curves, costs, caps)]
    bought = allocate(gains, config.budget, costs, caps, weights)
    base = baseline_counts(curves, config)
    totals = {"plan": predicted_total(curves, bought.counts, weights),
              "even": predicted_total(curves, base["even"], weights),
              MEAN_LOSS_RULE: predicted_total(curves, base[MEAN_LOSS_RULE], weights),
              "ranking": predicted_total(curves, base["ranking"], weights),
              "highest_loss": {**predicted_total(curves, base["highest_loss"], weights),
                               "domain": base["highest_loss_domain"]}}
    for key in totals:
        totals[key]["spent"] = float(sum(c * m for c, m in zip(costs, totals[key]["counts"].values())))
    for key in BASELINES:
        totals[key]["plan_minus_this"] = paired_difference(curves, bought.counts, base[key], weights)
    measured = measured or {}
    pilot = {"recipe": measured.get("recipe", PILOT_RECIPE.label()), "sizes": list(config.pilot_sizes),
             "forward_s": measured.get("forward_s"), "pilot_s": measured.get("pilot_s")}
    allocation = {"budget": config.budget, "budget_unit": config.budget_unit, "spent": bought.spent,
                  "left": config.budget - bought.spent, "step": bought.step, "gap_bound": bought.gap_bound,
                  "rule": config.rule, "round": config.round}
    rows = [domain_row(dc, m, config) for dc, m in zip(curves, bought.counts)]
    notes = plan_notes(curves, bought, pilot["recipe"], rows)
    if config.transfer:
        transfer = transfer_section(curves, bought.counts, measured["transfer"]["matrix"], ratios, own_weights,
                                    weights, measured["transfer"])
        for row, effective in zip(rows, weights):
            row["effective_weight"] = effective
        notes.append("Transfer on: each domain's examples count on every weighted domain, domain i gaining "
                     f"ratio_ij = T[i][j]/T[j][j] (clipped to [{RATIO_CLIP[0]:g}, {RATIO_CLIP[1]:g}]) of what domain "
                     "j gains; the allocation and every total use the effective weights sum_i w_i ratio_ij, and "
                     "the bands do not cover the matrix's own noise.")
    simple = {key: [domain_row(dc, m, config) for dc, m in zip(curves, base[key])] for key in SIMPLE_RULES}
    totals["plan"]["training"] = training_total(rows, weights)
    for key in SIMPLE_RULES:
        totals[key]["training"] = training_total(simple[key], weights)
    return PlanResult(model=measured.get("model", {}), config=config.to_dict(), domains=rows,
                      totals=totals, allocation=allocation, pilot=pilot, transfer=transfer,
                      notes=notes,
                      timings={"plan": time.perf_counter() - t0}, verdict=verdict(totals, plan_evidence(rows, config)),
                      created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      even_domains=simple["even"], simple_domains={k: simple[k] for k in SIMPLE_RULES if k != "even"})


def plan_evidence(rows: list, config: PlanConfig) -> dict | None:
    """The benchmark check that speaks for this plan (`check_evidence`):
    of the setting every domain shares (`setting_of` its have; none when
    they differ), at the budget per domain in examples (in money: budget /
    (K times the mean cost per example))."""
    settings = {setting_of(r["have"]) for r in rows}
    if len(settings) != 1 or not rows:
        return None
    mean_cost = sum(r["cost_per_example"] for r in rows) / len(rows)
    return check_evidence(settings.pop(), config.budget / (len(rows) * mean_cost))


def even_text(counts: list) -> str:
    """"12 of each" where the even split's counts are equal, else their
    range ("11 to 12 of each") with each domain's count."""
    values = [m for _, m in counts]
    lo, hi = min(values, default=0), max(values, default=0)
    if lo == hi:
        return f"{lo} of each"
    return f"{lo} to {hi} of each ({', '.join(f'{name} {m}' for name, m in counts)})"


def recommendation(result: PlanResult) -> dict:
    """What to collect, following the `verdict`: "by" "plan" (the plan's
    counts) or a simple split of SIMPLE_RULES ("even" where the plan is not
    shown to beat spreading evenly; the split that realised most where the
    benchmark's check found the plan below it), "counts" [(domain, count)],
    "rows" the lines of those counts (`domain_row`), "preference" the plan's
    counts where they are not what is recommended (else None), and
    "headline", one sentence."""
    plan_counts = [(d["domain"], d["collect"]) for d in result.domains]
    spent_out = result.allocation["budget"] <= 0
    by = (result.verdict or {}).get("recommend", "plan")
    rows = result.even_domains if by == "even" else (result.simple_domains or {}).get(by)
    if by != "plan" and rows and not spent_out:
        counts = [(d["domain"], d["collect"]) for d in rows]
        why = ("is not shown to be better" if "evidence" not in result.verdict else
               "realised less on the benchmark's check by training (see below)")
        shown = even_text(counts) if by == "even" else ", ".join(f"{n} {m}" for n, m in counts)
        headline = (f"Recommended: {SIMPLE_RULES[by]}: {shown}. The plan's counts are the curves' preference, which "
                    f"{why}.")
        return {"by": by, "counts": counts, "rows": rows, "preference": plan_counts, "headline": headline}
    if spent_out:
        headline = "Nothing is left of the budget: this round has nothing to collect."
    else:
        headline = (f"Recommended: the plan's counts ({', '.join(f'{n} {m}' for n, m in plan_counts)}); it is "
                    f"predicted to beat spreading evenly.")
    return {"by": "plan", "counts": plan_counts, "rows": result.domains, "preference": None, "headline": headline}


# a reading this many times the largest pilot size is named in the notes
FAR = 2.0


def plan_notes(curves: list, bought: Allocation, recipe: str, rows: list | None = None) -> list:
    """What the user must know to read the plan."""
    notes = [f"Gains are drops of held-out loss (nats per fact) after the pilot recipe ({recipe}): they rank the "
             "domains and split the budget; a full training run's nats differ."]
    notes += [n for n in [training_note(setting_of(r["have"]) for r in rows or [])] if n]
    far = [r for r in rows or [] if r["identifiable"] and r["collect"] and (r["extrapolation"] or 0) > FAR]
    if far:
        notes.append("Read beyond the pilots: " + "; ".join(
            f"{r['domain']} at n = {r['reads_to']:g}, {r['extrapolation']:.1f}x its largest pilot size "
            f"({r['largest_pilot']:g})" for r in far)
            + ". There the curve's form is extrapolated: the band holds both forms' bands where the other form "
              "fits, and the gain the split reads is the chosen form's.")
    for dc in curves:
        if not dc.curve.identifiable:
            notes.append(f"{dc.name}: not identifiable, {dc.curve.reason}; nothing is planned for it and it "
                         "counts 0 in every total.")
        notes += [f"{dc.name}: {note}." for note in dc.curve.notes]
    if bought.gap_bound > 1e-9 * max(1.0, abs(bought.total)):
        notes.append(f"The best allocation gains at most {bought.gap_bound:.3g} more than this plan (the greedy "
                     "is exact for equal costs in single examples; here costs differ or it took steps of "
                     f"{bought.step}).")
    return notes


# --- how the pilot's nats compare with training's -----------------------------

CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "data" / "plan_calibration.json"


@lru_cache(maxsize=1)
def _calibration_data() -> dict:
    return json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))


def pilot_scale(rows=None, totals=None) -> dict:
    """How the pilot curve's predictions compare with what training
    realised on the benchmark (`data/plan_calibration.json`): per domain,
    p_k = G_k(48) - G_k(16) (pilot nats) against g_k, the realised gain of
    32 added facts. scale = exp(mean_k ln(g_k / p_k)) (least squares in logs
    with slope 1); its error is cross-validated by domain, the median over k
    of |s_{-k} p_k - g_k| / g_k with s_{-k} fitted without k, beside the
    median |p_k - g_k| / g_k of the pilot's own nats. On the plan check's
    totals (predicted sum P_a, realised mean R_a over K domains per
    allocation a): the median |scale P_a - K R_a| / (K R_a), and the same
    per allocation. Rows with p_k or g_k <= 0 are left out."""
    data = _calibration_data() if rows is None or totals is None else {}
    rows = data.get("domains", []) if rows is None else rows
    totals = data.get("totals", []) if totals is None else totals
    pairs = np.array([(r["pilot_gain_32"], r["realised_gain_32"]) for r in rows
                      if r["pilot_gain_32"] > 0 and r["realised_gain_32"] > 0], dtype=float)
    pilot, real = pairs[:, 0], pairs[:, 1]
    logs = np.log(real / pilot)
    scale = float(np.exp(logs.mean()))
    left_out = [float(np.exp(np.delete(logs, k).mean())) for k in range(len(logs))]
    cv = np.abs(np.array(left_out) * pilot - real) / real
    n_domains = len(rows)
    total_errors = {f"{t['budget']}: {t['allocation']}":
                    scale * t["predicted_sum"] / (n_domains * t["realised_per_domain"]) - 1 for t in totals}
    return {"scale": scale, "n": int(len(logs)), "cv_median_error": float(np.median(cv)),
            "uncalibrated_median_error": float(np.median(np.abs(pilot - real) / real)),
            "totals_median_error": float(np.median(np.abs(list(total_errors.values())))) if total_errors else None,
            "totals_errors": total_errors}


SETTING_TEXT = {"in_training": "where each domain's sample was already in the model's training and the last "
                               "blocks were trained on minibatches with 32 more facts of it",
                "not_in_training": "where the samples were not in training and the whole model was trained "
                                   "full-batch on what each allocation collected"}


def training_note(settings) -> str:
    """The plan's note on its units: for each setting its rows use, the
    calibration's factor, its size and its cross-validated error, or that
    there is none."""
    parts = []
    settings = sorted(set(settings))
    if not settings:
        return ""
    for setting in settings:
        cal = training_calibration(setting)
        if cal is None:
            parts.append(f"no calibration exists for plans {SETTING_TEXT[setting]}: gains stay in the pilot's nats")
            continue
        parts.append(f"for facts {'not ' if setting == 'not_in_training' else ''}in training, the pilot's nats x "
                     f"{cal['scale']:.2g}, fitted on the benchmark's check {SETTING_TEXT[setting]} ({cal['n']} "
                     f"readings over {cal['domains']} domains), whose median error cross-validated by domain is "
                     f"{100 * cal['cv_median_error']:.0f}%; the band is widened by the 90% spread of that error")
    return ("Gains in training's nats: " + "; ".join(parts) + ". They say roughly what a real run may realise; "
            "the allocation is made on the pilot's curves and does not depend on this scale.")


def setting_of(have: float) -> str:
    """Which of the benchmark's two plan checks a domain's plan is read
    against: "not_in_training" when none of its facts are in the model's
    training data (have 0: the user's facts are examples, and collecting
    means training on what is collected), else "in_training"."""
    return "not_in_training" if have == 0 else "in_training"


def calibration_rows(setting: str) -> list:
    """(pilot-nat prediction, realised gain) pairs of one setting's check
    (`data/plan_calibration.json`): "in_training", per benchmark domain
    G(16 + 32) - G(16) against the realised gain of 32 added facts;
    "not_in_training", per seed, budget and domain the plan's expected gain
    of its count against the gain of the plan's whole-model run."""
    data = _calibration_data()
    if setting == "in_training":
        return [{"domain": r["domain"], "predicted": r["pilot_gain_32"], "realised": r["realised_gain_32"]}
                for r in data["domains"]]
    return list((data.get(setting) or {}).get("rows", []))


def training_calibration(setting: str) -> dict | None:
    """The factor from the pilot's nats to the nats a real training run
    realised, in one setting: s = sum g / sum p over the setting's rows (a
    row with p = 0, a domain its plan collected nothing for, still adds its
    realised gain g: what a prediction is worth in every domain's gain);
    s_-k the same without domain k's rows; the left-out log errors
    e = ln(g / (s_-k p)) of the rows with p, g > 0, their 5% and 95%
    quantiles (the band's widening) and the median |s_-k p - g| / g. None
    without three such rows."""
    rows = calibration_rows(setting)
    good = [r for r in rows if r["predicted"] > 0 and r["realised"] > 0]
    if len(good) < 3 or sum(r["predicted"] for r in rows) <= 0:
        return None
    whole, without = ratio_scales(rows)
    errors = np.array([math.log(r["realised"] / (without[r["domain"]] * r["predicted"])) for r in good])
    return {"setting": setting, "scale": whole, "n": len(good), "domains": len({r["domain"] for r in good}),
            "log_error_band": [float(np.quantile(errors, 0.05)), float(np.quantile(errors, 0.95))],
            "cv_median_error": float(np.median(np.abs(np.exp(errors) - 1)))}


def ratio_scales(rows: list) -> tuple:
    """(s, {domain: s_-k}): s = sum g / sum p over the rows ("predicted" p,
    "realised" g), s_-k the same without domain k's rows (s where nothing
    else is left). Needs sum p > 0."""
    whole = sum(r["realised"] for r in rows) / sum(r["predicted"] for r in rows)
    without = {}
    for n in {r["domain"] for r in rows}:
        p = sum(r["predicted"] for r in rows if r["domain"] != n)
        without[n] = sum(r["realised"] for r in rows if r["domain"] != n) / p if p > 0 else whole
    return whole, without


def training_total(rows: list, weights: list) -> dict | None:
    """An allocation's weighted gain in training's nats: sum_k w_k s_k p_k
    over the rows with a calibrated gain, and the band [sum_k w_k lo_k,
    sum_k w_k hi_k] (the domains' bands added as if they moved together:
    wider than independent errors would give); None when no row has one."""
    have = [(r, w) for r, w in zip(rows, weights) if r.get("training_gain") is not None]
    if not have:
        return None
    return {"expected": sum(w * r["training_gain"] for r, w in have),
            "band": [sum(w * r["training_band"][0] for r, w in have), sum(w * r["training_band"][1] for r, w in have)]}


def in_training_nats(value: float | None, band, cal: dict | None) -> tuple:
    """(s * value, [s * band_lo * exp(e_5%), s * band_hi * exp(e_95%)]): a
    pilot-nat gain and its band in the nats a training run realised, the
    band widened by the calibration's own left-out error; (None, None)
    without a calibration or a value."""
    if cal is None or value is None:
        return None, None
    lo, hi = band if band else (value, value)
    e_lo, e_hi = cal["log_error_band"]
    return cal["scale"] * value, [cal["scale"] * lo * math.exp(e_lo), cal["scale"] * hi * math.exp(e_hi)]


# --- the cached entry point ------------------------------------------------

def plan_key(model_id: str | None, domains, config: PlanConfig | PilotConfig) -> str:
    """sha256 over (model fingerprint, domains, config.curve_settings(),
    engine and plan versions): what the pilot measurements depend on."""
    from .analysis import model_fingerprint

    payload = json.dumps({"model": model_fingerprint(model_id),
                          "domains": [[d.name, list(d.facts)] for d in as_domains(domains)],
                          "settings": config.curve_settings(), "engine": ENGINE_VERSION, "plan": PLAN_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class PilotMeasurements(ResultRecord):
    """What the pilots of a plan measured (`measure_pilots`): the model, the
    recipe, per domain its facts' count, mean loss, sizes, drops and per-fact
    drops; with the curve settings they were measured under, their
    `plan_key` and whether they came from the cache. This is what a plan job
    keeps; `to_dict()` is what `fit_pilots` and `build_plan` read."""

    model: dict
    recipe: str
    domains: list
    forward_s: float | None = None
    pilot_s: float | None = None
    transfer: dict | None = None
    settings: dict = field(default_factory=dict)
    cache_key: str = ""
    cached: bool = False
    created_at: str = ""


def pilot_status(model_id: str | None, domains, config: PlanConfig | PilotConfig) -> dict:
    """Before the pilots run, without loading the model: which domains'
    pilot curves `pilot_measurements` would compute and which it finds in
    the units (`analysis.stored_pilots`), with the message "1 of 4 domains
    recomputed, 3 from cache"."""
    from ..storage.units import model_identity
    from .analysis import model_fingerprint, stored_pilots

    return stored_pilots(model_identity(model_fingerprint(model_id), config.dtype, config.device), domains,
                         config.seed, lambda a, b: config.pilot_sizes)


def pilot_measurements(model_id: str | None, domains, config: PlanConfig | PilotConfig,
                       progress: Callable[[Progress], None] | None = None,
                       use_cache: bool = True) -> PilotMeasurements:
    """The cached half of a plan: the pilot measurements of `plan_key`, from
    cache/plans, else measured (the model loaded, `measure_pilots`) and
    stored there."""
    from ..access.models import load_model
    from ..storage.store import JsonStore

    report = progress or (lambda p: None)
    domains = as_domains(domains)
    key = plan_key(model_id, domains, config)
    store = JsonStore("plans")
    measured = store.get(key) if use_cache else None
    cached = measured is not None
    if measured is None:
        from ..storage.units import DomainUnits

        report(Progress("loading model", 0.0, "loading model"))
        loaded = load_model(model_id, config.device, config.dtype)
        # each domain's pilot curve is its own unit: one an analysis or another plan measured is not run again
        measured = measure_pilots(loaded, domains, config, report, DomainUnits(None) if use_cache else None)
        store.put(key, measured)
    else:
        report(Progress("pilots", 0.95, "cached pilot curves"))
    return PilotMeasurements.from_dict({**measured, "settings": config.curve_settings(), "cache_key": key,
                                        "cached": cached,
                                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def plan_from_pilots(pilots: PilotMeasurements, config: PlanConfig, curves: list | None = None) -> PlanResult:
    """The plan of `config` on measured pilots: `fit_pilots` (or the
    `curves` already fitted to them with this config's seed and resamples)
    then `build_plan`. Instant: no model. A ValueError when the pilots were
    measured under other curve settings than the config's."""
    if pilots.settings and pilots.settings != config.curve_settings():
        raise ValueError(f"the pilots were measured under other settings ({pilots.settings}) than the plan's "
                         f"({config.curve_settings()})")
    measured = pilots.to_dict()
    result = build_plan(curves if curves is not None else fit_pilots(measured, config), config, measured)
    result.pilot.update(cache_key=pilots.cache_key, cached=pilots.cached)
    return result


def run_plan(model_id: str | None, domains, config: PlanConfig,
             progress: Callable[[Progress], None] | None = None, use_cache: bool = True) -> PlanResult:
    """The cached entry point: the pilot measurements are computed once per
    `plan_key` (cache/plans, `pilot_measurements`); the fits and the
    allocation run every time."""
    report = progress or (lambda p: None)
    t0 = time.perf_counter()
    domains = as_domains(domains)
    check_plan(config, domains)
    result = plan_from_pilots(pilot_measurements(model_id, domains, config, report, use_cache), config)
    result.timings["total"] = time.perf_counter() - t0
    report(Progress("done", 1.0, "plan ready"))
    return result


# --- the user's files and the table --------------------------------------------

def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _csv_values(text: str, source: str) -> list:
    """(domain, value, line) from CSV rows domain,value; a first row whose
    value is not a number is a header."""
    import csv
    import io

    out = []
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        raise ValueError(f"{source}: not valid CSV ({exc})") from None
    for line, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise ValueError(f"{source}, line {line}: expected two columns, domain,value; got {len(row)}")
        value = _number(row[1].strip())
        if value is None:
            if line == 1:
                continue
            raise ValueError(f"{source}, line {line}: {row[1].strip()!r} is not a number")
        out.append((row[0].strip(), value, f"line {line}"))
    return out


def _json_values(text: str, source: str) -> list:
    """(domain, value, where) from a JSON object {domain: number}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object {{domain: value}}, got {type(data).__name__}")
    out = []
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: the value of {name!r} is not a number ({value!r})")
        out.append((name.strip(), float(value), repr(name)))
    return out


def load_values(path, what: str) -> dict:
    """{domain: value} from a .csv (rows domain,value) or .json ({domain:
    value}) file of costs, caps or weights; a one-line ValueError naming the
    file (and line) for anything else, a blank name or a domain twice."""
    from pathlib import Path

    path = Path(path)
    readers = {".csv": _csv_values, ".json": _json_values}
    if path.suffix.lower() not in readers:
        raise ValueError(f"{path}: the {what} file must be .csv or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: the {what} file cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    values = {}
    for name, value, where in readers[path.suffix.lower()](text, str(path)):
        if not name:
            raise ValueError(f"{path}, {where}: a blank domain name")
        if name.casefold() in {n.casefold() for n in values}:
            raise ValueError(f"{path}, {where}: the domain {name!r} is given twice")
        values[name] = value
    if not values:
        raise ValueError(f"{path}: the {what} file names no domain")
    return values


def match_domains(values: dict, names: list, what: str, source: str) -> dict:
    """values keyed by the domains' own names (matched ignoring case and
    surrounding space); a one-line ValueError for a name that is not one."""
    known = {n.casefold(): n for n in names}
    out = {}
    for name, value in values.items():
        if name.strip().casefold() not in known:
            raise ValueError(f"{source}: the {what} name the domain {name!r}, which is not among the domains "
                             f"({', '.join(names)})")
        out[known[name.strip().casefold()]] = value
    return out


PLAN_ROW_FIELDS = ("domain", "round", "n_facts", "have", "collected_before", MEAN_LOSS_FIELD, "recommended_by",
                   "collect", "curves_prefer", "cost_per_example", "cost", "weight", "cap", "gain", "expected_gain",
                   "gain_5pct", "gain_95pct", "training_gain", "training_5pct", "training_95pct", "marginal_gain_last",
                   "reads_to", "extrapolation", "form", "fit_error", "reason")


def plan_rows(result: PlanResult) -> list:
    """One flat row per domain (PLAN_ROW_FIELDS), for a table or a CSV, of
    what is recommended (`recommendation`: spreading evenly where the plan
    is not shown to beat it, else the plan): the round, the facts already in
    training (have) and collected in the rounds before, who recommends
    (recommended_by), the examples to collect and their cost, the plan's own
    count (curves_prefer: the curves' preference), the predicted gain
    (fitted curve, mean over the bootstrap curves) with its 90% band (5% and
    95% quantiles) and in training's nats (`in_training_nats`), the gain of
    the last example bought, where the curve is read to and how many times
    the largest pilot size that is, the form and leave-one-out error of the
    fit or why there is none."""
    rec = recommendation(result)
    by = SIMPLE_RULES.get(rec["by"], "plan")
    rows = []
    for d, planned in zip(rec["rows"], result.domains):
        band = d["gain_band"] or [None, None]
        rows.append({"domain": d["domain"], "round": d.get("round", 1), "n_facts": d["n_facts"], "have": d.get("have"),
                     "collected_before": d.get("collected_before", 0), MEAN_LOSS_FIELD: d[MEAN_LOSS_FIELD],
                     "recommended_by": by, "collect": d["collect"], "curves_prefer": planned["collect"],
                     "cost_per_example": d["cost_per_example"], "cost": d["cost"], "weight": d["weight"],
                     "cap": d["cap"], "gain": d["gain"], "expected_gain": d.get("expected_gain"),
                     "gain_5pct": band[0], "gain_95pct": band[1], "training_gain": d.get("training_gain"),
                     "training_5pct": (d.get("training_band") or [None, None])[0],
                     "training_95pct": (d.get("training_band") or [None, None])[1],
                     "marginal_gain_last": d["marginal_gain_last"],
                     "reads_to": d.get("reads_to"), "extrapolation": d.get("extrapolation"), "form": d["form"],
                     "fit_error": d["fit_error"], "reason": d["reason"]})
    return rows


def fit_text(row: dict) -> str:
    """A plan row's fit for people: "power (LOO error 0.0013)", or "not
    identifiable: " and the reason."""
    if row["form"] is None:
        return f"not identifiable: {row['reason']}"
    return row["form"] + (f" (LOO error {row['fit_error']:.2g})" if row["fit_error"] is not None else "")


def plan_csv(result: PlanResult) -> str:
    """`plan_rows` as CSV with a header row; a missing value is an empty cell,
    and text that starts like a spreadsheet formula gets a leading apostrophe."""
    import csv
    import io

    from ..safe_text import csv_cell

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PLAN_ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else csv_cell(v) for k, v in row.items()} for row in plan_rows(result))
    return out.getvalue()


def round_text(result: PlanResult) -> str | None:
    """'Round 2: the budget left after the examples collected before (Alpha
    3, Beta 4); each curve is read from the facts in training plus those.'
    None in the first round."""
    config = result.config or {}
    if config.get("round", 1) <= 1:
        return None
    collected = ", ".join(f"{name} {m}" for name, m in config.get("collected") or []) or "none"
    return (f"Round {config['round']}: the budget is what is left after the examples collected before ({collected}); "
            "each curve is read from the facts in training plus those, since the next examples will be trained on "
            "with them.")


def format_plan(result: PlanResult) -> str:
    """The plan as text: what is recommended (`recommendation`), one line
    per domain of it (and the plan's own count where that differs from what
    is recommended), the totals against the baselines, and the notes."""
    alloc, unit = result.allocation, result.allocation["budget_unit"]
    rec = recommendation(result)
    even = rec["by"] != "plan"  # a simple split is recommended: the plan's counts come second
    header = (["Domain", "Facts", "Have"] + (["Collected before"] if alloc.get("round", 1) > 1 else [])
              + ["Mean loss", "Fit (LOO error)", f"Collect ({SIMPLE_RULES[rec['by']]})" if even else "Collect"]
              + ([("Curves prefer (not shown better)" if "evidence" not in result.verdict
                   else "Curves prefer (realised less)")] if even else [])
              + ["Cost", "Mean gain [90% band]", "In training's nats [90%]", "Last example", "Reads to (x pilot)"])
    rows = []
    for d, planned in zip(rec["rows"], result.domains):
        trained = (f"{_g(d['training_gain'])} [{_g(d['training_band'][0])}, {_g(d['training_band'][1])}]"
                   if d.get("training_gain") is not None else "—")
        fit = (f"{d['form']} ({_g(d['fit_error'])})" if d["identifiable"] else "not identifiable")
        mean = d.get("expected_gain", d["gain"])
        gain = f"{_g(mean)} [{_g(d['gain_band'][0])}, {_g(d['gain_band'][1])}]" if d["identifiable"] else "—"
        reach = (f"{d['reads_to']:g} ({d['extrapolation']:.1f}x)" if d.get("extrapolation") is not None
                 and d["identifiable"] else "—")
        rows.append([d["domain"], str(d["n_facts"]), f"{d.get('have', d['n_facts']):g}"]
                    + ([str(d.get("collected_before", 0))] if alloc.get("round", 1) > 1 else [])
                    + [f"{d[MEAN_LOSS_FIELD]:.3f}", fit, str(d["collect"])]
                    + ([str(planned["collect"])] if even else [])
                    + [_g(d["cost"]), gain, trained, _g(d["marginal_gain_last"]), reach])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    spent = sum(d["cost"] for d in rec["rows"])
    lines = [f"Collection plan: budget {alloc['budget']:g} {unit}, spent {spent:g}, split on the "
             f"{'mean gain over the bootstrap curves' if alloc.get('rule') == 'expected' else 'fitted curves'}; pilot "
             f"{result.pilot['recipe']} at n = {', '.join(map(str, result.pilot['sizes']))} facts of a half "
             "(at most the smaller half)"]
    lines += ([round_text(result)] if round_text(result) else []) + ["", rec["headline"], ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    t = result.totals
    lines += ["", "Predicted total gain (weighted, nats; mean over the bootstrap curves) [90% band]; this plan minus "
                  "each [paired 90% band]:"]
    for key, label in (("plan", "this plan"), ("even", "spread evenly"), (MEAN_LOSS_RULE, "split by mean loss"),
                       ("ranking", "split by the ranking's score"), ("highest_loss", f"all on {t['highest_loss']['domain']} (highest mean loss)")):
        if key not in t:
            continue
        band = t[key]["band"]
        line = f"  {label}: {_g(t[key].get('expected', t[key]['gain']))} [{_g(band[0])}, {_g(band[1])}]"
        if "plan_minus_this" in t[key]:
            diff = t[key]["plan_minus_this"]
            line += (f"; plan minus this {_g(diff.get('expected', diff['gain']))} [{_g(diff['band'][0])}, "
                     f"{_g(diff['band'][1])}]")
        lines.append(line)
    for key, label in (("plan", "this plan"), ("even", "spread evenly")):
        trained = t.get(key, {}).get("training")
        if trained:
            lines.append(f"  {label}, in training's nats: {_g(trained['expected'])} [{_g(trained['band'][0])}, "
                         f"{_g(trained['band'][1])}] (calibrated on the benchmark; see the notes)")
    lines += [""] + list((result.verdict or {}).get("sentences", []))
    if result.transfer:
        lines += [""] + transfer_lines(result.transfer)
    return "\n".join(lines + ["", "Notes:"] + [f"  {n}" for n in result.notes])


def transfer_lines(transfer: dict) -> list:
    """The transfer matrix as text (rows: the domain whose held-out loss
    drops, columns: the domain trained on), then per domain its weight,
    effective weight and predicted gain from every domain's examples."""
    names = transfer["domains"]
    width = max(len(n) for n in names + ["trained on ->"])
    cell = max(10, max(len(n) for n in names))
    lines = ["Transfer matrix T[i][j]: drop of domain i's held-out loss (nats per fact) after the pilot trained on "
             "domain j's half at its largest pilot size:", "  " + "trained on ->".ljust(width) + "".join(
                 n.rjust(cell + 2) for n in names)]
    for name, row in zip(names, transfer["matrix"]):
        lines.append("  " + name.ljust(width) + "".join(_g(v).rjust(cell + 2) for v in row))
    lines.append("Weight -> effective weight (sum_i w_i ratio_ij); predicted gain on each domain from all examples "
                 "(mean over the bootstrap curves):")
    for name, w, eff, on in zip(names, transfer["weights"], transfer["effective_weights"], transfer["gain_on"]):
        lines.append(f"  {name}: {w:g} -> {_g(eff)}; gain {_g(on['expected'])}")
    return lines


def _g(value) -> str:
    return "—" if value is None else f"{value:.3g}"
