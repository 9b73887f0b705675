"""Domain-level estimators read off a trajectory of checkpoints.

Where the user has no checkpoints of their own, the trajectory is the
benchmark's own baseline fine-tune: the recipe run on the mixture of every
domain's training half (`TailTrainer.train(recipe, seed, pool)`), its
trainable parameters theta_0 .. theta_T recorded before each step and after
the last, with each step's learning rate eta_t. Everything below is evaluated
at those checkpoints; nothing is trained on the held-out facts. With the
user's own checkpoints (`load_user_trajectory`) every checkpoint brings its
own weights and its own block inputs, and the step sizes are given or
estimated (`step_length_lr`).

Notation. L_k(theta): mean loss of domain k's training facts; L_Q,k(theta):
mean loss of its held-out facts; l_i: one fact's mean next-token loss;
g_k,t = grad L_k(theta_t), q_k,t = grad L_Q,k(theta_t) over the trainable
parameters; Delta_t = theta_{t+1} - theta_t, the baseline's real step;
H_Q,k,t the Hessian of L_Q,k at theta_t; w the recipe's `added_weight`;
P the optimizer's preconditioner (the identity for SGD; for AdamW,
diag(1 / (sqrt(v) + eps)) with v Adam's second moment at theta_0 over seeded
minibatches of the pool, as `alignment_adam` takes it). u_k,t = w P g_k,t is
the extra step direction that adding domain k's facts to every minibatch puts
into step t, to first order.

Estimators (higher = collecting more of the domain is predicted to help more):

* ``diffin`` -- Diff-In (Tan et al., 2025) at domain level. The realised
  gain of k is an accumulated sum of differences between consecutive steps:
  G_k = sum_t D_k,t, D_k,t = L_Q,k(theta_{t+1}) - L_Q,k(theta_{t+1} - eta_t u_k,t),
  the drop of k's held-out loss that step t's extra data buys. Expanding both
  losses to second order around theta_t (no convexity, no inverse Hessian):

      D_k,t ~= eta_t q_k,t^T u_k,t  +  eta_t (H_Q,k,t u_k,t)^T (Delta_t - eta_t u_k,t / 2),

  the first-order (TracIn) term plus the paper's second-order correction,
  which goes through one Hessian-gradient product per step, formed by
  central finite differences of gradients (the paper's abstract says finite
  differences of first-order gradients; the full text is not available to
  us, so this expansion is our own derivation following it):
  H v ~= (grad L_Q,k(theta + eps v) - grad L_Q,k(theta - eps v)) / (2 eps),
  eps = u^(1/3) * max(||theta||, 1) / ||v||, u the unit roundoff of the
  model's arithmetic (the step that balances the O(eps^2) truncation against
  the O(u / eps) rounding).
  priority_k = sum_{t < T} D_k,t.
  Where this departs from the paper, and why: (1) the paper scores one
  training sample against one test sample; here the "sample" is the domain's
  training half entering every minibatch with weight w (its mean gradient),
  and the test point is the domain's held-out mean loss, because the
  benchmark's ground truth is exactly that counterfactual. (2) Each step's
  difference is expanded with the state at theta_t held fixed: how an earlier
  step's perturbation is carried through later steps (the (I - eta H_B)
  propagation of SGD-influence), the change of the held-out gradient over
  later steps and the cross terms between different steps' perturbations are
  not tracked, which keeps the cost at a few gradients per step and domain.
  Those terms are of the same eta^2 order as the kept correction and there is
  one per pair of steps (T (T - 1) / 2 of them against T kept corrections), so
  the correction makes each step's own difference exact to second order, not
  the whole accumulated gain once T > 1. (3) For AdamW the added step is
  linearised with a fixed diagonal preconditioner P (Adam's update is not
  linear in the added gradient); for SGD P = I and each step's difference is
  exact to second order.
* ``tracin_ckpt`` -- TracIn over checkpoints (Pruthi et al., 2020): the first
  term alone, sum_{t < T} eta_t q_k,t^T u_k,t.
* ``vog`` -- variance of gradients (Agarwal et al., 2022; the score
  stress-tested in Tan et al., 2023): per training fact i, the gradient of
  l_i with respect to its input hidden states (the input to the first kept
  block; a language model's "pixels"), S_i,t at every checkpoint t = 0 .. T;
  VoG_i = mean over (token, coordinate) of std_t(S_i,t) (population std over
  the T + 1 checkpoints); priority = mean_i VoG_i. Higher VoG marks facts the
  model's treatment of which is still moving, the ones pruning keeps, so the
  expected sign is positive and is not flipped.
* ``ckpt_confidence`` -- dataset-cartography confidence (Swayamdipta et al.,
  2020) with p_i,t = exp(-l_i(theta_t)), the fact's geometric-mean per-token
  probability: priority = 1 - mean_i mean_t p_i,t. Flipped, because low
  confidence (hard to learn, as high mean loss) is what more data can fix.
* ``ckpt_variability`` -- cartography variability: mean_i std_t p_i,t
  (ambiguous facts; higher = more useful, not flipped).
* ``el2n`` -- EL2N (Paul et al., 2021) averaged over checkpoints: per fact,
  the mean over its predicted tokens of ||softmax(z) - e_y||_2, averaged over
  t = 0 .. T; priority = mean over the domain's training facts (higher error =
  more to learn, not flipped).

Cost: one fine-tune to record the trajectory (shared by all); ``diffin`` and
``tracin_ckpt`` share 2 gradients per domain and step (training and
held-out), ``diffin`` adds 2 more for its finite difference; the other four
share one pass over the training facts at each checkpoint (with a backward to
the inputs when ``vog`` is asked, forward only otherwise).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..kernels.alignment import blocks_of, padded_block_batch, tail_grad_fn, tail_parameters
from ..costs import (Cost, adam_moment_s, chunked, expected_padded, finetune_s, gradients_s, padded_tokens,
                     ranking_tail_bytes, tail_pass_s, trainable_params, trained_bytes, trainer_step_bytes)
from ..kernels.subspace import per_fact_losses
from ..kernels.training import Recipe
from .registry import Estimator, EstimatorScore, get, register, register_family

_TRAJ = {"block_inputs", "held_out", "trajectory"}
register(Estimator("diffin", "Diff-In over checkpoints (second order)", "trajectory",
                   "held-out influence accumulated over checkpoints, with its second-order term",
                   needs=_TRAJ, in_analysis=True))
register(Estimator("tracin_ckpt", "TracIn over checkpoints (held-out)", "trajectory",
                   "held-out gradient alignment summed over checkpoints", needs=_TRAJ, in_analysis=True))
register(Estimator("vog", "Variance of gradients over checkpoints (VoG)", "trajectory",
                   "variance of input gradients over checkpoints", needs=_TRAJ, in_analysis=True))
register(Estimator("ckpt_confidence", "Low confidence over checkpoints (cartography)", "trajectory",
                   "1 - mean confidence over checkpoints", needs=_TRAJ, in_analysis=True))
register(Estimator("ckpt_variability", "Variability over checkpoints (cartography)", "trajectory",
                   "variability of confidence over checkpoints", needs=_TRAJ, in_analysis=True))
register(Estimator("el2n", "EL2N error norm over checkpoints", "trajectory",
                   "mean error norm over checkpoints", needs=_TRAJ, in_analysis=True))

# names whose scores come from one pass over the training facts at every checkpoint
CHECKPOINT_PASS = ("vog", "ckpt_confidence", "ckpt_variability", "el2n")
GRADIENT_PATH = ("diffin", "tracin_ckpt")


@dataclass
class Trajectory:
    """Trainable parameters at steps 0 .. T (theta_t before step t; the last
    after step T - 1) and the learning rate of each step.

    A trajectory of the user's own checkpoints (`load_user_trajectory`) also
    holds, per checkpoint, every parameter of the truncated model (`states`,
    the frozen embeddings and LM head change between checkpoints too) and
    each fact's input to the first kept block (`block_inputs`, which the
    checkpoint's own lower blocks produce); its step sizes are unknown
    (lrs None) until `diffin_scores` estimates them."""

    checkpoints: list  # list over t of list[Tensor], one per trainable parameter
    lrs: list | None  # eta_t for t = 0 .. T - 1
    seconds: float
    states: list | None = None  # per t: every parameter of the truncated model, in .parameters() order
    block_inputs: list | None = None  # per t: per fact, its input to the first kept block
    lr_source: str = "recipe"  # "recipe", "given" or "step length"

    @property
    def steps(self) -> int:
        return len(self.checkpoints) - 1


def enter_checkpoint(trainer, trajectory: Trajectory, params: list, t: int) -> None:
    """Put the trainer at checkpoint t: its trainable parameters, and for a
    user trajectory every parameter and the facts' block inputs too."""
    if trajectory.states is None:
        load_checkpoint(params, trajectory.checkpoints[t])
        return
    load_checkpoint(trainer.params, trajectory.states[t])
    trainer.data.block_inputs[:] = trajectory.block_inputs[t]


