"""Does the ranking hold? Ground truth by actually training, and a leaderboard
of rival estimators against it.

Each domain's facts are split (seeded) into a training half and a held-out
half. Every estimator scores the domains from the training halves only. Two
ground truths then measure what adding domain k's training facts really does
to the held-out loss of every domain j:

* **In the concept subspace S_k** (B = 1). Influence functions assume the
  model sits at a minimum of its training loss; it does not, so, as in the
  proximal response of Bae et al. (2022), the linear term is removed:
      u*(eps) = stationary point of  L_tr(u) - g_tr^T u + eps L_tr,k(u) + lambda/2 |u|^2
  (Newton's method in float64 on the structured Hessian; only the final
  norm and LM head are re-run), realised change
      Delta_j(eps) = L_held,j(u*(eps)) - L_held,j(0),
  predicted change
      Delta_j^pred(eps) = -eps grad L_held,j^T (H + lambda I)^-1 grad L_tr,k.
  The implicit function theorem makes Delta / Delta^pred -> 1 as eps -> 0;
  larger eps shows how far the linearisation carries.
* **Full fine-tuning**: seeded AdamW on all parameters for a fixed number of
  steps. The baseline run trains on minibatches of all training facts; run k
  trains on the same minibatches plus a minibatch of domain k's training
  facts with weight `finetune_added_weight`. Realised gain of k =
  held-out loss of k after the baseline - after run k.

Leaderboard: per estimator, Spearman's rho between its priority and the
realised fine-tuning gain over domains, with a seeded bootstrap interval
(resampling each domain's held-out facts and, where the estimator is a mean
over facts, its training facts), rho against the subspace gain, Kendall's tau
against the default ranking (exact-Hessian influence), and time.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from .analysis import Progress, _as_domains
from .curvature import structured_hessian, tail_coefficients, tail_function
from .domains import Domain
from .estimators import (DEFAULT_ESTIMATOR, ESTIMATORS, LABELS, padded_block_batch, score_estimators, split_pass,
                         tail_model, token_weights, trainable_parameters)
from .result import finite_or_none
from .solvers import damped, dense_solve
from .subspace import encode_facts, find_anatomy, per_fact_losses


@dataclass(frozen=True)
class ValidationConfig:
    """Every knob of one validation run.

    seed: the split, the fine-tuning minibatches, LiSSA and the bootstrap.
    held_out_fraction: share of each domain's facts held out (when no
        held-out list is given).
    eps: upweights of the added domain in the subspace ground truth.
    damping: lambda, as in the analysis.
    newton_steps: at most this many Newton steps per (domain, eps).
    finetune_steps / finetune_lr / finetune_batch: the AdamW budget, the
        learning rate and the facts per minibatch of the training mix.
    finetune_blocks: AdamW trains the last this-many blocks and the final
        norm (capped at the model's depth).
    finetune_added_batch / finetune_added_weight: facts of the added domain
        per step and the weight of their mean loss.
    estimators: which rival scores go on the leaderboard.
    bootstrap: resamples for the interval on rho; interval_pct its coverage.
    lissa_depth / lissa_batch_facts: LiSSA steps and facts per minibatch HVP.
    subspace / finetune: switch either ground truth off.
    """

    seed: int = 0
    held_out_fraction: float = 0.5
    eps: tuple = (0.01, 0.1, 0.3)
    damping: float = 1e-3
    newton_steps: int = 2
    finetune_steps: int = 8
    finetune_blocks: int = 4
    finetune_lr: float = 3e-5
    finetune_batch: int = 8
    finetune_added_batch: int = 4
    finetune_added_weight: float = 1.0
    estimators: tuple = ESTIMATORS
    bootstrap: int = 1000
    interval_pct: float = 90.0
    lissa_depth: int = 1000
    lissa_batch_facts: int = 8
    subspace: bool = True
    finetune: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        object.__setattr__(self, "estimators", tuple(self.estimators))
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction!r}")
        if not self.eps or any(not (e > 0) for e in self.eps):
            raise ValueError("eps must be a non-empty list of positive numbers")
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad:
            raise ValueError(f"unknown estimator(s): {', '.join(bad)}; choose from {', '.join(ESTIMATORS)}")
        if self.finetune_steps < 1 or self.finetune_batch < 1 or self.finetune_added_batch < 1:
            raise ValueError("finetune_steps, finetune_batch and finetune_added_batch must be >= 1")
        if self.bootstrap < 0:
            raise ValueError("bootstrap must be >= 0")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["eps"] = list(self.eps)
        data["estimators"] = list(self.estimators)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown validation config fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class ValidationResult:
    model: dict
    config: dict
    domains: list  # names
    split: dict  # {"train": {name: [facts]}, "held_out": {name: [facts]}}
    estimators: list  # EstimatorScore.to_dict() per estimator
    subspace: dict | None  # ground truth in S_k
    finetune: dict | None  # ground truth by fine-tuning
    leaderboard: list  # one row per estimator
    timings: dict
    created_at: str = ""
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return finite_or_none(dataclasses.asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationResult":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "ValidationResult":
        return cls.from_dict(json.loads(text))

    def table(self):
        """The leaderboard as a DataFrame, best rho first."""
        import pandas as pd

        rows = [{
            "Estimator": r["label"],
            "ρ fine-tune": r["spearman_finetune"],
            "interval": _interval_text(r.get("spearman_finetune_interval")),
            "ρ subspace": r["spearman_subspace"],
            "τ vs default": r["kendall_vs_default"],
            "time (s)": r["time_s"],
            "solver converged": {None: "—", True: "yes", False: "no"}[r.get("solver_converged")],
        } for r in self.leaderboard]
        return pd.DataFrame(rows)


def _interval_text(pair) -> str:
    if not pair or pair[0] is None:
        return "—"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


# --- the split ---------------------------------------------------------------------------------------------


def split_domains(domains, seed: int = 0, held_out_fraction: float = 0.5, held_out=None):
    """(train, held) lists of Domain. Each domain's facts are shuffled with a
    generator seeded by (seed, domain name) and the last
    round(fraction * N) become held-out (at least 1, leaving at least 1 to train).
    held_out: optional {name: [facts]} given by the user; then all of a
    domain's facts train and these are its held-out facts."""
    domains = _as_domains(domains)
    train, held = [], []
    for d in domains:
        if held_out is not None:
            if d.name not in held_out or not held_out[d.name]:
                raise ValueError(f"The held-out list has no facts for domain {d.name!r}.")
            train.append(d)
            held.append(Domain(d.name, tuple(held_out[d.name])))
            continue
        facts = list(d.facts)
        if len(facts) < 2:
            raise ValueError(f"Domain {d.name!r} needs at least 2 facts to split into training and held-out.")
        random.Random(f"{seed}:{d.name}").shuffle(facts)
        n_held = min(max(1, round(held_out_fraction * len(facts))), len(facts) - 1)
        train.append(Domain(d.name, tuple(facts[: len(facts) - n_held])))
        held.append(Domain(d.name, tuple(facts[len(facts) - n_held:])))
    return train, held


# --- correlation helpers -----------------------------------------------------------------------------------


def spearman(x, y) -> float | None:
    """Spearman's rho (scipy), None when undefined (constant or non-finite input)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(stats.spearmanr(x, y).statistic)
    return value if math.isfinite(value) else None


def kendall(x, y) -> float | None:
    """Kendall's tau-b (scipy), None when undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    value = float(stats.kendalltau(x, y).statistic)
    return value if math.isfinite(value) else None


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.pearsonr(x, y).statistic)


