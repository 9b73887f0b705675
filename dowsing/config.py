"""The one configuration of an analysis. Frozen, so its hash can key the cache."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .records import ConfigRecord
from .result import PAPER_ESTIMATOR
# DEVICES and DTYPES belong to the model's settings; the command line and the pages read them from here
from .settings import DEVICES, DTYPES, BootstrapSettings, InfluenceSettings, ModelSettings

SOLVERS = ("auto", "cg", "exact")
STAGES = ("all", "ranking")  # where an analysis stops: everything, or after the ranking and the diagnosis
CURVATURES = ("hessian", "ggn")
# the bootstrap's rank probabilities and 90% intervals are too coarse below this many resamples
MIN_RESAMPLES = 200

# What orders the domains (`dowsing.pipelines.ranking`): a name from the estimator
# registry (`dowsing.estimators`), checked there. The paper's
# concept-subspace influence is always computed (Mean, transfer, saturation);
# the ranking estimator decides the Rank, Share and Priority columns. The
# default is the one the benchmark's stated rule picked against real
# fine-tuning (`validation.leaderboard.choose_default`, written into the
# shipped evidence by `python -m dowsing benchmark --evidence`; docs/VALIDATION.md);
# mean loss where the evidence names none.
# This module sits below the estimator registry and cannot import it, so it
# spells the name itself (tests/test_registry.py pins it to estimators.MEAN_LOSS).
FALLBACK_ESTIMATOR = "mean_loss"


def evidence_default() -> str:
    """The default ranking estimator the shipped benchmark evidence names."""
    from pathlib import Path

    path = Path(__file__).resolve().parent / "data" / "benchmark_evidence.json"
    try:
        picked = (json.loads(path.read_text(encoding="utf-8")).get("default") or {}).get("estimator")
    except (OSError, ValueError):
        picked = None
    return picked if isinstance(picked, str) and picked else FALLBACK_ESTIMATOR


DEFAULT_ESTIMATOR = evidence_default()


@dataclass(frozen=True)
class AnalysisConfig(ConfigRecord):
    """Every knob of one analysis; defaults are the engine's defaults.

    damping: lambda in (H + lambda I) z = g.
    blocks: B, the number of final transformer blocks whose MLP output
        projection carries the rank-1 concept adapter.
    solver: "auto" (fastest exact method), "cg" (conjugate gradient on
        Hessian-vector products by double backprop) or "exact" (dense solve).
    curvature: "hessian" (exact second derivative) or "ggn" (Gauss-Newton).
    cg_rtol / cg_maxiter: CG stops at ||r|| <= cg_rtol * ||g|| or after
        cg_maxiter iterations (0 means the subspace dimension).
    saturation_points: how many log-spaced n the saturation curve holds,
        from N_k / 10 to saturation_max_factor * N_k.
    batch_size: facts per forward pass (results do not depend on it).
    bootstrap_resamples / seed: resamples of each domain's facts for the 90%
        intervals and rank probabilities (curvature held fixed).
    estimator: what ranks the domains: an estimator the registry offers to
        analyses (`dowsing.estimators.names("analysis")`; checked by
        `dowsing.pipelines.ranking.check_estimator`). The paper's quantities are
        computed whatever it is.
    align_blocks: the alignment estimators use the parameters of the last
        align_blocks transformer blocks and the final norm (all blocks when
        the model has fewer).
    adam_batches: seeded minibatches of 8 facts that estimate Adam's second
        moment (seeded by `seed`).
    checkpoints: the user's training checkpoints of the model, oldest first
        (local folders or hub steps owner/name@revision; `dowsing.access.checkpoints`
        checks them), the last being the model analysed. The checkpoint
        estimators need at least two; the others ignore them.
    checkpoint_lr: the step size of every interval between two checkpoints
        (learning rate times optimizer steps), for TracIn and Diff-In; None
        estimates it from each interval's step length.
    diagnose: also run the pilot fine-tunes (`dowsing.kernels.pilots`) that give
        each domain its diagnosis sentence (`dowsing.kernels.diagnosis`).
    stage: "all" (the ranking, the diagnosis and the paper's quantities) or
        "ranking" (stop after the ranking and the diagnosis: no curvature,
        solve, saturation or transfer; the paper's fields are None). The
        paper's estimator ranks by the solve, so it needs "all".
    """

    damping: float = 1e-3
    blocks: int = 1
    solver: str = "auto"
    curvature: str = "hessian"
    device: str = "cpu"
    dtype: str = "float32"
    cg_rtol: float = 1e-6
    cg_maxiter: int = 0
    saturation_points: int = 24
    saturation_max_factor: float = 1000.0
    batch_size: int = 16
    bootstrap_resamples: int = 200
    seed: int = 0
    estimator: str = DEFAULT_ESTIMATOR
    align_blocks: int = 4
    adam_batches: int = 8
    checkpoints: tuple = ()
    checkpoint_lr: float | None = None
    diagnose: bool = True
    stage: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in (self.checkpoints or ())))
        # the shared fields are checked by the settings they belong to (`dowsing.settings`)
        self.model_settings()
        self.bootstrap_settings()
        self.influence_settings()
        if int(self.blocks) != self.blocks or self.blocks < 1:
            raise ValueError(f"blocks must be an integer >= 1, got {self.blocks!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}")
        if not (0 < self.cg_rtol < 1):
            raise ValueError(f"cg_rtol must be in (0, 1), got {self.cg_rtol!r}")
        if self.cg_maxiter < 0:
            raise ValueError(f"cg_maxiter must be >= 0, got {self.cg_maxiter!r}")
        if self.saturation_points < 20:
            raise ValueError(f"saturation_points must be >= 20, got {self.saturation_points!r}")
        if self.saturation_max_factor < 10:
            raise ValueError("saturation_max_factor must be >= 10")
        if not isinstance(self.estimator, str) or not self.estimator:
            raise ValueError(f"estimator must be an estimator's name, got {self.estimator!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "ranking" and self.estimator == PAPER_ESTIMATOR:
            raise ValueError("the paper's estimator ranks by the paper's solve: --stage ranking cannot skip it "
                             "(choose another estimator, or --stage all)")

    def model_settings(self) -> ModelSettings:
        return ModelSettings(self.device, self.dtype, self.batch_size)

    def bootstrap_settings(self) -> BootstrapSettings:
        return BootstrapSettings(self.bootstrap_resamples, self.seed, MIN_RESAMPLES, "bootstrap_resamples")

    def influence_settings(self) -> InfluenceSettings:
        return InfluenceSettings(self.damping, self.align_blocks, self.adam_batches, self.checkpoint_lr)

    def canonical_json(self) -> str:
        """Stable text form: part of the cache key."""
        return json.dumps(self.to_dict(), sort_keys=True)


def settings_changes(config: dict) -> str:
    """The settings of `config` (a to_dict()) that differ from the engine's
    defaults, as 'curvature = ggn, damping = 0.01'; '' when there are none.
    Unknown or missing fields are skipped, so older results still describe."""
    defaults = AnalysisConfig().to_dict()
    changed = [f"{name} = {value}" for name, value in (config or {}).items()
               if name in defaults and value != defaults[name]]
    return ", ".join(changed)
