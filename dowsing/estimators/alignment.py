"""The alignment family: gradient alignment over the parameters fine-tuning
changes (the last blocks and the final norm; `dowsing.alignment`), with the
identity or Adam's preconditioner P.

* ``alignment`` / ``alignment_adam``: between a domain's own facts,
  1/(N(N-1)) sum_{i != j} g_i^T P g_j;
* ``alignment_heldout`` / ``alignment_heldout_adam``: between its training
  and held-out halves, g_bar_A^T P g_bar_B.
"""
from __future__ import annotations

import time

from ..alignment import (ADAM_EPS, adam_preconditioner, alignment_blocks, blocks_of, domain_alignment, tail_grad_fn, tail_model,
                         tail_parameters)
from .registry import Estimator, EstimatorScore, get, register, register_family

register(Estimator("alignment_adam", "Gradient alignment between facts, Adam-preconditioned", "alignment",
                   "gradient alignment between a domain's facts over the last blocks, Adam's preconditioner",
                   needs={"block_inputs"}, cost=5.2, in_analysis=True))
register(Estimator("alignment", "Gradient alignment between facts", "alignment",
                   "the same without a preconditioner", needs={"block_inputs"}, cost=5.2, in_analysis=True))
register(Estimator("alignment_heldout_adam", "Gradient alignment between two halves, Adam-preconditioned",
                   "alignment", "gradient alignment between two seeded halves of each domain's facts, Adam's "
                                "preconditioner", needs={"block_inputs", "held_out"}, cost=5.2, in_analysis=True))
register(Estimator("alignment_heldout", "Gradient alignment between two halves", "alignment",
                   "the same without a preconditioner", needs={"block_inputs", "held_out"}, cost=5.2,
                   in_analysis=True))


def _pool(ctx) -> list:
    """The facts Adam's second moment is sampled from: the training pool, or
    every fact scored (in row order) when the estimator scores all facts."""
    split = ctx.split
    rows = [r for rows in split.train_rows for r in rows]
    if ctx.settings.all_facts:
        rows = sorted(set(rows) | {r for rows in split.held_rows for r in rows})
    return rows


def _domain_values(grad_of, preconditioners: dict, train: list, held: list, names, all_facts: bool) -> dict:
    """{name: (priority, per-example values)} of one domain. The held-out
    estimators align the training half with the held-out one (with
    all_facts, each held-out fact with the training half too); the pair
    estimators align the facts among themselves (all of them with all_facts)."""
    out = {}
    if any("heldout" in n for n in names):
        forward = domain_alignment(grad_of, train, preconditioners, query_rows=held)
        back = domain_alignment(grad_of, held, preconditioners, query_rows=train) if all_facts else None
        for n in (n for n in names if "heldout" in n):
            key = "adam" if n.endswith("_adam") else "plain"
            per_example = list(forward[key].per_fact_query) + (list(back[key].per_fact_query) if back else [])
            out[n] = (forward[key].query, per_example)
    pair_names = [n for n in names if "heldout" not in n]
    if pair_names:
        rows = train + held if all_facts else train
        result = domain_alignment(grad_of, rows, preconditioners)
        for n in pair_names:
            a = result["adam" if n.endswith("_adam") else "plain"]
            out[n] = (a.pairs, list(a.per_fact_pairs))
    return out


def alignment_scores(ctx, names) -> list:
    """The named alignment estimators (`dowsing.alignment`) over the last
    `settings.blocks` transformer blocks and the final norm, from the block
    inputs cached by the forward pass. Adam's second moment comes from
    `adam_batches` seeded minibatches of `adam_batch` facts of the pool
    (`_pool`), as a fine-tune on the mixture would see them."""
    split, s = ctx.split, ctx.settings
    if split.block_inputs is None:
        raise ValueError("the alignment estimators need the block inputs cached by the forward pass")
    t0 = time.perf_counter()
    _, blocks, note = alignment_blocks(ctx.loaded.model, s.blocks)
    depth = len(blocks_of(ctx.loaded.model))
    blocks = min(blocks, depth - split.capture_block)  # only the blocks after the captured inputs can train
    first = depth - blocks
    work, embed = tail_model(ctx.loaded.model, split.capture_block)
    try:
        work.eval()
        params = tail_parameters(work, blocks)
        grad_of = tail_grad_fn(work, embed, split.ids, split.block_inputs, params)
        preconditioners = {"plain": None}
        if any(n.endswith("_adam") for n in names):
            ctx.progress(0.0, f"Adam's second moment from {s.adam_batches} minibatches of {s.adam_batch} facts")
            preconditioners["adam"] = adam_preconditioner(grad_of, _pool(ctx), s.adam_batch, s.adam_batches, s.seed)
        values = {n: ([], []) for n in names}
        n_domains = len(split.train_rows)
        for k in range(n_domains):
            ctx.progress(0.05 + 0.95 * k / n_domains, f"gradient alignment, domain {k + 1} of {n_domains}")
            got = _domain_values(grad_of, preconditioners, list(split.train_rows[k]), list(split.held_rows[k]),
                                 names, s.all_facts)
            for n in names:
                values[n][0].append(float(got[n][0]))
                values[n][1].append([float(x) for x in got[n][1]])
    finally:
        del work
    seconds = time.perf_counter() - t0
    details = {"blocks": blocks, "first_block": first, "parameters": int(sum(p.numel() for p in params)),
               "preconditioner_pool": "every fact scored" if s.all_facts else "training facts"}
    if any(n.endswith("_adam") for n in names):
        details.update(adam_batches=s.adam_batches, adam_batch_size=s.adam_batch, adam_eps=ADAM_EPS, seed=s.seed)
    # every alignment estimator shares the same backward passes: each is charged the whole time
    return [EstimatorScore(n, get(n).label, values[n][0], values[n][1], split.forward_s + seconds, dict(details),
                           [note] if note else [])
            for n in names]


register_family("alignment", alignment_scores)
