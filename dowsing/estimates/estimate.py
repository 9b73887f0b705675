"""What a run will cost before it starts: wall time on this machine and peak
memory (the process's resident memory on the CPU, allocated GPU memory with
device cuda) for an analysis, a benchmark, a validation or a plan's pilots.

Two parts:

* The machine's speed constants, measured once per model by a short
  calibration (`calibration.calibrate`, cached).
* Per pipeline (`analysis_cost` and `plan_cost` here, `benchmark_cost` and
  `validation_cost` in `validation_estimates`) the sum over its stages of what each stage declares it costs
  beside its own code: every estimator family in its module in
  `estimators/` (`Family.cost`, read from the registry, so a new family is
  priced without an edit here), the analysis' solves in `analysis_costs`,
  the forward pass in `forward`, the pilots in `pilots`, the ground truth's
  fine-tunes in `validation/costs`; the shared arithmetic is in `costs`.

The record and its text, the memory check and --estimate's output are in
`cost_report`. Everything here predicts; nothing runs the analysis.
"""
from __future__ import annotations

import os
from pathlib import Path

from .analysis_costs import (analysis_memory, analysis_route, analysis_run, analysis_subspace_s, diagnosis_cost,
                             pilot_stage, ranking_cost)
from .calibration import (Calibration, cached_calibration, calibrate, calibration_in_subprocess,  # noqa: F401
                          calibration_path, default_threads)
from .cost_report import (Estimate, available_memory_bytes, calibration_basis, format_bytes,  # noqa: F401
                          format_estimate, format_seconds, load_note, memory_refusal, report)
from .validation_estimates import benchmark_cost, validation_cost  # noqa: F401
from ..costs import RAY_STARTUP_S, predicted_tokens, resident_bytes
from ..paths import cache_dir


# --- the sums over each pipeline's stages ------------------------------------------------------------------------

def analysis_cost(cal: Calibration, domains: list, config, ray_workers: int = 0,
                  pilots_stored=frozenset(), forward_stored=frozenset()) -> Estimate:
    """The estimate of one analysis. domains: [(name, [tokens per fact])];
    ray_workers: the Ray workers the per-domain units would spread over (0:
    in this process; the structured route always stays here);
    pilots_stored: the names of the domains whose pilot curves are stored
    units (`analysis.pilot_status`'s "reused"): their pilot fine-tunes are
    not priced. forward_stored: the names of the domains whose forward
    pieces are stored (`analysis.forward_status`'s "reused"): the forward
    pass runs over each other domain's facts in batches of its own
    (`analysis._forward`). With config.stage "ranking" the paper's solve,
    saturation and bootstrap do not run and are not priced."""
    from ..estimators.pilot import to_tune
    from ..kernels.forward import forward_pass_s  # torch: imported when an estimate is made, not with this module
    lengths = [list(d) for _, d in domains]
    flat = [n for d in lengths for n in d]
    route = analysis_route(config)
    paper = config.stage != "ranking"
    to_run = [list(d) for n, d in domains if n not in forward_stored]
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": forward_pass_s(cal, config.batch_size, *to_run)}
    notes = []
    if len(to_run) < len(lengths):
        notes.append(f"{len(lengths) - len(to_run)} of {len(lengths)} domains' forward passes from cache: the "
                     f"forward pass counts the other {len(to_run)}")
    if ray_workers:
        stages["ray start-up"] = RAY_STARTUP_S
    if paper:
        subspace = analysis_subspace_s(cal, lengths, config)
        if ray_workers and route != "structured":
            # one thread per worker: the calibrated seconds times the threads they were measured at (an upper bound)
            spread = cal.threads / min(ray_workers, len(lengths))
            subspace = {k: v * spread for k, v in subspace.items()}
            notes.append(f"per-domain solves spread over {min(ray_workers, len(lengths))} single-threaded Ray "
                         f"workers")
        stages.update(subspace)
    else:
        notes.append("stage ranking: the run stops after the ranking and the diagnosis; the paper's solve, "
                     "saturation and bootstrap do not run and are not counted")
    stored = frozenset(pilots_stored) & {n for n, _ in domains}
    ranking, diagnosis = ranking_cost(cal, domains, config, stored), diagnosis_cost(cal, domains, config, stored)
    stages["ranking"] = ranking.seconds
    if diagnosis is not None:
        stages["diagnosis"] = diagnosis.seconds
    where = pilot_stage(config)
    if where is not None and stored:
        run = analysis_run(cal, domains, config, stored)
        with_pilot, todo = len(to_tune(run.train, run.held)), len(to_tune(run.train, run.held, run.pilots_stored))
        notes.insert(0, f"{with_pilot - todo} of {with_pilot} domains' pilot curves from cache: the {where} counts "
                        f"the pilot fine-tunes of the other {todo}")
    basis = calibration_basis(cal) + [
        f"{len(flat)} facts, {predicted_tokens(flat)} predicted tokens, {len(lengths)} domains, "
        f"route {route}, ranking by {config.estimator}"]
    if paper and route == "cg":
        notes.append("CG is counted at its iteration limit (the subspace dimension unless cg_maxiter is set): "
                     "an upper bound")
    if paper and route != "structured":
        notes.append("Hessian-vector products are scaled from the fine-tune step, not measured themselves")
    memory = analysis_memory(cal, lengths, config, ranking, diagnosis)
    memory["ray start-up"], memory["start-up"] = memory["load model"], cal.base_bytes
    return Estimate("analysis", stages, {k: memory[k] for k in stages}, cal.device, basis, notes)


