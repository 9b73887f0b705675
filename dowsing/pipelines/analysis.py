"""One analysis, start to end: concept vectors, gradients, curvature, solve,
influence, metrics and saturation for every domain, and the ranking."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..kernels import metrics
from ..config import AnalysisConfig
from ..domains import as_domains
from ..estimators import PAPER, PILOT_CURVE, PILOT_GAIN
from ..estimators import get as get_estimator
from .executor import LocalExecutor, Shared, Unit
from ..kernels.forward import FactTokens, merge_pieces
from .forward_units import domain_pieces
from ..access.models import LoadedModel, directory_fingerprint, file_sha256, hub_snapshot, load_model, resolve_model
from ..progress import Progress
from .model_description import ModelDescription, prepared_model
from .ranking import check_estimator, rank, ranking_split
from ..result import ENGINE_VERSION, DomainResult, Result
from ..kernels.saturation import n_grid
from ..kernels.subspace import Encoded, make_batches
from ..kernels.subspace_solve import (DomainContext, build_domain_context, choose_route, line_coefficients,
                                      solve_domain)
from ..kernels.uncertainty import DomainKernels, bootstrap_domains, bootstrap_priorities
from ..storage.units import DomainUnits, model_identity


def analyze(model, domains, config: AnalysisConfig | None = None,
            progress: Callable[[Progress], None] | None = None, executor=None, store=None,
            should_stop: Callable[[], bool] | None = None, units=None,
            on_ranking: Callable[[Result], None] | None = None) -> Result:
    """The paper's concept-subspace influence Mean_k = g_k^T (H_k + lambda I)^-1 g_k
    in each concept subspace (with transfer, saturation and their bootstrap),
    and the domains ranked by config.estimator's priority (`dowsing.pipelines.ranking`).

    model: a LoadedModel, or a model id / path (None for the embedded default).
    domains: Domain objects or {"name", "facts"} dicts.
    executor: where each domain's curvature, solve and saturation fit run
    (`dowsing.pipelines.executor`; in this process by default; the structured route
    always runs here). store: a UnitStore that keeps each finished domain.
    units: a `units.DomainUnits` where the per-domain units (each domain's
    pilot curve and its piece of the forward pass) are found and kept, so
    domains whose facts did not change are not computed again; None: every
    unit is computed (through the same per-domain path).
    on_ranking(result): called with the ranking and the diagnosis as soon
    as they are ready, before the paper's quantities (their fields None,
    extras["partial"] says what is still computing); not called when the
    estimator is the paper's, which ranks by them. config.stage "ranking"
    stops there.
    """
    config = config or AnalysisConfig()
    check_estimator(config)
    report = progress or (lambda p: None)
    timings: dict = {}
    clock = time.perf_counter()
    domains = as_domains(domains)
    model, described, checkpoints = prepared_model(model, config, report, timings)
    if units is not None:
        units.model = units.model or described.identity
    paper_first = config.estimator == PAPER  # it ranks by the solve: the paper's quantities come first
    # the forward pass reports 0.05 to 0.1, the paper-first order's share; before a ranking its share is larger
    passed = _forward(model, described, domains, config,
                      report if paper_first else _rescaled(report, (0.05, 0.1), (0.05, RANKING_SHARE[0])),
                      timings, units)
    if units is not None:
        units.row_text = passed.facts
        units.note_blocks(described.depth)
    outcomes = bootstrap = None
    if paper_first:
        outcomes, bootstrap = _paper(model.model, described.anatomy, domains, passed, config, report, executor,
                                     store, should_stop, timings)
    # the stages report their fractions for the paper-first order; the other order rescales them, so they rise
    ranked = report if paper_first else _rescaled(report, (0.78, 1.0), RANKING_SHARE)
    scores, ranking = _ranking(model, described.anatomy, domains, passed, outcomes, bootstrap, config, checkpoints,
                               ranked, timings, units)
    ranking["diagnosis"] = _diagnosis(model, described.anatomy, passed, scores, config, ranked, timings, units)
    later = _rescaled(report, (0.05, 0.78), PAPER_AFTER_SHARE)
    if outcomes is None and on_ranking is not None:
        timings["ranking_ready"] = time.perf_counter() - clock
        on_ranking(_finished(_result(described, domains, config, passed, None, None, scores, dict(ranking),
                                     dict(timings)), units, partial=config.stage != "ranking"))
    if outcomes is None and config.stage == "all":
        outcomes, bootstrap = _paper(model.model, described.anatomy, domains, passed, config, later, executor,
                                     store, should_stop, timings)
    timings["total"] = time.perf_counter() - clock
    report(Progress("done", 1.0, "analysis complete" if config.stage == "all" else "ranking complete"))
    return _finished(_result(described, domains, config, passed, outcomes, bootstrap, scores, ranking, timings), units)


# Where the progress bar stands while a ranking estimator runs before the paper's quantities: the forward pass
# up to 0.2, the ranking (the pilots) up to 0.8, the paper's solve and bootstrap the rest. That is where the
# time goes in an uncached default analysis (forward 19%, ranking to 85%, the paper 15% of the run), so the
# bar's 0.8 is the moment the ranking reaches the Results page, not its half.
RANKING_SHARE = (0.2, 0.8)
PAPER_AFTER_SHARE = (0.8, 0.98)


def _rescaled(report, old: tuple, new: tuple):
    """report, with each Progress fraction mapped linearly from the
    interval `old` onto `new`."""
    def rescaled(p: Progress) -> None:
        fraction = new[0] + (p.fraction - old[0]) * (new[1] - new[0]) / (old[1] - old[0])
        report(Progress(p.stage, min(max(fraction, new[0]), new[1]), p.message))
    return rescaled


def _finished(result: Result, units, partial: bool = False) -> Result:
    """The result with which domains' units were computed and which found
    stored, and, for the ranking sent ahead of the paper's quantities,
    extras["partial"]: what is still being computed."""
    if units is not None:
        result.extras["units"] = units.to_dict()
        large = sorted({name for names in units.not_kept.values() for name in names})
        if large:
            note = (f"Too large to keep in the cache, computed again on every run: the units of {', '.join(large)} "
                    "(many facts or a wide model).")
            result.extras.setdefault("warnings", [])
            if note not in result.extras["warnings"]:
                result.extras["warnings"].append(note)
    if partial:
        result.extras["partial"] = {"computing": ["mean", "share_pct (paper)", "delta_n", "saturation", "transfer",
                                                  "bootstrap"]}
    return result


def _paper(net, anatomy, domains: list, passed, config: AnalysisConfig, report, executor, store, should_stop,
           timings: dict) -> tuple:
    """(outcomes, bootstrap): the paper's quantities, every domain's solve,
    saturation and kernels, then their bootstrap. Not per-domain units:
    H_k is the curvature of the loss over every fact of every domain."""
    outcomes = _solve_domains(net, anatomy, passed, config, report, executor, store, should_stop, timings)
    return outcomes, _paper_bootstrap(domains, passed, outcomes, config, report, timings)


@dataclass
class AnalysisPass:
    """What the forward pass gives the rest of the analysis: the domains' names, the facts and
    which rows each domain holds, the padded batches, the concept directions
    and their norms, the per-token quantities, the ranking estimator's block
    inputs (when it needs them), the solve route and notes for the user."""

    names: list
    facts: list
    rows_of: list
    ids: list
    batches: list
    directions: torch.Tensor
    norms: torch.Tensor
    tokens: FactTokens
    block_inputs: list | None
    first_block: int | None
    route: str
    notes: list
    seconds: float


def _forward(model: LoadedModel, described: ModelDescription, domains: list, config: AnalysisConfig, report,
             timings: dict, units=None) -> AnalysisPass:
    """The plain forward pass over every fact: concept vectors, per-token
    quantities, and the ranking estimator's block inputs from the same pass.
    Each domain's share is a unit (`forward_units.domain_pieces`): a domain
    whose facts did not change is read from `units`, not run again."""
    net, anatomy, first = model.model, described.anatomy, described.capture_block
    facts = [f for d in domains for f in d.facts]
    starts = [0]
    for d in domains:
        starts.append(starts[-1] + len(d.facts))
    rows_of = [list(range(starts[k], starts[k + 1])) for k in range(len(domains))]
    t0 = time.perf_counter()
    report(Progress("concept vectors", 0.05, f"forward pass over {len(facts)} facts"))
    pieces, notes = domain_pieces(net, anatomy, model.tokenizer, [d.name for d in domains],
                                  [list(d.facts) for d in domains], config.batch_size, first, units, report)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    merged = merge_pieces(pieces)
    del pieces
    # the solve's routes that run the model again read the facts in these batches
    batches = make_batches(Encoded(merged.ids, []), config.batch_size, next(net.parameters()).device)
    tokens = merged.tokens
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
    return AnalysisPass([d.name for d in domains], facts, rows_of, merged.ids, batches, merged.directions,
                        merged.norms, tokens, merged.block_inputs, first, route, notes, timings["forward"])


def _solve_domains(net, anatomy, passed: AnalysisPass, config: AnalysisConfig, report, executor, store, should_stop,
                   timings: dict) -> list:
    """Each domain's solve, saturation fit and bootstrap kernels
    (`subspace_solve.solve_domain`), one unit of the executor each."""
    t0 = time.perf_counter()
    coefficients = None
    if config.blocks == 1 and passed.tokens.tail_matches and passed.route in ("structured", "cg"):
        # every domain's per-token coefficients in one pass over the tokens (the head product is shared)
        report(Progress("solve", 0.1, "per-token curvature coefficients of every domain"))
        coefficients = line_coefficients(anatomy, passed.tokens, passed.directions, config.curvature)
    coefficient_s = time.perf_counter() - t0
    context = DomainContext(net=net, anatomy=anatomy, batches=passed.batches, tokens=passed.tokens,
                            directions=passed.directions, rows_of=passed.rows_of, n_total=len(passed.facts),
                            route=passed.route, config=config, report=report, coefficients=coefficients)
    executor = executor or LocalExecutor()
    if executor.kind != "local" and passed.route == "structured":
        # Each domain's structured solve takes milliseconds: shipping the
        # model to workers would cost more than it saves.
        passed.notes.append("The structured route's per-domain solves ran in this process: they take "
                            "milliseconds, less than shipping the model to Ray workers.")
        executor = LocalExecutor()
    units = [Unit(f"domain{k}/{name}", (k,)) for k, name in enumerate(passed.names)]

    def on_done(key, value, finished, total):
        report(Progress("solve", 0.1 + 0.65 * finished / total, f"domain {finished} of {total} solved"))

    t0 = time.perf_counter()
    if executor.kind == "local":
        shared = Shared("analysis", context=context)
    else:
        shared = Shared(f"analysis/{id(context)}", payload=context.payload(), build=build_domain_context)
    values = executor.run(solve_domain, units, shared, store=store, on_done=on_done, should_stop=should_stop)
    outcomes = [values[u.key] for u in units]
    timings["saturation"] = sum(o["seconds"]["saturation"] for o in outcomes)
    # each unit also fitted its saturation curve and its bootstrap kernels: those count where they did before
    timings["solve"] = (coefficient_s + time.perf_counter() - t0 - timings["saturation"]
                        - sum(o["seconds"]["kernels"] for o in outcomes))
    return outcomes


def _paper_bootstrap(domains: list, passed: AnalysisPass, outcomes: list, config: AnalysisConfig, report,
                     timings: dict) -> dict | None:
    """The paper's bootstrap over facts (Mean, Share, ranks, saturation),
    from each domain's resampling kernels; None where a route gives none."""
    t0 = time.perf_counter()
    bootstrap = None
    if all(o["kernels"] is not None for o in outcomes):
        report(Progress("uncertainty", 0.75, f"bootstrap over facts ({config.bootstrap_resamples} resamples)"))
        kernels = []
        for k, domain in enumerate(domains):
            n_k = len(passed.rows_of[k])
            grid = n_grid(n_k, config.saturation_points, config.saturation_max_factor)
            kernels.append(DomainKernels(domain.name, n_k, grid, outcomes[k]["kernels"].numpy()))
        bootstrap = bootstrap_domains(kernels, n_resamples=config.bootstrap_resamples, level=0.90,
                                      seed=config.seed).to_dict()
    else:
        passed.notes.append("No bootstrap intervals with the CG solver and B > 1: they need a dense system per "
                            "domain.")
    timings["bootstrap"] = time.perf_counter() - t0 + sum(o["seconds"]["kernels"] for o in outcomes)
    return bootstrap


