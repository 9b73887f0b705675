"""The benchmark: each building block against an independent computation,
the quick benchmark end to end through the CLI, bad input, and the page."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.kernels.alignment import (adam_preconditioner, capture_block_inputs, domain_alignment, tail_grad_fn,
                               tail_model, tail_parameters)
from dowsing.access.models import load_model
from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches, per_fact_losses
from dowsing.validation.correlations import domain_bootstrap, spearman
from dowsing.kernels.training import Recipe
from dowsing.validation.finetune import measured_delta_n
from dowsing.validation.leaderboard import choose_winner, reliability
from dowsing.domains import benchmark_domains, benchmark_groups

REPO = Path(__file__).resolve().parent.parent
FACTS = ["The cat sat on the mat today.", "Water boils at one hundred degrees.", "Paris is the capital of France.",
         "Bees make honey from the nectar of flowers.", "The violin has four strings.",
         "Iron rusts when it meets water and air."]



def float64_rel(loaded) -> float:
    """Relative tolerance of a float64 comparison on a tiny model: Llama's
    RMSNorm (transformers) computes in float32 whatever the model's dtype, so
    two float64 routes through it agree only to float32-level rounding."""
    return 2e-5 if "llama" in loaded.info.architecture.lower() else 1e-6

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))


# --- data -------------------------------------------------------------------------------------------------


def test_shipped_benchmark_has_power_and_every_group():
    from dowsing.domains import HARD_KINDS, hard_case_domains
    from dowsing.validation.benchmark import BenchmarkConfig, check_domains

    ordinary = benchmark_domains(hard=False)
    groups = benchmark_groups()
    assert len(ordinary) >= 24 and all(len(d.facts) >= 60 for d in ordinary)
    assert {groups[d.name] for d in ordinary} == {"everyday", "encyclopedic", "specialist", "language", "invented"}
    assert sum(groups[d.name] == "invented" for d in ordinary) >= 2
    # the default benchmark scores the hard cases too, each grouped by its kind
    domains = benchmark_domains()
    assert [d.name for d in domains] == [d.name for d in ordinary + hard_case_domains()]
    # every shipped domain fills the default collection protocol (sample 16, test 12, pool 32)
    assert len(check_domains(domains, BenchmarkConfig())) == len(domains)
    assert {groups[d.name] for d in domains} == {"everyday", "encyclopedic", "specialist", "language",
                                                 "invented", *HARD_KINDS}
    # the quick set: six ordinary domains and one hard case of each kind, each filling the quick protocol
    quick = benchmark_domains(quick=True)
    assert len(quick) == 11 and {d.name for d in quick} <= {d.name for d in domains}
    assert sum(groups[d.name] in HARD_KINDS for d in quick) == len(HARD_KINDS)
    assert {groups[d.name] for d in quick if groups[d.name] in HARD_KINDS} == set(HARD_KINDS)
    assert len(check_domains(quick, BenchmarkConfig.quick())) == 11
    every = [f for d in domains for f in d.facts]
    assert len(every) == len(set(every))


# --- statistics -------------------------------------------------------------------------------------------


def test_domain_bootstrap_equals_a_direct_loop():
    rng = np.random.default_rng(3)
    p, g, b = rng.normal(size=12), rng.normal(size=12), rng.normal(size=12)
    g = g + 2 * p  # a real relation, so rho is far from 0
    out = domain_bootstrap(p, g, b, resamples=300, seed=7)
    draw = np.random.default_rng(7)
    rhos, diffs = [], []
    for _ in range(300):
        idx = draw.integers(0, 12, 12)
        r = stats.spearmanr(p[idx], g[idx]).statistic
        rhos.append(r)
        diffs.append(r - stats.spearmanr(b[idx], g[idx]).statistic)
    assert out["rho"] == pytest.approx([np.percentile(rhos, 5), np.percentile(rhos, 95)])
    assert out["diff"] == pytest.approx([np.percentile(diffs, 5), np.percentile(diffs, 95)])
    assert out["diff_p_le_0"] == pytest.approx(np.mean(np.asarray(diffs) <= 0))
    assert out["rho"][0] > 0.3


def test_reliability_is_scipy_spearman_and_spearman_brown():
    a, b, c = [1.0, 2.0, 3.0, 5.0, 4.0], [1.1, 2.5, 2.9, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]
    out = reliability({"x": [a, b], "y": [c, c]})
    r = stats.spearmanr(a, b).statistic
    assert out["between_seeds"]["x"]["spearman"] == pytest.approx(r)
    assert out["between_seeds"]["x"]["spearman_brown"] == pytest.approx(2 * r / (1 + r))
    pair = out["between_recipes"][0]
    assert pair["spearman"] == pytest.approx(stats.spearmanr(np.mean([a, b], axis=0), c).statistic)


def test_winner_is_the_best_rho_and_ties_go_to_the_cheaper():
    rows = [{"estimator": "slow", "spearman_main": 0.80, "time_s": 90.0},
            {"estimator": "fast", "spearman_main": 0.79, "time_s": 5.0},
            {"estimator": "bad", "spearman_main": 0.20, "time_s": 1.0}]
    assert choose_winner(rows) == "fast"
    assert choose_winner(rows, tie=0.0) == "slow"


def test_measured_saturation_reads_the_marginal_gain():
    points = [[0, 10.0], [4, 9.0], [8, 8.5], [16, 8.3], [32, 8.28]]
    out = measured_delta_n(points)
    assert out["marginal"][0] == [4, pytest.approx(0.25)]
    assert [r for _, r in out["ratio"]] == pytest.approx([1.0, 0.5, 0.1, 0.005])
    assert out["delta_n_10pct"] == 16
    flat = measured_delta_n([[0, 1.0], [4, 0.9], [8, 0.8]])
    assert flat["delta_n_10pct"] is None and "stayed above" in flat["reason"]


def test_recipes_reject_nonsense():
    with pytest.raises(ValueError, match="optimizer"):
        Recipe("x", "adagrad")
    with pytest.raises(ValueError, match="lr"):
        Recipe("x", lr=0.0)


# --- gradient alignment against autograd on the full model -------------------------------------------------


def _full_model_fact_grads(loaded, facts, blocks):
    """Per-fact gradients of l_i on the whole model (no cached inputs, no
    truncation) over the last `blocks` blocks and the final norm."""
    net = loaded.model
    anatomy = find_anatomy(net)
    names = [n for n, _ in net.named_parameters()]
    depth = len(anatomy.down_projs)
    keep = [f".{i}." for i in range(depth - blocks, depth)]
    chosen = [p for n, p in net.named_parameters()
              if (any(k in n for k in keep) and ("layers" in n or ".h." in n))
              or n.endswith(("model.norm.weight", "ln_f.weight", "ln_f.bias"))]
    assert chosen and len(names) > len(chosen)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    encoded = encode_facts(loaded.tokenizer, facts, anatomy.max_positions)
    grads = []
    for ids in encoded.ids:
        input_ids = torch.tensor([ids])
        mask = torch.ones_like(input_ids)
        loss = per_fact_losses(net(input_ids=input_ids, attention_mask=mask).logits, input_ids, mask)[0]
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, chosen)]))
    return torch.stack(grads)


def test_alignment_equals_explicit_sums_over_autograd_gradients(tiny64):
    blocks = 1
    facts = FACTS
    g = _full_model_fact_grads(tiny64, facts, blocks)
    n = len(facts)
    rows, query = [0, 1, 2, 3], [4, 5]
    # the same seeded minibatches as adam_preconditioner, squared mean gradients
    rng = random.Random(11)
    v = torch.zeros(g.shape[1], dtype=torch.float64)
    for _ in range(3):
        pick = rng.sample(list(range(n)), 2)
        v += g[pick].mean(dim=0) ** 2
    p_adam = 1.0 / ((v / 3).sqrt() + 1e-8)

    net = tiny64.model
    anatomy = find_anatomy(net)
    depth = len(anatomy.down_projs)
    encoded = encode_facts(tiny64.tokenizer, facts, anatomy.max_positions)
    inputs = capture_block_inputs(net, make_batches(encoded, 4, "cpu"), depth - blocks)
    work, embed = tail_model(net, depth - blocks)
    params = tail_parameters(work, blocks)
    assert sum(p.numel() for p in params) == g.shape[1]
    grad_of = tail_grad_fn(work, embed, encoded.ids, inputs, params)
    precond = adam_preconditioner(grad_of, list(range(n)), 2, 3, seed=11)
    flat_p = torch.cat([x.reshape(-1) for x in precond]).to(torch.float64)
    assert torch.allclose(flat_p, p_adam.to(torch.float32).to(torch.float64), rtol=1e-5)
    out = domain_alignment(grad_of, rows, {"plain": None, "adam": precond}, query_rows=query)
    for name, weight in (("plain", torch.ones_like(p_adam)), ("adam", flat_p)):
        pairs = [float(g[i] @ (weight * g[j])) for i in rows for j in rows if i != j]
        assert out[name].pairs == pytest.approx(np.mean(pairs), rel=float64_rel(tiny64))
        per_fact = [np.mean([float(g[i] @ (weight * g[j])) for j in rows if j != i]) for i in rows]
        assert out[name].per_fact_pairs == pytest.approx(per_fact, rel=float64_rel(tiny64))
        q = g[query].mean(dim=0)
        assert out[name].query == pytest.approx(float(g[rows].mean(dim=0) @ (weight * q)), rel=float64_rel(tiny64))


# --- the quick benchmark end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tiny_llama_dir, tmp_path_factory):
    """`python -m dowsing benchmark --quick` on the tiny Llama, once; with 100 bootstrap
    resamples instead of 500 (half the run's time; no test reads their number), three doses
    (so the extrapolation has two points below the largest) and the plan check at two budgets."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench.json"
    config = folder / "config.json"
    config.write_text(json.dumps({"bootstrap": 100, "doses": [2, 4, 8], "plan_budgets": [22, 55]}))
    proc = subprocess.run(
        [sys.executable, "-m", "dowsing", "benchmark", "--quick", "--model", str(tiny_llama_dir), "--out", str(out),
         "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
        env={**__import__("os").environ, "DOWSING_CACHE": str(folder / "cache")})
    return proc, out


def test_quick_benchmark_cli_writes_a_leaderboard_that_recomputes(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Winner:" in proc.stdout and "[" in proc.stderr  # progress lines
    result = json.loads(out.read_text())
    config = result["config"]
    # six ordinary domains and one hard case of each kind; one recipe, read at the largest dose and (second
    # reading) with each domain's own sample added
    assert len(result["domains"]) == 11 and config["seeds"] == 2 and len(config["recipes"]) == 1
    assert set(result["truth"]) == {"adamw", "adamw_sample"}
    # the collection protocol: per domain a sample (halved for the estimators), test facts and a pool, disjoint
    split = result["split"]
    for name in result["domains"]:
        sample, test, pool = split["sample"][name], split["test"][name], split["pool"][name]
        assert (len(sample), len(test), len(pool)) == (config["sample_facts"], config["test_facts"],
                                                       max(config["doses"]))
        assert len(set(sample) | set(test) | set(pool)) == len(sample) + len(test) + len(pool)
        assert sorted(split["train"][name] + split["held_out"][name]) == sorted(sample)
    # every rho on the leaderboard is scipy's Spearman of the priority and the seed-averaged gain
    for row in result["leaderboard"]:
        for name, cell in row["recipes"].items():
            gain = np.mean(result["truth"][name]["gains"], axis=0)
            want = stats.spearmanr(row["priority"], gain).statistic
            assert cell["spearman"] == pytest.approx(want)
            if row["estimator"] != "mean_loss":
                base = next(r for r in result["leaderboard"] if r["estimator"] == "mean_loss")
                assert cell["diff_vs_mean_loss"] == pytest.approx(
                    want - stats.spearmanr(base["priority"], gain).statistic)
            assert len(cell["per_seed"]) == 2
            lo, hi = cell["interval"]
            assert lo is None or lo <= hi
    estimators = {r["estimator"] for r in result["leaderboard"]}
    assert {"paper", "mean_loss", "alignment_adam", "heldout_influence", "ekfac", "pilot_gain", "pilot_curve",
            "lookahead_sign"} <= estimators
    main = [r for r in result["leaderboard"] if r["recipes"][config["main_recipe"]]["spearman"] is not None]
    best = max(r["recipes"][config["main_recipe"]]["spearman"] for r in main)
    winner = next(r for r in main if r["estimator"] == result["winner"])
    assert winner["recipes"][config["main_recipe"]]["spearman"] >= best - 0.02
    # ground truth: real fine-tunes moved the test losses, differently per domain; the ranking target is the
    # gain at the largest dose
    truth = result["truth"]["adamw"]
    gains = truth["gains"]
    assert len(gains) == 2 and np.ptp(gains[0]) > 0
    assert gains == truth["dose_gains"][str(max(config["doses"]))]
    assert truth["gain"] == pytest.approx(np.mean(gains, axis=0).tolist())
    assert result["reliability"]["between_seeds"]["adamw"]["spearman"] == pytest.approx(
        stats.spearmanr(gains[0], gains[1]).statistic)
    # per-group leaderboards: the hard cases and the ordinary domains, each rho scipy's on that subset
    groups = [result["groups"][n] for n in result["domains"]]
    hard_kinds = {"noise", "scrambled", "contradiction", "grab-bag", "redundant"}
    by_group = result["group_leaderboards"]
    assert by_group["hard"]["n_domains"] == 5 and by_group["ordinary"]["n_domains"] == 6
    for name, keep in (("hard", lambda g: g in hard_kinds), ("ordinary", lambda g: g not in hard_kinds)):
        idx = [i for i, g in enumerate(groups) if keep(g)]
        target = np.mean(gains, axis=0)[idx]
        for row in by_group[name]["rows"]:
            priority = next(r["priority"] for r in result["leaderboard"] if r["estimator"] == row["estimator"])
            want = stats.spearmanr(np.asarray(priority)[idx], target).statistic
            assert row["spearman"] == pytest.approx(want) if not np.isnan(want) else row["spearman"] is None
    assert result["default"]["estimator"] in estimators
    # dose-response curves: the baseline's test loss, then each dose, beside the predicted saturation
    assert len(result["curves"]) == 3
    for curve in result["curves"]:
        k = result["domains"].index(curve["domain"])
        points = curve["measured"]["points"]
        assert [p[0] for p in points] == [0] + config["doses"]
        assert points[0][1] == pytest.approx(truth["baseline_loss"][k])
        for n, loss in points[1:]:
            gain = np.mean([g[k] for g in truth["dose_gains"][str(n)]])
            assert loss == pytest.approx(truth["baseline_loss"][k] - gain)
        assert len(curve["predicted"]["ratio"]) == len(config["doses"])


def test_quick_benchmark_checks_the_plan_by_training_on_it(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Plan check" in proc.stdout and "Extrapolation to 8 added facts" in proc.stdout
    result = json.loads(out.read_text())
    check, truth = result["plan_check"], result["truth"]["adamw"]
    assert [b["budget"] for b in check["budgets"]] == [22, 55]
    n = len(result["domains"])
    for entry in check["budgets"]:
        counts = entry["counts"]
        assert sum(counts["even"]) == sum(counts["proportional"]) == entry["budget"]
        assert sum(counts["plan"]) <= entry["budget"] and sum(counts["plan_weighted"]) <= entry["budget"]
        assert all(0 <= m <= 8 for c in counts.values() for m in c)  # a pool of 8 facts per domain
        assert sum(counts["ranking"]) == entry["budget"]
        # the Plan page's recommendation is the plan or the even split, and shares that allocation's run
        assert counts["recommended"] in (counts["plan"], counts["even"])
        same = "plan" if counts["recommended"] == counts["plan"] else "even"
        assert entry["realised_per_domain"]["recommended"] == entry["realised_per_domain"][same]
        for name in ("plan", "plan_weighted", "recommended", "even", "proportional", "ranking"):
            per_domain = entry["realised_per_domain"][name]
            assert len(per_domain) == n and len(entry["realised"][name]["per_seed"]) == 2
            assert entry["realised"][name]["mean"] == pytest.approx(np.mean(per_domain))
        for plan, other in itertools.product(("plan", "plan_weighted", "recommended"),
                                             ("even", "proportional", "ranking")):
            diff = entry[f"{plan}_minus"][other]
            assert diff["diff"] == pytest.approx(entry["realised"][plan]["mean"] - entry["realised"][other]["mean"])
            assert diff["interval"][0] <= diff["diff"] <= diff["interval"][1]
        # a domain without a curve gets nothing
        for name, m, w in zip(result["domains"], counts["plan"], counts["plan_weighted"]):
            if check["curves"][name]["form"] is None:
                assert m == w == 0
    # the weighted plan counts each sample as its weight in the runs: 8 facts x 8 (largest dose) / 88 base facts
    assert check["have"] == {"sample": 8, "weighted": pytest.approx(8 * 8 / 88)}
    ex = check["extrapolation"]
    assert ex["fit_doses"] == [2, 4] and ex["target"] == 8 and len(ex["rows"]) == n
    for k, row in enumerate(ex["rows"]):
        assert row["measured"] == pytest.approx(np.mean([g[k] for g in truth["dose_gains"]["8"]]))
    assert set(check["saturation"]) == {c["domain"] for c in result["curves"]}


def test_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    # in this process (quick_run is the real `python -m dowsing benchmark`)
    from dowsing.cli import main

    short = tmp_path / "short.json"
    short.write_text(json.dumps({"domains": [{"name": "A", "facts": FACTS[:3]}, {"name": "B", "facts": FACTS[3:] + ["Snow is cold."]}]}))
    out = tmp_path / "out.json"
    code = main(["benchmark", "--domains", str(short), "--model", str(tiny_llama_dir), "--out", str(out)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'A' has 3 facts" in lines[0]
    assert not out.exists()
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"recipes": [{"name": "x", "optimizer": "adagrad"}], "main_recipe": "x"}))
    code = main(["benchmark", "--config", str(bad_config), "--out", str(out)])
    assert code == 2 and "optimizer" in capsys.readouterr().err and not out.exists()
    for budgets, said in (("0", "whole number of examples >= 1"), ("12,x", "numbers separated by commas"),
                          ("100000", "more than the domains' pools hold")):
        code = main(["benchmark", "--quick", "--plan-budgets", budgets, "--model", str(tiny_llama_dir), "--out",
                     str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and said in lines[0] and not out.exists()


def test_few_domains_warn_that_rho_has_no_power(tiny_llama_dir, tmp_path):
    from dowsing.validation.benchmark import BenchmarkConfig, run_benchmark
    from dowsing.domains import Domain

    # six facts each: the smallest collection protocol (a sample of 4, 1 test fact, a dose of 1)
    domains = [Domain(n, tuple(f"{n} fact number {i} is about {n.lower()}." for i in range(6)))
               for n in ("Alpha", "Beta", "Gamma")]
    config = BenchmarkConfig.quick(estimators=("mean_loss", "alignment"), seeds=1, curve_domains=(),
                                   recipes=(Recipe("adamw", steps=1, blocks=1),), align_blocks=1, bootstrap=50,
                                   max_facts=0, sample_facts=4, test_facts=1, doses=(1,))
    with pytest.warns(UserWarning, match="no power"):
        result = run_benchmark(load_model(str(tiny_llama_dir)), domains, config)
    assert result.warnings and len(result.domains) == 3


def test_benchmark_page_shows_the_run(quick_run, tiny_llama_dir, tmp_path, monkeypatch):
    """The page finds a finished benchmark job in the cache and shows its
    leaderboard, reliability, scatter and learning curves from its result."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    proc, out = quick_run
    assert proc.returncode == 0
    cache = tmp_path / "cache"
    monkeypatch.setenv("DOWSING_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st.cache_resource.clear()
    from dowsing.background.jobs import JobState, JobStore, now_iso
    from dowsing.validation.benchmark import BenchmarkResult

    store = JobStore()
    store.write_result("b" * 64, "benchmark", BenchmarkResult.from_json(out.read_text()))
    store.put(JobState(job_id="b" * 64, status="done", created_at=now_iso(), run_id="run1",
                       request={"kind": "benchmark", "model_id": str(tiny_llama_dir), "domains": []}))
    store.close()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_llama_dir)
    at.run()
    at.switch_page("pages/benchmark.py")
    at.run()
    assert not at.exception, at.exception
    result = json.loads(out.read_text())
    table = at.dataframe[0].value
    assert len(table) == len(result["leaderboard"])
    main = result["config"]["main_recipe"]
    by_label = {r["label"]: r["recipes"][main]["spearman"] for r in result["leaderboard"]}
    for label, rho in zip(table["Estimator"], table["ρ"]):
        assert rho == pytest.approx(by_label[label]) if by_label[label] is not None else np.isnan(rho)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any("Spearman ρ against the realised" in t for t in titles)
    assert any("priority against realised held-out gain" in t for t in titles)
    assert sum("learning curve" in t for t in titles) == len(result["curves"])
    st.cache_resource.clear()


def test_derivatives_of_all_directions_at_once_equal_the_per_direction_twin(tiny64):
    from dowsing.kernels.forward import split_pass
    from dowsing.kernels.subspace_terms import all_domain_terms, domain_terms
    from dowsing.kernels.splitting import split_domains

    domains = [{"name": n, "facts": FACTS[2 * i: 2 * i + 2] + [f"{n} is a letter of the alphabet."]}
               for i, n in enumerate(("A", "B", "C"))]
    train, held = split_domains(domains, 0)
    split = split_pass(tiny64, train, held)
    fast = all_domain_terms(split)
    for k in range(len(train)):
        slow = domain_terms(split, k)
        for name in ("a", "c", "c_ggn", "grads", "hessian"):
            got, want = getattr(fast[k], name), getattr(slow, name)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max())), name