def fact_batches(ids: list, batch_size: int, device) -> list:
    """(input_ids, attention_mask, rows) right-padded batches of token ids."""
    out = []
    for start in range(0, len(ids), batch_size):
        rows = list(range(start, min(start + batch_size, len(ids))))
        width = max(len(ids[r]) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(ids[r])] = torch.tensor(ids[r])
            mask[j, : len(ids[r])] = 1
        out.append((input_ids.to(device), mask.to(device), rows))
    return out


def load_user_trajectory(checkpoints: list, trainer, blocks: int, lr: float | None = None,
                         batch_size: int = 16, report=None) -> Trajectory:
    """The trajectory of the user's checkpoints (`dowsing.access.checkpoints`,
    validated, oldest first) for `trainer`'s facts: each checkpoint is loaded
    once, runs its blocks before the first kept one over every fact (its own
    block inputs) and gives the truncated model's parameters. lr: the step
    size of every interval (the optimizer's learning rate times the steps
    between two checkpoints); None estimates one per interval in
    `diffin_scores`."""
    from transformers import AutoModelForCausalLM

    from ..kernels.alignment import capture_block_inputs, tail_model

    report = report or (lambda fraction, message: None)
    t0 = time.perf_counter()
    reference = trainer.params[0]
    kept = len(blocks_of(trainer.work))
    trainable_ids = {id(p) for p in tail_parameters(trainer.work, blocks)}
    trainable_index = [i for i, p in enumerate(trainer.params) if id(p) in trainable_ids]
    states, block_inputs, trainable = [], [], []
    for t, c in enumerate(checkpoints):
        report(t / len(checkpoints), f"loading checkpoint {t + 1} of {len(checkpoints)}")
        net = AutoModelForCausalLM.from_pretrained(str(c.path), dtype=reference.dtype, attn_implementation="eager")
        net.to(reference.device).eval()
        first = len(blocks_of(net)) - kept
        with torch.no_grad():
            inputs = capture_block_inputs(net, fact_batches(trainer.data.ids, batch_size, reference.device), first)
            work, _ = tail_model(net, first)
            values = [p.detach().clone() for p in work.parameters()]
        if [v.shape for v in values] != [p.shape for p in trainer.params]:
            raise ValueError(f"checkpoint {t + 1} ({c.spec}) does not have the analysed model's shapes")
        states.append(values)
        block_inputs.append([x.clone() for x in inputs])
        trainable.append([values[i] for i in trainable_index])
        del net, work
    lrs = None if lr is None else [float(lr)] * (len(checkpoints) - 1)
    return Trajectory(trainable, lrs, time.perf_counter() - t0, states, block_inputs,
                      "step length" if lr is None else "given")


