"""The result of one analysis: what the JSON file, the CLI table and the app show."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import pandas as pd

# Part of every cache key: a result computed by an older engine (another diagnosis, another
# order of stages) is recomputed, not shown with today's labels.
ENGINE_VERSION = "1.7.2"

# The paper's estimator, which ranks by the analysis' own solve. This base
# module sits below the estimator registry and cannot import it, so it spells
# the name itself (tests/test_registry.py pins it to estimators.PAPER).
PAPER_ESTIMATOR = "paper"


@dataclass
class DomainResult:
    name: str
    rank: int  # by priority, descending (ties keep the domains' order)
    mean: float  # the paper's Mean_k = mean_i I_ki = g_k^T z_k
    # |priority_k| / sum_j |priority_j| * 100; with the paper's estimator
    # |sum_i I_ki| / sum_j |sum_i I_ji| * 100
    share_pct: float
    t_vs_rest: float | None  # Welch's t of the estimator's per-fact values against all other domains'
    p_value: float | None  # two-sided
    n_facts: int
    delta_n_10pct: float | None  # from the power-law fit; None with a reason
    delta_n_direct: float | None  # root of mu_k(N_k + dn) = 0.1 mu_k(N_k)
    delta_n_reason: str | None  # why delta_n_10pct is None
    saturation: dict  # {alpha, n0, c, r2, points: [[n, mu], ...]}
    solver: dict  # {method, iterations, rel_residual, nonpositive_curvature}
    concept_vector_norm: float  # ||mean hidden state|| before normalising
    # The ranking estimator's score (config["estimator"]); None in results of
    # engines before 1.3.0, which ranked by the paper's Mean.
    priority: float | None = None

    @property
    def ranking_priority(self) -> float:
        """What ranked this domain: the priority, or Mean for older results."""
        return self.mean if self.priority is None else self.priority


@dataclass
class Result:
    model: dict
    config: dict
    domains: list[DomainResult]
    per_example: list[dict]  # [{domain, text, influence}]
    timings: dict  # seconds per stage
    engine_version: str = ENGINE_VERSION
    created_at: str = ""
    cache_key: str = ""
    extras: dict = field(default_factory=dict)  # optional additions (transfer, bootstrap)

    def to_dict(self) -> dict:
        return finite_or_none(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        domains = [DomainResult(**d) for d in data["domains"]]
        rest = {k: v for k, v in data.items() if k != "domains"}
        return cls(domains=domains, **rest)

    @classmethod
    def from_json(cls, text: str) -> "Result":
        return cls.from_dict(json.loads(text))

    def domain(self, name: str) -> DomainResult:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(name)

    def ranked(self) -> list[DomainResult]:
        return sorted(self.domains, key=lambda d: d.rank)

    @property
    def estimator(self) -> str:
        """The ranking estimator; the paper's for results of engines before
        1.3.0, which ranked by it alone and stored no estimator."""
        return (self.config or {}).get("estimator") or PAPER_ESTIMATOR

    def table(self) -> pd.DataFrame:
        """The ranked table: Rank, Concept, Priority (the ranking estimator's
        score), Share (%), the paper's Mean and Δn@10%, t vs rest (and p)."""
        rows = [
            {
                "Rank": d.rank,
                "Concept": d.name,
                "Priority": d.ranking_priority,
                "Share (%)": d.share_pct,
                "Mean (paper)": d.mean,
                "Δn@10%": d.delta_n_10pct,
                "t vs rest": d.t_vs_rest,
                "p": d.p_value,
            }
            for d in self.ranked()
        ]
        return pd.DataFrame(rows, columns=["Rank", "Concept", "Priority", "Share (%)", "Mean (paper)", "Δn@10%",
                                           "t vs rest", "p"])


def finite_or_none(value):
    """JSON has no NaN or inf: turn them into null rather than invalid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def format_sci(value: float | None, digits: int = 1) -> str:
    """Scientific notation like the paper's table (3.7e-02 -> '3.7×10⁻²'); None -> '—'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    superscript = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    return f"{mantissa}×10{str(int(exponent)).translate(superscript)}"


def format_number(value: float | None, digits: int = 3) -> str:
    """A plain decimal with `digits` significant digits (0.183, 2.86, 1,234);
    scientific notation only outside [0.001, 1e6), "—" for none."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < 1e-3 or magnitude >= 1e6:
        return format_sci(value, digits - 1)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(magnitude))))
    return f"{value:,.{decimals}f}"
