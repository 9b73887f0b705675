"""What the stages of a benchmark (`benchmark.run_benchmark`) and of a quick
validation (`validate.validate`) cost that are not an estimator family's:
the ground truth's fine-tunes (the collection protocol's units, the plan
check's runs, the validation's fine-tunes and its Newton steps in S_k), the
learning-curve predictions, the leaderboards, and the memory both hold
beside the estimators. Pure arithmetic over a calibration
(`calibration.Calibration`) and tokens per fact; the estimator families
price themselves (`estimators.registry.Family.cost`)."""
from __future__ import annotations

import math

from ..costs import (CALIBRATION_DOMAINS, RunShape, block_inputs_bytes, finetune_s, hessian_s, largest_batch,
                     line_work, padded_tokens, predicted_tokens, read_tokens, resident_bytes, solve_s, step_padded,
                     tail_params, tail_pass_s, trained_bytes, trainer_step_bytes)


def benchmark_units_s(cal, sample: list, test: list, pool: list, config, keep: int) -> list:
    """Seconds of every fine-tune unit of the collection protocol
    (`protocol.protocol_units`): per recipe and seed the baseline (every
    domain's test losses before and after) and, per domain, one run per
    dose adding the first n facts of its pool (cycled) and, with the second
    reading, one adding its own sample, each reading its test facts. Every
    run takes `dose_steps(recipe, max(doses))` steps of `batch` facts of all
    the samples plus `added_batch` added facts. sample / test / pool: [tokens
    per fact] per domain, the pool in the order the doses take it."""
    from .protocol import dose_steps

    base = [n for d in sample for n in d]
    tests = [n for d in test for n in d]
    n_max = max(config.doses)
    units = []
    for recipe in config.recipes:
        blocks = min(recipe.blocks, keep)
        steps = dose_steps(recipe, n_max)
        one_seed = [finetune_s(cal, steps, step_padded(base, None, recipe.batch, recipe.added_batch), keep, blocks,
                               2 * read_tokens(tests))]
        for k in range(len(sample)):
            read = read_tokens(test[k])
            for n in sorted(config.doses):
                step = step_padded(base, pool[k][:n], recipe.batch, recipe.added_batch, cycled=True)
                one_seed.append(finetune_s(cal, steps, step, keep, blocks, read))
            if config.second_reading:
                step = step_padded(base, sample[k], recipe.batch, recipe.added_batch)
                one_seed.append(finetune_s(cal, steps, step, keep, blocks, read))
        units += one_seed * config.seeds
    units += plan_check_units_s(cal, base, tests, pool, config, keep)
    return units


def plan_check_units_s(cal, base: list, tests: list, pool: list, config, keep: int) -> list:
    """Seconds of the plan check's runs (`protocol.plan_run_losses`): per
    budget B and seed one run per allocation (`plan_check.ALLOCATIONS`) of
    the main recipe's protocol steps, each adding B pool facts in a
    minibatch of ceil(2 B / steps) and reading every test fact. Every
    allocation is costed as the even one: the plan's is not known before its
    pilots."""
    from .plan_check import ALLOCATIONS, even_counts
    from .protocol import dose_steps

    recipe = next(r for r in config.recipes if r.name == config.main_recipe)
    blocks = min(recipe.blocks, keep)
    steps = dose_steps(recipe, max(config.doses))
    units = []
    for budget in config.plan_budgets:
        counts = even_counts(budget, [len(p) for p in pool])
        added = [n for p, m in zip(pool, counts) for n in p[:m]]
        wide = max(recipe.added_batch, math.ceil(2 * len(added) / steps))
        step = step_padded(base, added, recipe.batch, wide, cycled=True)
        units += [finetune_s(cal, steps, step, keep, blocks, read_tokens(tests))] * (len(ALLOCATIONS) * config.seeds)
    return units


def truth_trainer_s(cal, test: list, keep: int) -> float:
    """The ground truth's trainer: a tail copy, checked on the first 16 test facts."""
    return cal.copy_s + tail_pass_s(cal, read_tokens([n for d in test for n in d][:16]), keep)


def curve_predictions_s(cal, train: list, curves: int) -> float:
    """The learning-curve predictions of `curves` domains: per domain a
    Hessian of the largest training half and 32 dense solves."""
    return curves * (hessian_s(cal, max(predicted_tokens(t) for t in train)) + 32 * solve_s(cal, cal.d_ff, lu=True))


