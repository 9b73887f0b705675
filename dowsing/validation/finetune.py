"""Ground truth by fine-tuning: counterfactual runs that differ only by the
added domain's data."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..alignment import blocks_of, padded_block_batch, tail_model, tail_parameters
from ..subspace import per_fact_losses

def finetune_gains(loaded, split, train, config, report=None) -> dict:
    """Held-out per-fact losses after the baseline run and after each domain's
    run, all from the same starting weights and the same seeded minibatches.

    AdamW trains the last `finetune_blocks` transformer blocks and the final
    norm (the embeddings and tied LM head stay fixed), starting from the
    block inputs cached by the forward pass, so a step costs those blocks and
    the head, not the whole model.

    Returns per held-out fact (domain by domain) "before", "baseline" and
    "runs" {name: [...]}, with "held_rows", "gain" (own held-out drop against
    the baseline), "drop_matrix" and "baseline_drop".
    """
    report = report or (lambda fraction, message: None)
    trainer = TailTrainer(loaded, split)
    # every kept block trains: the split captured its inputs at depth - finetune_blocks
    recipe = Recipe("validation", "adamw", lr=config.finetune_lr, steps=config.finetune_steps, blocks=trainer.depth,
                    batch=config.finetune_batch, added_batch=config.finetune_added_batch,
                    added_weight=config.finetune_added_weight)
    held_all = [r for rows in split.held_rows for r in rows]
    before = trainer.losses(held_all, config.batch_size)
    want = split.tokens.fact_losses[held_all].cpu()
    if float((before - want).abs().max()) > 1e-3 * float(want.abs().max()):
        raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                           "fine-tuning ground truth is not available for this architecture.")
    pool = [r for rows in split.train_rows for r in rows]

    def run(added: int | None) -> torch.Tensor:
        trainer.train(recipe, config.seed, pool, added=None if added is None else split.train_rows[added])
        return trainer.losses(held_all, config.batch_size)

    t0 = time.perf_counter()
    n = len(train)
    report(0.0, "baseline fine-tuning run (no added domain)")
    baseline = run(None)
    runs = {}
    for k, d in enumerate(train):
        report((k + 1) / (n + 1), f"fine-tuning with {d.name} added ({k + 1} of {n})")
        runs[d.name] = run(k)
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




# --- the benchmark's ground truth: recipes, seeds and learning curves --------------------------------------

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class Recipe:
    """One way of fine-tuning. Each step trains on a minibatch of `batch`
    facts of the base mixture (mean loss, weight 1) plus, in a run that adds
    domain k, `added_batch` of k's facts (mean loss, weight `added_weight`).
    Only the last `blocks` transformer blocks and the final norm train."""

    name: str
    optimizer: str = "adamw"
    lr: float = 3e-5
    steps: int = 8
    blocks: int = 4
    batch: int = 8
    added_batch: int = 4
    added_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe {self.name!r}: optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.steps < 1 or self.blocks < 1 or self.batch < 1 or self.added_batch < 1:
            raise ValueError(f"recipe {self.name!r}: steps, blocks, batch and added_batch must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"recipe {self.name!r}: lr must be > 0")

    def label(self) -> str:
        name = {"adamw": "AdamW", "sgd": "SGD"}[self.optimizer]
        return f"{name}, lr {self.lr:g}, {self.steps} steps, last {self.blocks} blocks"


class TailTrainer:
    """Fine-tunes the last blocks of a model from cached block inputs, always
    from the same starting weights, so counterfactual runs differ only by the
    data they add.

    The block inputs come from the forward pass (`split.block_inputs`,
    captured at `split.capture_block`), so a step costs the kept blocks and
    the LM head, not the whole model. The first call checks that the
    truncated model reproduces the full model's losses.
    """

    def __init__(self, loaded, split):
        self.split = split
        self.work, self.embed = tail_model(loaded.model, split.capture_block)
        self.work.eval()  # no dropout: runs differ only by the added data
        self.params = list(self.work.parameters())
        self.original = [p.detach().clone() for p in self.params]
        self.device = self.params[0].device
        self.depth = len(list(blocks_of(self.work)))

    def losses(self, rows, batch_size: int = 16) -> torch.Tensor:
        """Per-fact losses of the given fact rows under the current weights."""
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                logits, ids, mask = self._logits(rows[i: i + batch_size])
                out.append(per_fact_losses(logits, ids, mask).to(torch.float64).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def check(self) -> None:
        held = [r for rows in self.split.held_rows for r in rows][:16]
        got, want = self.losses(held), self.split.tokens.fact_losses[held].cpu()
        if float((got - want).abs().max()) > 1e-3 * float(want.abs().max()):
            raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                               "fine-tuning ground truth is not available for this architecture.")

    def _logits(self, rows):
        split = self.split
        input_ids, mask, hidden = padded_block_batch([split.ids[r] for r in rows],
                                                     [split.block_inputs[r] for r in rows], self.device)
        logits = self.work(inputs_embeds=self.embed(hidden), attention_mask=mask, use_cache=False).logits
        return logits, input_ids, mask

    def train(self, recipe: Recipe, seed: int, pool: list, added: list | None = None,
              added_weight: float | None = None) -> None:
        """Reset to the starting weights and run the recipe: base minibatches
        from `pool` (seeded by `seed`, the same in every run of that seed),
        plus minibatches of `added` (seeded by seed + 1) when given."""
        if recipe.blocks > self.depth:
            raise ValueError(f"recipe {recipe.name!r} trains {recipe.blocks} blocks but only {self.depth} "
                             "are kept; raise the benchmark's captured depth")
        with torch.no_grad():
            for p, p0 in zip(self.params, self.original):
                p.copy_(p0)
        trainable = tail_parameters(self.work, recipe.blocks)
        if recipe.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=recipe.lr)
        else:
            opt = torch.optim.SGD(trainable, lr=recipe.lr)
        weight = recipe.added_weight if added_weight is None else added_weight
        rng, added_rng = random.Random(seed), random.Random(seed + 1)
        for _ in range(recipe.steps):
            pick = rng.sample(pool, min(recipe.batch, len(pool)))
            weights = [1.0 / len(pick)] * len(pick)
            if added:
                extra = added_rng.sample(added, min(recipe.added_batch, len(added)))
                pick = pick + extra
                weights += [weight / len(extra)] * len(extra)
            logits, ids, mask = self._logits(pick)
            w = torch.tensor(weights, dtype=logits.dtype, device=self.device)
            loss = (per_fact_losses(logits, ids, mask) * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del logits, loss
        del opt


def counterfactual_gains(trainer: TailTrainer, recipe: Recipe, seed: int, report=None) -> dict:
    """Realised gain of every domain under one recipe and seed: the held-out
    loss of k after the baseline run minus after the run that adds k's
    training facts. Only k's own held-out facts are evaluated after run k.

    Returns {"gain": [per domain], "gain_per_fact": [[baseline - run, per
    held-out fact of k]], "baseline_drop": [per domain], "seconds"}.
    """
    report = report or (lambda fraction, message: None)
    split = trainer.split
    t0 = time.perf_counter()
    pool = [r for rows in split.train_rows for r in rows]
    held_all = [r for rows in split.held_rows for r in rows]
    before = trainer.losses(held_all)
    trainer.train(recipe, seed, pool)
    baseline = trainer.losses(held_all)
    offsets, start = [], 0
    for rows in split.held_rows:
        offsets.append(list(range(start, start + len(rows))))
        start += len(rows)
    n = len(split.train_rows)
    per_fact = []
    for k in range(n):
        report(k / n, f"domain {k + 1} of {n}")
        trainer.train(recipe, seed, pool, added=split.train_rows[k])
        after = trainer.losses(split.held_rows[k])
        per_fact.append((baseline[offsets[k]] - after).tolist())
    return {
        "gain": [sum(g) / len(g) for g in per_fact],
        "gain_per_fact": per_fact,
        "baseline_drop": [float((before[o] - baseline[o]).mean()) for o in offsets],
        "seconds": time.perf_counter() - t0,
    }


def learning_curve(trainer: TailTrainer, recipe: Recipe, seed: int, k: int, sizes, curve_held: int,
                   n_ref: int) -> dict:
    """Held-out loss of domain k after training with n of its facts added,
    for each n in sizes (nested subsets, n = 0 is the baseline).

    k's facts (training and held-out halves) are reordered with a seeded
    shuffle; the last `curve_held` are the curve's held-out facts, the others
    the pool the n added facts come from. The base mixture is every other
    domain's training half. The added facts enter each step with weight
    recipe.added_weight * n / n_ref, so the dose grows with n as it would
    in a mixture, and n = n_ref is the dose of the ranking's run.
    """
    split = trainer.split
    own = list(split.train_rows[k]) + list(split.held_rows[k])
    random.Random(f"curve:{seed}:{k}").shuffle(own)
    held, addable = own[len(own) - curve_held:], own[: len(own) - curve_held]
    base = [r for j, rows in enumerate(split.train_rows) if j != k for r in rows]
    points = []
    for n in sorted(set(int(s) for s in sizes)):
        if n > len(addable):
            break
        if n == 0:
            trainer.train(recipe, seed, base)
        else:
            trainer.train(recipe, seed, base, added=addable[:n], added_weight=recipe.added_weight * n / n_ref)
        points.append([n, float(trainer.losses(held).mean())])
    return {"points": points, "held_out_facts": curve_held, "pool": len(addable)}


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
