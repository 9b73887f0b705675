"""What the stages of an analysis (`analysis.run_analysis`) cost that are not
an estimator family's: the paper's solve, the saturation curve and the
bootstrap per domain on the route `analysis.choose_route` takes, and the
memory each stage holds; the ranking and the diagnosis are priced by the
families that compute them (`estimators.registry.Family.cost`). Pure
arithmetic over a calibration (`calibration.Calibration`) and the
domains' tokens per fact."""
from __future__ import annotations

from ..costs import (CALIBRATION_DOMAINS, LINE_CHUNK, Cost, RunShape, block_inputs_bytes, largest_batch, line_work,
                    matmul_s, padded_tokens, predicted_tokens, resident_bytes, solve_s, substitution_s, tail_pass_s,
                    hessian_s)


def analysis_route(config) -> str:
    """The analysis' route as `analysis.choose_route` picks it for a model
    whose final norm and head reproduce its logits (the usual case)."""
    if config.solver == "auto":
        return "structured" if config.blocks == 1 else "exact"
    return config.solver


def _grid_points(n_k: int, config) -> int:
    from ..kernels.saturation import n_grid

    return len(n_grid(n_k, config.saturation_points, config.saturation_max_factor))


# torch.linalg.eig of diag(d) P on the default model's domains (r = 520 to
# 640) took 17 to 21 times r^3 / 1.5 at the rate of an LU factorisation.
EIG_FLOPS_PER_R3 = 20.0


def structured_domain_s(cal, n_tokens: int, r: int, m_k: int, points: int) -> tuple:
    """(solve, saturation, kernels) seconds of one domain on the structured
    route: H = X^T diag X (float64) over every token, the dense solve, and
    the saturation system. With rank r = the domain's tokens < d_ff
    (`saturation.LowRankSystem`): the Woodbury factors, one eigendecomposition
    of diag(d) P (priced as eig, the exact Hessian's case; Gauss-Newton's
    eigh costs less) with the complex LU of its eigenvectors, the spectral
    parts for the m_k + 1 rows [G; g], two Woodbury solves of those rows that
    check the form at the grid's ends, and O(r (m_k + 1)^2) per grid point;
    all of it counts to the kernels, and the saturation fit's brentq is O(r)
    per step. Otherwise (dense) a solve of the m_k + 1 rows per grid point.
    The per-token coefficients are shared by every domain (`coefficients_s`)."""
    d = cal.d_ff
    rows = m_k + 1
    solve = hessian_s(cal, n_tokens) + solve_s(cal, d)
    if r < d:
        solve += (2.0 * d ** 3 / 3.0) / cal.factor_flops + substitution_s(cal, d, r) + matmul_s(cal, 2.0 * r * r * d)
        products = substitution_s(cal, d, rows) + matmul_s(cal, 4.0 * r * d * rows + 2.0 * rows * rows * d)
        woodbury = products + solve_s(cal, r, rhs=rows, lu=True)
        spectrum = (EIG_FLOPS_PER_R3 + 4.0) * r ** 3 / 1.5 / cal.factor_flops + 4.0 * substitution_s(cal, r, rows)
        kernels = spectrum + products + 2.0 * woodbury + points * matmul_s(cal, 8.0 * r * rows * rows)
        return solve, points * matmul_s(cal, 8.0 * r), kernels
    solve += hessian_s(cal, r)
    kernels = solve_s(cal, d, rhs=rows, lu=True) + matmul_s(cal, 2.0 * rows * rows * d)
    return solve, 0.0, points * kernels


def coefficients_s(cal, n_tokens: int, domains: int) -> float:
    """Every token's curvature coefficients along every domain's direction
    in one pass (`subspace_solve.line_coefficients`), scaled from the
    calibration's timing of that pass along CALIBRATION_DOMAINS directions."""
    return n_tokens * cal.line_s_per_token * line_work(cal, domains) / line_work(cal, CALIBRATION_DOMAINS)


