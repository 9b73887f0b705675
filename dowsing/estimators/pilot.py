"""The pilot family: pilot fine-tunes on each domain's own facts
(`dowsing.kernels.pilots`), split into two seeded halves A (the training half) and
B (the held-out half).

* ``pilot_gain``: train the last blocks briefly on A alone and measure the
  drop of B's loss, and the other way; the mean of the two drops (a
  reducible-loss reading: what the domain's facts teach about its other
  facts, not how high its loss is);
* ``pilot_curve``: the same at nested sizes of the half (2, 4, 8 facts),
  a line in ln n through the points, read at the benchmark's largest dose;
* ``lookahead_sign``: the first-order drop of each half's loss after one
  Adam step on the other over every parameter of the model,
  lr * sign(grad L_A)^T grad L_B, averaged both ways.

A domain whose halves cannot hold two facts each has no pilot: its priority
is NaN and `details["too_small"]` names it (the analysis ranks it by the
fallback estimator).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from ..kernels.alignment import blocks_of
from ..costs import (Cost, block_inputs_bytes, finetune_s, padded_tokens, read_tokens, tail_params, tail_pass_s,
                     trainable_params)
from ..kernels.pilots import PILOT_RECIPE, extrapolate, log_fit, pilot_curve, pilot_sizes, sign_lookahead
from ..kernels.side_by_side import TrainerPool, pool_workers
from ..kernels.training import TailData, TailTrainer
from ..storage.units import pilot_key, recomputed_message
from .registry import Estimator, EstimatorScore, get, register, register_family

MIN_HALF = 2

PILOT_GAIN = "pilot_gain"  # also the diagnosis' reading of each domain
PILOT_CURVE = "pilot_curve"  # also the plan's curves
LOOKAHEAD_SIGN = "lookahead_sign"

register(Estimator(PILOT_GAIN, "Pilot gain: train on half, drop of the other half", "pilot",
                   "fine-tune briefly on one half of a domain's facts (at most 8), drop of the other half's loss, "
                   "both ways",
                   needs={"block_inputs", "held_out"}, in_analysis=True))
register(Estimator(PILOT_CURVE, "Pilot learning curve, extrapolated", "pilot",
                   "the pilot gain at 2, 4, 8 facts, a line in ln n, read at the largest dose",
                   needs={"block_inputs", "held_out"}, in_analysis=True))
register(Estimator(LOOKAHEAD_SIGN, "One-step Adam lookahead, all parameters", "pilot",
                   "first-order drop of one half's loss after one Adam (sign) step on the other, every parameter",
                   needs={"held_out"}, in_analysis=True))


def _in_row_order(values_a: list, values_b: list, n_a: int, n_b: int) -> list:
    """Per fact, training half then held-out half (the all_facts order),
    each half scaled so the mean over all facts weighs the halves equally."""
    total = n_a + n_b
    return [float(x) * total / (2 * n_a) for x in values_a] + [float(x) * total / (2 * n_b) for x in values_b]


def _curve_values(curve: dict, target: int, n_a: int, n_b: int) -> dict:
    """Priorities and per-fact values of pilot_gain and pilot_curve from one
    domain's two-way curve. Per fact: its drop at each size (B facts trained
    on A, A facts on B) fitted by the same ln-n line, whose mean over the
    facts is the domain's line, read at `target`."""
    sizes = curve["sizes"]
    last = curve["per_fact"]
    gain_facts = _in_row_order(last["a"], last["b"], n_a, n_b)
    by_fact = np.asarray(curve["per_fact_by_size"], dtype=float)  # (sizes, B facts then A facts), scaled
    per_fact_curve = [extrapolate(sizes, by_fact[:, j], target) for j in range(by_fact.shape[1])]
    curve_facts = per_fact_curve[n_b:] + per_fact_curve[:n_b]
    a, b = log_fit(sizes, curve["drop"])
    return {PILOT_GAIN: (curve["drop"][-1], gain_facts),
            PILOT_CURVE: (a + b * math.log(target), curve_facts),
            "fit": {"sizes": sizes, "drop": curve["drop"], "intercept": a, "slope_per_ln_n": b, "target": target,
                    # what a collection plan's learning curve is fitted to (`plan.fit_pilots`)
                    "per_fact_by_size": curve["per_fact_by_size"], "strata": [n_b, n_a]}}


