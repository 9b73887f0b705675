"""What a benchmark (`validation.benchmark.run_benchmark`) and a quick
validation (`validation.validate.validate`) will cost before they start:
the sum over their stages of what each declares beside its code (the
estimator families through the registry, the ground truth's fine-tunes in
`validation.costs`, the forward pass in `kernels.forward`)."""
from __future__ import annotations

import math

from .calibration import Calibration
from .cost_report import Estimate, calibration_basis
from ..costs import RAY_STARTUP_S, RunShape, predicted_tokens


def family_costs(cal: Calibration, run: RunShape, wanted) -> dict:
    """{family: Cost} of the estimator families of the wanted names, in the
    registry's order, each priced by its own cost function."""
    from ..estimators import FAMILIES

    return {family: FAMILIES[family].price(cal, run, members) for family, members in wanted.items()}


def benchmark_cost(cal: Calibration, train: list, held: list, test: list, pool: list, config, ray_workers: int = 0,
                   ray_local: bool = True) -> Estimate:
    """The estimate of one benchmark under the collection protocol
    (`validation.protocol`). train / held: [(name, [tokens per fact])] of
    the halves of each domain's sample (what the estimators see); test /
    pool: the same of its test facts and its pool (in the order the doses
    take it). ray_workers: Ray workers for the fine-tunes (0: in this
    process); ray_local: they share this machine's cores with the
    estimators."""
    from ..estimators import FAMILIES, PAPER, by_family, get
    from ..kernels.forward import forward_pass_s
    from ..validation.costs import (benchmark_leaderboard_s, benchmark_memory, benchmark_units_s,
                                   curve_predictions_s, truth_trainer_s)
    from ..validation.plan_check import ALLOCATIONS
    from ..validation.protocol import dose_steps

    names = [n for n, _ in train]
    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    te, po = [list(x) for _, x in test], [list(x) for _, x in pool]
    sample = [a + b for a, b in zip(tr, he)]
    keep = min(cal.n_layers, max([r.blocks for r in config.recipes] + [config.align_blocks]))
    flat = [n for d in tr for n in d] + [n for d in he for n in d]
    # the ground truth's pass: every domain's sample then its pool, then every domain's test facts
    everything = [n for s, p in zip(sample, po) for n in s + p] + [n for d in te for n in d]
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": forward_pass_s(cal, config.batch_size, flat, everything)}
    main = next(r for r in config.recipes if r.name == config.main_recipe)
    run = RunShape("benchmark", tr, he, keep, recipe=main, recipes=tuple(config.recipes), truth=everything,
                   batch_size=config.batch_size, adam_batches=config.adam_batches, align_blocks=config.align_blocks,
                   ekfac_blocks=config.ekfac_blocks, ekfac_fit_facts=config.ekfac_fit_facts,
                   pilot_sizes=config.pilot_sizes, checkpoints=len(config.checkpoints),
                   lr_known=not config.checkpoints or config.checkpoint_lr is not None)
    wanted = by_family(config.estimators)
    if config.curve_domains:  # the learning-curve predictions read the paper's subspace terms
        wanted.setdefault(get(PAPER).family, [])
    families = family_costs(cal, run, {f: wanted[f] for f in FAMILIES if f in wanted})
    seconds = {FAMILIES[f].stage: cost.seconds for f, cost in families.items()}
    stages.update(seconds)
    units = benchmark_units_s(cal, sample, te, po, config, keep)
    notes = []
    if ray_workers:
        # each unit on one thread: the calibrated seconds times its threads (an upper bound)
        work = sum(units) * cal.threads
        estimators = sum(seconds.values())
        wall = (estimators + work) / ray_workers if ray_local else max(estimators, math.ceil(
            len(units) / ray_workers) * work / len(units))
        stages["ray start-up"] = RAY_STARTUP_S
        stages["fine-tunes"] = max(wall - estimators, 0.0)
        notes.append(f"{len(units)} fine-tunes on {ray_workers} single-threaded Ray workers beside the estimators")
    else:
        stages["fine-tunes"] = sum(units)
    stages["fine-tunes"] += truth_trainer_s(cal, te, keep)
    stages["learning-curve predictions"] = curve_predictions_s(cal, tr, sum(1 for n in config.curve_domains
                                                                            if n in names))
    stages["leaderboard"] = benchmark_leaderboard_s(cal, names, config)
    per_seed = 1 + len(names) * (len(config.doses) + int(config.second_reading))
    steps = ", ".join(sorted({str(dose_steps(r, max(config.doses))) for r in config.recipes}, key=int))
    basis = calibration_basis(cal) + [
        f"{len(names)} domains: samples of {sum(map(len, sample))} facts ({predicted_tokens(flat)} predicted "
        f"tokens), {sum(map(len, te))} test facts, pools of {sum(map(len, po))}; {len(config.estimators)} "
        f"estimators; {len(units)} fine-tunes of {steps} steps ({len(config.recipes)} recipes x {config.seeds} seeds "
        f"x {per_seed}: the baseline and per domain {len(config.doses)} doses"
        + (" and its sample" if config.second_reading else "") + ")"
        + (f", {len(ALLOCATIONS) * len(config.plan_budgets) * config.seeds} of them the plan check's "
           f"({len(ALLOCATIONS)} allocations x "
           f"{len(config.plan_budgets)} budgets x {config.seeds} seeds)" if config.plan_budgets else "")]
    notes.append("AirRep's encoder training and kronfluence's bookkeeping are left out (seconds)")
    memory, after = benchmark_memory(cal, run, ray_workers if ray_local else 0)
    memory.update({FAMILIES[f].stage: after + cost.bytes for f, cost in families.items()})
    return Estimate("benchmark", stages, {k: int(memory[k]) for k in stages}, cal.device, basis, notes)


