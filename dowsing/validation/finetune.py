"""Ground truth by fine-tuning: counterfactual runs that differ only by the
added domain's data."""
from __future__ import annotations

import random
import time

import torch

from ..training import Recipe, TailData, TailTrainer, build_trainer


def validation_recipe(config, blocks: int) -> Recipe:
    """The quick validation's AdamW recipe (a ValidationConfig's finetune_*
    fields) training the last `blocks` blocks."""
    return Recipe("validation", "adamw", lr=config.finetune_lr, steps=config.finetune_steps, blocks=blocks,
                  batch=config.finetune_batch, added_batch=config.finetune_added_batch,
                  added_weight=config.finetune_added_weight)


def finetune_gains(loaded, split, train, config, report=None, executor=None, store=None, should_stop=None) -> dict:
    """Held-out per-fact losses after the baseline run and after each domain's
    run, all from the same starting weights and the same seeded minibatches.

    AdamW trains the last `finetune_blocks` transformer blocks and the final
    norm (the embeddings and tied LM head stay fixed), starting from the
    block inputs cached by the forward pass, so a step costs those blocks and
    the head, not the whole model. The runs are units of `executor` (in this
    process by default), stored in `store` as they finish.

    Returns per held-out fact (domain by domain) "before", "baseline" and
    "runs" {name: [...]}, with "held_rows", "gain" (own held-out drop against
    the baseline), "drop_matrix" and "baseline_drop".
    """
    from ..executor import LocalExecutor, Shared, Unit

    report = report or (lambda fraction, message: None)
    executor = executor or LocalExecutor()
    trainer = TailTrainer(loaded, split)
    # every kept block trains: the split captured its inputs at depth - finetune_blocks
    recipe = validation_recipe(config, trainer.depth)
    held_all = [r for rows in split.held_rows for r in rows]
    before = trainer.losses(held_all, config.batch_size)
    want = split.tokens.fact_losses[held_all].cpu()
    if float((before - want).abs().max()) > 1e-3 * float(want.abs().max()):
        raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                           "fine-tuning ground truth is not available for this architecture.")

    t0 = time.perf_counter()
    n = len(train)
    units = [Unit("validation/baseline", ("mixture", recipe, config.seed, None, config.batch_size))]
    units += [Unit(f"validation/domain{k}", ("mixture", recipe, config.seed, k, config.batch_size)) for k in range(n)]

    def on_done(key, value, finished, total):
        report(finished / total, f"fine-tuning run {finished} of {total} done ({key.split('/')[-1]})")

    report(0.0, f"{n + 1} fine-tuning runs (a baseline and one per domain)")
    shared = Shared("validation-tail", payload=trainer.payload() if executor.kind != "local" else None,
                    build=build_trainer, context=trainer if executor.kind == "local" else None)
    values = executor.run(finetune_unit, units, shared, store=store, on_done=on_done, should_stop=should_stop)
    baseline = values["validation/baseline"]
    runs = {d.name: values[f"validation/domain{k}"] for k, d in enumerate(train)}
    held_rows, start = [], 0
    for rows in split.held_rows:
        held_rows.append(list(range(start, start + len(rows))))
        start += len(rows)
    drop = [[float(baseline[held_rows[j]].mean() - runs[d.name][held_rows[j]].mean()) for d in train]
            for j in range(n)]
    return {
        "held_rows": held_rows,
        "before": before.tolist(),
        "baseline": baseline.tolist(),
        "runs": {name: r.tolist() for name, r in runs.items()},
        # drop_matrix[j][k]: held-out loss drop of j from adding k's data (rows improve, columns collected)
        "drop_matrix": drop,
        "gain": [drop[k][k] for k in range(n)],
        "baseline_drop": [float(before[r].mean() - baseline[r].mean()) for r in held_rows],
        "steps": config.finetune_steps,
        "trained_blocks": config.finetune_blocks,
        "seconds": time.perf_counter() - t0,
    }