def leaderboard_sets(names: list) -> int:
    """The per-group leaderboards a benchmark of these domains builds
    (`leaderboard.group_leaderboards`): all domains, the ordinary ones and
    the hard cases, each only with at least 3 domains."""
    from ..domains import benchmark_groups, domain_set

    groups = benchmark_groups()
    hard = sum(domain_set(groups.get(n)) == "hard" for n in names)
    return sum(count >= 3 for count in (len(names), len(names) - hard, hard))


def benchmark_leaderboard_s(cal, names: list, config) -> float:
    """Per estimator: every reading's leaderboard, and the main reading's per
    group, each with config.bootstrap resamples."""
    readings = len(config.recipes) * (2 if config.second_reading else 1)
    return (len(config.estimators) * (readings + leaderboard_sets(names)) * config.bootstrap
            * cal.leaderboard_s_per_resample)


def subspace_truth_s(cal, train: list, held: list, eps: int, newton_steps: int) -> float:
    """The validation's ground truth in S_k: per domain and upweight, Newton
    steps that each need the LM-head derivatives along v_k over the training
    tokens, a Hessian and a solve, and the held-out losses along v_k."""
    n_train = predicted_tokens([n for d in train for n in d])
    n_held = predicted_tokens([n for d in held for n in d])
    along = cal.line_s_per_token * line_work(cal, 1) / line_work(cal, CALIBRATION_DOMAINS)
    step = n_train * along + hessian_s(cal, n_train) + solve_s(cal, cal.d_ff)
    return len(train) * (eps * newton_steps * step + (eps + 1) * n_held * along + solve_s(cal, cal.d_ff))


def validation_finetunes_s(cal, train: list, held: list, recipe, keep: int, batch_size: int,
                           ray_workers: int = 0, ray_startup_s: float = 0.0) -> float:
    """The validation's fine-tuning ground truth (`finetune.finetune_gains`):
    the baseline and one run per domain adding its training half, each
    reading every held-out fact, and the trainer (a tail copy, checked on
    them). On Ray workers (one thread each) the runs spread over them."""
    pool, held_all = [n for d in train for n in d], [n for d in held for n in d]
    runs = [finetune_s(cal, recipe.steps, step_padded(pool, rows, recipe.batch, recipe.added_batch), keep,
                       keep, padded_tokens(sorted(held_all), batch_size)) for rows in [None] + train]
    if ray_workers:
        return ray_startup_s + math.ceil(len(runs) / ray_workers) * max(runs) * cal.threads
    return sum(runs) + cal.copy_s + tail_pass_s(cal, padded_tokens(sorted(held_all), batch_size), keep)


def benchmark_memory(cal, run: RunShape, ray_workers: int = 0) -> tuple:
    """(peak bytes per stage that is not an estimator family's, the bytes
    every family's stage adds to). Resident throughout: the process, the
    weights, the forward pass's per-token tensors and block inputs (with
    run.truth, the ground truth's own pass over every fact, its tensors
    too), and the fine-tune trainer on the ground truth's facts (its tail
    copy, the starting weights, its own copy of the block inputs). From the
    subspace estimators on: the head product of every token the estimators
    see and every domain's gradients and Hessian."""
    b, d, keep = cal.dtype_bytes, cal.d_ff, run.keep
    flat = run.flat
    n_tokens, facts, k = predicted_tokens(flat), len(flat), len(run.train)
    inputs = block_inputs_bytes(cal, flat)
    per_token = (d + cal.d_model + 6) * b
    resident = resident_bytes(cal) + n_tokens * per_token + inputs
    every = flat if run.truth is None else list(run.truth)
    truth_inputs = inputs if run.truth is None else block_inputs_bytes(cal, every)
    if run.truth is not None:
        resident += predicted_tokens(every) * per_token + truth_inputs
    trainer = truth_inputs + 2 * tail_params(cal, keep) * b
    line = n_tokens * cal.vocab * b
    terms = k * (facts * d + d * d) * 8 + 3 * k * n_tokens * 8
    trained, step = trained_bytes(cal, run), trainer_step_bytes(cal, run)
    batch = max(largest_batch(x, run.batch_size) for x in (flat, every))
    after = resident + trainer + line + terms
    memory = {"load model": resident_bytes(cal), "forward pass": resident + cal.forward_bytes_per_token * batch,
              "fine-tunes": after + 3 * trained + step}
    if ray_workers:
        worker = cal.base_bytes + trainer + tail_params(cal, keep) * b + 3 * trained + step
        memory["fine-tunes"] = after + ray_workers * worker + trainer
    memory["learning-curve predictions"] = after + 4 * d * d * 8
    memory["leaderboard"] = after
    memory["ray start-up"] = memory["start-up"] = cal.base_bytes
    return memory, after
