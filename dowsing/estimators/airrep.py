"""An AirRep-style estimator (Sun et al., "Enhancing Training Data Attribution
with Representational Optimization"): a small trainable encoder over the
model's frozen final hidden states, attention pooling over a group of facts,
trained with the paper's weighted pairwise ranking objective on
counterfactual fine-tunes, and cross-validated by domain.

Features. z_i = mean over fact i's predicting positions of the residual
entering the final norm (`split.tokens.h`, no extra forward pass),
standardised per coordinate with the training folds' mean and std.

Model. e(z) = W z / ||W z|| (W: d_model x dim, the only encoder weights, plus
a scale a and temperature tau). For a target fact x and a group S:
    s_i = e(x)^T e(z_i),   alpha_i = softmax_i(|s_i| / tau),
    f(x, S) = a * sum_{i in S} alpha_i s_i,
attention over the group weighted by the absolute similarity, so a few facts
close to the target (either way) dominate, as the paper's influence pooling
does (its Eq. 7 was not legible in the copy we have; this is the form its
text describes).

Training data (the paper's cross-validation data, at domain scale). For a
fold F of domains to score, R counterfactual fine-tunes are run with the
benchmark's recipe on the mixture of every training half, each adding a
random subset S_r of `subset_facts` training facts drawn from one or two
random domains outside F. Targets are the held-out facts of the domains
outside F. Labels (the paper's Eq. 8): y_r,x = -(L_x(S_r) - mean_r L_x) /
std_r L_x, the negative loss of x after run r normalised over runs.

Objective (the paper's Eq. 9, weighted pairwise ranking): for each target x
and pair of runs r, r' with Delta = |y_r,x - y_r',x|,
    w = 0 if Delta < low else min(Delta, high),
    loss = sum w * log(1 + exp(-sign(y_r,x - y_r',x) (f(x, S_r) - f(x, S_r')))) / sum w,
pairs closer than `low` being too noisy to order and `high` capping outliers.

Score. Domain k in fold F (never seen in training its fold's encoder):
priority_k = mean_{q in Q_k} f(q, training facts of k); larger = adding k's
facts is predicted to lower its held-out loss more, relative to a typical
subset (the labels' zero).

Cost: folds * R fine-tunes to make the data (the bulk), then training and
scoring a d_model x dim encoder, milliseconds to seconds on a CPU.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..costs import Cost, expected_padded, finetune_s, read_tokens, trained_bytes, trainer_step_bytes
from .registry import Estimator, EstimatorScore, get, register, register_family

register(Estimator("airrep", "AirRep: trained encoder, cross-validated by domain", "airrep",
                   "an encoder trained to rank counterfactual fine-tunes, cross-validated by domain",
                   needs={"counterfactuals"}, in_validation=False))


@dataclass(frozen=True)
class AirRepConfig:
    """dim: encoder output size. folds: domain folds (each scored by an
    encoder trained on the others). runs_per_fold / subset_facts: the
    counterfactual fine-tunes per fold and the facts each adds. steps / lr:
    Adam on the ranking loss. low / high: the label-difference clip of the
    pair weights."""

    dim: int = 16
    folds: int = 3
    runs_per_fold: int = 8
    subset_facts: int = 4
    steps: int = 300
    lr: float = 0.02
    low: float = 0.1
    high: float = 2.0
    seed: int = 0


def fact_features(split) -> torch.Tensor:
    """(M, d_model) float64: per fact, the mean of the final-norm input over
    its predicting positions."""
    tokens = split.tokens
    h = tokens.h.detach().to(torch.float64).cpu()
    fact = tokens.token_fact.cpu()
    sums = torch.zeros(split.n_facts, h.shape[1], dtype=torch.float64).index_add_(0, fact, h)
    counts = torch.zeros(split.n_facts, dtype=torch.float64).index_add_(0, fact, torch.ones_like(fact, dtype=torch.float64))
    return sums / counts.clamp_min(1.0)[:, None]


def normalized_labels(losses: torch.Tensor) -> torch.Tensor:
    """y_r,x = -(L_r,x - mean_r L_r,x) / std_r L_r,x for losses (R, Q); a
    target whose loss does not move between runs gets zeros."""
    centred = losses - losses.mean(0, keepdim=True)
    std = losses.std(0, unbiased=False, keepdim=True)
    return torch.where(std > 0, -centred / std.clamp_min(1e-300), torch.zeros_like(centred))


def pairwise_ranking_loss(pred: torch.Tensor, labels: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The weighted pairwise ranking loss over runs, per target (columns):
    sum_{x, r < r'} w softplus(-sign(y_r - y_r') (p_r - p_r')) / sum w,
    w = 0 where |y_r - y_r'| < low, else min(|y_r - y_r'|, high)."""
    dy = labels[:, None, :] - labels[None, :, :]  # (R, R, Q)
    dp = pred[:, None, :] - pred[None, :, :]
    gap = dy.abs()
    upper = torch.triu(torch.ones(labels.shape[0], labels.shape[0], dtype=torch.bool), diagonal=1)[:, :, None]
    w = torch.where((gap >= low) & upper, gap.clamp(max=high), torch.zeros_like(gap))
    total = w.sum()
    if total == 0:
        return (pred * 0).sum()
    return (w * torch.nn.functional.softplus(-torch.sign(dy) * dp)).sum() / total