def hvp_domain_s(cal, padded: float, config, route: str, points: int) -> tuple:
    """(solve, saturation, kernels) seconds of one domain on the
    Hessian-vector-product routes (B blocks, dimension B x d_ff): per-fact
    gradients and the first-order graph cost a forward and a backward over
    every batch; each product one double backward. exact: a dense matrix
    of both systems (2 x dim products) and a dense solve per grid point. cg:
    at most cg_maxiter (else dim) iterations, and with B > 1 one CG run per
    grid point for mu(n), so an upper bound."""
    dim = config.blocks * cal.d_ff
    backward = tail_pass_s(cal, padded, config.blocks, config.blocks) - tail_pass_s(cal, padded, config.blocks)
    first_order = cal.forward_s_per_token * padded + backward
    product = 2.0 * backward
    if route == "exact":
        solve = 3 * first_order + 2 * dim * product + solve_s(cal, dim)
        return solve, points * solve_s(cal, dim, lu=True), points * solve_s(cal, dim, rhs=1, lu=True)
    iterations = min(config.cg_maxiter or dim, dim)
    solve = 2 * first_order + iterations * product
    if config.blocks == 1:
        return solve, points * solve_s(cal, cal.d_ff, lu=True), points * solve_s(cal, cal.d_ff, lu=True)
    return solve, points * iterations * product, 0.0


def analysis_subspace_s(cal, lengths: list, config) -> dict:
    """Seconds of the solve, saturation and bootstrap stages over all domains."""
    route = analysis_route(config)
    flat = [n for d in lengths for n in d]
    n_tokens = predicted_tokens(flat)
    padded = padded_tokens(flat, config.batch_size)
    totals = [0.0, 0.0, 0.0]
    if route == "structured" or (route == "cg" and config.blocks == 1):
        totals[0] += coefficients_s(cal, n_tokens, len(lengths))
    for domain in lengths:
        points = _grid_points(len(domain), config)
        if route == "structured":
            parts = structured_domain_s(cal, n_tokens, predicted_tokens(domain), len(domain), points)
        else:
            parts = hvp_domain_s(cal, padded, config, route, points)
        totals = [t + p for t, p in zip(totals, parts)]
    bootstrap = totals[2]
    if route == "structured" or route == "exact" or config.blocks == 1:
        bootstrap += config.bootstrap_resamples * len(lengths) * cal.bootstrap_s_per_curve
    return {"solve": totals[0], "saturation": totals[1], "bootstrap": bootstrap}


def analysis_pilot_keep(cal, config) -> int:
    """The blocks after the analysis' captured block inputs (`ranking.capture_block_of`):
    the alignment's when the ranking estimator trains on block inputs, the
    pilot recipe's when the diagnosis runs, the more of the two."""
    from ..estimators import get
    from ..kernels.pilots import PILOT_RECIPE

    wanted = [min(config.align_blocks, cal.n_layers)] if "block_inputs" in get(config.estimator).needs else []
    if config.diagnose:
        wanted.append(min(PILOT_RECIPE.blocks, cal.n_layers))
    return max(wanted) if wanted else min(PILOT_RECIPE.blocks, cal.n_layers)


def analysis_run(cal, domains: list, config, pilots_stored=frozenset()) -> RunShape:
    """The analysis as its ranking estimator and its diagnosis see it: every
    domain's two seeded halves (`splitting.split_order`), the whole domains
    and the settings. domains: [(name, [tokens per fact])]; pilots_stored:
    the names of the domains whose pilot curves are stored units."""
    from ..kernels.splitting import split_order

    halves = [split_order(list(d), n, config.seed) for n, d in domains]
    stored = frozenset(k for k, (n, _) in enumerate(domains) if n in pilots_stored)
    return RunShape("analysis", [a for a, _ in halves], [b for _, b in halves], analysis_pilot_keep(cal, config),
                    domains=[(n, list(d)) for n, d in domains], batch_size=config.batch_size,
                    adam_batches=config.adam_batches, align_blocks=config.align_blocks,
                    checkpoints=len(config.checkpoints), lr_known=config.checkpoint_lr is not None,
                    pilots_stored=stored)