def plan_cost(cal: Calibration, train: list, held: list, config, pilots_stored=frozenset()) -> Estimate:
    """The estimate of a plan's pilots (a PilotConfig or PlanConfig); train /
    held as in `benchmark_cost`, the halves of `splitting.split_domains`.
    pilots_stored: the names of the domains whose pilot curves are stored
    units (`plan.pilot_status`'s "reused"): `plan.measure_pilots` neither
    reads them in its forward pass (unless the transfer matrix needs every
    domain) nor fine-tunes them. A PlanConfig adds the fits of the learning
    curves (`plan.fit_pilots`: per domain with a pilot, its bootstrap
    resamples, each a fit scaled from the calibration's per-curve fit of the
    saturation bootstrap); a PilotConfig is the pilots alone (a plan job).
    Memory as the benchmark's forward pass and fine-tunes hold it, without
    the estimators' working sets."""
    from ..costs import block_inputs_bytes, largest_batch
    from ..estimators.pilot import to_tune
    from ..kernels.forward import forward_pass_s
    from ..kernels.pilots import PILOT_RECIPE, plan_pilots_cost, transfer_s

    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    stored = frozenset(k for k, (n, _) in enumerate(train) if n in pilots_stored)
    transfer = bool(getattr(config, "transfer", False))
    # a domain without a stored curve is read (one too small for a pilot too); a missing transfer entry reads all
    read = [k for k in range(len(tr)) if transfer or k not in stored]
    keep = min(PILOT_RECIPE.blocks, cal.n_layers)
    flat = [n for k in read for n in tr[k] + he[k]]
    pilots, units = plan_pilots_cost(cal, [tr[k] for k in read], [he[k] for k in read], config.pilot_sizes,
                                     frozenset(p for p, k in enumerate(read) if k in stored))
    stages = {"start-up": cal.start_s, "load model": cal.load_s}
    b, d = cal.dtype_bytes, cal.d_ff
    memory = {"start-up": cal.base_bytes, "load model": resident_bytes(cal)}
    if flat:
        resident = (resident_bytes(cal) + predicted_tokens(flat) * (d + cal.d_model + 6) * b
                    + block_inputs_bytes(cal, flat))
        stages["forward pass"] = forward_pass_s(cal, config.batch_size, flat)
        memory["forward pass"] = resident + cal.forward_bytes_per_token * largest_batch(flat, config.batch_size)
    if units:
        stages["pilot fine-tunes"] = pilots.seconds
        memory["pilot fine-tunes"] = resident + pilots.bytes
    if transfer and flat:
        stages["transfer"] = transfer_s(cal, tr, he, config.pilot_sizes, PILOT_RECIPE.steps, keep, stored)
        # the trainer and a step, as when every pilot runs (a source whose pilot is stored still trains)
        memory["transfer"] = resident + plan_pilots_cost(cal, tr, he, config.pilot_sizes)[0].bytes
    with_pilot = to_tune(tr, he)
    resamples = getattr(config, "bootstrap_resamples", None)
    if resamples is not None:
        stages["fits"] = len(with_pilot) * resamples * cal.bootstrap_s_per_curve
        memory["fits"] = resident_bytes(cal)
    every = [n for d in tr + he for n in d]
    basis = calibration_basis(cal) + [
        f"{len(tr)} domains, {len(every)} facts ({predicted_tokens(every)} predicted tokens), "
        f"{len(units)} pilot fine-tunes of {PILOT_RECIPE.steps} steps on the last {keep} blocks"]
    notes = []
    reused = len(with_pilot) - len(to_tune(tr, he, stored))
    if reused:
        notes.append(f"{reused} of {len(with_pilot)} domains' pilot curves from cache: only the other "
                     f"{len(with_pilot) - reused} are fine-tuned"
                     + ("" if transfer else ", and the forward pass reads only the domains measured"))
    if transfer:
        notes.append("the transfer matrix is counted with none of its entries stored (reads of every domain after "
                     "each source's runs, two fine-tunes per source whose pilot is stored), and its forward pass "
                     "over every domain: an upper bound when entries are stored")
    notes.append("the allocation after the fits takes well under a second and is left out" if resamples is not None
                 else "the fits, bands and allocation after the pilots take well under a second and are left out")
    return Estimate("plan", stages, memory, cal.device, basis, notes)