def _ranking(model: LoadedModel, anatomy, domains: list, passed: AnalysisPass, outcomes: list, bootstrap,
             config: AnalysisConfig, checkpoints, report, timings: dict, units=None):
    """(scores, extras["ranking"]): the ranking estimator's priorities
    (`dowsing.pipelines.ranking`) and their intervals; the paper's quantities above
    stay as they are."""
    t0 = time.perf_counter()
    report(Progress("ranking", 0.78, f"ranking estimator: {get_estimator(config.estimator).label}"))
    split = ranking_split(model.model, anatomy, passed.directions, passed.tokens, passed.ids,
                          passed.block_inputs, passed.first_block, passed.rows_of, passed.names,
                          config, passed.seconds)
    outcomes = outcomes or [None] * len(domains)
    influence = [o["influence_all"][rows].tolist() if o else None for o, rows in zip(outcomes, passed.rows_of)]
    scores = rank(model, split, passed.rows_of, config, [o["mean"] if o else None for o in outcomes], influence,
                  checkpoints,
                  lambda fraction, message: report(Progress("ranking", 0.78 + 0.2 * fraction, message)), units)
    passed.notes.extend(scores.notes)
    report(Progress("ranking", 0.99, f"bootstrap of the priorities ({config.bootstrap_resamples} resamples)"))
    ranking = ranking_uncertainty(scores, bootstrap, config)
    timings["ranking"] = time.perf_counter() - t0
    return scores, ranking