def bootstrap_spearman(priority_samples, gain_samples, resamples: int, seed: int, interval_pct: float = 90.0):
    """Percentile interval of rho(priority, gain) when each domain's priority
    and gain are means over facts that are resampled with replacement.

    priority_samples: per domain, per-fact numbers whose mean is the
    priority, or a plain number (held fixed). gain_samples: the same for the gain.
    """
    if resamples == 0:
        return [None, None]
    rng = np.random.default_rng(seed)

    def draw(sample):
        if np.isscalar(sample):
            return float(sample)
        arr = np.asarray(sample, dtype=float)
        return float(arr[rng.integers(0, len(arr), len(arr))].mean())

    values = []
    for _ in range(resamples):
        p = [draw(s) for s in priority_samples]
        g = [draw(s) for s in gain_samples]
        rho = spearman(p, g)
        if rho is not None:
            values.append(rho)
    if len(values) < resamples / 2:
        return [None, None]
    tail = (100.0 - interval_pct) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


# --- ground truth in the concept subspace ------------------------------------------------------------------


def _tail_losses(anatomy, h, targets, direction, s, chunk: int = 512) -> torch.Tensor:
    """ce_t(s_t) = cross-entropy of tail(h_t + s_t v) at y_t, float64."""
    tail = tail_function(anatomy)
    out = []
    with torch.no_grad():
        for start in range(0, h.shape[0], chunk):
            hc = h[start: start + chunk] + s[start: start + chunk].to(h.dtype).unsqueeze(-1) * direction
            out.append(F.cross_entropy(tail(hc), targets[start: start + chunk], reduction="none").to(torch.float64))
    return torch.cat(out)


