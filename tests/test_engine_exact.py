"""Every engine number pinned to an independent float64 computation.

The reference applies the rank-1 adapter by editing the weight itself,
W <- W + v u^T, through torch.func.functional_call, runs one fact at a time
with no padding, and takes derivatives with torch.autograd.functional. The
engine instead uses forward hooks, padded batches, per-example u copies,
double backprop and the structured per-token Hessian.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dowsing.pipelines.analysis import analyze
from dowsing.kernels.subspace_solve import _cg_mu, line_coefficients
from dowsing.kernels.forward import forward_pass
from dowsing.kernels.saturation import DenseSystem, mu_function
from dowsing.kernels.solvers import conjugate_gradient, damped
from dowsing.config import AnalysisConfig
from dowsing.kernels.curvature import SubspaceObjective, structured_fact_gradients, structured_hessian, tail_coefficients
from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches

DOMAINS = [
    {"name": "Physics", "facts": ["Energy is conserved in a closed system.", "Light travels faster than sound.",
                                  "Force equals mass times acceleration of a body."]},
    {"name": "Biology", "facts": ["Cells are the basic unit of life.", "DNA carries genetic information.",
                                  "Plants make sugar by photosynthesis."]},
    {"name": "Economics", "facts": ["Inflation reduces the purchasing power of money.",
                                    "Prices rise when demand exceeds supply."]},
]
FACTS = [f for d in DOMAINS for f in d["facts"]]
FACT_DOMAIN = [k for k, d in enumerate(DOMAINS) for _ in d["facts"]]


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Reference:
    """Loss of each fact as a function of u, with W_b + v u_b^T written into the weights."""

    def __init__(self, loaded, n_blocks: int):
        self.model = loaded.model
        self.anatomy = find_anatomy(self.model)
        self.n_blocks = n_blocks
        names = {id(m): n for n, m in self.model.named_modules()}
        self.modules = self.anatomy.down_projs[-n_blocks:]
        self.weight_names = [names[id(m)] + ".weight" for m in self.modules]
        self.ids = [torch.tensor([loaded.tokenizer(f)["input_ids"]]) for f in FACTS]

    def fact_logits(self, i, u, v):
        overrides = {}
        for b, (module, name) in enumerate(zip(self.modules, self.weight_names)):
            delta = torch.outer(v, u[b]) if type(module).__name__ != "Conv1D" else torch.outer(u[b], v)
            overrides[name] = module.weight + delta
        return torch.func.functional_call(self.model, overrides, (self.ids[i],), {"use_cache": False}).logits[0]

    def fact_loss(self, i, u, v):
        logits = self.fact_logits(i, u, v)
        return F.cross_entropy(logits[:-1], self.ids[i][0, 1:])

    def loss(self, u, v, weights):
        return sum(w * self.fact_loss(i, u, v) for i, w in enumerate(weights) if w != 0)

    def concept_vectors(self):
        sums = torch.zeros((len(DOMAINS), self.anatomy.d_model), dtype=torch.float64)
        with torch.no_grad():
            for i, ids in enumerate(self.ids):
                hidden = self.model(ids, output_hidden_states=True, use_cache=False).hidden_states[-1][0]
                sums[FACT_DOMAIN[i]] += hidden.mean(dim=0)
        counts = torch.tensor([len(d["facts"]) for d in DOMAINS], dtype=torch.float64)
        means = sums / counts[:, None]
        return means / means.norm(dim=1, keepdim=True)

    def curvature(self, kind, u, v, weights):
        """The dense Hessian (autograd.functional.hessian) or Gauss-Newton matrix in S_k."""
        if kind == "ggn":
            return self.ggn(u, v, weights)
        h = torch.autograd.functional.hessian(lambda uu: self.loss(uu, v, weights), u, vectorize=True)
        return h.reshape(u.numel(), u.numel())

    def ggn(self, u, v, weights):
        """J^T (diag p - p p^T) J summed over predicted tokens, J from autograd.functional.jacobian."""
        total = torch.zeros((u.numel(), u.numel()), dtype=torch.float64)
        for i, w in enumerate(weights):
            if w == 0:
                continue
            # Forward mode: D columns instead of (T-1) * vocab rows.
            jac = torch.autograd.functional.jacobian(lambda uu: self.fact_logits(i, uu, v)[:-1], u,
                                                     vectorize=True, strategy="forward-mode")
            jac = jac.reshape(jac.shape[0], jac.shape[1], -1)  # (T-1, V, D)
            probs = torch.softmax(self.fact_logits(i, u, v)[:-1].detach(), dim=-1)
            for t in range(jac.shape[0]):
                # J^T (diag p - p p^T) J without the vocab x vocab matrix
                jp = jac[t].T @ probs[t]
                total += (w / jac.shape[0]) * ((jac[t].T * probs[t]) @ jac[t] - torch.outer(jp, jp))
        return total


def _engine_pass(loaded, batch_size):
    anatomy = find_anatomy(loaded.model)
    encoded = encode_facts(loaded.tokenizer, FACTS, anatomy.max_positions)
    batches = make_batches(encoded, batch_size, "cpu")
    directions, norms, tokens = forward_pass(loaded.model, anatomy, batches, FACT_DOMAIN, len(DOMAINS))
    return anatomy, batches, directions, tokens


def test_concept_vectors_match_one_fact_at_a_time_and_ignore_batching(tiny64):
    ref = Reference(tiny64, 1).concept_vectors()
    for batch_size in (1, 3, 8):
        _, _, directions, tokens = _engine_pass(tiny64, batch_size)
        assert _rel(directions, ref) < 1e-6
    _, _, _, one = _engine_pass(tiny64, 1)
    _, _, _, many = _engine_pass(tiny64, 8)
    # Llama builds its rotary tables in float32, so batch shapes move the
    # float64 losses by ~1e-10: far inside the 1e-6 the engine promises.
    assert _rel(many.fact_losses, one.fact_losses) < 1e-8
    assert torch.allclose(directions.norm(dim=1), torch.ones(len(DOMAINS), dtype=torch.float64))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_structured_route_equals_reference_gradients_and_curvature(tiny64, curvature):
    anatomy, batches, directions, tokens = _engine_pass(tiny64, 4)
    reference = Reference(tiny64, 1)
    m = len(FACTS)
    u0 = torch.zeros((1, anatomy.d_ff), dtype=torch.float64)
    for k in (0, len(DOMAINS) - 1):
        v = directions[k]
        a, c = tail_coefficients(anatomy, tokens.h, tokens.targets, v, curvature)
        grads = structured_fact_gradients(tokens.x, tokens.token_fact, tokens.token_scale, a, m)
        hess = structured_hessian(tokens.x, tokens.token_scale / m, c)
        for i in (0, m // 2, m - 1):
            g_ref = torch.autograd.functional.jacobian(lambda u: reference.fact_loss(i, u, v), u0).reshape(-1)
            assert _rel(grads[i], g_ref) < 1e-6
        h_ref = reference.curvature(curvature, u0, v, [1.0 / m] * m)
        assert _rel(hess, h_ref) < 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_every_domain_coefficients_at_once_equal_double_backprop(tiny64, curvature):
    """The analysis takes every domain's a_t, c_t from one closed-form pass
    over the tokens; each column equals the per-domain double backward
    (GPT-2's LayerNorm and Llama's RMSNorm)."""
    anatomy, _, directions, tokens = _engine_pass(tiny64, 4)
    got = line_coefficients(anatomy, tokens, directions, curvature)
    assert got is not None, "the closed form should hold for RMSNorm and LayerNorm heads"
    for k in range(len(DOMAINS)):
        a_ref, c_ref = tail_coefficients(anatomy, tokens.h, tokens.targets, directions[k], curvature)
        assert _rel(got[0][:, k], a_ref) < 1e-6
        assert _rel(got[1][:, k], c_ref) < 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hvp_route_equals_reference(tiny64, curvature):
    """B = 2 (the general case; B = 1 on this route is pinned by the solver agreement tests)."""
    n_blocks = 2
    anatomy, batches, directions, tokens = _engine_pass(tiny64, 3)
    reference = Reference(tiny64, n_blocks)
    m = len(FACTS)
    v = directions[0]
    u0 = torch.zeros((n_blocks, anatomy.d_ff), dtype=torch.float64)
    obj = SubspaceObjective(tiny64.model, anatomy, batches, v, n_blocks, curvature)
    grads = obj.per_fact_gradients()
    for i in (0, 4, m - 1):
        g_ref = torch.autograd.functional.jacobian(lambda u: reference.fact_loss(i, u, v), u0).reshape(-1)
        assert _rel(grads[i], g_ref) < 1e-6
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
    dense = obj.dense("all", weights)
    h_ref = reference.curvature(curvature, u0, v, weights.tolist())
    if curvature == "ggn":
        assert float(torch.linalg.eigvalsh(dense)[0]) > -1e-10  # Gauss-Newton is PSD
    assert _rel(dense, h_ref) < 1e-6


@pytest.mark.parametrize("curvature,damping", [("hessian", 0.1), ("ggn", 1e-3)])
def test_z_and_mean_match_reference_solve(tiny64, curvature, damping):
    # The tiny Llama's Hessian is indefinite and nearly singular at lambda =
    # 1e-3: its condition number would amplify rounding past 1e-6, so the
    # Hessian case compares at a damping where the solve is well posed.
    config = AnalysisConfig(dtype="float64", estimator="paper", curvature=curvature, damping=damping)
    result = analyze(tiny64, DOMAINS, config)
    anatomy = find_anatomy(tiny64.model)
    reference = Reference(tiny64, 1)
    directions = reference.concept_vectors()
    m = len(FACTS)
    u0 = torch.zeros((1, anatomy.d_ff), dtype=torch.float64)
    for k, domain in enumerate(DOMAINS):
        v = directions[k]
        h = reference.curvature(curvature, u0, v, [1.0 / m] * m)
        rows = [i for i in range(m) if FACT_DOMAIN[i] == k]
        g = torch.stack([
            torch.autograd.functional.jacobian(lambda u: reference.fact_loss(i, u, v), u0).reshape(-1) for i in rows
        ])
        z = torch.linalg.solve(h + damping * torch.eye(anatomy.d_ff, dtype=torch.float64), g.mean(0))
        mean_ref = float(g.mean(0) @ z)
        got = result.domain(domain["name"])
        assert got.mean == pytest.approx(mean_ref, rel=1e-6, abs=1e-12)
        per_example = [e["influence"] for e in result.per_example if e["domain"] == domain["name"]]
        assert per_example == pytest.approx((g @ z).tolist(), rel=1e-6, abs=1e-12)
        assert sum(per_example) / len(per_example) == pytest.approx(got.mean, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("curvature,damping", [("hessian", 5.0), ("ggn", 0.05)])
def test_auto_exact_cg_agree(gpt2_64, curvature, damping):
    """Where H + lambda I is positive definite the three solvers give one answer."""
    means = {}
    for solver in ("auto", "exact", "cg"):
        config = AnalysisConfig(dtype="float64", estimator="paper", curvature=curvature, damping=damping,
                                solver=solver, saturation_points=20)
        result = analyze(gpt2_64, DOMAINS, config)
        means[solver] = [d.mean for d in result.domains]
        deltas = [d.delta_n_direct for d in result.domains]
        if solver == "cg":
            assert all(d.solver["converged"] and d.solver["rel_residual"] <= 1e-5 for d in result.domains)
            assert not any(d.solver["nonpositive_curvature"] for d in result.domains)
        means[solver + "_dn"] = deltas
    for solver in ("exact", "cg"):
        assert means[solver] == pytest.approx(means["auto"], rel=1e-5)
        assert [x is None for x in means[solver + "_dn"]] == [x is None for x in means["auto_dn"]]
        for a, b in zip(means[solver + "_dn"], means["auto_dn"]):
            if a is not None:
                assert a == pytest.approx(b, rel=1e-4)


def test_two_blocks_exact_auto_and_cg_agree(gpt2_64):
    """B = 2: auto means the dense HVP route; CG's solve and its saturation
    curve (one CG run per n) match the dense system."""
    damping = 5.0
    exact = analyze(gpt2_64, DOMAINS, AnalysisConfig(dtype="float64", estimator="paper", blocks=2, damping=damping,
                                                     solver="exact"))
    auto = analyze(gpt2_64, DOMAINS, AnalysisConfig(dtype="float64", estimator="paper", blocks=2, damping=damping))
    assert auto.extras["route"] == "exact"
    assert auto.extras["subspace_dim"] == 2 * find_anatomy(gpt2_64.model).d_ff
    assert [d.mean for d in auto.domains] == pytest.approx([d.mean for d in exact.domains], rel=1e-9)

    anatomy, batches, directions, tokens = _engine_pass(gpt2_64, 3)
    m, rows = len(FACTS), [0, 1, 2]
    # Gauss-Newton keeps H(n) + lambda I positive definite for every n, where
    # CG is defined; with the exact Hessian CG rightly gives up at small n.
    obj = SubspaceObjective(gpt2_64.model, anatomy, batches, directions[0], 2, "ggn")
    g = obj.per_fact_gradients()[rows].mean(0)
    w_all = torch.full((m,), 1.0 / m, dtype=torch.float64)
    w_k = torch.zeros(m, dtype=torch.float64)
    w_k[rows] = 1.0 / len(rows)
    base = damped(obj.dense("all", w_all), damping)
    cg = conjugate_gradient(lambda p: obj.matvec("all", w_all, p) + damping * p, g, rtol=1e-10)
    assert cg.converged and _rel(cg.x, torch.linalg.solve(base, g)) < 1e-6
    mu_cg = _cg_mu(obj, w_all, w_k, len(rows), m, g, damping, 1e-10, None)
    mu_dense = mu_function(DenseSystem(base, obj.dense("domain", w_k), len(rows), m), g)
    for n in (0.3, 3.0, 300.0):
        assert mu_cg(n) == pytest.approx(mu_dense(n), rel=1e-6)


def test_cg_reports_nonpositive_curvature(gpt2_64):
    """With no damping the exact Hessian of the tiny model is indefinite: CG must say so."""
    config = AnalysisConfig(dtype="float64", estimator="paper", damping=0.0, solver="cg", saturation_points=20)
    exact = analyze(gpt2_64, DOMAINS, AnalysisConfig(dtype="float64", estimator="paper", damping=0.0, solver="exact"))
    result = analyze(gpt2_64, DOMAINS, config)
    indefinite = [d.solver["nonpositive_curvature"] for d in exact.domains]
    assert any(indefinite), "the tiny model should have an indefinite Hessian in some subspace"
    for got, flag in zip(result.domains, indefinite):
        if flag:
            # CG stops at the first direction with p^T A p <= 0, or converges
            # before meeting one; it never claims convergence with a large residual.
            assert got.solver["nonpositive_curvature"] or got.solver["rel_residual"] <= 1e-5


def test_transfer_diagonal_equals_means(tiny64):
    result = analyze(tiny64, DOMAINS, AnalysisConfig(dtype="float64", estimator="paper"))
    matrix = result.extras["transfer"]["matrix"]
    for k, d in enumerate(result.domains):
        assert matrix[k][k] == pytest.approx(d.mean, rel=1e-9, abs=1e-15)
