"""The collection protocol: what collecting more of a domain really does.

Each domain's facts are shuffled (seeded by the run's seed and the domain's
name) and cut into a *sample* (what the user has: the only facts any
estimator sees), *test* facts, and a *pool* (what collecting more would
bring; never seen by an estimator). The ground truth is a dose-response:

* baseline: the last blocks fine-tuned on minibatches of every domain's
  sample (the user's mixture), the same minibatches in every run of a seed;
* dose n of domain k: the same run plus, at every step, a minibatch of the
  first n facts of k's pool, walked in seeded permutations so each is seen
  at least twice, with weight added_weight * n / n_max: every added fact
  carries the same total weight whatever n, as in a mixture that grows by n
  facts;
* gain_k(n) = mean test loss of k after the baseline - after dose n. The
  ranking target is gain_k(n_max).

The second reading is the benchmark's earlier recipe on the same split: the
same baseline plus minibatches of k's own sample (weight 1), so the data
added is what the estimators scored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random

import numpy as np

from ..domains import Domain, as_domains
from ..kernels.training import Recipe, TailTrainer


def facts_needed(sample: int, test: int, doses) -> int:
    """Facts a domain needs for the protocol: its sample, its test facts and
    a pool as large as the largest dose."""
    return sample + test + max(doses)


def check_protocol_domains(domains, sample: int, test: int, doses) -> list:
    """The domains, each checked to fill the protocol's sample, test facts
    and pool; a one-line ValueError naming the first that cannot."""
    domains = as_domains(domains)
    need = facts_needed(sample, test, doses)
    for d in domains:
        if len(d.facts) < need:
            raise ValueError(f"Domain {d.name!r} has {len(d.facts)} facts; the collection protocol needs {need}: "
                             f"a sample of {sample}, {test} test facts and a pool of {max(doses)} for the largest "
                             f"dose.")
    if len(domains) < 2:
        raise ValueError("The benchmark needs at least 2 domains.")
    return domains


def collection_split(domains, seed: int, sample: int, test: int) -> dict:
    """{"sample", "test", "pool"}: lists of Domain in the domains' order. A
    domain's facts are shuffled by a generator seeded by (seed, name); the
    first `sample` are its sample, the next `test` its test facts and the
    rest its pool, in that shuffled order (dose n takes the pool's first n)."""
    out = {"sample": [], "test": [], "pool": []}
    for d in as_domains(domains):
        order = list(d.facts)
        random.Random(f"collection:{seed}:{d.name}").shuffle(order)
        out["sample"].append(Domain(d.name, tuple(order[:sample])))
        out["test"].append(Domain(d.name, tuple(order[sample: sample + test])))
        out["pool"].append(Domain(d.name, tuple(order[sample + test:])))
    return out


def dose_steps(recipe: Recipe, n_max: int) -> int:
    """Steps of every run of the protocol: the recipe's, or more where its
    added minibatches would not show each of n_max facts twice."""
    return max(recipe.steps, math.ceil(2 * n_max / recipe.added_batch))


# --- units: each one fine-tune from the starting weights on the truth pass ----------------------------------
# The truth pass's training rows of domain k are its sample (the first `sample` rows) then its pool;
# its held-out rows are k's test facts.

def _base(trainer: TailTrainer, sample: int) -> list:
    return [r for rows in trainer.data.train_rows for r in rows[:sample]]


def dose_baseline(trainer: TailTrainer, recipe: Recipe, seed: int, steps: int, sample: int) -> dict:
    """Every domain's test losses before training and after the baseline run."""
    tests = [r for rows in trainer.data.held_rows for r in rows]
    trainer.reset()
    before = trainer.losses(tests)
    trainer.train(recipe, seed, _base(trainer, sample), steps=steps)
    return {"before": before, "baseline": trainer.losses(tests)}


def dose_losses(trainer: TailTrainer, recipe: Recipe, seed: int, steps: int, sample: int, k: int, n: int,
                n_max: int):
    """Domain k's test losses after the run that adds the first n facts of
    its pool (weight added_weight * n / n_max, each seen at least twice)."""
    pool = trainer.data.train_rows[k][sample: sample + n]
    trainer.train(recipe, seed, _base(trainer, sample), added=pool, added_weight=recipe.added_weight * n / n_max,
                  steps=steps, cycle_added=True)
    return trainer.losses(trainer.data.held_rows[k])


def sample_reading_losses(trainer: TailTrainer, recipe: Recipe, seed: int, steps: int, sample: int, k: int):
    """Domain k's test losses after the run that adds minibatches of its own
    sample (the facts the estimators scored) with the recipe's weight."""
    trainer.train(recipe, seed, _base(trainer, sample), added=trainer.data.train_rows[k][:sample], steps=steps)
    return trainer.losses(trainer.data.held_rows[k])


def plan_run_losses(trainer: TailTrainer, recipe: Recipe, seed: int, steps: int, sample: int, counts: tuple,
                    n_max: int):
    """Every domain's test losses after the run that adds the first
    counts[k] pool facts of every domain k at once: the baseline's
    minibatches plus minibatches walking seeded permutations of the B added
    facts, each seen at least twice (the added minibatch grows to
    ceil(2 B / steps) where the recipe's is smaller), with weight
    added_weight * B / n_max, so every added fact carries the weight it
    carries in a dose run."""
    added = [r for k, m in enumerate(counts) for r in trainer.data.train_rows[k][sample: sample + m]]
    tests = [r for rows in trainer.data.held_rows for r in rows]
    if not added:
        trainer.train(recipe, seed, _base(trainer, sample), steps=steps)
        return trainer.losses(tests)
    wide = dataclasses.replace(recipe, added_batch=max(recipe.added_batch, math.ceil(2 * len(added) / steps)))
    trainer.train(wide, seed, _base(trainer, sample), added=added,
                  added_weight=recipe.added_weight * len(added) / n_max, steps=steps, cycle_added=True)
    return trainer.losses(tests)


def plan_units(recipe: Recipe, seed: int, doses, sample: int, allocations: dict) -> list:
    """One seed's plan-check runs: {(budget, allocation name): counts} ->
    one unit each, on the protocol's steps."""
    from ..pipelines.executor import Unit

    n_max = max(doses)
    steps = dose_steps(recipe, n_max)
    prefix = f"plan/{recipe.name}/{recipe.label()}/seed{seed}/sample{sample}/steps{steps}"
    # the counts are in the key: a stored run is reused only for the same allocation
    return [Unit(f"{prefix}/B{budget}/{name}/{_digest(counts)}",
                 ("plan_run", recipe, seed, steps, sample, tuple(counts), n_max))
            for (budget, name), counts in allocations.items()]


def _digest(counts) -> str:
    return hashlib.sha256(",".join(str(int(m)) for m in counts).encode()).hexdigest()[:12]


def protocol_units(recipe: Recipe, seed: int, n_domains: int, doses, sample: int, second_reading: bool) -> list:
    """One seed of one recipe: the baseline, every domain at every dose, and
    (second_reading) every domain with its sample added."""
    from ..pipelines.executor import Unit

    n_max = max(doses)
    steps = dose_steps(recipe, n_max)
    prefix = f"dose/{recipe.name}/{recipe.label()}/seed{seed}/sample{sample}/steps{steps}"
    units = [Unit(f"{prefix}/baseline", ("dose_baseline", recipe, seed, steps, sample))]
    for k in range(n_domains):
        units += [Unit(f"{prefix}/domain{k}/n{n}", ("dose", recipe, seed, steps, sample, k, n, n_max))
                  for n in sorted(doses)]
        if second_reading:
            units.append(Unit(f"{prefix}/domain{k}/sample", ("sample_reading", recipe, seed, steps, sample, k)))
    return units


def protocol_unit(trainer: TailTrainer, kind: str, recipe: Recipe, seed: int, *args):
    """One unit of the protocol's ground truth on a trainer."""
    if kind == "dose_baseline":
        return dose_baseline(trainer, recipe, seed, *args)
    if kind == "dose":
        return dose_losses(trainer, recipe, seed, *args)
    if kind == "sample_reading":
        return sample_reading_losses(trainer, recipe, seed, *args)
    if kind == "plan_run":
        return plan_run_losses(trainer, recipe, seed, *args)
    raise ValueError(f"unknown unit kind {kind!r}")


def protocol_gains(test_rows: list, values: dict, units: list, n_domains: int, doses) -> dict:
    """One seed's readings from its units' values: {"dose": {n: [gain per
    domain]}, "sample": [gain per domain] or None, "baseline_drop": [per
    domain]}, gain = mean test loss after the baseline - after the run."""
    offsets, start = [], 0
    for rows in test_rows:
        offsets.append(list(range(start, start + len(rows))))
        start += len(rows)
    base = values[units[0].key]
    baseline, before = base["baseline"], base["before"]
    own = [float(baseline[offsets[k]].mean()) for k in range(n_domains)]
    dose = {int(n): [None] * n_domains for n in doses}
    sample = None
    for unit in units[1:]:
        kind, k = unit.args[0], unit.args[5]
        after = float(np.mean(np.asarray(values[unit.key], dtype=float)))
        if kind == "dose":
            dose[int(unit.args[6])][k] = own[k] - after
        else:
            sample = sample or [None] * n_domains
            sample[k] = own[k] - after
    return {"dose": dose, "sample": sample,
            "baseline_drop": [float((before[o] - baseline[o]).mean()) for o in offsets]}