def mixture_losses(trainer: "TailTrainer", recipe: "Recipe", seed: int, k: int | None,
                   batch_size: int = 16) -> torch.Tensor:
    """Losses of every held-out fact after a run on the mixture of all
    training halves, with domain k's training facts added (k = None: the
    baseline)."""
    data = trainer.data
    pool = [r for rows in data.train_rows for r in rows]
    trainer.train(recipe, seed, pool, added=None if k is None else data.train_rows[k])
    return trainer.losses([r for rows in data.held_rows for r in rows], batch_size)


# --- units of ground truth: each one fine-tune from the starting weights, independent of the others ----------

def baseline_losses(trainer: TailTrainer, recipe: Recipe, seed: int) -> dict:
    """Held-out losses of every domain before training and after the baseline
    run (the mixture of all training halves, nothing added)."""
    data = trainer.data
    pool = [r for rows in data.train_rows for r in rows]
    held_all = [r for rows in data.held_rows for r in rows]
    trainer.reset()
    before = trainer.losses(held_all)
    trainer.train(recipe, seed, pool)
    return {"before": before, "baseline": trainer.losses(held_all)}


def added_losses(trainer: TailTrainer, recipe: Recipe, seed: int, k: int) -> torch.Tensor:
    """Held-out losses of domain k after the run that adds k's training facts."""
    data = trainer.data
    pool = [r for rows in data.train_rows for r in rows]
    trainer.train(recipe, seed, pool, added=data.train_rows[k])
    return trainer.losses(data.held_rows[k])


def gains_from_losses(held_rows: list, base: dict, after: list) -> dict:
    """Realised gains from the units' losses: gain_k = mean over k's held-out
    facts of (loss after the baseline - loss after the run adding k)."""
    offsets, start = [], 0
    for rows in held_rows:
        offsets.append(list(range(start, start + len(rows))))
        start += len(rows)
    baseline, before = base["baseline"], base["before"]
    per_fact = [(baseline[offsets[k]] - after[k]).tolist() for k in range(len(held_rows))]
    return {
        "gain": [sum(g) / len(g) for g in per_fact],
        "gain_per_fact": per_fact,
        "baseline_drop": [float((before[o] - baseline[o]).mean()) for o in offsets],
    }


def truth_units(recipe: Recipe, seed: int, n_domains: int) -> list:
    """The units of one recipe and seed: the baseline and one run per domain."""
    from ..executor import Unit

    prefix = f"truth/{recipe.name}/{recipe.label()}/seed{seed}"
    return ([Unit(f"{prefix}/baseline", ("baseline", recipe, seed))]
            + [Unit(f"{prefix}/domain{k}", ("added", recipe, seed, k)) for k in range(n_domains)])


def finetune_unit(trainer: TailTrainer, kind: str, recipe: Recipe, seed: int, *args):
    """One unit of ground truth on a trainer (in this process or a worker):
    "baseline" -> baseline_losses, "added" k -> added_losses,
    "curve" (k, n, curve_held, n_ref) -> one learning-curve point,
    "mixture" (k or None, batch_size) -> mixture_losses."""
    if kind == "baseline":
        return baseline_losses(trainer, recipe, seed)
    if kind == "added":
        return added_losses(trainer, recipe, seed, *args)
    if kind == "curve":
        return curve_point(trainer, recipe, seed, *args)
    if kind == "mixture":
        return mixture_losses(trainer, recipe, seed, *args)
    raise ValueError(f"unknown unit kind {kind!r}")


def counterfactual_gains(trainer: TailTrainer, recipe: Recipe, seed: int, report=None) -> dict:
    """Realised gain of every domain under one recipe and seed, in this
    process: the held-out loss of k after the baseline run minus after the
    run that adds k's training facts. Only k's own held-out facts are
    evaluated after run k.

    Returns {"gain": [per domain], "gain_per_fact": [[baseline - run, per
    held-out fact of k]], "baseline_drop": [per domain], "seconds"}.
    """
    report = report or (lambda fraction, message: None)
    t0 = time.perf_counter()
    base = baseline_losses(trainer, recipe, seed)
    n = len(trainer.data.train_rows)
    after = []
    for k in range(n):
        report(k / n, f"domain {k + 1} of {n}")
        after.append(added_losses(trainer, recipe, seed, k))
    out = gains_from_losses(trainer.data.held_rows, base, after)
    out["seconds"] = time.perf_counter() - t0
    return out