def token_lengths(tokenizer, facts, max_positions: int) -> list:
    """Tokens per fact as the engine encodes them (cut to the context)."""
    return [min(len(tokenizer(f)["input_ids"]), max_positions) for f in facts]



# --- from a request to an estimate -------------------------------------------------------------------------------

def load_tokenizer(model_id):
    """The model's tokenizer alone (for counting tokens when the calibration
    is cached), from where `models.load_model` would take it."""
    from transformers import AutoTokenizer

    from ..access.models import ModelError, converted_dir, resolve_model

    _, source, location = resolve_model(model_id)
    folder = converted_dir(Path(location)) if source in ("embedded", "gguf") else location
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=source == "hub", trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"The tokenizer of '{model_id}' could not be loaded: {str(exc).splitlines()[0]}") from None


def domain_tokens(tokenizer, cal: Calibration, domains) -> list:
    """[(name, [tokens per fact])] of Domain objects; ValueError when they come
    to more tokens than a run accepts, as the run itself would refuse."""
    from ..limits import too_many_tokens

    counted, total = [], 0
    for d in domains:
        lengths = token_lengths(tokenizer, d.facts, cal.max_positions)
        total += sum(lengths)
        refusal = too_many_tokens(total)
        if refusal:
            raise ValueError(refusal[:1].upper() + refusal[1:])
        counted.append((d.name, lengths))
    return counted


def ray_workers(executor) -> tuple:
    """(workers, local) of an ExecutorConfig (None: in this process): a Ray
    started here has num_cpus (else every core) single-threaded workers; for
    a cluster joined by address the same count is assumed."""
    if executor is None or executor.kind != "ray":
        return 0, True
    return int(executor.num_cpus or os.cpu_count() or 1), executor.address is None


def _calibrated(model_id, device: str, dtype: str, threads: int | None, calibration):
    if calibration is not None:
        return calibration, None
    return calibrate(model_id, device, dtype, threads)


def _stored(status, use_cache: bool) -> frozenset:
    """The names of the domains whose units the run will find stored
    (status(): `analysis.pilot_status`, `plan.pilot_status` or
    `analysis.forward_status`), looked up
    here so the cost functions stay arithmetic; none without the cache or
    before any unit was stored (the unit store is not created by an
    estimate)."""
    if not use_cache or not (cache_dir() / "domain_units").is_dir():
        return frozenset()
    found = status()
    return frozenset(found["reused"]) if found else frozenset()


