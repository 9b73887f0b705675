"""Validation and rival estimators, each pinned to an independent computation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.pipelines.analysis import analyze
from dowsing.config import AnalysisConfig
from dowsing.kernels.curvature import tail_coefficients
from dowsing.kernels.forward import split_pass
from dowsing.kernels.subspace_terms import logit_line, tail_derivatives
from dowsing.estimators import EstimatorContext, EstimatorSettings, compute
from dowsing.estimators.subspace import domain_terms_of
from dowsing.access.models import load_model
from dowsing.kernels.solvers import lissa
from dowsing.validation.correlations import bootstrap_spearman, kendall, spearman
from dowsing.kernels.splitting import split_domains
from dowsing.validation.subspace_truth import subspace_response
from dowsing.validation.validate import ValidationConfig, ValidationResult, validate

DOMAINS = [
    {"name": "Physics", "facts": ["Energy is conserved in a closed system.", "Light travels faster than sound.",
                                  "Force equals mass times acceleration of a body.",
                                  "Heat flows from hot bodies to cold ones."]},
    {"name": "Biology", "facts": ["Cells are the basic unit of life.", "DNA carries genetic information.",
                                  "Plants make sugar by photosynthesis.", "The heart pumps blood through the body."]},
    {"name": "Economics", "facts": ["Inflation reduces the purchasing power of money.",
                                    "Prices rise when demand exceeds supply.",
                                    "Banks lend out part of their deposits.", "Taxes fund public services."]},
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))


def test_lissa_converges_to_the_exact_solve_on_a_well_conditioned_system():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, 3.0, 20, dtype=torch.float64)) @ q.T
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    report = lissa(lambda p, j: a @ p, b, scale=4.0, depth=400, full_matvec=lambda p: a @ p)
    assert float((report.x - exact).norm() / exact.norm()) < 1e-8
    assert report.converged and report.rel_residual < 1e-8
    # minibatch products: A = mean of four parts, each step sees one of them
    parts = [a + d for d in (0.3 * torch.diag(torch.randn(20, generator=gen, dtype=torch.float64)) for _ in range(3))]
    parts.append(4 * a - sum(parts))
    noisy = lissa(lambda p, j: parts[j % 4] @ p, b, scale=12.0, depth=3000, repeats=4, full_matvec=lambda p: a @ p)
    assert float((noisy.x - exact).norm() / exact.norm()) < 0.1


def test_lissa_says_when_it_diverges():
    a = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))  # indefinite: the series cannot converge
    report = lissa(lambda p, j: a @ p, torch.ones(2, dtype=torch.float64), scale=2.0, depth=5000,
                   full_matvec=lambda p: a @ p)
    assert not report.converged


def test_rank_correlations_match_scipy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=9), rng.normal(size=9)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2, float("nan")], [1, 2, 3]) is None
    low, high = bootstrap_spearman([rng.normal(k, 0.1, 20) for k in range(4)],
                                   [rng.normal(k, 0.1, 20) for k in range(4)], 200, seed=0)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_split_is_seeded_disjoint_and_honours_a_given_held_out_list():
    train, held = split_domains(DOMAINS, seed=3)
    again, _ = split_domains(DOMAINS, seed=3)
    assert [d.facts for d in train] == [d.facts for d in again]
    for d, t, h in zip(DOMAINS, train, held):
        assert sorted(t.facts + h.facts) == sorted(d["facts"]) and not set(t.facts) & set(h.facts)
    given = {d["name"]: ["A new sentence about " + d["name"] + "."] for d in DOMAINS}
    train, held = split_domains(DOMAINS, held_out=given)
    assert [list(h.facts) for h in held] == list(given.values())
    with pytest.raises(ValueError):
        split_domains(DOMAINS, held_out={"Physics": ["x y"]})


def test_line_derivatives_equal_double_backprop(tiny64):
    train, held = split_domains(DOMAINS, seed=0)
    split = split_pass(tiny64, train, held)
    line = logit_line(split)
    assert line.ok
    tokens = split.tokens
    idx = torch.arange(tokens.h.shape[0])
    for k in range(len(train)):
        v = split.directions[k]
        _, a, c, c_ggn = line.derivatives(v, idx, tokens.targets)
        a_ref, c_ref = tail_coefficients(split.anatomy, tokens.h, tokens.targets, v, "hessian")
        _, g_ref = tail_coefficients(split.anatomy, tokens.h, tokens.targets, v, "ggn")
        for got, want in ((a, a_ref), (c, c_ref), (c_ggn, g_ref)):
            assert float((got - want).norm() / want.norm()) < 1e-6
        s = torch.linspace(-2.0, 2.0, len(idx), dtype=torch.float64)
        for got, want in zip(line.derivatives(v, idx, tokens.targets, s),
                             tail_derivatives(split.anatomy, tokens.h, tokens.targets, v, s)):
            assert float((got - want).norm() / want.norm()) < 1e-6


def test_default_estimator_equals_the_engine_on_the_training_half(tiny64):
    train, held = split_domains(DOMAINS, seed=0)
    split = split_pass(tiny64, train, held)
    scores = compute(EstimatorContext(tiny64, split, EstimatorSettings(damping=2.0)),
                     ("paper", "influence_cg", "tracin", "mean_loss"))
    by_name = {s.name: s for s in scores}
    result = analyze(tiny64, train, AnalysisConfig(dtype="float64", damping=2.0))
    engine = [d.mean for d in result.domains]
    assert by_name["paper"].priority == pytest.approx(engine, rel=1e-6)
    # with lambda = 2 the system is positive definite, and CG agrees with the dense solve
    assert by_name["influence_cg"].priority == pytest.approx(engine, rel=1e-6)
    # the analysis batches each domain's facts on their own, the split pass all of them together: Llama's
    # float32 rotary tables move float64 losses by a few 1e-9 between batch shapes
    assert by_name["mean_loss"].priority == pytest.approx(result.extras["domain_loss"], rel=1e-7)
    for k, s in enumerate(by_name["paper"].per_example):
        assert np.mean(s) == pytest.approx(by_name["paper"].priority[k], rel=1e-9)


def test_subspace_ground_truth_matches_influence_as_eps_goes_to_zero(tiny64):
    train, held = split_domains(DOMAINS, seed=0)
    split = split_pass(tiny64, train, held)
    terms = domain_terms_of(EstimatorContext(tiny64, split, EstimatorSettings(damping=1.0)))
    eps = (1e-4, 1e-3, 1e-2)
    errors = []
    for k in range(len(train)):
        resp = subspace_response(split, terms, k, eps, damping=1.0, newton_steps=8)
        assert all(n["rel_gradient"] < 1e-6 for n in resp["newton"])
        realised, predicted = np.asarray(resp["realised"]), np.asarray(resp["predicted"])
        # relative error of the whole vector of held-out changes, per eps
        errors.append(np.linalg.norm(realised - predicted, axis=1) / np.linalg.norm(predicted, axis=1))
    errors = np.asarray(errors)
    assert (errors[:, 0] < 1e-2).all()
    assert (errors[:, 0] <= errors[:, -1] + 1e-12).all()


def _saturate(folder, facts, steps=60, lr=1e-2):
    """Fine-tune a tiny model hard on some facts until their loss is near zero."""
    from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches, per_fact_losses

    loaded = load_model(str(folder), dtype="float32")
    net = loaded.model
    for p in net.parameters():
        p.requires_grad_(True)
    encoded = encode_facts(loaded.tokenizer, facts, find_anatomy(net).max_positions)
    (ids, mask, _), = make_batches(encoded, len(facts), "cpu")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = per_fact_losses(net(input_ids=ids, attention_mask=mask).logits, ids, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return loaded, float(loss.detach())


def _templated(name, words, kind):
    """Facts that share their words, so a tiny model learns a domain's held-out
    facts from its training facts."""
    return {"name": name, "facts": [f"{a} and {b} and {c} are {kind}." for a, b, c in
                                    list(itertools.permutations(words))[:4]]}


def test_a_saturated_domain_comes_last_in_validation_and_in_dowsing(tiny_gpt2_embedded_dir):
    domains = [_templated("Colors", ["Red", "blue", "green"], "colors"),
               _templated("Animals", ["Cats", "dogs", "birds"], "animals"),
               _templated("Metals", ["Iron", "copper", "gold"], "metals")]
    saturated = "Animals"
    loaded, final_loss = _saturate(tiny_gpt2_embedded_dir, domains[1]["facts"], steps=100)
    assert final_loss < 0.5  # against 8 to 12 nats on the other domains
    config = ValidationConfig(eps=(0.01,), damping=1.0, finetune_steps=10, finetune_lr=1e-2, finetune_blocks=2,
                              estimators=("paper", "influence_ggn", "mean_loss"), bootstrap=50,
                              subspace=False)
    result = validate(loaded, domains, config)
    names = result.domains
    assert names[int(np.argmin(result.finetune["gain"]))] == saturated
    ggn = next(e for e in result.estimators if e["name"] == "influence_ggn")
    assert names[int(np.argmin(ggn["priority"]))] == saturated
    loss = next(e for e in result.estimators if e["name"] == "mean_loss")
    assert names[int(np.argmin(loss["priority"]))] == saturated
    engine = analyze(loaded, domains, AnalysisConfig(damping=1.0, estimator="mean_loss"))
    assert engine.domain(saturated).rank == len(domains)
    # the default ranking (pilot fine-tunes on each domain's halves): training on half of the saturated
    # domain's facts does not lower the other half's loss, and the diagnosis says so
    pilots = analyze(loaded, domains, AnalysisConfig(damping=1.0))
    drop = next(d for d in pilots.extras["diagnosis"] if d["domain"] == saturated)
    assert drop["pilot_drop"] <= 0 and drop["kind"] in ("saturated", "known")
    assert pilots.domain(saturated).rank > pilots.domain("Colors").rank
    # the result survives JSON
    again = ValidationResult.from_json(result.to_json())
    assert again.leaderboard[0]["estimator"] == result.leaderboard[0]["estimator"]
    assert len(again.table()) == 3


def test_exactness_check_agrees_where_the_system_is_positive_definite(tiny64):
    from dowsing.validation.validate import exactness_check

    check = exactness_check(tiny64, DOMAINS, damping=5.0, max_facts=3)
    assert not check["nonpositive_curvature"]
    assert check["rel_error"] < 1e-6