def subspace_response(split, terms, k: int, eps_values, damping: float, newton_steps: int = 2):
    """Realised and predicted held-out loss changes of every domain when
    domain k's training facts are upweighted by eps, in S_k.

    Newton starts at u = 0 for the smallest eps and warm-starts each larger
    one from the last; its first step from u = 0 is the influence step itself,
    later steps measure the non-linearity. rel_gradient is
    ||grad|| / (eps ||g_k||) before the last step taken.
    Returns {"eps": [...], "realised": [[Delta_j per j] per eps],
    "predicted": [[...]], "newton": [{"steps", "rel_gradient"} per eps]}.
    """
    tokens = split.tokens
    anatomy = split.anatomy
    v = split.directions[k].to(tokens.h.dtype)
    t = terms[k]
    train_all = [r for rows in split.train_rows for r in rows]
    w_tr = token_weights(split, train_all)
    w_k = token_weights(split, split.train_rows[k])
    on_train = (w_tr > 0).nonzero().flatten()
    x_tr = tokens.x[on_train].to(torch.float64)
    h_tr, y_tr = tokens.h[on_train], tokens.targets[on_train]
    held_tokens = torch.cat([(tokens.token_fact == r).nonzero().flatten()
                             for rows in split.held_rows for r in rows])
    x_he = tokens.x[held_tokens].to(torch.float64)
    h_he, y_he = tokens.h[held_tokens], tokens.targets[held_tokens]
    held_w = [token_weights(split, rows)[held_tokens] for rows in split.held_rows]

    g_tr0 = t.grads[train_all].mean(dim=0)
    g_k = t.grads[split.train_rows[k]].mean(dim=0)
    z_k = dense_solve(damped(t.hessian, damping), g_k).x
    g_held = torch.stack([t.grads[rows].mean(dim=0) for rows in split.held_rows])
    line = split.line
    base_held = line.derivatives(v, held_tokens, y_he, order=0)[0]
    loss0 = [float(w @ base_held) for w in held_w]

    u = torch.zeros_like(g_k)
    realised, predicted, newton = [], [], []
    for eps in sorted(eps_values):
        weight = w_tr[on_train] + eps * w_k[on_train]
        steps, rel_grad = 0, float("nan")
        for steps in range(1, newton_steps + 1):
            if not bool(u.any()):  # at u = 0 the derivatives are already known
                a, c = t.a[on_train], t.c[on_train]
            else:
                _, a, c, _ = line.derivatives(v, on_train, y_tr, x_tr @ u)
            grad = x_tr.T @ (weight * a) - g_tr0 + damping * u
            rel_grad = float(grad.norm() / (eps * g_k.norm()).clamp_min(1e-300))
            if rel_grad < 1e-6:
                steps -= 1
                break
            hess = damped(structured_hessian(x_tr, weight, c), damping)
            u = u - torch.linalg.solve(hess, grad)
        held_now = line.derivatives(v, held_tokens, y_he, x_he @ u, order=0)[0]
        realised.append([float(w @ held_now) - l0 for w, l0 in zip(held_w, loss0)])
        predicted.append((-eps * (g_held @ z_k)).tolist())
        newton.append({"steps": steps, "rel_gradient": rel_grad})
    return {"eps": sorted(float(e) for e in eps_values), "realised": realised, "predicted": predicted,
            "newton": newton}


# --- ground truth by fine-tuning ---------------------------------------------------------------------------


