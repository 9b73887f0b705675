"""One analysis, start to end: concept vectors, gradients, curvature, solve,
influence, metrics and saturation for every domain."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import metrics
from .config import ESTIMATOR_LABELS, AnalysisConfig
from .curvature import SubspaceObjective, structured_fact_gradients, structured_hessian, tail_coefficients, tail_function
from .models import (DTYPES, LoadedModel, directory_fingerprint, file_sha256, hub_snapshot, load_model,
                     resolve_model)
from .alignment import alignment_blocks, block_inputs_by_fact, capture_inputs_during
from .forward import FactTokens, forward_pass
from .ranking import ALIGNMENT_ESTIMATORS, ranking_priorities
from .result import ENGINE_VERSION, DomainResult, Result
from .saturation import DenseSystem, LowRankSystem, mu_function, n_grid, resampling_kernels, saturation
from .executor import LocalExecutor, Shared, Unit
from .domains import as_domains
from .progress import Progress
from .uncertainty import DomainKernels, bootstrap_domains, bootstrap_priorities
from .solvers import conjugate_gradient, damped, dense_solve
from .subspace import capture_tail_inputs, encode_facts, find_anatomy, make_batches, per_fact_losses


def _structured_domain(anatomy, tokens: FactTokens, v, rows, n_total: int, config: AnalysisConfig):
    """B = 1: per-fact gradients of all facts, H_k + lambda I, and the
    saturation system for domain k, from the per-token coefficients."""
    a, c = tail_coefficients(anatomy, tokens.h, tokens.targets, v, config.curvature)
    grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a, n_total)
    base = damped(structured_hessian(tokens.x, tokens.token_scale / n_total, c), config.damping)
    n_k = len(rows)
    in_k = torch.isin(tokens.token_fact, torch.tensor(rows, device=tokens.token_fact.device))
    u = tokens.x[in_k].to(torch.float64)
    scale_k = tokens.token_scale[in_k] / n_k
    if u.shape[0] < u.shape[1]:
        system = LowRankSystem(base, u, c[in_k] * scale_k, n_k, n_total)
    else:
        system = DenseSystem(base, structured_hessian(u, scale_k, c[in_k]), n_k, n_total)
    return grads, base, system


def choose_route(config: AnalysisConfig, tail_matches: bool) -> str:
    """auto: the structured Hessian when B = 1 (exact and cheapest), else dense
    from Hessian-vector products. cg / exact always go through HVPs."""
    if config.solver == "auto":
        return "structured" if config.blocks == 1 and tail_matches else "exact"
    return config.solver


def _cg_mu(obj: SubspaceObjective, w_all, w_k, n_k, n_total, g, damping, rtol, maxiter):
    """mu(n) by CG on Hessian-vector products, warm-started from the last
    solution: neighbouring n on the grid have close solutions."""
    last = {"x": None}

    def mu(n: float) -> float:
        scale = (n - n_k) / n_total

        def matvec(p):
            return obj.matvec("all", w_all, p) + scale * obj.matvec("domain", w_k, p) + damping * p

        report = conjugate_gradient(matvec, g, rtol=rtol, maxiter=maxiter, x0=last["x"])
        if report.nonpositive_curvature:
            last["x"] = None
            return float("nan")
        last["x"] = report.x
        return float(g @ report.x)

    return mu


@dataclass
class DomainContext:
    """What every domain's solve needs: the model and its anatomy, the
    batches and the forward pass's per-token quantities, the concept
    directions, which facts belong to which domain, and the route."""

    net: object
    anatomy: object
    batches: list
    tokens: FactTokens
    directions: torch.Tensor
    rows_of: list
    n_total: int
    route: str
    config: AnalysisConfig
    report: Callable | None = None

    def payload(self) -> dict:
        """Everything but the model module, plus its configuration and
        weights (a module can hold unpicklable state), for a worker."""
        model_config = self.net.config
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return {"model_config": model_config, "state": state, "device": str(next(self.net.parameters()).device),
                "batches": [(ids.cpu(), mask.cpu(), rows) for ids, mask, rows in self.batches],
                "tokens": self.tokens, "directions": self.directions.cpu(), "rows_of": self.rows_of,
                "n_total": self.n_total, "route": self.route, "config": self.config}


def build_domain_context(payload: dict) -> DomainContext:
    """A worker's DomainContext, rebuilt from the shipped weights."""
    from transformers import AutoModelForCausalLM

    config = payload["config"]
    device = payload["device"]
    net = AutoModelForCausalLM.from_config(payload["model_config"], attn_implementation="eager",
                                           dtype=DTYPES[config.dtype])
    net.load_state_dict(payload["state"])
    net = net.to(device).eval()
    batches = [(ids.to(device), mask.to(device), rows) for ids, mask, rows in payload["batches"]]
    tokens = payload["tokens"]
    tokens = FactTokens(**{f: (getattr(tokens, f).to(device) if torch.is_tensor(getattr(tokens, f))
                               else getattr(tokens, f)) for f in tokens.__dataclass_fields__})
    return DomainContext(net=net, anatomy=find_anatomy(net), batches=batches, tokens=tokens,
                         directions=payload["directions"].to(device), rows_of=payload["rows_of"],
                         n_total=payload["n_total"], route=payload["route"], config=config)


