"""Ground truth by fine-tuning: counterfactual runs that differ only by the
added domain's data."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..alignment import blocks_of, padded_block_batch, tail_embedding, tail_model, tail_parameters
from ..subspace import per_fact_losses

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


@dataclass
class TailData:
    """What fine-tuning the last blocks needs of the forward pass: each
    fact's token ids and its input to the first kept block (contiguous
    copies, so shipping them ships no more than they hold), which fact rows
    train and which are held out, and the full model's per-fact losses (to
    check the truncated copy against)."""

    ids: list
    block_inputs: list
    train_rows: list
    held_rows: list
    fact_losses: torch.Tensor

    @classmethod
    def from_split(cls, split) -> "TailData":
        return cls(list(split.ids), [b.detach().cpu().clone() for b in split.block_inputs],
                   [list(r) for r in split.train_rows], [list(r) for r in split.held_rows],
                   split.tokens.fact_losses.detach().cpu().clone())


@dataclass
class TailPayload:
    """A TailTrainer's whole input, for another process: the truncated
    model's configuration (its depth the kept blocks) and starting weights on
    the CPU, its data, and the device and dtype to train in there. Weights and
    configuration, not the module: a module can hold unpicklable state."""

    config: object
    state: dict
    data: TailData
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def build_trainer(payload: TailPayload) -> "TailTrainer":
    """The trainer a worker process builds once from a shipped payload; it
    checks that the rebuilt copy reproduces the full model's losses."""
    from transformers import AutoModelForCausalLM

    work = AutoModelForCausalLM.from_config(payload.config, attn_implementation="eager", dtype=payload.dtype)
    work.load_state_dict(payload.state)
    trainer = TailTrainer.from_parts(work.to(payload.device), payload.data)
    trainer.check()
    return trainer


class TailTrainer:
    """Fine-tunes the last blocks of a model from cached block inputs, always
    from the same starting weights, so counterfactual runs differ only by the
    data they add.

    The block inputs come from the forward pass (`split.block_inputs`,
    captured at `split.capture_block`), so a step costs the kept blocks and
    the LM head, not the whole model. `check()` verifies that the truncated
    model reproduces the full model's losses.
    """

    def __init__(self, loaded, split):
        work, _ = tail_model(loaded.model, split.capture_block)
        self._setup(work, TailData.from_split(split))

    @classmethod
    def from_parts(cls, work: torch.nn.Module, data: TailData) -> "TailTrainer":
        trainer = cls.__new__(cls)
        trainer._setup(work, data)
        return trainer

    def _setup(self, work, data: TailData) -> None:
        self.data = data
        self.work, self.embed = work, tail_embedding(work)
        self.work.eval()  # no dropout: runs differ only by the added data
        self.params = list(self.work.parameters())
        self.original = [p.detach().clone() for p in self.params]
        self.device = self.params[0].device
        self.depth = len(list(blocks_of(self.work)))

    def reset(self) -> None:
        """Back to the starting weights."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self.original):
                p.copy_(p0)

    def payload(self) -> TailPayload:
        """The starting model and data, on the CPU, to ship to workers."""
        import copy

        config = copy.deepcopy(self.work.config)
        config.num_hidden_layers = self.depth
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[-self.depth:]
        state = {k: p0.detach().cpu().clone() for k, p0 in self._starting_state().items()}
        return TailPayload(config, state, self.data, self.device.type, self.params[0].dtype)

    def payload_bytes(self) -> int:
        """What shipping this trainer to a node costs: its weights (the
        starting state, tied tensors once) and its cached block inputs."""
        seen, total = set(), 0
        for tensor in self.work.state_dict().values():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total + sum(b.numel() * b.element_size() for b in self.data.block_inputs)

    def _starting_state(self) -> dict:
        self.reset()
        return self.work.state_dict()

    def losses(self, rows, batch_size: int = 16) -> torch.Tensor:
        """Per-fact losses of the given fact rows under the current weights."""
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                logits, ids, mask = self._logits(rows[i: i + batch_size])
                out.append(per_fact_losses(logits, ids, mask).to(torch.float64).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def check(self) -> None:
        held = [r for rows in self.data.held_rows for r in rows][:16]
        got, want = self.losses(held), self.data.fact_losses[held]
        if float((got - want).abs().max()) > 1e-3 * float(want.abs().max()):
            raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                               "fine-tuning ground truth is not available for this architecture.")

    def _logits(self, rows):
        data = self.data
        input_ids, mask, hidden = padded_block_batch([data.ids[r] for r in rows],
                                                     [data.block_inputs[r] for r in rows], self.device)
        logits = self.work(inputs_embeds=self.embed(hidden), attention_mask=mask, use_cache=False).logits
        return logits, input_ids, mask

    def train(self, recipe: Recipe, seed: int, pool: list, added: list | None = None,
              added_weight: float | None = None, on_step=None) -> None:
        """Reset to the starting weights and run the recipe: base minibatches
        from `pool` (seeded by `seed`, the same in every run of that seed),
        plus minibatches of `added` (seeded by seed + 1) when given.

        on_step(step, trainable, lr): called before each step (step = 0 ..
        steps - 1) with the trainable parameters as they are then, and once
        more after the last (step = steps); a trajectory of checkpoints is
        read from it."""
        if recipe.blocks > self.depth:
            raise ValueError(f"recipe {recipe.name!r} trains {recipe.blocks} blocks but only {self.depth} "
                             "are kept; raise the benchmark's captured depth")
        self.reset()
        trainable = tail_parameters(self.work, recipe.blocks)
        if recipe.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=recipe.lr)
        else:
            opt = torch.optim.SGD(trainable, lr=recipe.lr)
        weight = recipe.added_weight if added_weight is None else added_weight
        rng, added_rng = random.Random(seed), random.Random(seed + 1)
        for step in range(recipe.steps):
            if on_step is not None:
                on_step(step, trainable, recipe.lr)
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
        if on_step is not None:
            on_step(recipe.steps, trainable, recipe.lr)
        del opt


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
