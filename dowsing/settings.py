"""The settings the pipelines share, one frozen dataclass per concern, each
checking its own fields once: how the model runs (`ModelSettings`), the
seeded bootstrap (`BootstrapSettings`) and the influence estimators' knobs
(`InfluenceSettings`).

A pipeline's configuration (`config.AnalysisConfig`, `pipelines.plan.PlanConfig`
and `PilotConfig`, `validation.validate.ValidationConfig`,
`validation.benchmark.BenchmarkConfig`) keeps its own flat fields, because
they are its command-line flags, its stored JSON and part of its cache key,
and builds these objects from them when it is made: a bad value is refused
with the same message whichever pipeline it is given to.
`estimators.context.estimator_settings` reads them to fill an estimator's
settings."""
from __future__ import annotations

import math
import numbers
from dataclasses import InitVar, dataclass

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64", "bfloat16")


@dataclass(frozen=True)
class ModelSettings:
    """How the model runs. device / dtype: where and in what precision it is
    loaded (bfloat16 only on cuda: the CPU kernels lack it); batch_size: facts
    per forward pass (results do not depend on it)."""

    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "bfloat16" and self.device != "cuda":
            raise ValueError("bfloat16 is only supported with device cuda")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class BootstrapSettings:
    """The seeded resampling behind a run's intervals. resamples: how many;
    seed: the run's one seed, which seeds the bootstrap and every other
    seeded choice of the run.

    minimum / field_name (given when built, not kept): a pipeline's own
    least number of resamples (an analysis needs 200 for its rank
    probabilities, a plan 100 for its bands, a validation or benchmark none)
    and the name of its field, so the message names the flag the user set."""

    resamples: int
    seed: int = 0
    minimum: InitVar[int] = 0
    field_name: InitVar[str] = "bootstrap_resamples"

    def __post_init__(self, minimum: int, field_name: str) -> None:
        if self.resamples < minimum:
            raise ValueError(f"{field_name} must be >= {minimum}, got {self.resamples!r}")


@dataclass(frozen=True)
class InfluenceSettings:
    """What the influence and alignment estimators read, in every pipeline
    that runs them.

    damping: lambda in (H + lambda I) z = g; a finite number >= 0.
    align_blocks: the alignment estimators use the parameters of the last
        align_blocks transformer blocks and the final norm.
    adam_batches: seeded minibatches that estimate Adam's second moment.
    checkpoint_lr: the step size of every interval between two of the
        user's checkpoints, for TracIn and Diff-In (None: from each
        interval's step length)."""

    damping: float = 1e-3
    align_blocks: int = 4
    adam_batches: int = 8
    checkpoint_lr: float | None = None

    def __post_init__(self) -> None:
        # an infinite damping solves to z = 0 and NaN compares false both ways: neither is a setting
        if not (isinstance(self.damping, numbers.Real) and math.isfinite(self.damping) and self.damping >= 0.0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if int(self.align_blocks) != self.align_blocks or self.align_blocks < 1:
            raise ValueError(f"align_blocks must be an integer >= 1, got {self.align_blocks!r}")
        if int(self.adam_batches) != self.adam_batches or self.adam_batches < 1:
            raise ValueError(f"adam_batches must be an integer >= 1, got {self.adam_batches!r}")
        if self.checkpoint_lr is not None and not (self.checkpoint_lr > 0):
            raise ValueError(f"checkpoint_lr must be > 0, got {self.checkpoint_lr!r}")

