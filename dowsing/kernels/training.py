"""Fine-tuning the last blocks of a model from cached block inputs: the
recipes, the trainer and what a worker process needs to rebuild it. The
benchmark's ground truth, the trajectory estimators and the AirRep
estimator's counterfactual runs all train with it."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..costs import READ_BATCH
from .alignment import blocks_of, padded_block_batch, tail_embedding, tail_model, tail_parameters
from .subspace import head_losses, per_fact_losses


OPTIMIZERS = ("adamw", "sgd")
STEP_CHUNK = 48  # facts a training step puts through the model at once
# model types whose logits are the LM head applied to the final hidden states, nothing after it
# (no soft-capping or scaling), so the head can run on the predicting positions alone
PLAIN_HEADS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW for every floating dtype


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
    def from_parts(cls, work: torch.nn.Module, data: TailData, original: list | None = None) -> "TailTrainer":
        """A trainer on this truncated model and data. original: the starting
        weights, in the order of work.parameters(), when another trainer on a
        copy of the same model already holds them (they are only read)."""
        trainer = cls.__new__(cls)
        trainer._setup(work, data, original)
        return trainer

    def _setup(self, work, data: TailData, original: list | None = None) -> None:
        self.data = data
        self.work, self.embed = work, tail_embedding(work)
        self.work.eval()  # no dropout: runs differ only by the added data
        self.params = list(self.work.parameters())
        self.original = original if original is not None else [p.detach().clone() for p in self.params]
        self.device = self.params[0].device
        self.depth = len(list(blocks_of(self.work)))
        plain = getattr(work.config, "model_type", None) in PLAIN_HEADS
        self.head = work.get_output_embeddings() if plain else None

    def map(self, fn, items: list) -> list:
        """fn(self, item) for each item, one after the other: the interface
        `side_by_side.TrainerPool` shares, for code that takes either."""
        return [fn(self, item) for item in items]

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

    def losses(self, rows, batch_size: int = READ_BATCH) -> torch.Tensor:
        """Per-fact losses of the given fact rows under the current weights.
        A batch as wide as a training step's chunk: on a CPU the LM head's
        weights are read from memory once per batch whatever its width, so a
        held-out half of 17 facts in batches of 16 and 1 costs nearly two
        full batches."""
        rows = list(rows)
        # batches of facts of similar length pad less; the losses go back to the order asked
        order = sorted(range(len(rows)), key=lambda j: len(self.data.ids[rows[j]]))
        out = torch.zeros(len(rows), dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                part = order[i: i + batch_size]
                out[part] = self.fact_losses([rows[j] for j in part]).to(torch.float64).cpu()
        return out

    def check(self) -> None:
        held = [r for rows in self.data.held_rows for r in rows][:16]
        got, want = self.losses(held), self.data.fact_losses[held]
        if float((got - want).abs().max()) > 1e-3 * float(want.abs().max()):
            raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                               "fine-tuning ground truth is not available for this architecture.")

    def fact_losses(self, rows) -> torch.Tensor:
        """Per-fact losses of these fact rows under the current weights, in
        the graph when gradients are on."""
        data = self.data
        input_ids, mask, hidden = padded_block_batch([data.ids[r] for r in rows],
                                                     [data.block_inputs[r] for r in rows], self.device)
        embeds = self.embed(hidden)
        if self.head is None:
            logits = self.work(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
            return per_fact_losses(logits, input_ids, mask)
        last = self.work.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return head_losses(last, self.head, input_ids, mask)

    def train(self, recipe: Recipe, seed: int, pool: list, added: list | None = None,
              added_weight: float | None = None, on_step=None, steps: int | None = None,
              cycle_added: bool = False) -> None:
        """Reset to the starting weights and run the recipe: base minibatches
        from `pool` (seeded by `seed`, the same in every run of that seed),
        plus minibatches of `added` (seeded by seed + 1) when given.

        steps: overrides the recipe's number of steps. cycle_added: the added
        minibatches walk seeded permutations of `added` one after another
        instead of drawing each minibatch afresh, so over S steps every added
        fact is seen floor or ceil of S * added_batch / len(added) times.

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
            # one fused kernel over every tensor instead of a pass per elementwise op: the same update,
            # and on a CPU a few-step pilot spends a tenth of its time in the optimizer without it
            opt = torch.optim.AdamW(trainable, lr=recipe.lr, fused=self.device.type in FUSED_ADAM_DEVICES)
        else:
            opt = torch.optim.SGD(trainable, lr=recipe.lr)
        weight = recipe.added_weight if added_weight is None else added_weight
        rng, added_rng = random.Random(seed), random.Random(seed + 1)
        steps = recipe.steps if steps is None else steps
        stream = cycled(added, recipe.added_batch * steps, added_rng) if (added and cycle_added) else None
        for step in range(steps):
            if on_step is not None:
                on_step(step, trainable, recipe.lr)
            pick = rng.sample(pool, min(recipe.batch, len(pool)))
            weights = [1.0 / len(pick)] * len(pick)
            if stream is not None:
                extra = stream[step * recipe.added_batch: (step + 1) * recipe.added_batch]
                pick = pick + extra
                weights += [weight / len(extra)] * len(extra)
            elif added:
                extra = added_rng.sample(added, min(recipe.added_batch, len(added)))
                pick = pick + extra
                weights += [weight / len(extra)] * len(extra)
            opt.zero_grad(set_to_none=True)
            # a wide minibatch (a plan check adds hundreds of facts a step) goes through in chunks whose
            # gradients add up: the logits of every fact at once would not fit in memory
            for start in range(0, len(pick), STEP_CHUNK):
                losses = self.fact_losses(pick[start: start + STEP_CHUNK])
                w = torch.tensor(weights[start: start + STEP_CHUNK], dtype=losses.dtype, device=self.device)
                (losses * w).sum().backward()
                del losses
            opt.step()
        if on_step is not None:
            on_step(steps, trainable, recipe.lr)
        del opt


def cycled(items: list, count: int, rng: random.Random) -> list:
    """`count` items taken in order from seeded permutations of `items`
    laid end to end (each permutation used whole before the next starts)."""
    out = []
    while len(out) < count:
        order = list(items)
        rng.shuffle(order)
        out += order
    return out[:count]