def _diagnosis(model: LoadedModel, anatomy, passed: AnalysisPass, scores, config: AnalysisConfig, report,
               timings: dict, units=None) -> list | None:
    """Per domain, what kind of domain it looks like (`dowsing.kernels.diagnosis`)
    from its mean loss and its pilot gain (the ranking's own runs when it
    ranks by a pilot estimator, else the pilot family's on the same seeded
    halves); None when config.diagnose is off."""
    if not config.diagnose:
        return None
    from ..kernels.diagnosis import diagnose
    from ..estimators import EstimatorContext, compute, estimator_settings

    t0 = time.perf_counter()
    if scores.name == PILOT_GAIN:
        drops = scores.priority if not scores.details.get("fallback") else [
            None if name in scores.details["fallback"]["domains"] else p for name, p in zip(passed.names, scores.priority)]
    elif scores.name == PILOT_CURVE and scores.details.get("fits"):
        # the curve's largest size is the pilot gain's own: the same runs
        drops = [fit["drop"][-1] if fit else None for fit in scores.details["fits"]]
    else:
        report(Progress("diagnosis", 0.99, "pilot fine-tunes for the diagnosis"))
        split = ranking_split(model.model, anatomy, passed.directions, passed.tokens, passed.ids,
                              passed.block_inputs, passed.first_block, passed.rows_of, passed.names, config,
                              passed.seconds, halves=True)
        # the pilot gain reads the seed, the batch size and all_facts alone, as when it ranks
        settings = estimator_settings(config, all_facts=True)
        drops = compute(EstimatorContext(model, split, settings, units=units), [PILOT_GAIN])[0].priority
    loss = [float(passed.tokens.fact_losses[rows].mean()) for rows in passed.rows_of]
    timings["diagnosis"] = time.perf_counter() - t0
    return [d.to_dict() for d in diagnose(passed.names, loss, drops)]