def record_trajectory(trainer, recipe, seed: int, pool: list | None = None) -> Trajectory:
    """Run the recipe on `pool` (all training rows by default: the benchmark's
    baseline fine-tune) and keep a clone of the trainable parameters at every
    step, from `TailTrainer.train`'s on_step. Leaves the trainer at theta_T."""
    t0 = time.perf_counter()
    if pool is None:
        pool = [r for rows in trainer.data.train_rows for r in rows]
    checkpoints, lrs = [], []

    def keep(step, trainable, lr):
        checkpoints.append([p.detach().clone() for p in trainable])
        if step < recipe.steps:
            lrs.append(float(lr))

    trainer.train(recipe, seed, pool, on_step=keep)
    return Trajectory(checkpoints, lrs, time.perf_counter() - t0)


def load_checkpoint(params: list, values: list) -> None:
    """Set the parameters to a checkpoint's values in place."""
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def flat(tensors: list) -> torch.Tensor:
    """One float64 vector of a list of tensors (dot products accumulate in float64)."""
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])


def unflat(vector: torch.Tensor, like: list) -> list:
    """The inverse of `flat`, in the dtypes and shapes of `like`."""
    out, start = [], 0
    for t in like:
        out.append(vector[start: start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def working_precision(model) -> float:
    """The unit roundoff the model's arithmetic really has: its parameters'
    dtype, except that Hugging Face's RMSNorm layers compute in float32
    whatever the dtype, so a float64 model with one is only float32-exact."""
    eps = torch.finfo(next(model.parameters()).dtype).eps
    if any("RMSNorm" in type(m).__name__ for m in model.modules()):
        eps = max(eps, torch.finfo(torch.float32).eps)
    return eps


def finite_difference_step(params: list, direction: torch.Tensor, precision: float | None = None) -> float:
    """eps of the central difference along `direction`:
    eps = u^(1/3) * max(||theta||, 1) / ||direction||, u the unit roundoff
    (`precision`; the parameters' dtype's when not given), the step that
    balances truncation (O(eps^2)) against rounding (O(u / eps))."""
    theta_norm = float(flat([p.detach() for p in params]).norm())
    v_norm = float(direction.norm())
    if v_norm == 0.0:
        return 0.0
    precision = torch.finfo(params[0].dtype).eps if precision is None else precision
    return precision ** (1.0 / 3.0) * max(theta_norm, 1.0) / v_norm


def finite_difference_hvp(grad_at, params: list, direction: torch.Tensor, eps: float | None = None,
                          precision: float | None = None) -> torch.Tensor:
    """H v ~= (grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps), flat
    float64, H the Hessian of the loss that `grad_at()` differentiates at the
    parameters' current values; eps from `finite_difference_step` (with
    `precision`) unless given. The parameters are restored to their exact
    values afterwards."""
    if eps is None:
        eps = finite_difference_step(params, direction, precision)
    if eps == 0.0:
        return torch.zeros_like(direction, dtype=torch.float64)
    saved = [p.detach().clone() for p in params]
    step = unflat(direction, saved)
    try:
        with torch.no_grad():
            for p, s in zip(params, step):
                p.add_(s, alpha=eps)
        plus = flat(grad_at())
        with torch.no_grad():
            for p, p0, s in zip(params, saved, step):
                p.copy_(p0).add_(s, alpha=-eps)
        minus = flat(grad_at())
    finally:
        load_checkpoint(params, saved)
    return (plus - minus) / (2.0 * eps)


def diffin_step(lr: float, held_grad: torch.Tensor, added_step: torch.Tensor, hvp_added: torch.Tensor,
                delta: torch.Tensor) -> tuple[float, float]:
    """Step t's Diff-In difference, split into its two terms:
    first = eta q^T u, second = eta (H_Q u)^T (Delta - eta u / 2);
    D = first + second is the second-order expansion around theta_t of
    L_Q(theta_{t+1}) - L_Q(theta_{t+1} - eta u)."""
    first = lr * float(held_grad @ added_step)
    second = lr * float(hvp_added @ (delta - 0.5 * lr * added_step))
    return first, second


def step_length_lr(delta: torch.Tensor, pool_grad: torch.Tensor, preconditioner: torch.Tensor | None) -> float:
    """The step size of an interval between two of the user's checkpoints
    when none is given: eta = ||Delta|| / ||P g_pool||, the step along the
    preconditioned mean gradient of the facts that is as long as the step the
    model really took. A length, not a projection: the model was trained on
    other data, so its step need not point along these facts' gradient."""
    direction = pool_grad if preconditioner is None else preconditioner * pool_grad
    norm = float(direction.norm())
    return float(delta.norm()) / norm if norm > 0.0 else 0.0


def mean_grad(grad_of, rows: list, chunk: int = 16) -> list:
    """grad of mean_{i in rows} l_i, in chunks of facts (grad_of gives the
    gradient of a chunk's mean loss)."""
    total = None
    for start in range(0, len(rows), chunk):
        part = rows[start: start + chunk]
        g = [x * (len(part) / len(rows)) for x in grad_of(part)]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return total


def diffin_scores(trainer, trajectory: Trajectory, params: list, preconditioner: torch.Tensor | None,
                  added_weight: float, fd: bool = True, chunk: int = 16, report=None) -> dict:
    """Per domain, sum over steps of Diff-In's first and second terms
    (`diffin_step`), with u_k,t = w P g_k,t; fd = False skips the finite
    differences (TracIn over checkpoints only). Returns {"first": [per
    domain], "second": [...], "grad_s", "fd_s"}; leaves the parameters at
    theta_0."""
    report = report or (lambda fraction, message: None)
    data = trainer.data
    grad_of = tail_grad_fn(trainer.work, trainer.embed, data.ids, data.block_inputs, params)
    precision = working_precision(trainer.work)
    n_domains = len(data.train_rows)
    first = [0.0] * n_domains
    second = [0.0] * n_domains
    grad_s = fd_s = 0.0
    estimate = trajectory.lrs is None
    if estimate:
        trajectory.lrs = []
    for t in range(trajectory.steps):
        enter_checkpoint(trainer, trajectory, params, t)
        delta = flat(trajectory.checkpoints[t + 1]) - flat(trajectory.checkpoints[t])
        if estimate:
            t0 = time.perf_counter()
            pool = [r for rows in data.train_rows for r in rows]
            trajectory.lrs.append(step_length_lr(delta, flat(mean_grad(grad_of, pool, chunk)), preconditioner))
            grad_s += time.perf_counter() - t0
        lr = trajectory.lrs[t]
        for k in range(n_domains):
            report((t * n_domains + k) / (trajectory.steps * n_domains), f"Diff-In, step {t + 1}, domain {k + 1}")
            t0 = time.perf_counter()
            held_rows = list(data.held_rows[k])
            g_train = flat(mean_grad(grad_of, list(data.train_rows[k]), chunk))
            q = flat(mean_grad(grad_of, held_rows, chunk))
            u = added_weight * (g_train if preconditioner is None else preconditioner * g_train)
            t1 = time.perf_counter()
            grad_s += t1 - t0
            first[k] += lr * float(q @ u)
            if fd:
                hv = finite_difference_hvp(lambda: mean_grad(grad_of, held_rows, chunk), params, u,
                                           precision=precision)
                second[k] += diffin_step(lr, q, u, hv, delta)[1]
                fd_s += time.perf_counter() - t1
    enter_checkpoint(trainer, trajectory, params, 0)
    return {"first": first, "second": second, "grad_s": grad_s, "fd_s": fd_s}


def tracin_per_fact(trainer, trajectory: Trajectory, params: list, preconditioner: torch.Tensor | None,
                    added_weight: float, chunk: int = 16, report=None) -> list:
    """Per domain, per fact (training half, then held-out half), the fact's
    share of the first-order term: sum_t eta_t w (P g_i,t)^T q_t, q_t the
    gradient of the other half's mean loss. The training half's values
    average to `diffin_scores`' "first" (TracIn over checkpoints); the
    held-out half's swap the roles of the halves, as the held-out alignment
    does, so every fact has a value. Needs trajectory.lrs; leaves the
    parameters at theta_0."""
    report = report or (lambda fraction, message: None)
    data = trainer.data
    grad_of = tail_grad_fn(trainer.work, trainer.embed, data.ids, data.block_inputs, params)
    halves = [(list(a), list(b)) for a, b in zip(data.train_rows, data.held_rows)]
    values = [[0.0] * (len(a) + len(b)) for a, b in halves]
    for t in range(trajectory.steps):
        enter_checkpoint(trainer, trajectory, params, t)
        scale = trajectory.lrs[t] * added_weight
        for k, (a, b) in enumerate(halves):
            report((t * len(halves) + k) / (trajectory.steps * len(halves)), f"per-fact TracIn, step {t + 1}, domain {k + 1}")
            for rows, other, offset in ((a, b, 0), (b, a, len(a))):
                q = flat(mean_grad(grad_of, other, chunk))
                pq = q if preconditioner is None else preconditioner * q
                for j, r in enumerate(rows):
                    values[k][offset + j] += scale * float(flat(grad_of([r])) @ pq)
    enter_checkpoint(trainer, trajectory, params, 0)
    return values


@dataclass
class CheckpointStats:
    """Per training fact (rows in `rows` order), across checkpoints 0 .. T."""

    rows: list
    losses: torch.Tensor  # (T + 1, N): l_i(theta_t)
    el2n: torch.Tensor | None  # (T + 1, N): mean over predicted tokens of ||softmax - e_y||
    vog: torch.Tensor | None  # (N,): mean over (token, coordinate) of std_t dl_i/dh_i
    seconds: float


def fact_error_norms(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per fact, mean over its predicted tokens of ||softmax(z_t) - e_{y_t}||_2
    = sqrt(sum_v p_v^2 - 2 p_y + 1), in the logits' dtype (the vocabulary-sized
    work dominates; each term is in [0, 1], so float32 loses nothing that
    matters), float64 out."""
    p = torch.softmax(logits[:, :-1, :], dim=-1)
    target = input_ids[:, 1:]
    p_y = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    err = torch.sqrt(((p * p).sum(-1) - 2 * p_y + 1).clamp_min(0.0)).to(torch.float64)
    valid = mask[:, 1:].to(err.dtype)
    return (err * valid).sum(1) / valid.sum(1)


def checkpoint_stats(trainer, trajectory: Trajectory, params: list, rows: list, input_grads: bool,
                     error_norms: bool = True, batch_size: int = 16, report=None) -> CheckpointStats:
    """Losses, EL2N (when error_norms) and VoG (when input_grads) of the given facts at every
    checkpoint. The input gradients of one batch come from one backward of
    the sum of its facts' losses: facts do not interact (causal attention,
    right padding), so each fact's slice is its own dl_i/dh_i. Their mean
    and variance over checkpoints accumulate by Welford's update, which does
    not cancel when the gradients barely move. Leaves the parameters at
    theta_0."""
    report = report or (lambda fraction, message: None)
    t0 = time.perf_counter()
    data = trainer.data
    n_ckpt = len(trajectory.checkpoints)
    losses = torch.zeros(n_ckpt, len(rows), dtype=torch.float64)
    el2n = torch.zeros(n_ckpt, len(rows), dtype=torch.float64)
    mean = [None] * len(rows)
    m2 = [None] * len(rows)
    for t in range(n_ckpt):
        report(t / n_ckpt, f"checkpoint {t} of {n_ckpt - 1}")
        enter_checkpoint(trainer, trajectory, params, t)
        for start in range(0, len(rows), batch_size):
            part = rows[start: start + batch_size]
            input_ids, mask, hidden = padded_block_batch([data.ids[r] for r in part],
                                                         [data.block_inputs[r] for r in part], trainer.device)
            with torch.set_grad_enabled(input_grads):
                if input_grads:
                    hidden.requires_grad_(True)
                logits = trainer.work(inputs_embeds=trainer.embed(hidden), attention_mask=mask, use_cache=False).logits
                fact_loss = per_fact_losses(logits, input_ids, mask)
                grads = torch.autograd.grad(fact_loss.sum(), hidden)[0] if input_grads else None
            with torch.no_grad():
                losses[t, start: start + len(part)] = fact_loss.detach().to(torch.float64).cpu()
                if error_norms:
                    el2n[t, start: start + len(part)] = fact_error_norms(logits.detach(), input_ids, mask).cpu()
            if grads is None:
                continue
            for j in range(len(part)):
                i = start + j
                x = grads[j, : int(mask[j].sum())].detach().to(torch.float64).cpu()
                if mean[i] is None:
                    mean[i], m2[i] = x.clone(), torch.zeros_like(x)
                    continue
                d = x - mean[i]
                mean[i] += d / (t + 1)
                m2[i] += d * (x - mean[i])
            del logits, grads
    enter_checkpoint(trainer, trajectory, params, 0)
    vog = None
    if input_grads:
        vog = torch.tensor([float(torch.sqrt(m / n_ckpt).mean()) for m in m2], dtype=torch.float64)
    return CheckpointStats(list(rows), losses, el2n if error_norms else None, vog, time.perf_counter() - t0)


def checkpoint_priorities(stats: CheckpointStats, domain_rows: list) -> dict:
    """{name: (priority per domain, per-fact values per domain)} of the
    checkpoint-pass estimators, from `checkpoint_stats` over every domain's
    training facts (in `domain_rows` order)."""
    index = {r: i for i, r in enumerate(stats.rows)}
    prob = torch.exp(-stats.losses)
    per_fact = {
        "ckpt_confidence": 1.0 - prob.mean(0),
        "ckpt_variability": prob.std(0, unbiased=False),
    }
    if stats.el2n is not None:
        per_fact["el2n"] = stats.el2n.mean(0)
    if stats.vog is not None:
        per_fact["vog"] = stats.vog
    out = {}
    for name, values in per_fact.items():
        pieces = [[float(values[index[r]]) for r in rows] for rows in domain_rows]
        out[name] = ([sum(p) / len(p) for p in pieces], pieces)
    return out


# every estimator this family computes: the two groups that share their work
TRAJECTORY_ESTIMATORS = GRADIENT_PATH + CHECKPOINT_PASS


def trajectory_scores(loaded, split, names=TRAJECTORY_ESTIMATORS, recipe=None, seed: int = 0,
                      blocks: int | None = None, adam_batch: int = 8, adam_batches: int = 8,
                      batch_size: int = 16, trainer=None, progress=None, checkpoints: list | None = None,
                      checkpoint_lr: float | None = None, all_facts: bool = False) -> list[EstimatorScore]:
    """The named trajectory estimators on the split's domains, over the
    trajectory of the baseline fine-tune of `recipe` and `seed` (the
    benchmark's main recipe and first seed: the run whose checkpoints a user
    without their own would have), or over the user's `checkpoints`
    (validated by `dowsing.access.checkpoints`, oldest first, the last being the
    loaded model) with step size `checkpoint_lr` (None: estimated per
    interval, `step_length_lr`); the recipe then gives only the optimizer
    (its preconditioner) and the blocks. blocks: train the last `blocks`
    blocks instead of the recipe's (None: the recipe's). trainer: a
    TailTrainer on this split to reuse (one is built from `loaded`
    otherwise); it is reset to its starting weights and block inputs
    afterwards. all_facts: every fact of a domain (training and held-out
    halves) gets a per-fact value, instead of its training half.

    Each score's time is the forward pass, the recorded fine-tune, and the
    work it needs (shared work charged in full to each estimator sharing it,
    as the alignment family does)."""
    from ..kernels.training import Recipe, TailTrainer

    unknown = [n for n in names if n not in TRAJECTORY_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown trajectory estimator(s): {', '.join(unknown)}; "
                         f"choose from {', '.join(TRAJECTORY_ESTIMATORS)}")
    if split.block_inputs is None:
        raise ValueError("the trajectory estimators need the block inputs cached by the forward pass")
    recipe = recipe or Recipe("trajectory")
    if blocks is not None:
        recipe = dataclasses.replace(recipe, blocks=blocks)
    report = progress or (lambda fraction, message: None)
    trainer = trainer or TailTrainer(loaded, split)
    original_inputs = list(trainer.data.block_inputs)
    if checkpoints:
        trajectory = load_user_trajectory(checkpoints, trainer, recipe.blocks, checkpoint_lr, batch_size,
                                          report=lambda f, m: report(0.1 * f, m))
    else:
        report(0.0, f"recording the baseline fine-tune's trajectory ({recipe.steps} steps)")
        trajectory = record_trajectory(trainer, recipe, seed)
    params = tail_parameters(trainer.work, recipe.blocks)
    source = {"trajectory": "user checkpoints" if checkpoints else f"baseline fine-tune ({recipe.label()}, seed {seed})",
              "checkpoints": len(trajectory.checkpoints)}
    run = _Run(trainer, trajectory, params, recipe, seed, split.forward_s + trajectory.seconds, source, report)
    scores = {}
    try:
        if any(n in GRADIENT_PATH for n in names):
            scores.update(_gradient_path_scores(run, [n for n in names if n in GRADIENT_PATH], adam_batch,
                                                adam_batches, all_facts))
        if any(n in CHECKPOINT_PASS for n in names):
            scores.update(_checkpoint_pass_scores(run, [n for n in names if n in CHECKPOINT_PASS], batch_size,
                                                  all_facts))
    finally:
        trainer.reset()
        trainer.data.block_inputs[:] = original_inputs
    return [scores[n] for n in names]


@dataclass
class _Run:
    """What both groups of trajectory estimators read: the trainer, the
    trajectory, the trainable parameters, the recipe and seed, the seconds
    every score is charged (forward pass and trajectory), where the
    trajectory came from, and the progress callback."""

    trainer: object
    trajectory: Trajectory
    params: list
    recipe: object
    seed: int
    base_s: float
    source: dict
    report: object


def _gradient_path_scores(run: _Run, names: list, adam_batch: int, adam_batches: int, all_facts: bool) -> dict:
    """TracIn over checkpoints and Diff-In, sharing their gradients."""
    from ..kernels.alignment import adam_preconditioner

    trainer, trajectory, params, recipe = run.trainer, run.trajectory, run.params, run.recipe
    t0 = time.perf_counter()
    preconditioner = None
    if recipe.optimizer == "adamw":
        enter_checkpoint(trainer, trajectory, params, 0)
        data = trainer.data
        grad_of = tail_grad_fn(trainer.work, trainer.embed, data.ids, data.block_inputs, params)
        pool = [r for rows in data.train_rows for r in rows]
        preconditioner = flat(adam_preconditioner(grad_of, pool, adam_batch, adam_batches, run.seed))
    adam_s = time.perf_counter() - t0
    out = diffin_scores(trainer, trajectory, params, preconditioner, recipe.added_weight, fd="diffin" in names,
                        report=lambda f, m: run.report(0.1 + 0.6 * f, m))
    info = {**run.source, "steps": trajectory.steps, "parameters": sum(p.numel() for p in params),
            "preconditioner": "adam (theta_0)" if preconditioner is not None else "identity",
            "step_sizes": list(trajectory.lrs), "step_size_source": trajectory.lr_source}
    per_fact, per_fact_s = None, 0.0
    if all_facts:
        t1 = time.perf_counter()
        per_fact = tracin_per_fact(trainer, trajectory, params, preconditioner, recipe.added_weight,
                                   report=lambda f, m: run.report(0.7 + 0.1 * f, m))
        per_fact_s = time.perf_counter() - t1
    seconds = run.base_s + adam_s + out["grad_s"] + per_fact_s
    notes = []
    if trajectory.lr_source == "step length":
        notes.append("The step size between checkpoints was estimated from each step's length (give "
                     "checkpoint_lr for the real one): Diff-In's second-order term depends on it.")
    scores = {}
    if "tracin_ckpt" in names:
        scores["tracin_ckpt"] = EstimatorScore("tracin_ckpt", get("tracin_ckpt").label, out["first"], per_fact,
                                               seconds, info, list(notes))
    if "diffin" in names:
        total = [a + b for a, b in zip(out["first"], out["second"])]
        scores["diffin"] = EstimatorScore(
            "diffin", get("diffin").label, total, per_fact, seconds + out["fd_s"],
            {**info, "first_order": out["first"], "second_order": out["second"],
             "hessian_gradient_products": trajectory.steps * len(total), "finite_difference": "central"},
            list(notes))
    return scores


def _checkpoint_pass_scores(run: _Run, names: list, batch_size: int, all_facts: bool) -> dict:
    """VoG, cartography and EL2N from one pass over the facts at every checkpoint."""
    data = run.trainer.data
    domain_rows = data.train_rows
    if all_facts:
        domain_rows = [list(a) + list(b) for a, b in zip(data.train_rows, data.held_rows)]
    rows = [r for domain in domain_rows for r in domain]
    stats = checkpoint_stats(run.trainer, run.trajectory, run.params, rows, "vog" in names, "el2n" in names,
                             batch_size, report=lambda f, m: run.report(0.7 + 0.3 * f, m))
    values = checkpoint_priorities(stats, domain_rows)
    return {n: EstimatorScore(n, get(n).label, values[n][0], values[n][1], run.base_s + stats.seconds,
                              {**run.source, "input_gradients": "vog" in names,
                               "facts": "all" if all_facts else "training half"})
            for n in names}


def trajectory_family(ctx, names) -> list:
    """The trajectory family's compute: over the user's checkpoints when the
    context has them, else over the settings' recipe's baseline fine-tune;
    the recipe trains no more blocks than the split captured."""
    from ..kernels.alignment import blocks_of

    s, split = ctx.settings, ctx.split
    kept = len(blocks_of(ctx.loaded.model)) - split.capture_block
    return trajectory_scores(ctx.loaded, split, names, s.recipe, s.seed, blocks=min(s.recipe.blocks, kept),
                             adam_batch=s.adam_batch, adam_batches=s.adam_batches, batch_size=s.batch_size,
                             progress=ctx.progress, checkpoints=ctx.checkpoints, checkpoint_lr=s.checkpoint_lr,
                             all_facts=s.all_facts)


def trajectory_s(cal, train: list, held: list, names, recipe, keep: int, adam_batches: int, checkpoints: int = 0,
                 all_facts: bool = False, lr_known: bool = True) -> float:
    """Recording the baseline fine-tune (or loading `checkpoints` of the
    user's), then Diff-In / TracIn's gradients at every step (per domain its
    training and held-out means, Diff-In's central differences two more
    held-out means; with all_facts per-fact gradients too) and the
    checkpoint pass (a forward, with input gradients for VoG, over the
    scored facts at every checkpoint)."""
    pool = [n for d in train for n in d]
    blocks = min(recipe.blocks, keep)
    if checkpoints:
        seconds, steps = cal.copy_s + checkpoints * cal.load_s, checkpoints - 1
    else:
        steps = recipe.steps
        seconds = cal.copy_s + finetune_s(cal, steps, expected_padded(pool, recipe.batch), keep, blocks, 0)
    if {"diffin", "tracin_ckpt"} & set(names):
        if recipe.optimizer == "adamw":
            seconds += adam_moment_s(cal, pool, adam_batches, keep, blocks)
        means = [chunked(t) for t in train] + [chunked(h) for h in held] * (3 if "diffin" in names else 1)
        if not lr_known:
            means.append(chunked(pool))
        if all_facts:
            means += [chunked(h) for h in held] + [chunked(t) for t in train]
            means += [(len(d), sum(d)) for d in train + held]
        calls, padded = sum(c for c, _ in means), sum(p for _, p in means)
        # per chunk: scaled and summed; per step: the checkpoint entered and its delta; per domain: the step
        # u = P g, its dot products and (Diff-In) the perturbed parameters and the finite difference
        per_domain = 12 if "diffin" in names else 3
        vectors = (4 + per_domain * len(train)) * trainable_params(cal, blocks) * cal.vector_s_per_element
        seconds += steps * (gradients_s(cal, calls, padded, keep, blocks, vector_ops=2) + vectors)
    if {"vog", "ckpt_confidence", "ckpt_variability", "el2n"} & set(names):
        scored = [n for d in (train + held if all_facts else train) for n in d]
        _, padded = chunked(scored)
        seconds += (steps + 1) * tail_pass_s(cal, padded, keep, keep if "vog" in names else 0)
    return seconds


def trajectory_cost(cal, run, names) -> Cost:
    """`trajectory_s` over the run's halves with its recipe. Memory: the
    trajectory's checkpoints and deltas of the trained blocks (the longest
    recipe's steps and ten more) and a fine-tune step. In an analysis (the
    user's checkpoints, every fact scored) a second forward pass over every
    fact and the last align_blocks blocks alone (`costs.ranking_tail_bytes`)."""
    if run.pipeline == "analysis":
        keep = min(run.align_blocks, cal.n_layers)
        flat = [n for _, d in run.domains for n in d]
        forward = cal.forward_s_per_token * padded_tokens(flat, run.batch_size)
        return Cost(forward + trajectory_s(cal, run.train, run.held, names, Recipe("checkpoints", blocks=keep), keep,
                                           run.adam_batches, run.checkpoints, all_facts=True,
                                           lr_known=run.lr_known), ranking_tail_bytes(cal, run))
    seconds = trajectory_s(cal, run.train, run.held, names, run.recipe, run.keep, run.adam_batches, run.checkpoints,
                           lr_known=run.lr_known)
    steps = max(r.steps for r in run.recipes)
    return Cost(seconds, (steps + 10) * trained_bytes(cal, run) * 2 + trainer_step_bytes(cal, run))


register_family("trajectory", trajectory_family, trajectory_cost)