def curve_plan(data: TailData, seed: int, k: int, curve_held: int) -> dict:
    """Which facts a learning curve of domain k uses: k's facts (training and
    held-out halves) reordered with a seeded shuffle; the last `curve_held`
    are the curve's held-out facts, the others the pool the n added facts
    come from; the base mixture is every other domain's training half."""
    own = list(data.train_rows[k]) + list(data.held_rows[k])
    random.Random(f"curve:{seed}:{k}").shuffle(own)
    return {"held": own[len(own) - curve_held:], "addable": own[: len(own) - curve_held],
            "base": [r for j, rows in enumerate(data.train_rows) if j != k for r in rows]}


def curve_sizes_within(sizes, pool: int) -> list:
    """The curve's n values that the pool can supply, ascending."""
    out = []
    for n in sorted(set(int(s) for s in sizes)):
        if n > pool:
            break
        out.append(n)
    return out


def curve_point(trainer: TailTrainer, recipe: Recipe, seed: int, k: int, n: int, curve_held: int,
                n_ref: int) -> float:
    """Held-out loss of domain k's curve facts after training with n of its
    facts added (n = 0: the base mixture alone). The added facts enter each
    step with weight recipe.added_weight * n / n_ref, so the dose grows with
    n as it would in a mixture, and n = n_ref is the dose of the ranking's
    run."""
    plan = curve_plan(trainer.data, seed, k, curve_held)
    if n == 0:
        trainer.train(recipe, seed, plan["base"])
    else:
        trainer.train(recipe, seed, plan["base"], added=plan["addable"][:n],
                      added_weight=recipe.added_weight * n / n_ref)
    return float(trainer.losses(plan["held"]).mean())


def curve_units(recipe: Recipe, seed: int, k: int, name: str, sizes, curve_held: int, n_ref: int,
                pool: int) -> list:
    from ..executor import Unit

    prefix = f"curve/{recipe.name}/{recipe.label()}/seed{seed}/{name}/held{curve_held}/ref{n_ref}"
    return [Unit(f"{prefix}/n{n}", ("curve", recipe, seed, k, n, curve_held, n_ref))
            for n in curve_sizes_within(sizes, pool)]


def learning_curve(trainer: TailTrainer, recipe: Recipe, seed: int, k: int, sizes, curve_held: int,
                   n_ref: int) -> dict:
    """Held-out loss of domain k after training with n of its facts added,
    for each n in sizes (nested subsets, n = 0 is the baseline), in this
    process; `curve_plan` and `curve_point` say which facts and how."""
    plan = curve_plan(trainer.data, seed, k, curve_held)
    points = [[n, curve_point(trainer, recipe, seed, k, n, curve_held, n_ref)]
              for n in curve_sizes_within(sizes, len(plan["addable"]))]
    return {"points": points, "held_out_facts": curve_held, "pool": len(plan["addable"])}


def measured_delta_n(points, fraction: float = 0.1) -> dict:
    """From a learning curve [[n, loss], ...]: the marginal gain per added
    fact on each interval, m_i = (L(n_{i-1}) - L(n_i)) / (n_i - n_{i-1}), its
    ratio to the first interval's, and the first n at which that ratio falls
    to `fraction` (None when it does not within the curve)."""
    marginal = []
    for (n0, l0), (n1, l1) in zip(points, points[1:]):
        marginal.append([n1, (l0 - l1) / (n1 - n0)])
    if not marginal or not marginal[0][1] > 0:
        return {"marginal": marginal, "ratio": [], "delta_n_10pct": None,
                "reason": "the first added facts did not lower the held-out loss"}
    first = marginal[0][1]
    ratio = [[n, m / first] for n, m in marginal]
    hit = next((n for n, r in ratio if r <= fraction), None)
    reason = None if hit is not None else f"the marginal gain stayed above {fraction:.0%} up to n = {points[-1][0]}"
    return {"marginal": marginal, "ratio": ratio, "delta_n_10pct": hit, "reason": reason}