class _PilotCurves:
    """Each domain's two-way pilot curve: from the run's per-domain units
    (`ctx.units`, keyed by `units.pilot_key`) when one holds it, else run on
    a TailTrainer built on first need (none when every curve is stored) and
    kept there. The minibatches are seeded by the settings' seed alone and
    the halves by (seed, domain name), so a curve is the same whichever
    other domains share the run."""

    def __init__(self, ctx, wanted: set):
        self.ctx, self.wanted, self.units = ctx, wanted, ctx.units if wanted else None
        self.trainer = None
        self.sizes = ctx.settings.pilot_sizes if PILOT_CURVE in wanted else None
        self.recipe = PILOT_RECIPE
        if wanted and ctx.split.capture_block is not None:
            # only the blocks after the captured inputs can train (the depth of the trainer's tail copy)
            depth = len(blocks_of(ctx.loaded.model)) - ctx.split.capture_block
            self.recipe = dataclasses.replace(PILOT_RECIPE, blocks=min(PILOT_RECIPE.blocks, depth))

    def _sizes(self, rows_a: list, rows_b: list) -> list:
        # the pilot gain alone: only the curve's last point, at the largest pilot size
        sizes = self.sizes if self.sizes is not None else (max(self.ctx.settings.pilot_sizes),)
        return pilot_sizes(sizes, len(rows_a), len(rows_b))

    def key(self, rows_a: list, rows_b: list) -> str | None:
        if self.units is None:
            return None
        return pilot_key(self.units.model, self.units.texts(rows_a), self.units.texts(rows_b), self.recipe.label(),
                         self.ctx.settings.seed, self._sizes(rows_a, rows_b))

    def cached(self, k: int, rows_a: list, rows_b: list) -> bool:
        key = self.key(rows_a, rows_b) if self.wanted else None
        return key is not None and self.units.has(key)

    def _trainer(self):
        if self.trainer is None:
            tail = self.ctx.take_tail()
            if tail is not None:  # checked by the pipeline on every domain's facts: no second copy, no second check
                trainer = TailTrainer.from_parts(tail, TailData.from_split(self.ctx.split))
            else:
                trainer = TailTrainer(self.ctx.loaded, self.ctx.split)
                trainer.check()
            # a curve's fine-tunes are independent: they run side by side, one per core
            self.trainer = TrainerPool(trainer, pool_workers(trainer.device.type))
        return self.trainer

    def curve(self, k: int, rows_a: list, rows_b: list) -> dict:
        """`pilots.pilot_curve` of domain k, with the per-fact losses of its
        halves under the starting weights (what the drops are measured from)."""
        name = self.ctx.split.names[k] if self.ctx.split.names else str(k)
        key = self.key(rows_a, rows_b)
        stored = self.units.get("pilot", key, name) if key is not None else None
        if stored is not None:
            return stored
        curve = pilot_curve(self._trainer(), self.recipe, self.ctx.settings.seed, rows_a, rows_b,
                            self._sizes(rows_a, rows_b))
        losses = self.ctx.split.tokens.fact_losses
        curve.update(losses_a=[float(losses[r]) for r in rows_a], losses_b=[float(losses[r]) for r in rows_b])
        if key is not None:
            self.units.put("pilot", key, name, curve)
        return curve

    def message(self) -> str:
        done = self.units.summary("pilot")
        return recomputed_message(len(done["computed"]), len(done["computed"]) + len(done["reused"]))