def solve_domain(ctx: DomainContext, k: int) -> dict:
    """One domain, start to end: its per-fact gradients in S_k, the solve
    z_k = (H_k + lambda I)^-1 g_k, the influence g_i^T z_k of every fact, the
    saturation fit of mu(n), and (with a dense system) the bootstrap's
    resampling kernels. Returns plain data (tensors on the CPU), so a worker
    can send it back and the unit store can keep it."""
    config, tokens, rows_of, n_total = ctx.config, ctx.tokens, ctx.rows_of, ctx.n_total
    report = ctx.report or (lambda p: None)
    n_domains = len(rows_of)
    base_fraction = 0.1 + 0.65 * k / n_domains
    v = ctx.directions[k].to(DTYPES[config.dtype])
    rows = rows_of[k]
    n_k = len(rows)
    w_all = torch.full((n_total,), 1.0 / n_total, dtype=torch.float64)
    w_k = torch.zeros(n_total, dtype=torch.float64)
    w_k[rows] = 1.0 / n_k
    t0 = time.perf_counter()
    if ctx.route == "structured":
        grads, base, system = _structured_domain(ctx.anatomy, tokens, v, rows, n_total, config)
        g_bar = grads[rows].mean(dim=0)
        solve = dense_solve(base, g_bar, method="auto (structured Hessian, dense solve)")
        mu = mu_function(system, g_bar)
        obj = None
    else:
        obj = SubspaceObjective(ctx.net, ctx.anatomy, ctx.batches, v, config.blocks, config.curvature)
        grads = obj.per_fact_gradients()
        g_bar = grads[rows].mean(dim=0)
        if ctx.route == "exact":
            report(Progress("curvature", base_fraction, f"domain {k + 1}: dense {obj.dim}×{obj.dim} curvature"))
            base = damped(obj.dense("all", w_all), config.damping)
            solve = dense_solve(base, g_bar, method="exact")
            system = DenseSystem(base, obj.dense("domain", w_k), n_k, n_total)
            mu = mu_function(system, g_bar)
        else:
            def on_iteration(i, residual):
                report(Progress("solve", base_fraction, f"domain {k + 1}: CG iteration {i}, "
                                                        f"relative residual {residual:.2e}"))

            solve = conjugate_gradient(
                lambda p: obj.matvec("all", w_all, p) + config.damping * p, g_bar,
                rtol=config.cg_rtol, maxiter=config.cg_maxiter or None, callback=on_iteration,
            )
            if config.blocks == 1 and tokens.tail_matches:
                # B = 1: the saturation curve needs a solve per n; the
                # structured system gives them exactly at a fraction of
                # the cost of a CG run per n.
                _, _, system = _structured_domain(ctx.anatomy, tokens, v, rows, n_total, config)
                mu = mu_function(system, g_bar)
            else:
                system = None  # the bootstrap would need N_k CG solves per n
                mu = _cg_mu(obj, w_all, w_k, n_k, n_total, g_bar, config.damping, config.cg_rtol,
                            config.cg_maxiter or None)
    influence_all = (grads @ solve.x).cpu()  # g_i^T z_k for every fact i
    mean = float(g_bar @ solve.x)
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(Progress("saturation", base_fraction, f"domain {k + 1}: saturation fit"))
    sat = json.loads(json.dumps(saturation(mu, n_k, mean, config.saturation_points, config.saturation_max_factor),
                                default=float))
    if obj is not None:
        obj.release()
    t_sat = time.perf_counter() - t0
    t0 = time.perf_counter()
    kernels = None
    if system is not None:
        grid = n_grid(n_k, config.saturation_points, config.saturation_max_factor)
        kernels = torch.from_numpy(resampling_kernels(system, grads[rows], grid))
    return {"influence_all": influence_all, "mean": mean, "solve": solve.summary(), "saturation": sat,
            "kernels": kernels, "seconds": {"solve": t_solve, "saturation": t_sat,
                                            "kernels": time.perf_counter() - t0}}


