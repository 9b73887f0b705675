"""The collection plan: how many more examples of each domain a budget
should buy, and what the model is predicted to gain.

Each domain's learning curve G_k(n) (`dowsing.curves`) is fitted to pilot
fine-tunes on the user's own facts (`dowsing.pilots.pilot_curve`): one
forward pass over every domain's two seeded halves, then, per domain,
AdamW on the last blocks trained on n facts of one half and the drop of the
other half's loss measured, both ways, at n = 2, 4, 8. The gain of
collecting m more examples of domain k, which has S_k facts now, is

  gain_k(m) = G_k(S_k + m) - G_k(S_k).

G_k is in the pilot recipe's units: the drop a few AdamW steps on the last
blocks buy. Its shape across domains is what ranks them and splits the
budget; its absolute nats are the pilot's, not those of a full training run.

`allocate` spends the budget greedily on the largest weighted gain per unit
cost. The pilot measurements are cached (cache/plans) under the model,
the domains and the settings the curves depend on, so a repeat with another
budget, costs, caps or weights refits and reallocates in milliseconds.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from .config import DEVICES, DTYPES
from .curves import BAND, LearningCurve, fit_curve
from .domains import as_domains
from .pilots import PILOT_RECIPE, PILOT_SIZES, pilot_curve
from .progress import Progress
from .records import ConfigRecord, ResultRecord
from .result import ENGINE_VERSION, finite_or_none

BUDGET_UNITS = ("examples", "money")
MIN_HALF = 2  # a pilot trains on one half and measures the other: two facts each at least
# The greedy takes one example at a time up to this many steps, then steps
# of several examples (the reported gap bound covers what stepping costs).
MAX_STEPS = 100_000
PLAN_VERSION = 1  # bump when what the cached pilot measurements hold changes


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
    pilot_sizes: the pilot's nested sizes (`pilots.pilot_sizes` ends them at
        the smaller half's size).
    seed: the halves, the pilot's minibatches and the bootstrap.
    bootstrap_resamples: resamples of the facts' per-fact drops for the bands.
    device / dtype / batch_size: how the model runs, as in an analysis.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "costs", _pairs(self.costs))
        object.__setattr__(self, "weights", _pairs(self.weights))
        object.__setattr__(self, "caps", _pairs(self.caps, _whole))
        object.__setattr__(self, "pilot_sizes", tuple(int(n) for n in self.pilot_sizes))
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"the budget must be a number > 0, got {self.budget!r}")
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
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples!r}")
        _check_pilot_settings(self)

    def cost(self, name: str) -> float:
        return dict(self.costs).get(name, 1.0)

    def cap(self, name: str) -> int | None:
        return dict(self.caps).get(name)

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, 1.0)

    def pilot_config(self) -> "PilotConfig":
        """The part of the plan the pilot measurements depend on."""
        return PilotConfig(pilot_sizes=self.pilot_sizes, seed=self.seed, device=self.device, dtype=self.dtype,
                           batch_size=self.batch_size)

    def curve_settings(self) -> dict:
        """What the pilot measurements depend on (their cache key's settings):
        not the budget, costs, caps, weights or resamples, which only refit
        and reallocate."""
        return self.pilot_config().curve_settings()


@dataclass(frozen=True)
class PilotConfig(ConfigRecord):
    """The settings the pilot measurements depend on, and nothing else: what
    a plan job (`dowsing.jobs`, kind "plan") runs and caches. A PlanConfig
    with the same fields has the same curve_settings, so the job and
    `run_plan` share one cached measurement."""

    record_name = "pilot"

    pilot_sizes: tuple = PILOT_SIZES
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "pilot_sizes", tuple(int(n) for n in self.pilot_sizes))
        _check_pilot_settings(self)

    def curve_settings(self) -> dict:
        return {"pilot_sizes": list(self.pilot_sizes), "seed": self.seed, "device": self.device,
                "dtype": self.dtype, "batch_size": self.batch_size, "recipe": PILOT_RECIPE.label()}


def _check_pilot_settings(config) -> None:
    """A one-line ValueError for pilot sizes, device, dtype or batch size that cannot run."""
    if not config.pilot_sizes or min(config.pilot_sizes) < 1:
        raise ValueError(f"pilot_sizes must be integers >= 1, got {config.pilot_sizes!r}")
    if config.device not in DEVICES or config.dtype not in DTYPES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} and dtype one of {', '.join(DTYPES)}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size!r}")


def _whole(value) -> int:
    """A cap: a whole number of examples >= 0."""
    number = float(value)
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise ValueError(f"a cap must be a whole number of examples >= 0, got {value!r}")
    return int(number)


def check_plan(config: PlanConfig, domains) -> None:
    """A one-line ValueError when the costs, caps or weights name a domain
    that is not among `domains`."""
    names = {d.name for d in as_domains(domains)}
    for what, pairs in (("costs", config.costs), ("caps", config.caps), ("weights", config.weights)):
        unknown = [name for name, _ in pairs if name not in names]
        if unknown:
            raise ValueError(f"the {what} name domain(s) not among the domains: {', '.join(map(repr, unknown))} "
                             f"(domains: {', '.join(sorted(names))})")


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
    (held-out half B first, as the per-fact drops are laid out)."""
    from .pilots import pilot_sizes
    from .splitting import split_domains
    from .subspace import find_anatomy
    from .units import loaded_identity, pilot_key, recomputed_message

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
    forward_s = 0.0
    if todo:
        forward_s = _measure_curves(loaded, [train[k] for k in todo], [held[k] for k in todo],
                                    [curves[k] for k in todo], config, recipe, depth - blocks, units, report)
    measured = []
    for domain, a, b, c in zip(domains, train, held, curves):
        curve = c["curve"]
        entry = {"name": domain.name, "n_facts": len(domain.facts),
                 "mean_loss": float(np.mean(curve["losses_a"] + curve["losses_b"])),
                 "sizes": [], "drop": [], "per_fact_by_size": [], "strata": [], "seconds": []}
        if curve.get("sizes"):
            entry.update({key: curve[key] for key in ("sizes", "drop", "per_fact_by_size", "seconds")},
                         strata=[len(b.facts), len(a.facts)])
        measured.append(entry)
    report(Progress("pilots", 0.95, "pilot fine-tunes done"))
    return finite_or_none({"model": loaded.info.to_dict(), "recipe": recipe.label(), "forward_s": forward_s,
                           "pilot_s": time.perf_counter() - t0 - forward_s, "domains": measured})


def _measure_curves(loaded, train: list, held: list, curves: list, config, recipe, capture_block: int, units,
                    report) -> float:
    """One forward pass over these domains' halves, then each one's pilot
    curve (none for a domain whose halves cannot hold MIN_HALF facts) into
    curves[j]["curve"] with its halves' per-fact losses, kept in `units`.
    Returns the forward pass's seconds."""
    import torch

    from .forward import split_pass

    report(Progress("forward", 0.03, f"forward pass over {sum(len(a.facts) + len(b.facts) for a, b in zip(train, held))} facts"))
    split = split_pass(loaded, train, held, config.batch_size, capture_block=capture_block)
    losses = split.tokens.fact_losses
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the model's loss is not finite on {len(bad)} fact(s): the weights may be corrupt or the "
                         "dtype too narrow")
    trainer = None
    for j, domain in enumerate(train):
        report(Progress("pilots", 0.05 + 0.9 * j / len(train),
                        f"pilot fine-tunes, domain {j + 1} of {len(train)} to measure: {domain.name}"))
        rows_a, rows_b = list(split.train_rows[j]), list(split.held_rows[j])
        curve = {}
        if min(len(rows_a), len(rows_b)) >= MIN_HALF:
            trainer = trainer or _pilot_trainer(loaded, split)
            curve = pilot_curve(trainer, recipe, config.seed, rows_a, rows_b, config.pilot_sizes)
        curve.update(losses_a=[float(losses[r]) for r in rows_a], losses_b=[float(losses[r]) for r in rows_b])
        curves[j]["curve"] = curve
        if units is not None and curve.get("sizes"):
            units.put("pilot", curves[j]["key"], domain.name, curve)
    return split.forward_s


