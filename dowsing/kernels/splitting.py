"""The one seeded split of a domain's facts into two parts, used wherever
facts are split: the benchmark's training and held-out halves, the quick
validation's, and the analysis' halves for the held-out estimators."""
from __future__ import annotations

import random

from ..domains import Domain, as_domains


def split_order(items: list, name: str, seed: int, fraction: float = 0.5) -> tuple[list, list]:
    """(first, second): the items shuffled by a generator seeded by
    (seed, name); the last round(fraction * N) (at least 1, leaving at least
    1) are the second part. The same permutation for facts and for row
    numbers, so a domain's rows split exactly as its facts do."""
    order = list(items)
    random.Random(f"{seed}:{name}").shuffle(order)
    n_second = min(max(1, round(fraction * len(order))), len(order) - 1)
    return order[: len(order) - n_second], order[len(order) - n_second:]


def split_domains(domains, seed: int = 0, held_out_fraction: float = 0.5, held_out=None):
    """(train, held) lists of Domain, each domain split by `split_order`.
    held_out: optional {name: [facts]} given by the user; then all of a
    domain's facts train and these are its held-out facts."""
    domains = as_domains(domains)
    train, held = [], []
    for d in domains:
        if held_out is not None:
            if d.name not in held_out or not held_out[d.name]:
                raise ValueError(f"The held-out list has no facts for domain {d.name!r}.")
            train.append(d)
            held.append(Domain(d.name, tuple(held_out[d.name])))
            continue
        if len(d.facts) < 2:
            raise ValueError(f"Domain {d.name!r} needs at least 2 facts to split into training and held-out.")
        first, second = split_order(list(d.facts), d.name, seed, held_out_fraction)
        train.append(Domain(d.name, tuple(first)))
        held.append(Domain(d.name, tuple(second)))
    return train, held
