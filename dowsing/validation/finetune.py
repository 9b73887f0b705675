"""Ground truth by fine-tuning: counterfactual runs that differ only by the
added domain's data."""
from __future__ import annotations

import time

import torch

from ..kernels.training import Recipe, TailTrainer, build_trainer


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
    from ..pipelines.executor import LocalExecutor, Shared, Unit

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


def finetune_unit(trainer: TailTrainer, kind: str, recipe: Recipe, seed: int, *args):
    """One unit of the quick validation's ground truth on a trainer (in this
    process or a worker): "mixture" (k or None, batch_size) -> mixture_losses."""
    if kind == "mixture":
        return mixture_losses(trainer, recipe, seed, *args)
    raise ValueError(f"unknown unit kind {kind!r}")


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