def _pilot_trainer(loaded, split):
    """The TailTrainer of the pilots, checked to reproduce the model's
    losses; a one-line ValueError for an architecture it cannot cut."""
    from .training import TailTrainer

    try:
        trainer = TailTrainer(loaded, split)
        trainer.check()
    except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"the pilot fine-tunes cannot run on this model: {exc}") from exc
    return trainer


@dataclass
class DomainCurve:
    """One domain's learning curve with what the plan reads beside it."""

    name: str
    n_facts: int
    mean_loss: float
    curve: LearningCurve


def domain_seed(seed: int, name: str) -> int:
    """The bootstrap seed of one domain: from (seed, name), so a domain's
    band does not move when other domains are added or reordered."""
    return int.from_bytes(hashlib.sha256(f"plan:{seed}:{name}".encode()).digest()[:8], "little")


def fit_pilots(measured: dict, config: PlanConfig) -> list:
    """Each measured domain's `curves.fit_curve` (halves resampled
    separately, `config.bootstrap_resamples` resamples seeded by
    `domain_seed`); a domain too small for a pilot gets no curve and says
    why."""
    out = []
    for entry in measured["domains"]:
        if entry["sizes"]:
            per_fact = [[np.nan if v is None else v for v in row] for row in entry["per_fact_by_size"]]
            curve = fit_curve(entry["sizes"], per_fact, entry["strata"], config.bootstrap_resamples,
                              domain_seed(config.seed, entry["name"]))
        else:
            curve = LearningCurve([], [], reason=f"too few facts for a pilot: each half needs {MIN_HALF} "
                                                 f"(the domain has {entry['n_facts']})")
        out.append(DomainCurve(entry["name"], entry["n_facts"], entry["mean_loss"], curve))
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
    plan's total minus each baseline's with its paired band."""

    model: dict
    config: dict
    domains: list
    totals: dict
    allocation: dict
    pilot: dict
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    created_at: str = ""

    def row(self, name: str) -> dict:
        return next(d for d in self.domains if d["domain"] == name)


def total_draws(curves: list, counts: list, weights: list) -> tuple:
    """(sum_k w_k gain_k(m_k) over the domains with a curve, the same total
    for every bootstrap resample r: resample r of every domain together, the
    domains' resamples being independent; 0.0 where nothing is bought)."""
    gain, draws = 0.0, 0.0
    for dc, m, w in zip(curves, counts, weights):
        if dc.curve.identifiable and m > 0:
            gain += w * dc.curve.gain(dc.n_facts, m)
            draws = draws + w * dc.curve.gain_draws(dc.n_facts, m)
    return float(gain), draws


def _band(point: float, draws) -> list:
    """The 90% band of resampled values (a point without resamples: itself)."""
    return [float(b) for b in (np.quantile(draws, BAND) if np.ndim(draws) else (point, point))]


def predicted_total(curves: list, counts: list, weights: list) -> dict:
    """A plan's weighted total gain, its 90% band (`total_draws`) and its counts."""
    gain, draws = total_draws(curves, counts, weights)
    return {"gain": gain, "band": _band(gain, draws), "counts": {dc.name: int(m) for dc, m in zip(curves, counts)}}


def paired_difference(curves: list, counts: list, other: list, weights: list) -> dict:
    """The plan's total minus another plan's, with the 90% band of the
    difference over the same resamples (paired: what both plans share of a
    curve's uncertainty cancels)."""
    gain, draws = total_draws(curves, counts, weights)
    base, base_draws = total_draws(curves, other, weights)
    return {"gain": gain - base, "band": _band(gain - base, np.subtract(draws, base_draws))}


def baseline_counts(curves: list, config: PlanConfig) -> dict:
    """The two plans the greedy one is set against: "even", the budget split
    equally, m_k = min(cap_k, floor(B / (K c_k))) on every domain; and
    "highest_loss", m = min(cap, floor(B / c)) on the domain of highest
    mean loss alone."""
    share = config.budget / len(curves)
    even = [most_examples(share, config.cost(dc.name), config.cap(dc.name)) for dc in curves]
    top = max(range(len(curves)), key=lambda k: curves[k].mean_loss)
    highest = [0] * len(curves)
    highest[top] = most_examples(config.budget, config.cost(curves[top].name), config.cap(curves[top].name))
    return {"even": even, "highest_loss": highest, "highest_loss_domain": curves[top].name}


def domain_row(dc: DomainCurve, m: int, config: PlanConfig) -> dict:
    """One domain's line of the plan."""
    curve, have = dc.curve, dc.n_facts
    row = {"domain": dc.name, "n_facts": have, "mean_loss": dc.mean_loss, "collect": int(m),
           "cost": m * config.cost(dc.name), "cost_per_example": config.cost(dc.name),
           "weight": config.weight(dc.name), "cap": config.cap(dc.name), "identifiable": curve.identifiable,
           "form": curve.form, "fit_error": curve.loo_error, "reason": curve.reason, "fit": curve.to_dict(),
           "gain": None, "gain_band": None, "marginal_gain_last": None, "marginal_gain_next": None}
    if curve.identifiable:
        row.update(gain=curve.gain(have, m), gain_band=list(curve.gain_band(have, m)),
                   marginal_gain_last=curve.gain(have + m - 1, 1) if m > 0 else None,
                   marginal_gain_next=curve.gain(have + m, 1))
    return row


def build_plan(curves: list, config: PlanConfig, measured: dict | None = None) -> PlanResult:
    """The plan from the domains' curves: `allocate` with the config's
    costs, caps and weights, each domain's line (`domain_row`) and the
    totals of the plan and of the baselines (`predicted_total`). Instant:
    no model."""
    t0 = time.perf_counter()
    names = [dc.name for dc in curves]
    costs = [config.cost(n) for n in names]
    weights = [config.weight(n) for n in names]
    gains = [(lambda m, dc=dc: dc.curve.gain(dc.n_facts, m)) if dc.curve.identifiable else None for dc in curves]
    bought = allocate(gains, config.budget, costs, [config.cap(n) for n in names], weights)
    base = baseline_counts(curves, config)
    totals = {"plan": predicted_total(curves, bought.counts, weights),
              "even": predicted_total(curves, base["even"], weights),
              "highest_loss": {**predicted_total(curves, base["highest_loss"], weights),
                               "domain": base["highest_loss_domain"]}}
    for key in totals:
        totals[key]["spent"] = float(sum(c * m for c, m in zip(costs, totals[key]["counts"].values())))
    for key in ("even", "highest_loss"):
        totals[key]["plan_minus_this"] = paired_difference(curves, bought.counts, base[key], weights)
    measured = measured or {}
    pilot = {"recipe": measured.get("recipe", PILOT_RECIPE.label()), "sizes": list(config.pilot_sizes),
             "forward_s": measured.get("forward_s"), "pilot_s": measured.get("pilot_s")}
    allocation = {"budget": config.budget, "budget_unit": config.budget_unit, "spent": bought.spent,
                  "left": config.budget - bought.spent, "step": bought.step, "gap_bound": bought.gap_bound}
    return PlanResult(model=measured.get("model", {}), config=config.to_dict(),
                      domains=[domain_row(dc, m, config) for dc, m in zip(curves, bought.counts)],
                      totals=totals, allocation=allocation, pilot=pilot,
                      notes=plan_notes(curves, bought, pilot["recipe"]), timings={"plan": time.perf_counter() - t0},
                      created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def plan_notes(curves: list, bought: Allocation, recipe: str) -> list:
    """What the user must know to read the plan."""
    notes = [f"Gains are drops of held-out loss (nats per fact) after the pilot recipe ({recipe}): they rank the "
             "domains and split the budget; a full training run's nats differ."]
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
    settings: dict = field(default_factory=dict)
    cache_key: str = ""
    cached: bool = False
    created_at: str = ""


def pilot_measurements(model_id: str | None, domains, config: PlanConfig | PilotConfig,
                       progress: Callable[[Progress], None] | None = None,
                       use_cache: bool = True) -> PilotMeasurements:
    """The cached half of a plan: the pilot measurements of `plan_key`, from
    cache/plans, else measured (the model loaded, `measure_pilots`) and
    stored there."""
    from .models import load_model
    from .store import JsonStore

    report = progress or (lambda p: None)
    domains = as_domains(domains)
    key = plan_key(model_id, domains, config)
    store = JsonStore("plans")
    measured = store.get(key) if use_cache else None
    cached = measured is not None
    if measured is None:
        from .units import DomainUnits

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


PLAN_ROW_FIELDS = ("domain", "n_facts", "mean_loss", "collect", "cost_per_example", "cost", "weight", "cap", "gain",
                   "gain_5pct", "gain_95pct", "marginal_gain_last", "form", "fit_error", "reason")


def plan_rows(result: PlanResult) -> list:
    """One flat row per domain (PLAN_ROW_FIELDS), for a table or a CSV: the
    examples to collect and their cost, the predicted gain with its 90%
    band (5% and 95% quantiles), the gain of the last example bought, the
    form and leave-one-out error of the fit or why there is none."""
    rows = []
    for d in result.domains:
        band = d["gain_band"] or [None, None]
        rows.append({"domain": d["domain"], "n_facts": d["n_facts"], "mean_loss": d["mean_loss"],
                     "collect": d["collect"], "cost_per_example": d["cost_per_example"], "cost": d["cost"],
                     "weight": d["weight"], "cap": d["cap"], "gain": d["gain"], "gain_5pct": band[0],
                     "gain_95pct": band[1], "marginal_gain_last": d["marginal_gain_last"], "form": d["form"],
                     "fit_error": d["fit_error"], "reason": d["reason"]})
    return rows


def fit_text(row: dict) -> str:
    """A plan row's fit for people: "power (LOO error 0.0013)", or "not
    identifiable: " and the reason."""
    if row["form"] is None:
        return f"not identifiable: {row['reason']}"
    return row["form"] + (f" (LOO error {row['fit_error']:.2g})" if row["fit_error"] is not None else "")


def plan_csv(result: PlanResult) -> str:
    """`plan_rows` as CSV with a header row; a missing value is an empty cell."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PLAN_ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in plan_rows(result))
    return out.getvalue()


def format_plan(result: PlanResult) -> str:
    """The plan as text: one line per domain, the totals against the two
    baselines, and the notes."""
    alloc, unit = result.allocation, result.allocation["budget_unit"]
    header = ["Domain", "Facts", "Mean loss", "Fit (LOO error)", "Collect", "Cost", "Gain [90% band]",
              "Last example"]
    rows = []
    for d in result.domains:
        fit = (f"{d['form']} ({_g(d['fit_error'])})" if d["identifiable"] else "not identifiable")
        gain = f"{_g(d['gain'])} [{_g(d['gain_band'][0])}, {_g(d['gain_band'][1])}]" if d["identifiable"] else "—"
        rows.append([d["domain"], str(d["n_facts"]), f"{d['mean_loss']:.3f}", fit, str(d["collect"]),
                     _g(d["cost"]), gain, _g(d["marginal_gain_last"])])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [f"Collection plan: budget {alloc['budget']:g} {unit}, spent {alloc['spent']:g}; pilot "
             f"{result.pilot['recipe']} at n = {', '.join(map(str, result.pilot['sizes']))} facts of a half "
             "(at most the smaller half)", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    t = result.totals
    lines += ["", "Predicted total gain (weighted, nats) [90% band]; this plan minus each [paired 90% band]:"]
    for key, label in (("plan", "this plan"), ("even", "spread evenly"),
                       ("highest_loss", f"all on {t['highest_loss']['domain']} (highest mean loss)")):
        line = f"  {label}: {_g(t[key]['gain'])} [{_g(t[key]['band'][0])}, {_g(t[key]['band'][1])}]"
        if "plan_minus_this" in t[key]:
            diff = t[key]["plan_minus_this"]
            line += f"; plan minus this {_g(diff['gain'])} [{_g(diff['band'][0])}, {_g(diff['band'][1])}]"
        lines.append(line)
    return "\n".join(lines + ["", "Notes:"] + [f"  {n}" for n in result.notes])


def _g(value) -> str:
    return "—" if value is None else f"{value:.3g}"