def validation_cost(cal: Calibration, train: list, held: list, config, ray_workers: int = 0) -> Estimate:
    """The estimate of one quick validation (`validation.validate`); train /
    held as in `benchmark_cost`."""
    from ..estimators import PAPER, by_family, names as offered
    from ..kernels.forward import forward_pass_s
    from ..validation.costs import benchmark_memory, subspace_truth_s, validation_finetunes_s
    from ..validation.finetune import validation_recipe
    from ..validation.validate import scored_estimators, validation_settings

    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    keep = min(config.finetune_blocks, cal.n_layers)
    recipe = validation_recipe(config, keep)
    flat = [n for d in tr for n in d] + [n for d in he for n in d]
    names = list(dict.fromkeys([PAPER] + list(config.estimators)))
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": forward_pass_s(cal, config.batch_size, flat)}
    run = RunShape("validation", tr, he, keep, recipe=recipe, recipes=(recipe,), batch_size=config.batch_size,
                   adam_batches=validation_settings(config, keep).adam_batches, align_blocks=keep, ekfac_blocks=0,
                   lissa_depth=config.lissa_depth, lissa_batch=config.lissa_batch_facts,
                   checkpoints=len(config.checkpoints),
                   lr_known=not config.checkpoints or config.checkpoint_lr is not None)
    # without the fine-tuning ground truth no block inputs are captured, and the estimators that need them drop out
    scored = family_costs(cal, run, by_family(scored_estimators(config, config.finetune)))
    stages["estimators"] = sum((cost.seconds for cost in scored.values()), 0.0)
    if config.subspace:
        stages["subspace ground truth"] = subspace_truth_s(cal, tr, he, len(config.eps), config.newton_steps)
    if config.finetune:
        stages["fine-tuning ground truth"] = validation_finetunes_s(cal, tr, he, recipe, keep, config.batch_size,
                                                                    ray_workers, RAY_STARTUP_S)
    stages["leaderboard"] = len(names) * config.bootstrap * cal.leaderboard_s_per_resample
    memory, after = benchmark_memory(cal, run)
    memory["estimators"] = after + max(cost.bytes for cost in family_costs(
        cal, run, by_family(offered("validation"))).values())
    memory["subspace ground truth"] = memory["leaderboard"] + 4 * cal.d_ff ** 2 * 8
    memory["fine-tuning ground truth"] = memory["fine-tunes"]
    basis = calibration_basis(cal) + [
        f"{len(tr)} domains, {len(flat)} facts ({predicted_tokens(flat)} predicted tokens), "
        f"{len(names)} estimators, {len(tr) + 1} fine-tunes of {recipe.steps} steps"]
    notes = ["CG and LiSSA are counted at d_ff iterations and their full depth: upper bounds"]
    return Estimate("validation", stages, {k: int(memory[k]) for k in stages}, cal.device, basis, notes)
