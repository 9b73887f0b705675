"""The quick check on a user's own domain set: split each domain, score every
estimator on the training halves, and measure two ground truths.

Each domain's facts are split (seeded) into a training half and a held-out
half. Two ground truths measure what adding domain k's training facts really
does to the held-out loss of every domain j:

* **In the concept subspace S_k** (B = 1), the proximal response
  (`subspace_truth.subspace_response`).
* **Fine-tuning** (`finetune.finetune_gains`): seeded AdamW on the last
  blocks; run k trains on the baseline's minibatches plus a minibatch of
  domain k's training facts. Realised gain of k = held-out loss of k after
  the baseline - after run k.

Leaderboard: per estimator, Spearman's rho between its priority and the
realised fine-tuning gain over domains, with a seeded bootstrap interval
(resampling each domain's held-out facts and, where the estimator is a mean
over facts, its training facts), rho against the subspace gain, Kendall's tau
against the paper's ranking, and time. The benchmark (`benchmark.py`) is the
version with statistical power; this check runs on whatever domains the user
has.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..access.checkpoints import checkpoint_fields
from ..kernels.curvature import structured_hessian, tail_coefficients
from ..domains import Domain, as_domains
from ..estimators import (PAPER, EstimatorContext, EstimatorSettings, check_names, compute, estimator_settings, get,
                          names)
from ..estimators.subspace import domain_terms_of
from ..kernels.forward import split_pass
from ..access.models import LoadedModel, load_model
from ..progress import Progress
from ..records import ConfigRecord, ResultRecord
from ..settings import BootstrapSettings, InfluenceSettings, ModelSettings
from ..kernels.solvers import damped, dense_solve
from ..kernels.splitting import split_domains
from ..kernels.subspace import encode_facts, find_anatomy
from .correlations import bootstrap_spearman, kendall, spearman
from .finetune import finetune_gains, validation_recipe
from .subspace_truth import subspace_response, summarise_subspace



@dataclass(frozen=True)
class ValidationConfig(ConfigRecord):
    """Every knob of one validation run.

    seed: the split, the fine-tuning minibatches, LiSSA and the bootstrap.
    held_out_fraction: share of each domain's facts held out (when no
        held-out list is given).
    eps: upweights of the added domain in the subspace ground truth.
    damping: lambda, as in the analysis.
    newton_steps: at most this many Newton steps per (domain, eps).
    finetune_steps / finetune_lr / finetune_batch: the AdamW budget, the
        learning rate and the facts per minibatch of the training mix.
    finetune_blocks: AdamW trains the last this-many blocks and the final
        norm (capped at the model's depth).
    finetune_added_batch / finetune_added_weight: facts of the added domain
        per step and the weight of their mean loss.
    estimators: which rival scores go on the leaderboard.
    bootstrap: resamples for the interval on rho; interval_pct its coverage.
    lissa_depth / lissa_batch_facts: LiSSA steps and facts per minibatch HVP.
    subspace / finetune: switch either ground truth off.
    checkpoints / checkpoint_lr: the user's training checkpoints of the
        model, oldest first (the last must be the model validated); the
        trajectory estimators read them instead of the baseline fine-tune.
        checkpoint_lr: the step size of every interval (None: from each
        step's length).
    """

    record_name = "validation config"

    seed: int = 0
    held_out_fraction: float = 0.5
    eps: tuple = (0.01, 0.1, 0.3)
    damping: float = 1e-3
    newton_steps: int = 2
    finetune_steps: int = 8
    finetune_blocks: int = 4
    finetune_lr: float = 3e-5
    finetune_batch: int = 8
    finetune_added_batch: int = 4
    finetune_added_weight: float = 1.0
    estimators: tuple = field(default_factory=lambda: names("validation"))
    bootstrap: int = 1000
    interval_pct: float = 90.0
    lissa_depth: int = 1000
    lissa_batch_facts: int = 8
    subspace: bool = True
    finetune: bool = True
    batch_size: int = 16
    checkpoints: tuple = ()
    checkpoint_lr: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        object.__setattr__(self, "estimators", tuple(self.estimators))
        object.__setattr__(self, "checkpoints", checkpoint_fields(self.checkpoints, self.checkpoint_lr))
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction!r}")
        if not self.eps or any(not (e > 0) for e in self.eps):
            raise ValueError("eps must be a non-empty list of positive numbers")
        check_names(self.estimators, "validation")
        if self.finetune_steps < 1 or self.finetune_batch < 1 or self.finetune_added_batch < 1:
            raise ValueError("finetune_steps, finetune_batch and finetune_added_batch must be >= 1")
        # the shared fields are checked by the settings they belong to (`dowsing.settings`)
        self.model_settings()
        self.bootstrap_settings()
        self.influence_settings()

    def model_settings(self) -> ModelSettings:
        """A model given by id is loaded in float32 on the CPU (`validate`)."""
        return ModelSettings(batch_size=self.batch_size)

    def bootstrap_settings(self) -> BootstrapSettings:
        # 0 resamples: no interval on rho
        return BootstrapSettings(self.bootstrap, self.seed, 0, "bootstrap")

    def influence_settings(self) -> InfluenceSettings:
        """The alignment's blocks are the fine-tune's (`validate`), its Adam
        minibatches the estimators' default."""
        return InfluenceSettings(damping=self.damping, checkpoint_lr=self.checkpoint_lr)


@dataclass
class ValidationResult(ResultRecord):
    model: dict
    config: dict
    domains: list  # names
    split: dict  # {"train": {name: [facts]}, "held_out": {name: [facts]}}
    estimators: list  # EstimatorScore.to_dict() per estimator
    subspace: dict | None  # ground truth in S_k
    finetune: dict | None  # ground truth by fine-tuning
    leaderboard: list  # one row per estimator
    timings: dict
    created_at: str = ""
    extras: dict = field(default_factory=dict)

    def table(self):
        """The leaderboard as a DataFrame, best rho first."""
        import pandas as pd

        rows = [{
            "Estimator": r["label"],
            "ρ fine-tune": r["spearman_finetune"],
            "interval": _interval_text(r.get("spearman_finetune_interval")),
            "ρ subspace": r["spearman_subspace"],
            "τ vs default": r["kendall_vs_default"],
            "time (s)": r["time_s"],
            "solver converged": {None: "—", True: "yes", False: "no"}[r.get("solver_converged")],
        } for r in self.leaderboard]
        return pd.DataFrame(rows)


def _interval_text(pair) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"




def validation_settings(config: ValidationConfig, blocks: int) -> EstimatorSettings:
    """What the estimators read in a validation whose fine-tunes train the
    last `blocks` blocks: the alignment estimators use the same blocks."""
    # the trajectory is the user's checkpoints when given, else the validation's own baseline fine-tune
    # (same recipe, seed and minibatches)
    return estimator_settings(config, blocks=blocks, lissa_depth=config.lissa_depth,
                              lissa_batch_facts=config.lissa_batch_facts, recipe=validation_recipe(config, blocks))


def validate(model, domains, config: ValidationConfig | None = None, held_out=None,
             progress: Callable[[Progress], None] | None = None, executor=None,
             should_stop: Callable[[], bool] | None = None) -> ValidationResult:
    """Split, score every estimator on the training halves, measure both
    ground truths, and build the leaderboard.

    model: a LoadedModel, or a model id / path (None = embedded default),
    loaded in float32 on the CPU. executor: where the fine-tuning runs go
    (`dowsing.pipelines.executor`; in this process by default).
    """
    from datetime import datetime, timezone

    config = config or ValidationConfig()
    say = progress or (lambda p: None)
    clock = time.perf_counter()
    timings = {}
    checkpoints = None
    if config.checkpoints:
        from ..access.checkpoints import check_last_is_model, validate_checkpoints

        checkpoints = validate_checkpoints(config.checkpoints)
        check_last_is_model(checkpoints, model.info.id if isinstance(model, LoadedModel) else model)
    if not isinstance(model, LoadedModel):
        say(Progress("loading model", 0.0, "loading model"))
        running = config.model_settings()
        model = load_model(model, running.device, running.dtype)
        timings["load_model"] = time.perf_counter() - clock
    train, held = split_domains(domains, config.seed, config.held_out_fraction, held_out)
    domain_names = [d.name for d in train]

    say(Progress("forward", 0.02, f"forward pass over {sum(len(d.facts) for d in train + held)} facts"))
    depth = len(find_anatomy(model.model).down_projs)
    blocks = min(config.finetune_blocks, depth)
    split = split_pass(model, train, held, config.batch_size, capture_block=depth - blocks if config.finetune else None)
    timings["forward"] = split.forward_s

    t0 = time.perf_counter()
    ctx = EstimatorContext(model, split, validation_settings(config, blocks), checkpoints,
        lambda f, m: say(Progress("estimators", 0.05 + 0.25 * f, m)))
    scores = compute(ctx, scored_estimators(config, split.block_inputs is not None))
    timings["estimators"] = time.perf_counter() - t0

    subspace = None
    if config.subspace:
        t0 = time.perf_counter()
        subspace = subspace_truth(split, domain_terms_of(ctx), domain_names, config, say)
        timings["subspace"] = time.perf_counter() - t0
    finetune = None
    if config.finetune:
        t0 = time.perf_counter()
        finetune = finetune_gains(model, split, train, config,
                                  lambda f, m: say(Progress("fine-tuning ground truth", 0.5 + 0.45 * f, m)),
                                  executor=executor, should_stop=should_stop)
        timings["finetune"] = time.perf_counter() - t0

    say(Progress("leaderboard", 0.96, "correlations and bootstrap"))
    leaderboard = build_leaderboard(scores, subspace, finetune, config)
    timings["total"] = time.perf_counter() - clock
    say(Progress("done", 1.0, "validation complete"))
    return ValidationResult(
        model=model.info.to_dict(), config=config.to_dict(), domains=domain_names,
        split={"train": {d.name: list(d.facts) for d in train}, "held_out": {d.name: list(d.facts) for d in held}},
        estimators=[s.to_dict() for s in scores], subspace=subspace, finetune=finetune, leaderboard=leaderboard,
        timings=timings, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def scored_estimators(config: ValidationConfig, has_block_inputs: bool) -> list:
    """The configured estimators, the paper's first if it was not asked for
    (the leaderboard's reference), without those that need block inputs
    when no fine-tuning ground truth captured them."""
    wanted = list(config.estimators)
    if PAPER not in wanted:
        wanted.insert(0, PAPER)
    return [e for e in wanted if has_block_inputs or "block_inputs" not in get(e).needs]


def subspace_truth(split, terms: list, domain_names: list, config: ValidationConfig, say) -> dict:
    """The proximal response in each S_k (`subspace_truth.subspace_response`)."""
    per_domain = []
    for k, name in enumerate(domain_names):
        say(Progress("subspace ground truth", 0.3 + 0.2 * k / len(domain_names), f"Newton in S_k for {name}"))
        per_domain.append(subspace_response(split, terms, k, config.eps, config.damping, config.newton_steps))
    return summarise_subspace(domain_names, per_domain)


def build_leaderboard(scores, subspace, finetune, config: ValidationConfig) -> list:
    default = next(s for s in scores if s.name == PAPER)
    rows = []
    for i, s in enumerate(scores):
        row = {"estimator": s.name, "label": s.label, "priority": s.priority, "time_s": s.time_s,
               "kendall_vs_default": kendall(s.priority, default.priority),
               "spearman_finetune": None, "spearman_finetune_interval": [None, None], "spearman_subspace": None,
               # iterative inverse-HVP solvers: did every domain's solve converge? (None: no iterative solve)
               "solver_converged": None}
        flags = [d["converged"] for d in (s.details or {}).get("per_domain", []) if "converged" in d]
        if flags:
            row["solver_converged"] = all(flags)
        if finetune is not None:
            row["spearman_finetune"] = spearman(s.priority, finetune["gain"])
            base = np.asarray(finetune["baseline"])
            gain_samples = []
            for k, name in enumerate(subspace["domains"] if subspace else list(finetune["runs"])):
                rows_k = finetune["held_rows"][k]
                gain_samples.append(base[rows_k] - np.asarray(finetune["runs"][name])[rows_k])
            priority_samples = s.per_example if s.per_example is not None else s.priority
            row["spearman_finetune_interval"] = bootstrap_spearman(
                priority_samples, gain_samples, config.bootstrap, config.seed + i, config.interval_pct)
        if subspace is not None:
            row["spearman_subspace"] = spearman(s.priority, subspace["gain"])
        rows.append(row)
    rows.sort(key=lambda r: -(r["spearman_finetune"] if r["spearman_finetune"] is not None else -2))
    return rows


def exactness_check(loaded, domains, damping: float = 1e-3, max_facts: int = 8, domain_index: int = 0) -> dict:
    """CG against a dense solve of (H + lambda I) z = g_bar in one domain's
    B = 1 subspace, on at most max_facts facts per domain (so it takes
    seconds). Returns the relative error ||z_cg - z_dense|| / ||z_dense||, CG's
    iterations and residual, and whether CG met non-positive curvature."""
    from ..kernels.forward import forward_pass
    from ..kernels.curvature import structured_fact_gradients
    from ..kernels.solvers import conjugate_gradient
    from ..kernels.subspace import make_batches

    domains = as_domains(domains)
    small = [Domain(d.name, d.facts[:max_facts]) for d in domains]
    facts = [f for d in small for f in d.facts]
    groups = [k for k, d in enumerate(small) for _ in d.facts]
    anatomy = find_anatomy(loaded.model)
    t0 = time.perf_counter()
    encoded = encode_facts(loaded.tokenizer, facts, anatomy.max_positions)
    batches = make_batches(encoded, 16, next(loaded.model.parameters()).device)
    directions, _, tokens = forward_pass(loaded.model, anatomy, batches, groups, len(small))
    v = directions[domain_index].to(tokens.h.dtype)
    a, c = tail_coefficients(anatomy, tokens.h, tokens.targets, v, "hessian")
    grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a, len(facts))
    rows = [i for i, g in enumerate(groups) if g == domain_index]
    g_bar = grads[rows].mean(dim=0)
    x64 = tokens.x.to(torch.float64)
    w = tokens.token_scale / len(facts) * c
    dense = dense_solve(damped(structured_hessian(tokens.x, tokens.token_scale / len(facts), c), damping), g_bar)
    cg = conjugate_gradient(lambda p: x64.T @ (w * (x64 @ p)) + damping * p, g_bar, rtol=1e-10)
    rel = float((cg.x - dense.x).norm() / dense.x.norm().clamp_min(1e-300))
    return {"domain": small[domain_index].name, "dim": int(g_bar.numel()), "n_facts": len(facts),
            "rel_error": rel, "cg_iterations": cg.iterations, "cg_rel_residual": cg.rel_residual,
            "nonpositive_curvature": cg.nonpositive_curvature or dense.nonpositive_curvature,
            "damping": damping, "seconds": time.perf_counter() - t0}