def pilot_scores(ctx, names) -> list:
    """The named pilot estimators, every domain; see the module's docstring."""
    split, s = ctx.split, ctx.settings
    t0 = time.perf_counter()
    n_domains = len(split.train_rows)
    values = {n: ([], []) for n in names}
    seconds = {n: 0.0 for n in names}
    fits, small = [], []
    curves = _PilotCurves(ctx, {PILOT_GAIN, PILOT_CURVE} & set(names))
    recipe = curves.recipe
    stored = [curves.cached(k, list(split.train_rows[k]), list(split.held_rows[k])) for k in range(n_domains)]
    if curves.units is not None:
        ctx.progress(0.0, f"pilot fine-tunes: {recomputed_message(n_domains - sum(stored), n_domains)}")
    for k in range(n_domains):
        rows_a, rows_b = list(split.train_rows[k]), list(split.held_rows[k])
        ctx.progress(k / n_domains, f"pilot fine-tunes, domain {k + 1} of {n_domains}"
                     + (" (from cache)" if stored[k] else ""))
        if min(len(rows_a), len(rows_b)) < MIN_HALF:
            small.append(split.names[k] if split.names else k)
            for n in names:
                values[n][0].append(float("nan"))
                values[n][1].append([float("nan")] * (len(rows_a) + len(rows_b) if s.all_facts else len(rows_a)))
            fits.append(None)
            continue
        got = {}
        if curves.wanted:
            curve = curves.curve(k, rows_a, rows_b)
            got.update(_curve_values(curve, s.pilot_target, len(rows_a), len(rows_b)))
            seconds[PILOT_GAIN] = seconds.get(PILOT_GAIN, 0.0) + curve["seconds"][-1]
            seconds[PILOT_CURVE] = seconds.get(PILOT_CURVE, 0.0) + sum(curve["seconds"])
            fits.append(got.pop("fit"))
        if LOOKAHEAD_SIGN in names:
            t1 = time.perf_counter()
            look = sign_lookahead(ctx.loaded.model, split.ids, rows_a, rows_b, s.recipe.lr, per_fact=s.all_facts,
                                  batch_size=s.batch_size)
            facts = (_in_row_order(look["per_fact_a"], look["per_fact_b"], len(rows_a), len(rows_b))
                     if s.all_facts else None)
            got[LOOKAHEAD_SIGN] = (look["score"], facts)
            seconds[LOOKAHEAD_SIGN] += time.perf_counter() - t1
        for n in names:
            priority, facts = got[n]
            values[n][0].append(float(priority))
            values[n][1].append(facts)
    ctx.progress(1.0, "pilot fine-tunes done" + (f": {curves.message()}" if curves.units is not None else ""))
    details = {"pilot_recipe": recipe.label(), "pilot_sizes": list(s.pilot_sizes), "target_n": s.pilot_target,
               "lookahead_lr": s.recipe.lr, "too_small": small, "wall_s": time.perf_counter() - t0}
    out = []
    for n in names:
        # per-fact values exist over both halves only: the benchmark's mode (training facts) gets none
        per_example = values[n][1] if s.all_facts else None
        extra = {"fits": fits} if n == PILOT_CURVE else {}
        notes = ([f"{len(small)} domain(s) have fewer than {2 * MIN_HALF} facts: no pilot ({', '.join(map(str, small))})"]
                 if small else [])
        out.append(EstimatorScore(n, get(n).label, values[n][0], per_example, split.forward_s + seconds[n],
                                  {**details, **extra}, notes))
    return out


def full_gradient_s(cal, rows: list, batch_size: int) -> float:
    """The gradient of a mean loss over every parameter of the model
    (`pilots.mean_loss_gradient`), accumulated over batches of `batch_size`
    facts: the forward pass at its calibrated rate, backward through the LM
    head and every block as a fine-tune step's (`costs.tail_work`), and each
    batch's gradient added to the sum (a pass over every parameter)."""
    calls, padded = math.ceil(len(rows) / batch_size), padded_tokens(rows, batch_size)
    backward = tail_pass_s(cal, padded, cal.n_layers, cal.n_layers) - tail_pass_s(cal, padded, cal.n_layers)
    return cal.forward_s_per_token * padded + backward + calls * cal.n_params * cal.vector_s_per_element


