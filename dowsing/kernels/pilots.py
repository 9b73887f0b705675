"""Pilot fine-tunes on the user's own sample: how much training on some of
a domain's facts lowers the loss of its other facts.

Each domain's sample is split into two seeded halves A and B (`splitting`).
A pilot run resets the last blocks to the starting weights and trains them
on facts of one half alone (`training.TailTrainer`); the drop of the other
half's per-fact losses is what that much data of the domain bought. Doing it
at nested sizes n of the half gives a small learning curve, which a
curve in ln n extrapolates to a larger n. The one-step lookahead is the
first-order version over every parameter of the model: Adam's first step
is a sign step, so the drop of L_B after one step of size lr on L_A is
lr * sign(grad L_A)^T grad L_B to first order.

The functions here are the pure work; `estimators/pilot.py` turns them into
estimators, and the collection plan reads the same curves.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import torch

from .subspace import pad_ids, per_fact_losses
from .training import Recipe

PILOT_SIZES = (2, 4, 8)
# AdamW on the last blocks, every fact of the run in every step (the batch is
# larger than any half): a few steps, so the drop reads how far the domain's
# facts carry to its other facts, not how well a long run memorises them.
PILOT_RECIPE = Recipe("pilot", "adamw", lr=1e-4, steps=4, blocks=4, batch=4096)


def pilot_drops(trainer, recipe: Recipe, seed: int, train_rows: list, eval_rows: list) -> torch.Tensor:
    """Per fact of eval_rows: its loss under the starting weights minus its
    loss after `recipe` trained the last blocks on train_rows alone."""
    trainer.train(recipe, seed, list(train_rows))
    after = trainer.losses(list(eval_rows))
    return trainer.data.fact_losses[list(eval_rows)].to(torch.float64) - after


def pilot_sizes(sizes, half_a: int, half_b: int) -> list:
    """The nested sizes both halves can supply, ascending, ending with the
    largest asked size, or with the smaller half's whole size where that is
    smaller (the pilot gain's own point).

    No run trains on more than the largest asked size, however large the
    halves: every check of the pilots against real training (the benchmark,
    the plan checks, the check on domains outside the repo) ran them on at
    most 8 facts a half, so that is the curve the ranking's evidence is
    for, and a run's cost grows with its size. The rest of the other half
    is still read: every fact of B is evaluated after training on A's first
    n, and the other way."""
    top = min(half_a, half_b, max(int(n) for n in sizes)) if len(sizes) else min(half_a, half_b)
    out = sorted({int(n) for n in sizes if 0 < int(n) < top})
    return out + [top] if top > 0 else out


def pilot_curve(trainer, recipe: Recipe, seed: int, rows_a: list, rows_b: list, sizes=PILOT_SIZES,
                targets: list | None = None) -> dict:
    """The two-way pilot learning curve of one domain.

    For each n in `pilot_sizes`: drop_AB(n) = mean over B of the per-fact
    drop after training on the first n facts of A, drop_BA(n) the same the
    other way, and drop(n) = (drop_AB(n) + drop_BA(n)) / 2. At the largest
    n the per-fact drops of B (trained on A) and of A (trained on B) are kept
    as well, in that order: each fact's own reading of the pilot gain.

    trainer: a TailTrainer, or a `side_by_side.TrainerPool` that runs the
    curve's fine-tunes side by side (each starts from the same weights and
    needs nothing from the others).

    Returns {"sizes", "drop" [per size], "per_fact" {"b": [...], "a": [...]},
    "per_fact_by_size" [[per fact of B then A, scaled so their mean is
    drop(n)] per size], "seconds" [per size: its share of the curve's wall
    time]}.

    targets: other domains' halves [(rows A_i, rows B_i)] to read at the
    largest n from the same two runs (`transfer_drops`' entries, at no more
    fine-tuning), returned under "transfer" with the seconds the reading
    took ("transfer_s", left out of "seconds").
    """
    sizes = pilot_sizes(sizes, len(rows_a), len(rows_b))
    runs = []
    for n in sizes:
        last = bool(targets) and n == sizes[-1]
        runs.append((rows_a[:n], rows_b, [b for _, b in targets] if last else []))
        runs.append((rows_b[:n], rows_a, [a for a, _ in targets] if last else []))
    t0 = time.perf_counter()
    done = trainer.map(lambda t, run: _pilot_run(t, recipe, seed, run), runs)
    # runs side by side overlap: each size gets its share of the wall time, in proportion to its runs' own
    # seconds, so the seconds add up to what the curve took
    own = sum(run[2] + run[3] for run in done)
    scale = (time.perf_counter() - t0) / own if own > 0 else 1.0
    drops, by_size, seconds = [], [], []
    total = len(rows_a) + len(rows_b)
    for (on_b, _, own_b, _), (on_a, _, own_a, _) in zip(done[0::2], done[1::2]):
        drops.append(0.5 * (float(on_b.mean()) + float(on_a.mean())))
        # each half weighs half whatever the halves' sizes, so the mean over all facts is drop(n)
        by_size.append([float(x) * total / (2 * len(rows_b)) for x in on_b]
                       + [float(x) * total / (2 * len(rows_a)) for x in on_a])
        seconds.append((own_b + own_a) * scale)
    per_fact = {"b": [float(x) for x in done[-2][0]], "a": [float(x) for x in done[-1][0]]} if done \
        else {"b": [], "a": []}
    out = {"sizes": sizes, "drop": drops, "per_fact": per_fact, "per_fact_by_size": by_size, "seconds": seconds}
    if targets is not None:
        read_b, read_a = (done[-2][1], done[-1][1]) if done and targets else ([], [])
        out.update(transfer=_two_way(read_b, read_a), transfer_s=scale * sum(run[3] for run in done))
    return out


def _pilot_run(trainer, recipe: Recipe, seed: int, run: tuple) -> tuple:
    """One fine-tune of a pilot curve, run = (rows taught, rows read, other
    halves read too): (the read rows' per-fact drops, each other half's mean
    drop, seconds of the run and its own read, seconds of the other reads)."""
    taught, read, others = run
    t0 = time.perf_counter()
    drops = pilot_drops(trainer, recipe, seed, taught, read)
    t1 = time.perf_counter()
    reads = [_drops_now(trainer, rows) for rows in others]
    return drops, reads, t1 - t0, time.perf_counter() - t1


def transfer_drops(trainer, recipe: Recipe, seed: int, source_a: list, source_b: list, size: int,
                   targets: list) -> list:
    """What training on one domain's half does to other domains' held-out
    halves, at one pilot size n: per target (rows A_i, rows B_i),

      on_b = mean over B_i of the per-fact drop after training on A_j[:n],
      on_a = mean over A_i of the per-fact drop after training on B_j[:n],
      drop = (on_b + on_a) / 2,

    the mirror of `pilot_curve`'s two directions (A_j's run read on B, B_j's
    on A), so the source's own halves as the target give its pilot drop at n
    (the same runs, the same arithmetic). Two fine-tunes whatever the number
    of targets (side by side on a `TrainerPool`); each target costs a
    forward pass through the trained blocks.
    Returns [{"on_b", "on_a", "drop"}] in the targets' order."""
    def run(t, job):
        taught, halves = job
        t.train(recipe, seed, list(taught))
        return [_drops_now(t, rows) for rows in halves]

    read_b, read_a = trainer.map(run, [(source_a[:size], [b for _, b in targets]),
                                       (source_b[:size], [a for a, _ in targets])])
    return _two_way(read_b, read_a)


