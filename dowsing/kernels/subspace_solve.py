"""One domain's solve in its concept subspace, start to end: per-fact
gradients in S_k, z_k = (H_k + lambda I)^-1 g_k by the chosen route, the
influence of every fact, the saturation curve mu(n) and its fit, and the
bootstrap's resampling kernels. A unit of the executor: in this process, or
on a worker that rebuilds the model from shipped weights."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import AnalysisConfig
from .curvature import SubspaceObjective, structured_fact_gradients, structured_hessian, tail_coefficients
from .forward import FactTokens
from ..access.models import DTYPES
from ..progress import Progress
from .saturation import DenseSystem, LowRankSystem, mu_function, n_grid, saturation
from .solvers import conjugate_gradient, damped, dense_solve
from .subspace import find_anatomy
from .subspace_terms import LogitLine, derivatives_at_zero


def line_coefficients(anatomy, tokens: FactTokens, directions: torch.Tensor, curvature: str) -> tuple | None:
    """(a, c), each (N, K) in float64: every token's a_t and c_t (Hessian or
    Gauss-Newton) along every domain's direction at once, from the closed
    form of the logits along h_t + s v_k (`subspace_terms.derivatives_at_zero`:
    one LM-head product per token for all domains, instead of a double
    backward through the head per domain). None where that form does not
    reproduce the model's final norm and head (the caller then takes
    `tail_coefficients` per domain)."""
    line = LogitLine(anatomy, tokens.h, keep=False)
    if not line.ok:
        return None
    a, c, c_ggn = derivatives_at_zero(line, directions, tokens.targets)
    return a, (c if curvature == "hessian" else c_ggn)


def _structured_domain(anatomy, tokens: FactTokens, v, rows, n_total: int, config: AnalysisConfig,
                       coefficients: tuple | None = None):
    """B = 1: per-fact gradients of all facts, H_k + lambda I, and the
    saturation system for domain k, from the per-token coefficients
    (`coefficients`: this domain's (a, c) when computed for every domain at
    once, else computed here)."""
    if coefficients is not None:
        a, c = coefficients
    else:
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
    coefficients: tuple | None = None  # `line_coefficients` of every domain, where B = 1 and the form holds

    def domain_coefficients(self, k: int) -> tuple | None:
        """Domain k's (a, c) from `coefficients`, or None."""
        if self.coefficients is None:
            return None
        a, c = self.coefficients
        return a[:, k], c[:, k]

    def payload(self) -> dict:
        """Everything but the model module, plus its configuration and
        weights (a module can hold unpicklable state), for a worker."""
        model_config = self.net.config
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return {"model_config": model_config, "state": state, "device": str(next(self.net.parameters()).device),
                "batches": [(ids.cpu(), mask.cpu(), rows) for ids, mask, rows in self.batches],
                "tokens": self.tokens, "directions": self.directions.cpu(), "rows_of": self.rows_of,
                "n_total": self.n_total, "route": self.route, "config": self.config,
                "coefficients": self.coefficients}


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
                         n_total=payload["n_total"], route=payload["route"], config=config,
                         coefficients=payload.get("coefficients"))


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
        grads, base, system = _structured_domain(ctx.anatomy, tokens, v, rows, n_total, config,
                                                 ctx.domain_coefficients(k))
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
                _, _, system = _structured_domain(ctx.anatomy, tokens, v, rows, n_total, config,
                                                  ctx.domain_coefficients(k))
                mu = mu_function(system, g_bar)
            else:
                system = None  # the bootstrap would need N_k CG solves per n
                mu = _cg_mu(obj, w_all, w_k, n_k, n_total, g_bar, config.damping, config.cg_rtol,
                            config.cg_maxiter or None)
    influence_all = (grads @ solve.x).cpu()  # g_i^T z_k for every fact i
    mean = float(g_bar @ solve.x)
    t_solve = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = n_grid(n_k, config.saturation_points, config.saturation_max_factor)
    kernels = mus = None
    if system is not None:
        # One pass over the grid with [G; g_bar] as the left factor gives the
        # bootstrap's kernels G A(n)^-1 G^T and the curve g_bar^T A(n)^-1 g_bar.
        forms = torch.from_numpy(system.forms(grid, torch.vstack([grads[rows], g_bar.unsqueeze(0)])))
        kernels, mus = forms[:, :-1, :-1].contiguous(), forms[:, -1, -1].numpy()
        mu = mu_function(system, g_bar, grid)
    t_kernels = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(Progress("saturation", base_fraction, f"domain {k + 1}: saturation fit"))
    sat = json.loads(json.dumps(saturation(mu, n_k, mean, config.saturation_points, config.saturation_max_factor,
                                           mus=mus), default=float))
    if obj is not None:
        obj.release()
    return {"influence_all": influence_all, "mean": mean, "solve": solve.summary(), "saturation": sat,
            "kernels": kernels, "seconds": {"solve": t_solve, "saturation": time.perf_counter() - t0,
                                            "kernels": t_kernels}}
