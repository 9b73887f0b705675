"""What a family's compute function is given: the model, the split pass
(each domain's training and held-out fact rows over one forward pass), the
settings, and the user's checkpoints; and how that travels to a worker
process when a family runs as a unit of the executor."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..kernels.training import Recipe


@dataclass(frozen=True)
class EstimatorSettings:
    """Every knob an estimator reads.

    damping: lambda of the influence estimators in S_k.
    blocks: the last blocks (plus the final norm) whose parameters the
        alignment estimators use.
    adam_batch / adam_batches: Adam's second moment from `adam_batches`
        seeded minibatches of `adam_batch` facts of the training pool.
    seed: every seeded choice (minibatches, LiSSA, the trajectory's fine-tune).
    lissa_depth / lissa_batch_facts: LiSSA's steps and facts per minibatch HVP.
    ekfac_blocks / ekfac_fit_facts: the EK-FAC curvature's blocks and the
        training facts it is fitted on (None: all).
    recipe: the fine-tune whose trajectory the trajectory estimators read
        when no checkpoints are given (and their optimizer and blocks), and
        the recipe of AirRep's counterfactual runs.
    checkpoint_lr: the step size between the user's checkpoints (None: from
        each step's length).
    pilot_sizes / pilot_target: the pilot learning curve's nested sizes of
        a half, and the n it is extrapolated to (the benchmark's largest dose).
    all_facts: per-example values over each domain's training facts followed
        by its held-out facts (the analysis scores every fact of a domain);
        otherwise over the training facts only.
    """

    damping: float = 1e-3
    blocks: int = 4
    adam_batch: int = 8
    adam_batches: int = 8
    seed: int = 0
    lissa_depth: int = 2000
    lissa_batch_facts: int = 8
    ekfac_blocks: int = 2
    ekfac_fit_facts: int | None = 128
    batch_size: int = 16
    recipe: Recipe = field(default_factory=lambda: Recipe("trajectory"))
    checkpoint_lr: float | None = None
    pilot_sizes: tuple = (2, 4, 8)
    pilot_target: int = 32
    all_facts: bool = False


def estimator_settings(config, **overrides) -> EstimatorSettings:
    """The settings an estimator reads, from any pipeline's configuration
    through the settings it shares with the others (`dowsing.settings`):
    damping, the alignment's blocks, Adam's minibatches and the checkpoints'
    step size from its influence settings, the seed from its bootstrap
    settings (a run has one seed), the batch size from its model settings.
    `overrides` are what is the pipeline's own (the trajectory's recipe,
    blocks capped at the model's depth, all_facts, ...); every other field
    keeps EstimatorSettings' default."""
    influence = config.influence_settings()
    shared = dict(damping=influence.damping, blocks=influence.align_blocks, adam_batches=influence.adam_batches,
                  checkpoint_lr=influence.checkpoint_lr, seed=config.bootstrap_settings().seed,
                  batch_size=config.model_settings().batch_size)
    return EstimatorSettings(**{**shared, **overrides})


@dataclass
class EstimatorContext:
    """loaded: a LoadedModel; split: a SplitPass (block inputs captured at
    the first block any estimator trains); checkpoints: the user's checked
    checkpoints, oldest first, or None; progress(fraction, message)."""

    loaded: object
    split: object
    settings: EstimatorSettings
    checkpoints: list | None = None
    progress: Callable[[float, str], None] = field(default=lambda fraction, message: None)
    # `units.DomainUnits`: where the per-domain units (the pilot curves) are kept and found; None: none kept
    units: object | None = None

    def take_tail(self):
        """The split pass's checked truncated model (`SplitPass.tail`),
        handed over once: a family that trains it takes it, so no one else
        reads weights that training changes. None after that, or where the
        pipeline built none (the family then builds and checks its own)."""
        tail, self.split.tail = self.split.tail, None
        return tail

    def payload(self) -> dict:
        """Everything but the model module: its configuration and weights on
        the CPU (a module can hold unpicklable state), for a worker."""
        net = self.loaded.model
        # what the split derives on first use is rebuilt there, not shipped (the terms are K Hessians)
        split = dataclasses.replace(self.split, line=None, terms=None, tail=None)
        return {"model_config": net.config, "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "dtype": next(net.parameters()).dtype, "tokenizer": self.loaded.tokenizer, "info": self.loaded.info,
                "split": split, "settings": self.settings, "checkpoints": self.checkpoints}


def build_context(payload: dict) -> EstimatorContext:
    """A worker's EstimatorContext, rebuilt from the shipped weights."""
    from transformers import AutoModelForCausalLM

    from ..access.models import LoadedModel

    net = AutoModelForCausalLM.from_config(payload["model_config"], attn_implementation="eager",
                                           dtype=payload["dtype"])
    net.load_state_dict(payload["state"])
    loaded = LoadedModel(net.eval(), payload["tokenizer"], payload["info"])
    return EstimatorContext(loaded, payload["split"], payload["settings"], payload["checkpoints"])
