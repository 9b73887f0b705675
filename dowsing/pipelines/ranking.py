"""The ranking step of an analysis: one estimator's priority per domain
orders the domains (Rank, Share, t vs rest), next to the paper's quantities,
which the analysis computes whatever the estimator is.

Every estimator the analysis offers (`estimators.names("analysis")`) is
computed by its family exactly as the benchmark computes it, on a split pass
made of the analysis's own forward pass (no second pass over the facts):

* estimators that need a held-out half see each domain's facts split in two
  halves A and B by `splitting.split_order`, seeded by (seed, domain name),
  the permutation that splits the benchmark's training and held-out facts:
  A trains, B is held out. Their per-fact values cover both halves (the
  family's `all_facts` mode): for the held-out alignment, g_i^T P g_bar_B for
  i in A and g_i^T P g_bar_A for i in B; for the checkpoint estimators, each
  fact's own score (TracIn and Diff-In: its share of the first-order term).
* the others see every fact of the domain as training facts (the pair
  alignment: 1/(N(N-1)) sum_{i != j} g_i^T P g_j over all of them; mean loss:
  each fact's loss).
* ``paper``: the analysis's own solve, Mean_k = g_bar_k^T (H_k + lambda I)^-1 g_bar_k
  with the user's solver, curvature and blocks, and its per-fact influences
  I_ki.

Adam's preconditioner, where an estimator uses it, is sampled from every
fact of every domain, in fact order. So what the benchmark measured for an
estimator applies to the ranking the app shows.
"""
from __future__ import annotations

import time
from typing import Callable

from ..kernels.alignment import alignment_span, check_tail, tail_model
from ..config import AnalysisConfig
from ..estimators import (MEAN_LOSS, PAPER, EstimatorContext, EstimatorScore, EstimatorSettings, check_names,
                          compute, estimator_settings, get)
from ..kernels.forward import SplitPass
from ..kernels.splitting import split_order
from ..kernels.pilots import PILOT_RECIPE
from ..kernels.training import Recipe


def check_estimator(config: AnalysisConfig) -> None:
    """A one-line ValueError unless config.estimator is one the registry
    offers to analyses and what it needs is there (the checkpoint
    estimators read at least two of the model's training checkpoints)."""
    check_names([config.estimator], "analysis")
    if "trajectory" in get(config.estimator).needs and len(config.checkpoints) < 2:
        raise ValueError(f"estimator {config.estimator} reads the model's training checkpoints: give at least 2, "
                         f"oldest first (got {len(config.checkpoints)})")


def capture_block_of(depth: int, config: AnalysisConfig) -> int | None:
    """The block whose inputs the ranking estimator and the diagnosis's
    pilot fine-tunes need from the forward pass of a model of `depth` blocks
    (the first block either trains), or None when neither runs. It reads the
    depth alone, so a forward piece's key is known before the model is loaded."""
    wanted = []
    if "block_inputs" in get(config.estimator).needs:
        wanted.append(alignment_span(depth, config.align_blocks)[0])
    if config.diagnose:
        wanted.append(depth - min(PILOT_RECIPE.blocks, depth))
    return min(wanted) if wanted else None


def ranking_split(net, anatomy, directions, tokens, ids: list, block_inputs: list | None, first: int | None,
                  rows_of: list, names: list, config: AnalysisConfig, forward_s: float,
                  halves: bool | None = None) -> SplitPass:
    """The analysis's forward pass as the split pass the ranking estimator
    reads: halves A / B of each domain's rows where it needs a held-out
    half (or `halves` says so), otherwise every row as a training row.

    Where the ranking estimator reads block inputs (captured at block
    `first`), the pass carries the truncated model that reads them (`alignment.tail_model`, blocks first..
    of `net`), once it has reproduced the facts' losses from those inputs
    (`alignment.check_tail`) on the first fact of each domain's two parts:
    what it catches is the architecture's, which any fact shows, and each
    domain's block inputs come from its own forward piece, so each is read
    once (every fact would cost a pass through the tail, 2.7 s on the
    default domains). A family that fine-tunes the tail starts from that
    checked copy (`EstimatorContext.take_tail`) instead of copying and
    checking the model again. An architecture whose blocks cannot be cut out
    is refused in one line."""
    if halves if halves is not None else "held_out" in get(config.estimator).needs:
        halves = [split_order(list(rows), names[k], config.seed) for k, rows in enumerate(rows_of)]
        train, held = [a for a, _ in halves], [b for _, b in halves]
    else:
        train, held = [list(rows) for rows in rows_of], [[] for _ in rows_of]
    split = SplitPass(anatomy, directions, tokens, train, held, sum(len(r) for r in rows_of), forward_s, ids,
                      block_inputs, first, list(names))
    if first is None or block_inputs is None or "block_inputs" not in get(config.estimator).needs:
        return split  # no tail for the ranking (the diagnosis's pilots, if any, build and check their own)
    try:
        work, embed = tail_model(net, first)
    except Exception as exc:  # an architecture whose blocks cannot be cut out
        raise ValueError(f"The estimator {config.estimator} cannot run on this model: its last blocks could not "
                         f"be separated ({type(exc).__name__}: {exc}). Choose the estimator '{PAPER}' or "
                         f"'{MEAN_LOSS}'.") from exc
    work.eval()
    rows = [part[0] for parts in (train, held) for part in parts if part]
    check_tail(work, embed, ids, block_inputs, tokens.fact_losses, config.batch_size, (PAPER, MEAN_LOSS),
               sorted(rows))
    split.tail = work
    return split


