"""The training / held-out split of each domain, and the shipped benchmark
domains."""
from __future__ import annotations

import random

from ..analysis import _as_domains
from ..domains import Domain

def split_domains(domains, seed: int = 0, held_out_fraction: float = 0.5, held_out=None):
    """(train, held) lists of Domain. Each domain's facts are shuffled with a
    generator seeded by (seed, domain name) and the last
    round(fraction * N) become held-out (at least 1, leaving at least 1 to train).
    held_out: optional {name: [facts]} given by the user; then all of a
    domain's facts train and these are its held-out facts."""
    domains = _as_domains(domains)
    train, held = [], []
    for d in domains:
        if held_out is not None:
            if d.name not in held_out or not held_out[d.name]:
                raise ValueError(f"The held-out list has no facts for domain {d.name!r}.")
            train.append(d)
            held.append(Domain(d.name, tuple(held_out[d.name])))
            continue
        facts = list(d.facts)
        if len(facts) < 2:
            raise ValueError(f"Domain {d.name!r} needs at least 2 facts to split into training and held-out.")
        random.Random(f"{seed}:{d.name}").shuffle(facts)
        n_held = min(max(1, round(held_out_fraction * len(facts))), len(facts) - 1)
        train.append(Domain(d.name, tuple(facts[: len(facts) - n_held])))
        held.append(Domain(d.name, tuple(facts[len(facts) - n_held:])))
    return train, held




def benchmark_file():
    from ..domains import DATA_DIR

    return DATA_DIR / "benchmark.json"


def benchmark_domains(quick: bool = False) -> list:
    """The shipped benchmark domains (27 of 40 facts), or the quick set of
    six when quick."""
    import json

    data = json.loads(benchmark_file().read_text(encoding="utf-8"))
    keep = set(data["quick"]) if quick else None
    return [Domain(d["name"], tuple(d["facts"])) for d in data["domains"] if keep is None or d["name"] in keep]


def benchmark_groups() -> dict:
    """{domain name: familiarity group} of the shipped benchmark domains."""
    import json

    return dict(json.loads(benchmark_file().read_text(encoding="utf-8"))["groups"])