def _result(described: ModelDescription, domains: list, config: AnalysisConfig, passed: AnalysisPass,
            outcomes: list | None, bootstrap, scores, ranking: dict, timings: dict) -> Result:
    """The Result: per domain its rank, Share, t vs rest, the paper's Mean,
    saturation and solve, per fact its influence and priority, and the
    extras (transfer matrix, bootstrap, ranking, warnings). outcomes None:
    the paper's quantities are not computed (yet); their fields are None."""
    rows_of, n_domains = passed.rows_of, len(domains)
    priorities = scores.priority
    ranks = metrics.ranks_by_mean(priorities)
    influence = [o["influence_all"][rows] for o, rows in zip(outcomes, rows_of)] if outcomes else None
    if config.estimator == PAPER:
        shares = metrics.shares_pct([float(i.sum()) for i in influence])
    else:
        shares = metrics.shares_pct(priorities)
    tests = metrics.t_vs_rest([scores.per_example[k] for k in range(n_domains)])
    results = []
    for k, domain in enumerate(domains):
        paper = _paper_fields(outcomes[k] if outcomes else None, config)
        results.append(DomainResult(
            name=domain.name, rank=ranks[k], share_pct=shares[k], t_vs_rest=tests[k][0], p_value=tests[k][1],
            n_facts=len(rows_of[k]), concept_vector_norm=float(passed.norms[k]), priority=priorities[k], **paper))
    per_example = [
        {"domain": domain.name, "text": passed.facts[i],
         "influence": float(influence[k][j]) if influence else None, "priority": scores.per_example[k][j]}
        for k, domain in enumerate(domains) for j, i in enumerate(rows_of[k])
    ]
    extras = {
        "route": passed.route, "bootstrap": bootstrap, "ranking": ranking,
        # per domain: what kind of domain it looks like, from its loss and its pilot gain (None: not asked)
        "diagnosis": ranking.pop("diagnosis", None),
        "transfer": {
            "domains": [d.name for d in domains],
            # matrix[j][k] = grad L_j^T z_k: data aligned with k lowering the loss of j
            "matrix": [[float(outcomes[k]["influence_all"][rows_of[j]].mean()) for k in range(n_domains)]
                       for j in range(n_domains)],
        } if outcomes else None,
        "domain_loss": [float(passed.tokens.fact_losses[r].mean()) for r in rows_of],
        "n_tokens": int(passed.tokens.x.shape[0]), "subspace_dim": config.blocks * described.anatomy.d_ff,
        "warnings": list(passed.notes),
        "domains_input": [{"name": d.name, "facts": list(d.facts)} for d in domains],
    }
    return Result(
        model=described.info.to_dict(), config=config.to_dict(), domains=results, per_example=per_example,
        timings=timings, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), extras=extras,
    )