def analyze(model, domains, config: AnalysisConfig | None = None,
            progress: Callable[[Progress], None] | None = None, executor=None, store=None,
            should_stop: Callable[[], bool] | None = None) -> Result:
    """The paper's concept-subspace influence Mean_k = g_k^T (H_k + lambda I)^-1 g_k
    in each concept subspace (with transfer, saturation and their bootstrap),
    and the domains ranked by config.estimator's priority (`dowsing.ranking`).

    model: a LoadedModel, or a model id / path (None for the embedded default).
    domains: Domain objects or {"name", "facts"} dicts.
    executor: where each domain's curvature, solve and saturation fit run
    (`dowsing.executor`; in this process by default; the structured route
    always runs here). store: a UnitStore that keeps each finished domain.
    """
    config = config or AnalysisConfig()
    report = progress or (lambda p: None)
    timings: dict = {}
    clock = time.perf_counter()
    domains = as_domains(domains)
    if not isinstance(model, LoadedModel):
        report(Progress("loading model", 0.0, "loading model"))
        model = load_model(model, config.device, config.dtype)
        timings["load_model"] = time.perf_counter() - clock
    if model.info.dtype != config.dtype or model.info.device != config.device:
        raise ValueError(
            f"The model is loaded as {model.info.dtype} on {model.info.device} but the configuration asks for "
            f"{config.dtype} on {config.device}: load it with those settings."
        )
    if config.checkpoints:
        from .checkpoints import check_last_is_model, validate_checkpoints

        check_last_is_model(validate_checkpoints(config.checkpoints), model.info.id)
    net, anatomy = model.model, find_anatomy(model.model)
    if config.blocks > len(anatomy.down_projs):
        raise ValueError(f"blocks = {config.blocks} but the model has only {len(anatomy.down_projs)} blocks.")
    dtype = DTYPES[config.dtype]
    n_domains = len(domains)
    facts = [f for d in domains for f in d.facts]
    fact_domain = [k for k, d in enumerate(domains) for _ in d.facts]
    n_total = len(facts)
    rows_of = [[i for i, k in enumerate(fact_domain) if k == kk] for kk in range(n_domains)]
    device = next(net.parameters()).device

    t0 = time.perf_counter()
    report(Progress("concept vectors", 0.05, f"forward pass over {n_total} facts"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_facts(model.tokenizer, facts, anatomy.max_positions)
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    batches = make_batches(encoded, config.batch_size, device)
    captured: list = []
    if config.estimator in ALIGNMENT_ESTIMATORS:
        # The alignment needs the input of its first block per fact: taken
        # from this pass rather than a second one.
        first_block, _, _ = alignment_blocks(net, config.align_blocks)
        with capture_inputs_during(net, first_block, captured):
            directions, norms, tokens = forward_pass(net, anatomy, batches, fact_domain, n_domains)
    else:
        directions, norms, tokens = forward_pass(net, anatomy, batches, fact_domain, n_domains)
    bad = (~torch.isfinite(tokens.fact_losses)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"The model's loss is not finite (NaN or inf) on {len(bad)} fact(s), first: {facts[bad[0]]!r}; "
            "the weights may be corrupt or the dtype too narrow."
        )
    timings["forward"] = time.perf_counter() - t0
    route = choose_route(config, tokens.tail_matches)
    if config.solver == "auto" and config.blocks == 1 and not tokens.tail_matches:
        notes.append("The model's final norm and LM head do not reproduce its logits; used the exact HVP route.")

    context = DomainContext(net=net, anatomy=anatomy, batches=batches, tokens=tokens, directions=directions,
                            rows_of=rows_of, n_total=n_total, route=route, config=config, report=report)
    executor = executor or LocalExecutor()
    if executor.kind != "local" and route == "structured":
        # Each domain's structured solve takes milliseconds: shipping the
        # model to workers would cost more than it saves.
        notes.append("The structured route's per-domain solves ran in this process: they take milliseconds, "
                     "less than shipping the model to Ray workers.")
        executor = LocalExecutor()
    units = [Unit(f"domain{k}/{d.name}", (k,)) for k, d in enumerate(domains)]

    def on_done(key, value, finished, total):
        report(Progress("solve", 0.1 + 0.65 * finished / total, f"domain {finished} of {total} solved"))

    t_solve = time.perf_counter()
    if executor.kind == "local":
        shared = Shared("analysis", context=context)
    else:
        shared = Shared(f"analysis/{id(context)}", payload=context.payload(), build=build_domain_context)
    values = executor.run(solve_domain, units, shared, store=store, on_done=on_done, should_stop=should_stop)
    outcomes = [values[u.key] for u in units]
    timings["saturation"] = sum(o["seconds"]["saturation"] for o in outcomes)
    # each unit also fitted its saturation curve and its bootstrap kernels: those count where they did before
    timings["solve"] = (time.perf_counter() - t_solve - timings["saturation"]
                        - sum(o["seconds"]["kernels"] for o in outcomes))
    per_domain = []
    for k in range(n_domains):
        influence_all = outcomes[k]["influence_all"]
        per_domain.append(dict(
            solve=outcomes[k]["solve"], influence=influence_all[rows_of[k]],
            mean=outcomes[k]["mean"], transfer=[float(influence_all[r].mean()) for r in rows_of],
        ))
    means = [p["mean"] for p in per_domain]
    saturations = [o["saturation"] for o in outcomes]

    t_boot = time.perf_counter()
    bootstrap = None
    if all(o["kernels"] is not None for o in outcomes):
        report(Progress("uncertainty", 0.75, f"bootstrap over facts ({config.bootstrap_resamples} resamples)"))
        kernels = []
        for k, domain in enumerate(domains):
            n_k = len(rows_of[k])
            grid = n_grid(n_k, config.saturation_points, config.saturation_max_factor)
            kernels.append(DomainKernels(domain.name, n_k, grid, outcomes[k]["kernels"].numpy()))
        bootstrap = bootstrap_domains(kernels, n_resamples=config.bootstrap_resamples, level=0.90,
                                      seed=config.seed).to_dict()
    else:
        notes.append("No bootstrap intervals with the CG solver and B > 1: they need a dense system per domain.")
    timings["bootstrap"] = time.perf_counter() - t_boot + sum(o["seconds"]["kernels"] for o in outcomes)

    # The ranking estimator (the paper's quantities above stay as they are).
    t_rank = time.perf_counter()
    report(Progress("ranking", 0.78, f"ranking estimator: {ESTIMATOR_LABELS[config.estimator]}"))

    def on_ranking(fraction, message):
        report(Progress("ranking", 0.78 + 0.2 * fraction, message))

    scores = ranking_priorities(
        model, encoded.ids, batches, rows_of, tokens.fact_losses, means,
        [p["influence"].tolist() for p in per_domain], config,
        block_inputs=block_inputs_by_fact(batches, captured) if captured else None, progress=on_ranking,
        names=[d.name for d in domains], domains=domains)
    del captured
    notes += scores.notes
    priorities = scores.priority
    ranks = metrics.ranks_by_mean(priorities)
    if config.estimator == "paper":
        shares = metrics.shares_pct([float(p["influence"].sum()) for p in per_domain])
    else:
        shares = metrics.shares_pct(priorities)
    tests = metrics.t_vs_rest([scores.per_fact[k] for k in range(n_domains)])
    report(Progress("ranking", 0.99, f"bootstrap of the priorities ({config.bootstrap_resamples} resamples)"))
    ranking = ranking_uncertainty(scores, bootstrap, config)
    timings["ranking"] = time.perf_counter() - t_rank
    timings["total"] = time.perf_counter() - clock

    results = []
    for k, domain in enumerate(domains):
        sat = saturations[k]
        results.append(DomainResult(
            name=domain.name, rank=ranks[k], mean=means[k], share_pct=shares[k],
            t_vs_rest=tests[k][0], p_value=tests[k][1], n_facts=len(rows_of[k]),
            delta_n_10pct=sat["delta_n_10pct"], delta_n_direct=sat["delta_n_direct"],
            delta_n_reason=sat["reason"],
            saturation={key: sat[key] for key in ("alpha", "n0", "c", "r2", "points")},
            solver=per_domain[k]["solve"], concept_vector_norm=float(norms[k]), priority=priorities[k],
        ))

    per_example = [
        {"domain": domain.name, "text": facts[i], "influence": float(per_domain[k]["influence"][j]),
         "priority": scores.per_fact[k][j]}
        for k, domain in enumerate(domains) for j, i in enumerate(rows_of[k])
    ]
    extras = {
        "route": route,
        "bootstrap": bootstrap,
        "ranking": ranking,
        "transfer": {
            "domains": [d.name for d in domains],
            # matrix[j][k] = grad L_j^T z_k: data aligned with k lowering the loss of j
            "matrix": [[per_domain[k]["transfer"][j] for k in range(n_domains)] for j in range(n_domains)],
        },
        "domain_loss": [float(tokens.fact_losses[r].mean()) for r in rows_of],
        "n_tokens": int(tokens.x.shape[0]),
        "subspace_dim": config.blocks * anatomy.d_ff,
        "warnings": notes,
        "domains_input": [{"name": d.name, "facts": list(d.facts)} for d in domains],
    }
    report(Progress("done", 1.0, "analysis complete"))
    return Result(
        model=model.info.to_dict(), config=config.to_dict(), domains=results, per_example=per_example,
        timings=timings, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), extras=extras,
    )


def ranking_uncertainty(scores, paper_bootstrap: dict | None, config: AnalysisConfig) -> dict:
    """extras["ranking"]: the estimator, its label, and its priorities' 90%
    intervals, Share intervals and rank probabilities (per domain, in domain
    order) from `bootstrap_priorities` over each domain's per-fact values,
    with the paper's bootstrap's resample count, level and seed.

    For the paper's estimator the paper's own bootstrap (which resamples the
    quadratic form Mean_k, not the mean of the per-fact influences) gives
    these numbers when it exists, so Priority and Mean (paper) carry one
    interval."""
    out = {"estimator": scores.estimator, "label": scores.label, "seconds": scores.seconds,
           "details": scores.details, "level": 0.90, "n_resamples": config.bootstrap_resamples,
           "seed": config.seed}
    if scores.estimator == "paper" and paper_bootstrap:
        domains = paper_bootstrap["domains"]
        out.update(source="the paper's bootstrap (extras.bootstrap)",
                   rank_stable_probability=paper_bootstrap["rank_stable_probability"],
                   priority_interval=[d["mean_interval"] for d in domains],
                   share_pct_interval=[d["share_pct_interval"] for d in domains],
                   rank_probabilities=[d["rank_probabilities"] for d in domains],
                   most_likely_rank=[d["most_likely_rank"] for d in domains],
                   rank_stable=[d["rank_stable"] for d in domains])
        return out
    boot = bootstrap_priorities(scores.per_fact, n_resamples=config.bootstrap_resamples, level=0.90,
                                seed=config.seed).to_dict()
    out.update(source="bootstrap of the per-fact values", **boot)
    return out


def model_fingerprint(model_id: str | None) -> str:
    """Cheap identity of a model for the cache key (no weights loaded)."""
    canonical, source, location = resolve_model(model_id)
    if source in ("embedded", "gguf"):
        return f"{source}:{file_sha256(location)}"
    if source == "directory":
        return f"directory:{directory_fingerprint(location)}"
    # The snapshot's commit: a model updated in the local cache must not
    # return results computed on its old weights.
    return f"hub:{canonical}@{hub_snapshot(canonical) or 'not-cached'}"


def cache_key(model_id: str | None, domains, config: AnalysisConfig | None = None) -> str:
    """sha256 over (model fingerprint, domains, config, engine version)."""
    config = config or AnalysisConfig()
    domains = as_domains(domains)
    payload = json.dumps({
        "model": model_fingerprint(model_id),
        "domains": [[d.name, list(d.facts)] for d in domains],
        "config": config.to_dict(),
        # what the checkpoints hold, not only where they are: a folder trained further is a new trajectory
        "checkpoints": [c if "@" in c and not Path(c).exists() else model_fingerprint(c) for c in config.checkpoints],
        "engine": ENGINE_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_analysis(model_id: str | None, domains, config: AnalysisConfig | None = None,
                 progress: Callable[[Progress], None] | None = None, use_cache: bool = True,
                 executor=None, should_stop: Callable[[], bool] | None = None) -> Result:
    """The cached entry point: a repeat of the same request returns at once.
    Each finished domain is kept in the unit store under the request's key
    until the whole result is stored, so a run started again after a crash
    solves only the domains that were missing. The executor does not change
    the result, so it is not part of the key."""
    from .executor import UnitStore
    from .store import ResultStore

    config = config or AnalysisConfig()
    report = progress or (lambda p: None)
    if config.checkpoints:
        from .checkpoints import validate_checkpoints

        validate_checkpoints(config.checkpoints)  # a one-line error before anything is loaded or keyed
    key = cache_key(model_id, domains, config)
    store = ResultStore()
    if use_cache:
        cached = store.get(key)
        if cached is not None:
            report(Progress("done", 1.0, "cached result"))
            return cached
    report(Progress("loading model", 0.0, "loading model"))
    t0 = time.perf_counter()
    loaded = load_model(model_id, config.device, config.dtype)
    load_s = time.perf_counter() - t0
    units = UnitStore(f"analysis/{key}") if use_cache else None
    result = analyze(loaded, domains, config, progress, executor=executor, store=units, should_stop=should_stop)
    result.timings["load_model"] = load_s
    result.cache_key = key
    store.put(key, result)
    if units is not None:
        units.clear()
    return result


def analysis_unit(_context, model_id: str | None, domains: list, config: dict) -> str:
    """One model's whole analysis as a unit of work: the worker loads the
    model from its id (its node's cache), runs `run_analysis` (cached there
    too) and returns the result as JSON."""
    return run_analysis(model_id, domains, AnalysisConfig.from_dict(config)).to_json(indent=None)


def run_analyses(model_ids: list, domains, config: AnalysisConfig | None = None, executor=None,
                 progress: Callable[[Progress], None] | None = None) -> list:
    """Several models' analyses of the same domains, each one unit of the
    executor (on Ray: one task per model, side by side). Results in the
    order of model_ids; each is also stored in this machine's result cache."""
    from .executor import _identity
    from .store import ResultStore

    config = config or AnalysisConfig()
    report = progress or (lambda p: None)
    executor = executor or LocalExecutor()
    domains = as_domains(domains)
    for model_id in model_ids:
        model_fingerprint(model_id)  # a bad id or path is a one-line ModelError here, not in a worker
    plain = [{"name": d.name, "facts": list(d.facts)} for d in domains]
    units = [Unit(f"model{i}", (model_id, plain, config.to_dict())) for i, model_id in enumerate(model_ids)]

    def on_done(key, value, finished, total):
        report(Progress("models", finished / total, f"model {finished} of {total} analysed"))

    values = executor.run(analysis_unit, units, Shared("analyses", build=_identity), on_done=on_done)
    results = [Result.from_json(values[u.key]) for u in units]
    store = ResultStore()
    for model_id, result in zip(model_ids, results):
        store.put(cache_key(model_id, domains, config), result)
    return results