class AirRepModel(torch.nn.Module):
    """e(z) = W z / ||W z||; f(x, S) = a sum_i softmax_i(|s_i| / tau) s_i, s_i = e(x)^T e(z_i)."""

    def __init__(self, d_in: int, dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(d_in, dim, generator=gen, dtype=torch.float64) / d_in ** 0.5)
        self.log_scale = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.log_tau = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        e = features @ self.proj
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def score(self, targets: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """f(x, S) for each target row of `targets` (embedded) against the
        embedded group: (Q,)."""
        s = targets @ group.T  # (Q, n)
        alpha = torch.softmax(s.abs() / self.log_tau.exp(), dim=-1)
        return self.log_scale.exp() * (alpha * s).sum(-1)


def fit_airrep(features: torch.Tensor, groups: list, targets: list, losses: torch.Tensor,
               config: AirRepConfig) -> tuple[AirRepModel, dict]:
    """Train on R runs: groups[r] the fact rows run r added, targets the
    fact rows whose losses (R, Q) were measured. Returns the model and
    {"loss_start", "loss_end", "seconds"}."""
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model = AirRepModel(features.shape[1], config.dim, config.seed)
    labels = normalized_labels(losses)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    target_rows = torch.tensor(targets)
    first = None
    for _ in range(config.steps):
        e_all = model.embed(features)
        e_targets = e_all[target_rows]
        pred = torch.stack([model.score(e_targets, e_all[torch.tensor(g)]) for g in groups])
        loss = pairwise_ranking_loss(pred, labels, config.low, config.high)
        if first is None:
            first = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, {"loss_start": first, "loss_end": float(loss.detach()), "seconds": time.perf_counter() - t0}


def domain_folds(n_domains: int, folds: int, seed: int) -> list:
    """Domain indices in `folds` groups (seeded shuffle, round robin)."""
    order = list(range(n_domains))
    random.Random(f"airrep:{seed}").shuffle(order)
    folds = max(2, min(folds, n_domains))
    return [sorted(order[i::folds]) for i in range(folds)]


def counterfactual_runs(trainer, recipe, seed: int, allowed: list, n_runs: int, subset_facts: int,
                        rng: random.Random) -> tuple[list, list, torch.Tensor, float]:
    """n_runs fine-tunes on the whole training pool, each adding a random
    subset of `subset_facts` training facts from one or two random domains of
    `allowed`; (groups, target rows, losses (R, Q), seconds), targets being
    the held-out facts of the allowed domains."""
    t0 = time.perf_counter()
    data = trainer.data
    pool = [r for rows in data.train_rows for r in rows]
    targets = [r for k in allowed for r in data.held_rows[k]]
    groups, losses = [], []
    for _ in range(n_runs):
        picked = rng.sample(allowed, min(len(allowed), rng.choice((1, 2))))
        candidates = [r for k in picked for r in data.train_rows[k]]
        group = rng.sample(candidates, min(subset_facts, len(candidates)))
        trainer.train(recipe, seed, pool, added=group)
        losses.append(trainer.losses(targets))
        groups.append(group)
    trainer.reset()
    return groups, targets, torch.stack(losses), time.perf_counter() - t0


def airrep_scores(loaded, split, recipe, seed: int = 0, config: AirRepConfig | None = None, trainer=None,
                  progress=None) -> EstimatorScore:
    """The AirRep estimator, cross-validated by domain: each fold's domains
    are scored by an encoder trained only on runs and targets of the other
    domains. details: per fold the domains scored, the rows its training
    saw, the ranking loss before and after, and the seconds of data,
    training and inference."""
    from ..kernels.training import TailTrainer

    config = config or AirRepConfig()
    report = progress or (lambda fraction, message: None)
    if split.block_inputs is None:
        raise ValueError("AirRep's counterfactual runs need the block inputs cached by the forward pass")
    if trainer is None:
        trainer = TailTrainer(loaded, split)
    data = trainer.data
    n_domains = len(data.train_rows)
    features = fact_features(split)
    rng = random.Random(f"airrep-runs:{config.seed}:{seed}")
    priority = [None] * n_domains
    folds_info = []
    data_s = train_s = infer_s = 0.0
    folds = domain_folds(n_domains, config.folds, config.seed)
    for f, fold in enumerate(folds):
        allowed = [k for k in range(n_domains) if k not in fold]
        report(f / len(folds), f"AirRep fold {f + 1} of {len(folds)}: {config.runs_per_fold} counterfactual fine-tunes")
        groups, targets, losses, seconds = counterfactual_runs(trainer, recipe, seed, allowed, config.runs_per_fold,
                                                               config.subset_facts, rng)
        data_s += seconds
        # standardise with the facts this fold may see only
        seen = sorted({r for k in allowed for r in list(data.train_rows[k]) + list(data.held_rows[k])})
        mean, std = features[seen].mean(0), features[seen].std(0).clamp_min(1e-12)
        z = (features - mean) / std
        model, fit = fit_airrep(z, groups, targets, losses, config)
        train_s += fit["seconds"]
        t0 = time.perf_counter()
        with torch.no_grad():
            e_all = model.embed(z)
            for k in fold:
                held = torch.tensor(list(data.held_rows[k]))
                priority[k] = float(model.score(e_all[held], e_all[torch.tensor(list(data.train_rows[k]))]).mean())
        infer_s += time.perf_counter() - t0
        folds_info.append({"domains": fold, "trained_on_rows": sorted({r for g in groups for r in g} | set(targets)),
                           "loss_start": fit["loss_start"], "loss_end": fit["loss_end"]})
    details = {"folds": folds_info, "data_s": data_s, "train_s": train_s, "inference_s": infer_s,
               "fine_tunes": len(folds) * config.runs_per_fold, "dim": config.dim,
               "parameters": features.shape[1] * config.dim + 2}
    return EstimatorScore("airrep", get("airrep").label, priority, None,
                          split.forward_s + data_s + train_s + infer_s, details)


def airrep_family(ctx, names) -> list:
    """The AirRep family's compute: its counterfactual runs use the
    settings' recipe (the benchmark's main recipe)."""
    return [airrep_scores(ctx.loaded, ctx.split, ctx.settings.recipe, ctx.settings.seed, progress=ctx.progress)]


def airrep_cost(cal, run, names) -> Cost:
    """AirRep's data (`AirRepConfig`): 3 folds (at least 2, at most the
    domains) of 8 counterfactual fine-tunes of the run's recipe adding 4
    training facts,
    each read on the held-out facts of the other folds' domains (the
    encoder's own training, a few seconds, is left out); it builds its own
    trainer (a tail copy). Memory: the trained blocks' weights, gradients and
    AdamW's moments, and a fine-tune step."""
    recipe, keep, air = run.recipe, run.keep, AirRepConfig()
    folds = max(2, min(air.folds, len(run.train)))
    pool = [n for d in run.train for n in d]
    held_all = [n for d in run.held for n in d]
    targets = held_all[: round(len(held_all) * (folds - 1) / folds)]
    step = expected_padded(pool, recipe.batch) + expected_padded(pool, min(recipe.added_batch, air.subset_facts))
    one = finetune_s(cal, recipe.steps, step, keep, min(recipe.blocks, keep), read_tokens(targets))
    memory = 3 * trained_bytes(cal, run) + trainer_step_bytes(cal, run)
    return Cost(cal.copy_s + folds * air.runs_per_fold * one, memory)


register_family("airrep", airrep_family, airrep_cost, "AirRep")
