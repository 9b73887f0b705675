"""The alignment family: gradient alignment over the parameters fine-tuning
changes (the last blocks and the final norm; `dowsing.kernels.alignment`), with the
identity or Adam's preconditioner P.

* ``alignment`` / ``alignment_adam``: between a domain's own facts,
  1/(N(N-1)) sum_{i != j} g_i^T P g_j;
* ``alignment_heldout`` / ``alignment_heldout_adam``: between its training
  and held-out halves, g_bar_A^T P g_bar_B.
"""
from __future__ import annotations

import time

from ..kernels.alignment import (ADAM_EPS, adam_preconditioner, alignment_blocks, blocks_of, domain_alignment, tail_grad_fn, tail_model,
                         tail_parameters)
from ..costs import (GRAD_CHUNK, Cost, adam_moment_s, chunked, gradients_s, ranking_tail_bytes, tail_params,
                     trainable_params)
from .registry import Estimator, EstimatorScore, get, register, register_family

register(Estimator("alignment_adam", "Gradient alignment between facts, Adam-preconditioned", "alignment",
                   "gradient alignment between a domain's facts over the last blocks, Adam's preconditioner",
                   needs={"block_inputs"}, in_analysis=True))
register(Estimator("alignment", "Gradient alignment between facts", "alignment",
                   "the same without a preconditioner", needs={"block_inputs"}, in_analysis=True))
register(Estimator("alignment_heldout_adam", "Gradient alignment between two halves, Adam-preconditioned",
                   "alignment", "gradient alignment between two seeded halves of each domain's facts, Adam's "
                                "preconditioner", needs={"block_inputs", "held_out"}, in_analysis=True))
register(Estimator("alignment_heldout", "Gradient alignment between two halves", "alignment",
                   "the same without a preconditioner", needs={"block_inputs", "held_out"},
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
    """The named alignment estimators (`dowsing.kernels.alignment`) over the last
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


def domain_alignment_s(cal, rows: list, query: list | None, keep: int, trained: int,
                       preconditioners: int = 1) -> float:
    """`alignment.domain_alignment`: the domain's summed gradient in chunks,
    the query's gradient in one call, and one gradient per fact, each
    flattened and squared, then per preconditioner dotted with itself, the
    domain's sum and the query's (three float64 sums)."""
    calls, padded = chunked(rows)
    per_fact = 2 + preconditioners * (3 if query else 2)
    seconds = gradients_s(cal, calls, padded, keep, trained, vector_ops=2)
    seconds += gradients_s(cal, len(rows), sum(rows), keep, trained, vector_ops=per_fact)
    if query:
        seconds += gradients_s(cal, 1, len(query) * max(query), keep, trained, vector_ops=1 + preconditioners)
    return seconds


def alignment_cost(cal, run, names) -> Cost:
    """Per domain its training facts against each other or (the held-out
    estimators) against its held-out half, sharing one pass of gradients
    for every preconditioner asked (plain, Adam's), Adam's moment once, all
    in a tail copy training the last align_blocks blocks. Memory: the larger
    of the model's deep copy and the tail copy with ten float64 vectors of
    the trained parameters, and a chunk's gradients. In an analysis (one
    estimator) its two halves against each other both ways, over the last
    align_blocks blocks alone (`costs.ranking_tail_bytes`)."""
    adam = any(n.endswith("_adam") for n in names)
    plain = any(not n.endswith("_adam") for n in names)
    query = any("held_out" in get(n).needs for n in names)
    pool = [n for d in run.train for n in d] if run.pipeline != "analysis" else [
        n for _, d in run.domains for n in d]
    if run.pipeline == "analysis":
        keep = trained = min(run.align_blocks, cal.n_layers)
        seconds = cal.copy_s + (adam_moment_s(cal, pool, run.adam_batches, keep, keep) if adam else 0.0)
        for (_, rows), half_a, half_b in zip(run.domains, run.train, run.held):
            if query:
                seconds += domain_alignment_s(cal, half_a, half_b, keep, keep)
                seconds += domain_alignment_s(cal, half_b, half_a, keep, keep)
            else:
                seconds += domain_alignment_s(cal, list(rows), None, keep, keep)
        return Cost(seconds, ranking_tail_bytes(cal, run))
    keep, trained = run.keep, min(run.align_blocks, run.keep)
    seconds = cal.copy_s + (adam_moment_s(cal, pool, run.adam_batches, keep, trained) if adam else 0.0)
    for k, rows in enumerate(run.train):
        seconds += domain_alignment_s(cal, rows, run.held[k] if query else None, keep, trained,
                                      int(adam) + int(plain))
    b = cal.dtype_bytes
    memory = max(cal.n_params * b, tail_params(cal, keep) * b + 10 * trainable_params(cal, trained) * 8)
    return Cost(seconds, memory + cal.step_bytes_per_token * GRAD_CHUNK * max(run.flat))


register_family("alignment", alignment_scores, alignment_cost)
