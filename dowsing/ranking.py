"""The ranking estimator: one priority per domain that orders the domains
(Rank, Share, t vs rest), next to the paper's quantities, which the analysis
computes whatever the estimator is.

* ``alignment_adam`` / ``alignment``: gradient alignment between a domain's
  facts over the parameters of the last `align_blocks` transformer blocks and
  the final norm (`dowsing.alignment`), with Adam's preconditioner P or the
  identity:
      priority_k = 1/(N_k(N_k-1)) sum_{i != j in k} g_i^T P g_j,
      per-fact value_i = g_i^T P (S_k - g_i) / (N_k - 1),  S_k = sum_{j in k} g_j,
  so the mean of the per-fact values is the priority. P = diag(1/(sqrt(v) + eps)),
  v = the mean over `adam_batches` seeded minibatches of 8 facts of the pool of
  every domain's facts of the squared minibatch-mean gradient.
* ``alignment_heldout_adam`` / ``alignment_heldout``: the domain's facts are
  split in two halves A and B exactly as the benchmark splits training and
  held-out facts (seeded by (seed, domain name)), and
      priority_k = g_bar_A^T P g_bar_B,
  the first-order gain on B from training on A; per-fact values are
  g_i^T P g_bar_B for i in A and g_i^T P g_bar_A for i in B (each half's
  mean is the priority).
* ``paper``: the paper's Mean_k = g_bar_k^T (H_k + lambda I)^-1 g_bar_k and its
  per-fact influences I_ki, unchanged.
* ``mean_loss``: the domain's mean next-token loss, per fact l_i.
* ``tracin_ckpt``, ``diffin``, ``vog``, ``ckpt_confidence``,
  ``ckpt_variability``, ``el2n``: read off the user's training checkpoints
  (config.checkpoints, oldest first, the last the model analysed) by
  `dowsing.validation.trajectory`, on the benchmark's halves of each domain
  (the first as training facts, the second as held-out) and the last
  `align_blocks` blocks. Per-fact values: the checkpoint-pass scores of each
  fact; for TracIn and Diff-In each fact's share of the first-order term
  (`tracin_per_fact`), whose training half averages to TracIn's priority.

The same functions and the same sampling as the benchmark
(`dowsing.validation.estimators.alignment_scores`), so what the benchmark
measured for an estimator applies to the ranking the app shows.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .alignment import (ADAM_EPS, adam_preconditioner, blocks_of, capture_block_inputs, domain_alignment,
                        padded_block_batch, tail_grad_fn, tail_model, tail_parameters)
from .config import CHECKPOINT_ESTIMATORS, ESTIMATOR_LABELS, RANKING_ESTIMATORS, AnalysisConfig
from .splitting import split_order
from .subspace import per_fact_losses

# Minibatch size of the Adam second-moment estimate: the benchmark's.
ADAM_BATCH_SIZE = 8
ALIGNMENT_ESTIMATORS = ("alignment_adam", "alignment", "alignment_heldout_adam", "alignment_heldout")


@dataclass
class RankingScores:
    """One estimator's priorities; per_fact[k] has domain k's facts in order
    and mean priority[k]."""

    estimator: str
    label: str
    priority: list  # per domain
    per_fact: list  # per domain, per fact
    seconds: float
    details: dict = field(default_factory=dict)  # parameter count, blocks, Adam's sampling
    notes: list = field(default_factory=list)  # what the user should know (e.g. fewer blocks than asked)


def _check_tail(work, embed, ids, block_inputs, fact_losses, batch_size: int) -> None:
    """The truncated model must reproduce every fact's loss from its block
    inputs; otherwise the architecture does something on the way (e.g.
    position embeddings added inside the model) that tail_model cannot undo."""
    device = next(work.parameters()).device
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = list(range(start, min(start + batch_size, len(ids))))
            input_ids, mask, hidden = padded_block_batch([ids[r] for r in rows], [block_inputs[r] for r in rows],
                                                         device)
            logits = work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits
            got = per_fact_losses(logits, input_ids, mask).to(torch.float64).cpu()
            want = fact_losses[rows].to(torch.float64).cpu()
            worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(1.0)).max()))
    dtype = next(work.parameters()).dtype
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)
    if not worst <= tolerance:
        raise ValueError(f"The gradient-alignment estimators cannot run on this model: its last blocks do not "
                         f"reproduce its loss from their inputs (relative error {worst:.1e}). Choose the "
                         f"estimator 'paper' or 'mean_loss'.")


def split_halves(rows: list, name: str, seed: int) -> tuple[list, list]:
    """(A, B): a domain's rows split by `splitting.split_order`, the
    permutation that splits its facts into the benchmark's training and
    held-out halves."""
    return split_order(rows, name, seed)


def ranking_priorities(loaded, ids: list, batches, rows_of: list, fact_losses: torch.Tensor, paper_means: list,
                       paper_per_fact: list, config: AnalysisConfig, block_inputs: list | None = None,
                       progress: Callable[[float, str], None] | None = None,
                       names: list | None = None, domains: list | None = None) -> RankingScores:
    """The priorities of config.estimator for every domain.

    ids: token ids per fact (row order); batches: the analysis' padded
    batches (for capturing block inputs when none are given); rows_of[k]:
    domain k's fact rows; fact_losses: l_i per fact; paper_means /
    paper_per_fact: Mean_k and I_ki from the paper's solve; block_inputs: the
    input of block `alignment_blocks(...)[0]` per fact, if already captured; domains: the Domain list (the checkpoint
    estimators split each into halves).
    """
    name = config.estimator
    if name not in RANKING_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(RANKING_ESTIMATORS)}, got {name!r}")
    report = progress or (lambda fraction, message: None)
    label = ESTIMATOR_LABELS[name]
    t0 = time.perf_counter()
    if name == "paper":
        return RankingScores(name, label, [float(m) for m in paper_means],
                             [[float(x) for x in values] for values in paper_per_fact], time.perf_counter() - t0,
                             {"source": "the paper's concept-subspace influence, I_ki = g_ki^T z_k"})
    if name == "mean_loss":
        per_fact = [[float(fact_losses[r]) for r in rows] for rows in rows_of]
        return RankingScores(name, label, [sum(v) / len(v) for v in per_fact], per_fact, time.perf_counter() - t0,
                             {"source": "mean next-token loss per fact"})

    if name in CHECKPOINT_ESTIMATORS:
        return checkpoint_ranking(loaded, domains, config, report)

    net = loaded.model
    first, blocks, note = alignment_blocks(net, config.align_blocks)
    if block_inputs is None:
        report(0.0, f"block inputs at block {first}")
        block_inputs = capture_block_inputs(net, batches, first)
    try:
        work, embed = tail_model(net, first)
    except Exception as exc:  # an architecture whose blocks cannot be cut out
        raise ValueError(f"The gradient-alignment estimators cannot run on this model: its last {blocks} blocks "
                         f"could not be separated ({type(exc).__name__}: {exc}). Choose the estimator 'paper' or "
                         f"'mean_loss'.") from exc
    try:
        work.eval()
        params = tail_parameters(work, blocks)
        _check_tail(work, embed, ids, block_inputs, fact_losses, config.batch_size)
        grad_of = tail_grad_fn(work, embed, ids, block_inputs, params)
        details = {"blocks": blocks, "first_block": first, "parameters": int(sum(p.numel() for p in params)),
                   "preconditioner": "identity"}
        preconditioner = None
        if name.endswith("_adam"):
            report(0.05, f"Adam's second moment from {config.adam_batches} minibatches of {ADAM_BATCH_SIZE} facts")
            pool = [r for rows in rows_of for r in rows]
            preconditioner = adam_preconditioner(grad_of, pool, ADAM_BATCH_SIZE, config.adam_batches, config.seed)
            details.update(preconditioner="adam", adam_batches=config.adam_batches, adam_batch_size=ADAM_BATCH_SIZE,
                           adam_eps=ADAM_EPS, seed=config.seed)
        priority, per_fact = [], []
        for k, rows in enumerate(rows_of):
            report(0.1 + 0.9 * k / len(rows_of), f"gradient alignment, domain {k + 1} of {len(rows_of)}")
            if "heldout" in name:
                half_a, half_b = split_halves(list(rows), names[k] if names else str(k), config.seed)
                a = domain_alignment(grad_of, half_a, {name: preconditioner}, query_rows=half_b)[name]
                b = domain_alignment(grad_of, half_b, {name: preconditioner}, query_rows=half_a)[name]
                value = dict(zip(half_a, a.per_fact_query)) | dict(zip(half_b, b.per_fact_query))
                priority.append(float(a.query))
                per_fact.append([float(value[r]) for r in rows])
                continue
            aligned = domain_alignment(grad_of, list(rows), {name: preconditioner})[name]
            priority.append(float(aligned.pairs))
            per_fact.append([float(x) for x in aligned.per_fact_pairs])
    finally:
        del work
    return RankingScores(name, label, priority, per_fact, time.perf_counter() - t0, details,
                         [note] if note else [])


def checkpoint_ranking(loaded, domains: list, config: AnalysisConfig,
                       report: Callable[[float, str], None]) -> RankingScores:
    """A checkpoint estimator's priorities over the user's checkpoints, with
    per-fact values in each domain's own fact order."""
    from .checkpoints import validate_checkpoints
    from .forward import split_pass
    from .training import Recipe
    from .splitting import split_domains
    from .validation.trajectory import trajectory_scores

    name = config.estimator
    t0 = time.perf_counter()
    checkpoints = validate_checkpoints(config.checkpoints)
    first, blocks, note = alignment_blocks(loaded.model, config.align_blocks)
    train, held = split_domains(domains, config.seed)
    report(0.02, "forward pass over each domain's halves")
    split = split_pass(loaded, train, held, config.batch_size, capture_block=first)
    # AdamW: the preconditioner of TracIn and Diff-In is Adam's, as for alignment_adam
    recipe = Recipe("checkpoints", "adamw", blocks=blocks)
    score = trajectory_scores(loaded, split, [name], recipe, config.seed, adam_batches=config.adam_batches,
                              batch_size=config.batch_size, progress=lambda f, m: report(0.05 + 0.95 * f, m),
                              checkpoints=checkpoints, checkpoint_lr=config.checkpoint_lr, all_facts=True)[0]
    per_fact = []
    for k, domain in enumerate(domains):
        # the split shuffled the domain's facts: take each value back to its fact
        by_text: dict = {}
        for text, value in zip(list(train[k].facts) + list(held[k].facts), score.per_example[k]):
            by_text.setdefault(text, []).append(float(value))
        per_fact.append([by_text[text].pop(0) for text in domain.facts])
    details = {key: value for key, value in score.details.items() if key not in ("first_order", "second_order")}
    details.update(blocks=blocks, first_block=first, checkpoints=[c.spec for c in checkpoints])
    notes = [note] if note else []
    if name in ("diffin", "tracin_ckpt") and score.details.get("step_size_source") == "step length":
        notes.append("The step size between checkpoints was estimated from each step's length (give "
                     "checkpoint_lr for the real one): Diff-In's second-order term depends on it.")
    return RankingScores(name, ESTIMATOR_LABELS[name], [float(p) for p in score.priority], per_fact,
                         time.perf_counter() - t0, details, notes)