def estimate_analysis(model_id, domains, config=None, executor=None, use_cache: bool = True,
                      calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `analysis.run_analysis(model_id, domains, config)` would cost.
    Bad input raises what the run raises (DomainError, ModelError,
    ValueError), before anything is measured. With use_cache and a stored
    result the run returns at once; the estimate says so and what computing
    it afresh would cost. executor: an ExecutorConfig; calibration and
    tokenizer: the model's, when the caller has them. Domains whose pilot
    curves are stored (`analysis.pilot_status`) are priced without their
    pilot fine-tunes, those whose forward pieces are stored
    (`analysis.forward_status`) without their forward pass; config.stage
    "ranking" without the paper's stages."""
    from ..pipelines.analysis import cache_key, forward_status, pilot_status
    from ..config import AnalysisConfig
    from ..domains import as_domains

    config = config or AnalysisConfig()
    domains = as_domains(domains)
    if config.checkpoints:
        from ..access.checkpoints import validate_checkpoints

        validate_checkpoints(config.checkpoints)
    cal, loaded = _calibrated(model_id, config.device, config.dtype, None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, _ = ray_workers(executor)
    estimate = analysis_cost(cal, domain_tokens(tokenizer, cal, domains), config, workers,
                             _stored(lambda: pilot_status(model_id, domains, config), use_cache),
                             _stored(lambda: forward_status(model_id, domains, config), use_cache))
    if use_cache and (cache_dir() / "results").is_dir():
        from ..storage.store import ResultStore

        if ResultStore().get(cache_key(model_id, domains, config)) is not None:
            estimate.notes.insert(0, f"a result of this request is cached: the run returns it at once "
                                     f"(computed afresh, with --no-cache, about {format_seconds(estimate.total_s)})")
            estimate.stages_s = {"cached result": 0.0}
            estimate.memory_bytes = {"cached result": cal.base_bytes}
    return estimate


def estimate_benchmark(model_id=None, domains=None, config=None, device: str = "cpu", threads: int | None = None,
                       executor=None, calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `validation.benchmark.run_benchmark` would cost (domains None:
    the shipped benchmark domains, ordinary and hard cases). Each domain is
    cut as the run cuts it (max_facts, then the collection protocol's
    sample, test facts and pool, and the sample's halves). threads: the
    torch threads it would run with (None: the current setting)."""
    from ..domains import benchmark_domains
    from ..kernels.splitting import split_domains
    from ..validation.benchmark import BenchmarkConfig, check_domains
    from ..validation.protocol import collection_split

    config = config or BenchmarkConfig()
    if config.checkpoints:
        from ..access.checkpoints import check_last_is_model, validate_checkpoints

        check_last_is_model(validate_checkpoints(config.checkpoints), model_id)
    domains = check_domains(domains if domains is not None else benchmark_domains(), config)
    protocol = collection_split(domains, config.seed, config.sample_facts, config.test_facts)
    train, held = split_domains(protocol["sample"], config.seed, config.held_out_fraction)
    cal, loaded = _calibrated(model_id, device, "float32", threads, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, local = ray_workers(executor)
    parts = [domain_tokens(tokenizer, cal, part) for part in (train, held, protocol["test"], protocol["pool"])]
    return benchmark_cost(cal, *parts, config, workers, local)


def estimate_validation(model_id, domains, config=None, held_out=None, executor=None,
                        calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `validation.validate.validate` would cost (float32 on the CPU,
    as it runs). held_out: {name: [facts]} or None (a seeded half)."""
    from ..domains import as_domains
    from ..kernels.splitting import split_domains
    from ..validation.validate import ValidationConfig

    config = config or ValidationConfig()
    if config.checkpoints:
        from ..access.checkpoints import check_last_is_model, validate_checkpoints

        check_last_is_model(validate_checkpoints(config.checkpoints), model_id)
    train, held = split_domains(as_domains(domains), config.seed, config.held_out_fraction, held_out)
    cal, loaded = _calibrated(model_id, "cpu", "float32", None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, _ = ray_workers(executor)
    return validation_cost(cal, domain_tokens(tokenizer, cal, train), domain_tokens(tokenizer, cal, held), config,
                           workers)


def estimate_plan(model_id, domains, config=None, use_cache: bool = True, calibration: Calibration | None = None,
                  tokenizer=None) -> Estimate:
    """What a plan's pilots (`plan.pilot_measurements`, a plan job) would
    cost; config a PilotConfig or PlanConfig (then with the fits). With
    use_cache and the pilots stored under their `plan_key` the run returns
    them at once, and the estimate says so; else the domains whose pilot
    curves are stored units (`plan.pilot_status`, an analysis or another
    plan measured them) are priced without their fine-tunes."""
    from ..domains import as_domains
    from ..pipelines.plan import PilotConfig, pilot_status, plan_key
    from ..kernels.splitting import split_domains

    config = config or PilotConfig()
    domains = as_domains(domains)
    train, held = split_domains(domains, config.seed)
    cal, loaded = _calibrated(model_id, config.device, config.dtype, None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    estimate = plan_cost(cal, domain_tokens(tokenizer, cal, train), domain_tokens(tokenizer, cal, held), config,
                         _stored(lambda: pilot_status(model_id, domains, config), use_cache))
    if use_cache and (cache_dir() / "plans").is_dir():
        from ..storage.store import JsonStore

        if JsonStore("plans").get(plan_key(model_id, domains, config)) is not None:
            estimate.notes.insert(0, f"these pilots are cached: the run returns them at once (measured afresh, "
                                     f"about {format_seconds(estimate.total_s)})")
            # the fits run on the cached pilots all the same, with no model loaded
            kept = {k: v for k, v in estimate.stages_s.items() if k == "fits"}
            estimate.stages_s = {"cached pilots": 0.0, **kept}
            estimate.memory_bytes = {k: cal.base_bytes for k in estimate.stages_s}
    return estimate