def paper_scores(paper_means: list, paper_per_fact: list) -> EstimatorScore:
    return EstimatorScore(PAPER, get(PAPER).label, [float(m) for m in paper_means],
                          [[float(x) for x in values] for values in paper_per_fact], 0.0,
                          {"source": "the paper's concept-subspace influence, I_ki = g_ki^T z_k"})


def ranking_settings(config: AnalysisConfig, depth: int) -> EstimatorSettings:
    """What the ranking estimator reads, on a model of `depth` blocks: the
    analysis' shared settings, values for every fact of a domain (all_facts),
    and the recipe of the user's checkpoints."""
    # AdamW: the preconditioner of TracIn and Diff-In over the user's checkpoints is Adam's, as for alignment_adam
    recipe = Recipe("checkpoints", "adamw", blocks=min(config.align_blocks, depth))
    return estimator_settings(config, recipe=recipe, all_facts=True)


def rank(loaded, split: SplitPass, rows_of: list, config: AnalysisConfig, paper_means: list, paper_per_fact: list,
         checkpoints: list | None = None, progress: Callable[[float, str], None] | None = None,
         units=None) -> EstimatorScore:
    """config.estimator's priorities for every domain, with per-fact values
    in each domain's own fact order (rows_of[k]). units: the run's
    `units.DomainUnits`, where the per-domain pilot curves are found and kept."""
    name = config.estimator
    if name == PAPER:
        return paper_scores(paper_means, paper_per_fact)
    t0 = time.perf_counter()
    settings = ranking_settings(config, len(split.anatomy.down_projs))
    ctx = EstimatorContext(loaded, split, settings, checkpoints, progress or (lambda fraction, message: None), units)
    score = compute(ctx, [name])[0]
    score.per_example = in_fact_order(score.per_example, split, rows_of)
    if score.details.get("too_small"):
        fill_from_mean_loss(score, split, rows_of)
    if checkpoints and "trajectory" in get(name).needs:
        score.details["checkpoints"] = [c.spec for c in checkpoints]
    score.time_s = time.perf_counter() - t0
    return score


def fill_from_mean_loss(score: EstimatorScore, split: SplitPass, rows_of: list) -> None:
    """Domains the estimator could not score (too few facts for a pilot:
    NaN) get the fallback's reading: each fact's loss l_i mapped onto the
    estimator's scale by the least-squares line priority = a + b * mean loss
    over the domains it did score (a = 0, b = 1 when fewer than two did), so
    their rank comes from mean loss. A note names them."""
    import math

    import numpy as np

    losses = split.tokens.fact_losses
    domain_loss = [float(losses[rows].mean()) for rows in rows_of]
    scored = [k for k, p in enumerate(score.priority) if p is not None and math.isfinite(p)]
    a, b = 0.0, 1.0
    if len(scored) >= 2 and np.ptp([domain_loss[k] for k in scored]) > 0:
        b, a = (float(c) for c in np.polyfit([domain_loss[k] for k in scored], [score.priority[k] for k in scored], 1))
    missing = [k for k in range(len(rows_of)) if k not in scored]
    for k in missing:
        score.per_example[k] = [a + b * float(losses[r]) for r in rows_of[k]]
        score.priority[k] = float(np.mean(score.per_example[k]))
    names = [split.names[k] if split.names else str(k) for k in missing]
    score.notes.append(f"{', '.join(names)}: too few facts for {score.label} (a pilot needs two per half); ranked "
                       f"by mean loss instead, mapped onto its scale by a line fitted over the other domains "
                       f"(priority = {a:.4g} + {b:.4g} x mean loss).")
    score.details["fallback"] = {"estimator": MEAN_LOSS, "domains": names, "intercept": a, "slope": b}


def in_fact_order(per_example: list, split: SplitPass, rows_of: list) -> list:
    """Per-example values over each domain's training then held-out rows
    (the families' all_facts order) back in the domain's fact order."""
    out = []
    for k, rows in enumerate(rows_of):
        value = dict(zip(list(split.train_rows[k]) + list(split.held_rows[k]), per_example[k]))
        out.append([float(value[r]) for r in rows])
    return out