def finetune_gains(loaded, split, train, config: ValidationConfig, report=None) -> dict:
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
    net = loaded.model
    device = next(net.parameters()).device
    first = split.capture_block
    work, embed = tail_model(net, first)
    work.eval()  # no dropout: runs differ only by the added data
    trainable = trainable_parameters(work)
    original = [p.detach().clone() for p in trainable]

    def logits_of(rows):
        input_ids, mask, hidden = padded_block_batch([split.ids[r] for r in rows], [split.block_inputs[r] for r in rows], device)
        logits = work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits
        return logits, input_ids, mask

    held_all = [r for rows in split.held_rows for r in rows]

    def held_losses():
        out = []
        with torch.no_grad():
            for i in range(0, len(held_all), config.batch_size):
                logits, ids, mask = logits_of(held_all[i: i + config.batch_size])
                out.append(per_fact_losses(logits, ids, mask).to(torch.float64).cpu())
        return torch.cat(out)

    before = held_losses()
    want = split.tokens.fact_losses[held_all].cpu()
    if float((before - want).abs().max()) > 1e-3 * float(want.abs().max()):
        raise RuntimeError("The truncated model does not reproduce the full model's losses; "
                           "fine-tuning ground truth is not available for this architecture.")
    pool = [r for rows in split.train_rows for r in rows]

    def run(added: int | None) -> torch.Tensor:
        with torch.no_grad():
            for p, p0 in zip(trainable, original):
                p.copy_(p0)
        opt = torch.optim.AdamW(trainable, lr=config.finetune_lr)
        rng = random.Random(config.seed)
        added_rng = random.Random(config.seed + 1)
        for _ in range(config.finetune_steps):
            pick = rng.sample(pool, min(config.finetune_batch, len(pool)))
            weights = [1.0 / len(pick)] * len(pick)
            if added is not None:
                own = split.train_rows[added]
                extra = added_rng.sample(own, min(config.finetune_added_batch, len(own)))
                pick = pick + extra
                weights += [config.finetune_added_weight / len(extra)] * len(extra)
            logits, ids, mask = logits_of(pick)
            w = torch.tensor(weights, dtype=logits.dtype, device=device)
            loss = (per_fact_losses(logits, ids, mask) * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del logits, loss
        del opt
        return held_losses()

    t0 = time.perf_counter()
    n = len(train)
    report(0.0, "baseline fine-tuning run (no added domain)")
    baseline = run(None)
    runs = {}
    for k, d in enumerate(train):
        report((k + 1) / (n + 1), f"fine-tuning with {d.name} added ({k + 1} of {n})")
        runs[d.name] = run(k)
    del work, original
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


# --- the whole validation ----------------------------------------------------------------------------------


def validate(model, domains, config: ValidationConfig | None = None, held_out=None,
             progress: Callable[[Progress], None] | None = None) -> ValidationResult:
    """Split, score every estimator on the training halves, measure both
    ground truths, and build the leaderboard.

    model: a LoadedModel, or a model id / path (None = embedded default),
    loaded in float32 on the CPU.
    """
    from datetime import datetime, timezone

    from .models import LoadedModel, load_model

    config = config or ValidationConfig()
    say = progress or (lambda p: None)
    clock = time.perf_counter()
    timings = {}
    if not isinstance(model, LoadedModel):
        say(Progress("loading model", 0.0, "loading model"))
        model = load_model(model, "cpu", "float32")
        timings["load_model"] = time.perf_counter() - clock
    train, held = split_domains(domains, config.seed, config.held_out_fraction, held_out)
    names = [d.name for d in train]
    n = len(train)

    say(Progress("forward", 0.02, f"forward pass over {sum(len(d.facts) for d in train + held)} facts"))
    depth = len(find_anatomy(model.model).down_projs)
    first = max(0, depth - config.finetune_blocks)
    split = split_pass(model, train, held, config.batch_size, capture_block=first if config.finetune else None)
    timings["forward"] = split.forward_s

    estimators = list(config.estimators)
    if DEFAULT_ESTIMATOR not in estimators:
        estimators.insert(0, DEFAULT_ESTIMATOR)
    t0 = time.perf_counter()
    scores, terms = score_estimators(
        model, train, split, estimators, config.damping, config.lissa_depth, config.lissa_batch_facts, config.seed,
        progress=lambda f, m: say(Progress("estimators", 0.05 + 0.25 * f, m)),
    )
    timings["estimators"] = time.perf_counter() - t0

    subspace = None
    if config.subspace:
        t0 = time.perf_counter()
        per_domain = []
        for k in range(n):
            say(Progress("subspace ground truth", 0.3 + 0.2 * k / n, f"Newton in S_k for {names[k]}"))
            per_domain.append(subspace_response(split, terms, k, config.eps, config.damping, config.newton_steps))
        subspace = _summarise_subspace(names, per_domain)
        timings["subspace"] = time.perf_counter() - t0

    finetune = None
    if config.finetune:
        t0 = time.perf_counter()
        finetune = finetune_gains(model, split, train, config,
                                  lambda f, m: say(Progress("fine-tuning ground truth", 0.5 + 0.45 * f, m)))
        timings["finetune"] = time.perf_counter() - t0

    say(Progress("leaderboard", 0.96, "correlations and bootstrap"))
    leaderboard = build_leaderboard(scores, subspace, finetune, config)
    timings["total"] = time.perf_counter() - clock
    say(Progress("done", 1.0, "validation complete"))
    return ValidationResult(
        model=model.info.to_dict(), config=config.to_dict(), domains=names,
        split={"train": {d.name: list(d.facts) for d in train}, "held_out": {d.name: list(d.facts) for d in held}},
        estimators=[s.to_dict() for s in scores], subspace=subspace, finetune=finetune, leaderboard=leaderboard,
        timings=timings, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _summarise_subspace(names, per_domain) -> dict:
    """Pearson, Spearman and the slope (least squares through the origin) of
    realised on predicted held-out changes, over all (k, j, eps)."""
    pred, real = [], []
    for resp in per_domain:
        for p_row, r_row in zip(resp["predicted"], resp["realised"]):
            pred += p_row
            real += r_row
    p, r = np.asarray(pred), np.asarray(real)
    slope = float((p @ r) / (p @ p)) if (p @ p) > 0 else None
    by_eps = []
    for e_index, eps in enumerate(per_domain[0]["eps"]):
        pe = np.asarray([x for resp in per_domain for x in resp["predicted"][e_index]])
        re_ = np.asarray([x for resp in per_domain for x in resp["realised"][e_index]])
        by_eps.append({"eps": eps, "pearson": pearson(pe, re_), "spearman": spearman(pe, re_),
                       "slope": float((pe @ re_) / (pe @ pe)) if (pe @ pe) > 0 else None})
    # the realised gain of k: its own held-out loss drop per unit eps, at the largest eps
    gain = [-resp["realised"][-1][k] / resp["eps"][-1] for k, resp in enumerate(per_domain)]
    return {"domains": names, "per_domain": per_domain, "pearson": pearson(p, r), "spearman": spearman(p, r),
            "slope": slope, "by_eps": by_eps, "gain": gain}


def build_leaderboard(scores, subspace, finetune, config: ValidationConfig) -> list:
    default = next(s for s in scores if s.name == DEFAULT_ESTIMATOR)
    rows = []
    for i, s in enumerate(scores):
        row = {"estimator": s.name, "label": s.label, "priority": s.priority, "time_s": s.time_s,
               "kendall_vs_default": kendall(s.priority, default.priority),
               "spearman_finetune": None, "spearman_finetune_interval": [None, None], "spearman_subspace": None,
               # iterative inverse-HVP solvers: did every domain's solve converge? (None: no iterative solve)
               "solver_converged": None}
        flags = [d["converged"] for d in (s.details or {}).get("per_domain", []) if "converged" in d]
        if flags:
            row["solver_converged"] = all(flags)
        if finetune is not None:
            row["spearman_finetune"] = spearman(s.priority, finetune["gain"])
            base = np.asarray(finetune["baseline"])
            gain_samples = []
            for k, name in enumerate(subspace["domains"] if subspace else list(finetune["runs"])):
                rows_k = finetune["held_rows"][k]
                gain_samples.append(base[rows_k] - np.asarray(finetune["runs"][name])[rows_k])
            priority_samples = s.per_example if s.per_example is not None else s.priority
            row["spearman_finetune_interval"] = bootstrap_spearman(
                priority_samples, gain_samples, config.bootstrap, config.seed + i, config.interval_pct)
        if subspace is not None:
            row["spearman_subspace"] = spearman(s.priority, subspace["gain"])
        rows.append(row)
    rows.sort(key=lambda r: -(r["spearman_finetune"] if r["spearman_finetune"] is not None else -2))
    return rows


# --- background runs for the app ---------------------------------------------------------------------------


def validation_dir():
    from .paths import cache_dir

    path = cache_dir() / "validation"
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_background(model_id: str | None, domains, config: ValidationConfig | None = None) -> str:
    """Start `python -m dowsing validate` in its own process; returns the run
    id. Progress lands in validation_dir()/ID/progress.json, the result in
    result.json, a failure in error.txt."""
    import subprocess
    import sys
    import uuid

    from .models import atomic_write_text
    from .paths import REPO_ROOT

    config = config or ValidationConfig()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    folder = validation_dir() / run_id
    folder.mkdir(parents=True)
    doms = _as_domains(domains)
    atomic_write_text(folder / "domains.json",
                      json.dumps({"domains": [{"name": d.name, "facts": list(d.facts)} for d in doms]}))
    atomic_write_text(folder / "config.json", json.dumps(config.to_dict()))
    cmd = [sys.executable, "-m", "dowsing", "validate", "--domains", str(folder / "domains.json"),
           "--config", str(folder / "config.json"), "--out", str(folder / "result.json"),
           "--progress-file", str(folder / "progress.json"), "--quiet"]
    if model_id:
        cmd += ["--model", model_id]
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (folder / "pid").write_text(str(proc.pid))
    return run_id


def background_state(run_id: str) -> dict:
    """{"status": running|done|failed, "fraction", "stage", "message", "result"}."""
    import os

    folder = validation_dir() / run_id
    state = {"status": "running", "fraction": 0.0, "stage": "starting", "message": "", "result": None}
    if (folder / "progress.json").exists():
        try:
            state.update(json.loads((folder / "progress.json").read_text()))
        except (OSError, ValueError):
            pass
    if (folder / "result.json").exists():
        state["status"] = "done"
        state["result"] = ValidationResult.from_json((folder / "result.json").read_text())
        return state
    alive = False
    try:
        pid = int((folder / "pid").read_text())
        os.kill(pid, 0)
        alive = not _is_zombie(pid)
    except (OSError, ValueError):
        alive = False
    if not alive:
        state["status"] = "failed"
        log = (folder / "log.txt").read_text() if (folder / "log.txt").exists() else ""
        state["message"] = (log.strip().splitlines() or ["the validation process ended without a result"])[-1]
    return state


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def latest_runs() -> list[str]:
    return sorted((p.name for p in validation_dir().iterdir() if p.is_dir()), reverse=True)


def exactness_check(loaded, domains, damping: float = 1e-3, max_facts: int = 8, domain_index: int = 0) -> dict:
    """CG against a dense solve of (H + lambda I) z = g_bar in one domain's
    B = 1 subspace, on at most max_facts facts per domain (so it takes
    seconds). Returns the relative error ||z_cg - z_dense|| / ||z_dense||, CG's
    iterations and residual, and whether CG met non-positive curvature."""
    from .analysis import forward_pass
    from .curvature import structured_fact_gradients
    from .solvers import conjugate_gradient
    from .subspace import make_batches

    domains = _as_domains(domains)
    small = [Domain(d.name, d.facts[:max_facts]) for d in domains]
    facts = [f for d in small for f in d.facts]
    groups = [k for k, d in enumerate(small) for _ in d.facts]
    anatomy = find_anatomy(loaded.model)
    t0 = time.perf_counter()
    encoded = encode_facts(loaded.tokenizer, facts, anatomy.max_positions)
    batches = make_batches(encoded, 16, next(loaded.model.parameters()).device)
    directions, _, tokens = forward_pass(loaded.model, anatomy, batches, groups, len(small))
    v = directions[domain_index].to(tokens.h.dtype)
    a, c = tail_coefficients(anatomy, tokens.h, tokens.targets, v, "hessian")
    grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a, len(facts))
    rows = [i for i, g in enumerate(groups) if g == domain_index]
    g_bar = grads[rows].mean(dim=0)
    x64 = tokens.x.to(torch.float64)
    w = tokens.token_scale / len(facts) * c
    dense = dense_solve(damped(structured_hessian(tokens.x, tokens.token_scale / len(facts), c), damping), g_bar)
    cg = conjugate_gradient(lambda p: x64.T @ (w * (x64 @ p)) + damping * p, g_bar, rtol=1e-10)
    rel = float((cg.x - dense.x).norm() / dense.x.norm().clamp_min(1e-300))
    return {"domain": small[domain_index].name, "dim": int(g_bar.numel()), "n_facts": len(facts),
            "rel_error": rel, "cg_iterations": cg.iterations, "cg_rel_residual": cg.rel_residual,
            "nonpositive_curvature": cg.nonpositive_curvature or dense.nonpositive_curvature,
            "damping": damping, "seconds": time.perf_counter() - t0}