def pilot_family_s(cal, train: list, held: list, names, keep: int, sizes=(2, 4, 8), batch_size: int = 16,
                   stored=frozenset()) -> float:
    """The pilot estimators over each domain's halves A (train) and B
    (held); a domain whose halves cannot hold two facts each costs nothing.
    pilot_gain / pilot_curve: a trainer (a tail copy, checked on 16 facts of
    B), then per domain and per pilot size n (`pilots.pilot_sizes`: the
    pilot sizes, the last cut to the smaller half; pilot_gain alone: the
    last only) two runs, A's first n facts teaching B and the
    other way, each PILOT_RECIPE.steps steps of all n facts on the last
    min(PILOT_RECIPE.blocks, keep) blocks and a read of the other half.
    lookahead_sign: per domain the whole model's gradient of each half's
    mean loss, then the two signs and dot products over every parameter.
    stored: positions of the domains whose pilot curves are stored units:
    their pilot_gain / pilot_curve runs are not priced, and the trainer is
    priced only when some domain still runs (`_PilotCurves` builds it on
    first need; its check reads the first 16 facts of every domain's B)."""
    names = set(names)
    tuned = bool(names & {PILOT_GAIN, PILOT_CURVE})
    blocks = min(PILOT_RECIPE.blocks, keep)
    seconds = 0.0
    if tuned and to_tune(train, held, stored):
        seconds += cal.copy_s + tail_pass_s(cal, read_tokens([n for d in held for n in d][:16]), keep)
    for k, (a, b) in enumerate(zip(train, held)):
        if min(len(a), len(b)) < MIN_HALF:
            continue
        if tuned and k not in stored:
            wanted = sizes if PILOT_CURVE in names else (max(sizes),)
            for n in pilot_sizes(wanted, len(a), len(b)):
                for taught, read in ((a, b), (b, a)):
                    seconds += finetune_s(cal, PILOT_RECIPE.steps, n * max(taught[:n]), keep, blocks,
                                          read_tokens(read))
        if LOOKAHEAD_SIGN in names:
            seconds += full_gradient_s(cal, a, batch_size) + full_gradient_s(cal, b, batch_size)
            seconds += 4 * cal.n_params * cal.vector_s_per_element
    return seconds


def to_tune(train: list, held: list, stored=frozenset()) -> list:
    """Positions of the domains whose pilot runs: halves of MIN_HALF facts
    each, and no stored pilot curve."""
    return [k for k, (a, b) in enumerate(zip(train, held)) if min(len(a), len(b)) >= MIN_HALF and k not in stored]


def pilot_memory(cal, train: list, held: list, keep: int, names, batch_size: int = 16, stored=frozenset()) -> float:
    """Bytes the named pilot estimators add over the halves A (train) and B
    (held): pilot_gain / pilot_curve a trainer (its own copy of the block
    inputs, a tail copy and its starting weights, gradients and AdamW's two
    moments of the trained blocks) and a step over the larger half;
    the runs side by side (`side_by_side`) add each further worker's tail
    copy, moments and step; lookahead_sign, one domain at a time beside it, the whole model's
    gradients of both halves and their signs, and one batch's activations
    kept for the backward pass: the calibrated one-block step's per token
    (the LM head's logits and one block) plus, for each further block,
    about 10 d_model + 4 d_ff values a token. No trainer when every
    domain's pilot curve is `stored` (or none can hold a pilot)."""
    names = set(names)
    b = cal.dtype_bytes
    flat = [n for d in train + held for n in d]
    if not flat:
        return 0.0
    half = max(max(len(d) for d in train + held), 1)
    trainer = step = lookahead = 0.0
    if names & {PILOT_GAIN, PILOT_CURVE} and to_tune(train, held, stored):
        trained = 3 * trainable_params(cal, min(PILOT_RECIPE.blocks, keep)) * b
        step = cal.step_bytes_per_token * half * max(flat)
        trainer = sum(flat) * cal.d_model * b + 2 * tail_params(cal, keep) * b + trained
        # the runs side by side: each further worker its own tail copy, moments and step
        trainer += (pool_workers(cal.device, cal.threads) - 1) * (tail_params(cal, keep) * b + trained + step)
    if LOOKAHEAD_SIGN in names:
        per_token = cal.step_bytes_per_token + (cal.n_layers - 1) * (10 * cal.d_model + 4 * cal.d_ff) * b
        lookahead = 4 * cal.n_params * b + per_token * batch_size * max(flat)
    return trainer + max(step, lookahead)


def pilot_cost(cal, run, names) -> Cost:
    """`pilot_family_s` and `pilot_memory` over the run's halves; in an
    analysis every fact's block inputs are held beside them. The domains of
    run.pilots_stored run no pilot fine-tunes."""
    seconds = pilot_family_s(cal, run.train, run.held, names, run.keep, run.pilot_sizes, run.batch_size,
                             run.pilots_stored)
    memory = pilot_memory(cal, run.train, run.held, run.keep, names, run.batch_size, run.pilots_stored)
    if run.pipeline == "analysis":
        memory += block_inputs_bytes(cal, [n for _, d in run.domains for n in d])
    return Cost(seconds, memory)


register_family("pilot", pilot_scores, pilot_cost)
