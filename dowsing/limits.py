"""The largest input a run accepts, in one place.

Domain sets come from files, forms and shared links; without a bound, one
pasted file can ask for days of work and more memory than any machine has.
The caps sit well above the shipped sets (the benchmark: 37 domains, at most
60 facts of at most 166 bytes each) and are stated in the README.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """max_domains: domains in one set; max_facts_per_domain: facts in one
    domain; max_fact_bytes: one fact's length in UTF-8 bytes; max_total_tokens:
    the tokens of all facts together, as the model's tokenizer counts them."""

    max_domains: int = 100
    max_facts_per_domain: int = 2000
    max_fact_bytes: int = 4000
    max_total_tokens: int = 200_000


LIMITS = Limits()


def too_many_tokens(total: int, limits: Limits | None = None) -> str | None:
    """The sentence refusing `total` tokens, or None when within the cap
    (`limits`, else `LIMITS`)."""
    limits = limits or LIMITS
    if total <= limits.max_total_tokens:
        return None
    return (f"the facts come to more than {limits.max_total_tokens:,} tokens, the most a run accepts; "
            "use fewer or shorter facts.")