def _drops_now(trainer, rows) -> float:
    """The mean per-fact drop of these rows under the trainer's current
    weights (as `pilot_drops` computes it, without training)."""
    rows = list(rows)
    return float((trainer.data.fact_losses[rows].to(torch.float64) - trainer.losses(rows)).mean())


def _two_way(read_b: list, read_a: list) -> list:
    return [{"on_b": b, "on_a": a, "drop": 0.5 * (b + a)} for b, a in zip(read_b, read_a)]


def log_fit(sizes, values) -> tuple[float, float]:
    """(a, b) of the least-squares line value = a + b ln n over the points;
    one point gives b = 0 (a flat curve: nothing to extrapolate from)."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.asarray(values, dtype=float)
    if len(x) < 2 or float(np.ptp(x)) == 0.0:
        return float(y.mean()), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def extrapolate(sizes, values, n_target: float) -> float:
    """The ln-n line through the pilot points (`log_fit`) read at n_target:
    a concave curve whose gain per added fact falls as 1/n."""
    a, b = log_fit(sizes, values)
    return a + b * math.log(n_target)


@contextmanager
def all_parameters_trainable(net):
    """Switch gradients on for every parameter, and back to how they were."""
    before = [p.requires_grad for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(True)
        yield [p for p in net.parameters()]
    finally:
        for p, flag in zip(net.parameters(), before):
            p.requires_grad_(flag)


def mean_loss_gradient(net, params: list, ids: list, rows: list, batch_size: int = 16) -> list:
    """grad of L = (1/|rows|) sum_i l_i over every parameter of the full
    model (tied weights once), accumulated over batches of facts."""
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        input_ids, mask = pad_ids([ids[r] for r in chunk], device)
        logits = net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        loss = per_fact_losses(logits, input_ids, mask).sum() / len(rows)
        grads = torch.autograd.grad(loss, params)
        for t, g in zip(total, grads):
            t.add_(g)
        del logits, loss, grads
    return total


def directional_losses(net, params: list, ids: list, rows: list, direction: list, batch_size: int = 16) -> torch.Tensor:
    """Per fact of rows: d l_i / d eps of l_i(theta + eps * direction) at 0,
    i.e. direction^T grad l_i, by forward-mode differentiation (one pass per
    batch, no per-fact backward)."""
    from torch.func import functional_call, jvp

    names = [n for n, _ in net.named_parameters()]
    device = params[0].device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        input_ids, mask = pad_ids([ids[r] for r in chunk], device)

        def losses(*values):
            logits = functional_call(net, dict(zip(names, values)),
                                     kwargs={"input_ids": input_ids, "attention_mask": mask, "use_cache": False}).logits
            return per_fact_losses(logits, input_ids, mask)

        with torch.no_grad():
            _, tangent = jvp(losses, tuple(p.detach() for p in params), tuple(direction))
        out.append(tangent.to(torch.float64).cpu())
    return torch.cat(out)


def sign_lookahead(net, ids: list, rows_a: list, rows_b: list, lr: float, per_fact: bool = False,
                   batch_size: int = 16) -> dict:
    """The first-order drop of each half's mean loss after one Adam step of
    size lr on the other half, over every parameter of the model:
    drop_AB = lr * sign(grad L_A)^T grad L_B (Adam's first step is
    -lr * sign(g) up to its epsilon), and the score is
    (drop_AB + drop_BA) / 2.

    per_fact: also each fact's own first-order drop, lr * sign(grad L_A)^T
    grad l_i for i in B and the other way for A (their means are drop_AB and
    drop_BA), by forward-mode differentiation.
    """
    with all_parameters_trainable(net) as params:
        grad_a = mean_loss_gradient(net, params, ids, rows_a, batch_size)
        grad_b = mean_loss_gradient(net, params, ids, rows_b, batch_size)
    sign_a = [torch.sign(g) for g in grad_a]
    sign_b = [torch.sign(g) for g in grad_b]
    drop_ab = lr * float(sum((s * g).sum(dtype=torch.float64) for s, g in zip(sign_a, grad_b)))
    drop_ba = lr * float(sum((s * g).sum(dtype=torch.float64) for s, g in zip(sign_b, grad_a)))
    del grad_a, grad_b
    out = {"drop_ab": drop_ab, "drop_ba": drop_ba, "score": 0.5 * (drop_ab + drop_ba)}
    if per_fact:
        params = [p for p in net.parameters()]
        out["per_fact_b"] = (lr * directional_losses(net, params, ids, rows_b, sign_a, batch_size)).tolist()
        out["per_fact_a"] = (lr * directional_losses(net, params, ids, rows_a, sign_b, batch_size)).tolist()
    return out


# --- what a plan's pilots cost before they run (pure; see `costs`) -------------------------------------------------

def plan_units_s(cal, train: list, held: list, sizes, steps: int, keep: int, stored=frozenset()) -> list:
    """Seconds of every pilot fine-tune of a plan (`plan.measure_pilots`):
    per domain whose halves A (train) and B (held) have 2 facts each, per n
    of `pilot_sizes`, `steps` steps on A's first n facts (all of them in
    every step: n times the longest) then B's losses read in batches of 16,
    and the same from B to A. Every unit trains all `keep` kept blocks.
    train / held: tokens per fact of each domain's halves; stored: the
    positions of the domains whose pilot curves are stored units (none of
    their fine-tunes run)."""
    from ..costs import finetune_s, read_tokens

    units = []
    for k, (a, b) in enumerate(zip(train, held)):
        if min(len(a), len(b)) < 2 or k in stored:
            continue
        for n in pilot_sizes(sizes, len(a), len(b)):
            units.append(finetune_s(cal, steps, n * max(a[:n]), keep, keep, read_tokens(b)))
            units.append(finetune_s(cal, steps, n * max(b[:n]), keep, keep, read_tokens(a)))
    return units


def transfer_s(cal, train: list, held: list, sizes, steps: int, keep: int, stored=frozenset()) -> float:
    """Seconds of the plan's transfer matrix with no entry stored (an upper
    bound otherwise): per source j whose halves hold a pilot, every domain
    i's halves B_i and A_i read through the trained blocks after the runs on
    A_j and on B_j cut to j's largest pilot size; a source whose pilot
    curve is stored (`stored`) first runs those two fine-tunes
    (`pilots.transfer_drops`), one whose pilot runs now is read from the
    pilot's own largest runs (`pilot_curve`'s targets)."""
    from ..costs import finetune_s, read_tokens, tail_pass_s

    reads = sum(tail_pass_s(cal, read_tokens(b) + read_tokens(a), keep) for a, b in zip(train, held))
    seconds = 0.0
    for k, (a, b) in enumerate(zip(train, held)):
        if min(len(a), len(b)) < 2:
            continue
        seconds += reads
        if k in stored:
            n = pilot_sizes(sizes, len(a), len(b))[-1]
            seconds += finetune_s(cal, steps, n * max(a[:n]), keep, keep, 0) + finetune_s(
                cal, steps, n * max(b[:n]), keep, keep, 0)
    return seconds


def plan_pilots_cost(cal, train: list, held: list, sizes, stored=frozenset()) -> tuple:
    """(costs.Cost, units) of a plan's pilot fine-tunes on the last
    PILOT_RECIPE.blocks blocks: every unit of `plan_units_s` and the trainer
    (a tail copy, checked on 16 held-out facts); bytes beside the forward
    pass: the trainer's own copy of the block inputs, the tail copy and its
    starting weights, the trained blocks' gradients and AdamW's two moments,
    and a step over the largest half, and as much again but the starting
    weights and block inputs for each further worker of `side_by_side`. train / held: the domains of the
    forward pass; stored: positions among them whose pilot curves are
    stored. No trainer (nothing) when no unit is left to run."""
    from ..costs import Cost, block_inputs_bytes, tail_params, tail_pass_s, trainable_params
    from .side_by_side import pool_workers

    keep = min(PILOT_RECIPE.blocks, cal.n_layers)
    flat = [n for d in train for n in d] + [n for d in held for n in d]
    units = plan_units_s(cal, train, held, sizes, PILOT_RECIPE.steps, keep, stored)
    if not units:
        return Cost(0.0, 0.0), units
    b = cal.dtype_bytes
    largest = max([min(len(a), len(h)) for a, h in zip(train, held)] + [1])
    step = cal.step_bytes_per_token * largest * max(flat)
    trained = 3 * trainable_params(cal, keep) * b
    # each further worker of the runs side by side: its own tail copy, moments and step
    twins = (pool_workers(cal.device, cal.threads) - 1) * (tail_params(cal, keep) * b + trained + step)
    memory = block_inputs_bytes(cal, flat) + 2 * tail_params(cal, keep) * b + trained + step + twins
    return Cost(sum(units) + cal.copy_s + tail_pass_s(cal, 16 * max(flat), keep), memory), units