def _paper_fields(outcome: dict | None, config: AnalysisConfig) -> dict:
    """One domain's paper fields of DomainResult: Mean, Δn, saturation and
    the solve's report, or None with the reason while they are not computed."""
    if outcome is None:
        reason = ("not computed: the analysis stopped after the ranking (stage ranking)" if config.stage == "ranking"
                  else "computing…")
        return {"mean": None, "delta_n_10pct": None, "delta_n_direct": None, "delta_n_reason": reason,
                "saturation": {}, "solver": {}}
    sat = outcome["saturation"]
    return {"mean": outcome["mean"], "delta_n_10pct": sat["delta_n_10pct"], "delta_n_direct": sat["delta_n_direct"],
            "delta_n_reason": sat["reason"], "saturation": {key: sat[key] for key in ("alpha", "n0", "c", "r2", "points")},
            "solver": outcome["solve"]}


def ranking_uncertainty(scores, paper_bootstrap: dict | None, config: AnalysisConfig) -> dict:
    """extras["ranking"]: the estimator, its label, and its priorities' 90%
    intervals, Share intervals and rank probabilities (per domain, in domain
    order) from `bootstrap_priorities` over each domain's per-fact values,
    with the paper's bootstrap's resample count, level and seed.

    For the paper's estimator the paper's own bootstrap (which resamples the
    quadratic form Mean_k, not the mean of the per-fact influences) gives
    these numbers when it exists, so Priority and Mean (paper) carry one
    interval."""
    out = {"estimator": scores.name, "label": scores.label, "seconds": scores.time_s,
           "details": scores.details, "level": 0.90, "n_resamples": config.bootstrap_resamples,
           "seed": config.seed}
    if scores.name == PAPER and paper_bootstrap:
        domains = paper_bootstrap["domains"]
        out.update(source="the paper's bootstrap (extras.bootstrap)",
                   rank_stable_probability=paper_bootstrap["rank_stable_probability"],
                   priority_interval=[d["mean_interval"] for d in domains],
                   share_pct_interval=[d["share_pct_interval"] for d in domains],
                   rank_probabilities=[d["rank_probabilities"] for d in domains],
                   most_likely_rank=[d["most_likely_rank"] for d in domains],
                   rank_stable=[d["rank_stable"] for d in domains])
        return out
    boot = bootstrap_priorities(scores.per_example, n_resamples=config.bootstrap_resamples, level=0.90,
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
    return request_key(model_fingerprint(model_id), domains, config or AnalysisConfig())


def request_key(fingerprint: str, domains, config: AnalysisConfig) -> str:
    """`cache_key` of the model whose `model_fingerprint` is `fingerprint`."""
    domains = as_domains(domains)
    payload = json.dumps({
        "model": fingerprint,
        "domains": [[d.name, list(d.facts)] for d in domains],
        "config": config.to_dict(),
        # what the checkpoints hold, not only where they are: a folder trained further is a new trajectory
        "checkpoints": [c if "@" in c and not Path(c).exists() else model_fingerprint(c) for c in config.checkpoints],
        "engine": ENGINE_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def pilot_status(model_id: str | None, domains, config: AnalysisConfig | None = None) -> dict | None:
    """Before a run, without loading the model: which domains' pilot curves
    `run_analysis` would compute and which it would find stored (`units`),
    {"computed": [names], "reused": [names], "no_pilot": [names too small
    for a pilot], "message": "2 of 4 domains recomputed, 2 from cache"}; None when the run has no pilots (neither
    the ranking estimator nor the diagnosis runs them). A model never run
    here counts every domain as to compute."""
    return stored_pilot_status(model_fingerprint(model_id), domains, config or AnalysisConfig())


def stored_pilot_status(fingerprint: str, domains, config: AnalysisConfig) -> dict | None:
    """`pilot_status` of the model whose `model_fingerprint` is `fingerprint`."""
    from ..estimators import estimator_settings

    curve = config.estimator == PILOT_CURVE
    if not (curve or config.estimator == PILOT_GAIN or config.diagnose):
        return None
    sizes = estimator_settings(config).pilot_sizes
    return stored_pilots(model_identity(fingerprint, config.dtype, config.device), domains, config.seed,
                         (lambda a, b: sizes) if curve else (lambda a, b: (max(sizes),)))


def stored_pilots(identity: str, domains, seed: int, sizes_of) -> dict:
    """Which domains' pilot curves at `sizes_of(half_a, half_b)` (the sizes
    asked for; the halves of `splitting.split_order` under `seed`) are
    stored in `units` for the model of this units identity
    (`units.model_identity`: fingerprint, dtype and device), and which are
    to compute: `pilot_status`'s dict. Loads no model."""
    from ..kernels.pilots import PILOT_RECIPE, pilot_sizes
    from ..kernels.splitting import split_order
    from ..storage.units import pilot_key, recomputed_message

    domains = as_domains(domains)
    units = DomainUnits(identity)
    blocks = units.blocks()
    computed, reused, no_pilot = [], [], []
    for domain in domains:
        a, b = split_order(list(domain.facts), domain.name, seed)
        if min(len(a), len(b)) < 2:  # too small for a pilot: ranked by the fallback, nothing to compute
            no_pilot.append(domain.name)
            continue
        stored = blocks is not None and units.has(pilot_key(
            units.model, a, b, replace(PILOT_RECIPE, blocks=min(PILOT_RECIPE.blocks, blocks)).label(), seed,
            pilot_sizes(sizes_of(a, b), len(a), len(b))))
        (reused if stored else computed).append(domain.name)
    return {"computed": computed, "reused": reused, "no_pilot": no_pilot,
            "message": recomputed_message(len(computed), len(computed) + len(reused))}


def forward_status(model_id: str | None, domains, config: AnalysisConfig | None = None) -> dict:
    """Before a run, without loading the model: which domains' forward
    pieces (`forward_units`) `run_analysis` would compute and which it would
    find stored, {"computed": [names], "reused": [names], "message"}. A
    model never run here counts every domain as to compute."""
    from ..storage.units import forward_key, recomputed_message
    from .forward_units import forward_settings
    from .ranking import capture_block_of

    config = config or AnalysisConfig()
    domains = as_domains(domains)
    units = DomainUnits(model_identity(model_fingerprint(model_id), config.dtype, config.device))
    blocks = units.blocks()
    settings = None if blocks is None else forward_settings(config.batch_size, capture_block_of(blocks, config))
    computed, reused = [], []
    for domain in domains:
        stored = settings is not None and units.present(forward_key(units.model, list(domain.facts), settings))
        (reused if stored else computed).append(domain.name)
    return {"computed": computed, "reused": reused, "message": recomputed_message(len(computed), len(domains))}


def run_analysis(model_id: str | None, domains, config: AnalysisConfig | None = None,
                 progress: Callable[[Progress], None] | None = None, use_cache: bool = True,
                 executor=None, should_stop: Callable[[], bool] | None = None,
                 on_ranking: Callable[[Result], None] | None = None) -> Result:
    """The cached entry point: a repeat of the same request returns at once.
    Each domain's units (its pilot curve and forward piece, `dowsing.storage.units`) are kept under
    their own content key, so a request that shares a domain with an earlier
    one (an edit of another domain, an added domain, a plan) reuses them.
    on_ranking: see `analyze`.
    Each finished domain is kept in the unit store under the request's key
    until the whole result is stored, so a run started again after a crash
    solves only the domains that were missing. The executor does not change
    the result, so it is not part of the key."""
    from .executor import UnitStore
    from ..storage.store import ResultStore

    config = config or AnalysisConfig()
    check_estimator(config)
    report = progress or (lambda p: None)
    if config.checkpoints:
        from ..access.checkpoints import validate_checkpoints

        validate_checkpoints(config.checkpoints)  # a one-line error before anything is loaded or keyed
    # the model is resolved once: the result's key and the stored units both read its fingerprint
    fingerprint = model_fingerprint(model_id)
    key = request_key(fingerprint, domains, config)
    store = ResultStore()
    if use_cache:
        cached = store.get(key)
        if cached is not None:
            report(Progress("done", 1.0, "cached result"))
            return cached
    status = stored_pilot_status(fingerprint, domains, config) if use_cache else None
    # which domains this run recomputes, said before it starts
    # The stage already says "loading model": the message carries only what is new.
    report(Progress("loading model", 0.0, f"pilot curves: {status['message']}" if status else "loading model"))
    t0 = time.perf_counter()
    loaded = load_model(model_id, config.device, config.dtype)
    load_s = time.perf_counter() - t0
    units = UnitStore(f"analysis/{key}") if use_cache else None
    # the per-domain units (pilot curves, forward pieces) outlive the request: another request sharing a domain reuses them
    domain_units = DomainUnits(None) if use_cache else None
    result = analyze(loaded, domains, config, progress, executor=executor, store=units, should_stop=should_stop,
                     units=domain_units, on_ranking=on_ranking)
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
    from ..storage.store import ResultStore

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