def pilot_stage(config) -> str | None:
    """Which stage of the analysis runs the pilot fine-tunes (the one stage
    whose domains `analysis.pilot_status` reports): "ranking" when it ranks
    by a pilot fine-tune, else "diagnosis" when that runs, else None."""
    from ..estimators import PILOT_CURVE, PILOT_GAIN

    if config.estimator in (PILOT_GAIN, PILOT_CURVE):
        return "ranking"
    return "diagnosis" if config.diagnose else None


def ranking_cost(cal, domains: list, config, pilots_stored=frozenset()) -> Cost:
    """The ranking estimator's own work, as its family prices it in an
    analysis (none for mean loss and the paper's, which reuse the forward
    pass and the solves). domains: [(name, [tokens per fact])];
    pilots_stored: names of the domains whose pilot curves are stored (read
    when the ranking runs the pilots)."""
    from ..estimators import FAMILIES, get

    stored = pilots_stored if pilot_stage(config) == "ranking" else frozenset()
    return FAMILIES[get(config.estimator).family].price(cal, analysis_run(cal, domains, config, stored),
                                                        [config.estimator])


def diagnosis_cost(cal, domains: list, config, pilots_stored=frozenset()) -> Cost | None:
    """The diagnosis (`analysis._diagnosis`, with config.diagnose): the pilot
    gain of every domain on its two seeded halves, priced by its family,
    but for the domains whose pilot curves are stored (pilots_stored, by
    name); None when it does not run, or the ranking estimator is the pilot
    gain or the pilot curve, whose own runs it reads."""
    from ..estimators import FAMILIES, PILOT_GAIN, get

    if pilot_stage(config) != "diagnosis":
        return None
    return FAMILIES[get(PILOT_GAIN).family].price(cal, analysis_run(cal, domains, config, pilots_stored),
                                                  [PILOT_GAIN])


def analysis_memory(cal, lengths: list, config, ranking: Cost, diagnosis: Cost | None) -> dict:
    """Peak bytes per stage: the process and the weights, the forward pass's
    per-token tensors (d_ff and d_model per predicted token), and on top the
    largest batches' activations (forward, as many as run side by side), the solve's float64 matrices
    (gradients of every fact, H, its factor, the Woodbury pieces) with the
    larger of a chunk's double backprop and H's float64 copies of X, and
    what the ranking and the diagnosis add (every fact's block inputs at
    least, when the diagnosis captures them)."""
    from ..kernels.side_by_side import pool_workers

    b, d = cal.dtype_bytes, cal.d_ff
    flat = [n for dom in lengths for n in dom]
    n_tokens, facts = predicted_tokens(flat), len(flat)
    resident = resident_bytes(cal)
    tokens = n_tokens * (d + cal.d_model) * b + n_tokens * 8 * 3
    # each domain in batches of its own, `pool_workers` domains side by side: their largest batches at once
    side = pool_workers(cal.device, cal.threads, runs=len(lengths))
    batch = sum(sorted((largest_batch(dom, config.batch_size) for dom in lengths), reverse=True)[:side])
    r = max(predicted_tokens(dom) for dom in lengths)
    system = (facts * d + 4 * d * d + 2 * r * d + r * r) * 8
    if analysis_route(config) != "structured":
        dim = config.blocks * d
        system = (facts * dim + 4 * dim * dim) * 8 + 2 * n_tokens * cal.step_bytes_per_token
    # the coefficients' pass holds one chunk of vocabulary-sized rows, and (a, c) for every domain
    solve_transient = max(cal.coef_bytes_per_token * min(n_tokens, LINE_CHUNK) + 2 * n_tokens * len(lengths) * 8,
                          2 * n_tokens * d * 8)
    inputs = block_inputs_bytes(cal, flat) if config.diagnose else 0
    memory = {"load model": resident,
              "forward pass": resident + tokens + cal.forward_bytes_per_token * batch,
              "solve": resident + tokens + system + solve_transient,
              "ranking": resident + tokens + max(ranking.bytes, inputs)}
    memory["saturation"] = memory["bootstrap"] = resident + tokens + system
    if diagnosis is not None:
        memory["diagnosis"] = resident + tokens + diagnosis.bytes
    return {k: int(v) for k, v in memory.items()}
