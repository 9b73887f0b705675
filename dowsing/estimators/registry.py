"""The estimator registry: every estimator is declared once, where its
family computes it, and everything else (the analysis's ranking step, the
benchmark, the quick validation, the CLI's choices and help, the app's
pickers, the evidence file) reads it from here.

An estimator turns each domain's facts into one priority: the larger, the
more that domain's data is predicted to help. A family is a group of
estimators that share their expensive work (one pass of per-fact gradients,
one trajectory of checkpoints) and one compute function that returns an
`EstimatorScore` per asked estimator, and one cost function that prices
that work before a run (`estimate` sums it into a pipeline's stages).
Adding an estimator to a family is one `register` call and its branch in
that family's module (its compute and its cost).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..costs import Cost

# What an estimator can need beyond the forward pass's per-token quantities.
NEEDS = {
    "held_out": "a held-out half of each domain's facts",
    "block_inputs": "each fact's input to the first trained block",
    "trajectory": "a trajectory of checkpoints (yours, or a recorded fine-tune)",
    "checkpoints": "your model's training checkpoints (in an analysis)",
    "counterfactuals": "counterfactual fine-tunes to train an encoder on",
}


@dataclass(frozen=True)
class Estimator:
    """One estimator as every caller sees it.

    family: the module that computes it (`FAMILIES`).
    needs: keys of NEEDS.
    in_analysis: offered as an analysis's ranking estimator.
    in_validation / in_benchmark: on the quick validation's or the
        benchmark's leaderboard by default.
    summary: one phrase for the CLI's help and the app's pickers.
    """

    name: str
    label: str
    family: str
    summary: str
    needs: frozenset = frozenset()
    in_analysis: bool = False
    in_validation: bool = True
    in_benchmark: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
        unknown = self.needs - set(NEEDS)
        if unknown:
            raise ValueError(f"estimator {self.name!r}: unknown needs {sorted(unknown)}")


@dataclass
class EstimatorScore:
    """One estimator's scores: priority[k] per domain, per_example[k] per
    fact of domain k (numbers whose mean is the priority; None where the
    estimator has no per-fact form), seconds including the shared forward
    pass, details (solver cost, parameter counts) and notes for the user."""

    name: str
    label: str
    priority: list
    per_example: list | None
    time_s: float
    details: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EstimatorScore":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Family:
    """A family's compute function: (context, names) -> [EstimatorScore] in
    the order of names, for estimators of this family only; its cost
    function: (calibration, costs.RunShape, names) -> costs.Cost, the
    seconds and extra bytes of computing those names in that run (None:
    priced as free); stage: the name of its stage in an estimate."""

    name: str
    compute: Callable
    cost: Callable | None = None
    stage: str = ""

    def price(self, cal, run, members):
        """The family's costs.Cost for these members in this run."""
        if self.cost is None:
            return Cost(0.0, 0.0)
        return self.cost(cal, run, list(members))


ESTIMATORS: dict[str, Estimator] = {}
FAMILIES: dict[str, Family] = {}


def register(estimator: Estimator) -> Estimator:
    if estimator.name in ESTIMATORS:
        raise ValueError(f"estimator {estimator.name!r} is registered twice")
    ESTIMATORS[estimator.name] = estimator
    return estimator


def unregister(name: str) -> None:
    """Remove an estimator (for tests that register a toy one)."""
    ESTIMATORS.pop(name, None)


def register_family(name: str, compute: Callable, cost: Callable | None = None, stage: str = "") -> Family:
    FAMILIES[name] = Family(name, compute, cost, stage or f"{name} estimators")
    return FAMILIES[name]


def unregister_family(name: str) -> None:
    """Remove a family and its estimators (for tests that register a toy one)."""
    for estimator in [n for n, e in ESTIMATORS.items() if e.family == name]:
        ESTIMATORS.pop(estimator)
    FAMILIES.pop(name, None)


def get(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}") from None


def names(where: str | None = None) -> tuple:
    """Registered estimator names in registration order; where = "analysis",
    "validation" or "benchmark" keeps those offered there."""
    if where is None:
        return tuple(ESTIMATORS)
    flag = {"analysis": "in_analysis", "validation": "in_validation", "benchmark": "in_benchmark"}[where]
    return tuple(n for n, e in ESTIMATORS.items() if getattr(e, flag))


def label(name: str) -> str:
    return get(name).label


def check_names(wanted, where: str | None = None) -> tuple:
    """The names, checked against the registry (one-line ValueError)."""
    allowed = names(where)
    bad = [n for n in wanted if n not in allowed]
    if bad:
        place = f" for the {where}" if where else ""
        raise ValueError(f"unknown estimator(s){place}: {', '.join(bad)}; choose from {', '.join(allowed)}")
    return tuple(wanted)


def by_family(wanted) -> dict:
    """{family: [names]} of the wanted estimators, families in registry order."""
    out: dict = {}
    for name in ESTIMATORS:
        if name in wanted:
            out.setdefault(ESTIMATORS[name].family, []).append(name)
    return out


def compute(ctx, wanted) -> list:
    """Every wanted estimator's EstimatorScore (in the order asked), each
    family computing its members together in this process."""
    wanted = check_names(wanted)
    groups = by_family(wanted)
    scores = {}
    for i, (family, members) in enumerate(groups.items()):
        def within(fraction, message, i=i):
            ctx.progress((i + fraction) / len(groups), message)

        part = dataclasses.replace(ctx, progress=within)
        scores.update({s.name: s for s in FAMILIES[family].compute(part, members)})
    return [scores[n] for n in wanted]


def family_unit(ctx, family: str, members: tuple) -> list:
    """One family as a unit of work for the executor: plain dicts, so a
    worker can send them back and the unit store can keep them."""
    return [s.to_dict() for s in FAMILIES[family].compute(ctx, list(members))]
