"""Per-domain units: an analysis after an edit computes only the edited
domain's pilot curve, one after adding a domain only the new domain's, a
plan after an analysis of the same domains computes none, and each such
result equals the one computed from scratch (to 1e-6 in float64, the same
ranking in float32). Computations are counted where they happen: the calls
of `pilots.pilot_curve`, and the forward passes of the plan."""
from __future__ import annotations

import pytest

from dowsing.kernels import pilots
from dowsing.pipelines.analysis import run_analysis
from dowsing.config import AnalysisConfig
from dowsing.domains import Domain, as_domains
from dowsing.estimators import pilot as pilot_family

WORDS = {"Alpha": "red", "Beta": "green", "Gamma": "blue", "Delta": "gold", "Omega": "grey"}


def _domain(name: str, n: int = 8) -> Domain:
    word = WORDS[name]
    return Domain(name, tuple(f"{name} item {i} is kept in the {word} box number {i * 7 % 5}." for i in range(n)))


FOUR = [_domain(n) for n in ("Alpha", "Beta", "Gamma", "Delta")]


def _edited(domains: list, k: int) -> list:
    out = list(domains)
    facts = list(out[k].facts)
    facts[3] = facts[3].replace("box", "crate")
    out[k] = Domain(out[k].name, tuple(facts))
    return out


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh cache, and a list that grows by one for each pilot curve
    actually run (in an analysis or a plan)."""
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))
    calls = []
    real = pilots.pilot_curve

    def counting(trainer, recipe, seed, rows_a, rows_b, sizes=pilots.PILOT_SIZES):
        calls.append(len(rows_a) + len(rows_b))
        return real(trainer, recipe, seed, rows_a, rows_b, sizes)

    monkeypatch.setattr(pilot_family, "pilot_curve", counting)
    import dowsing.pipelines.plan

    monkeypatch.setattr(dowsing.pipelines.plan, "pilot_curve", counting)
    return calls


def _same(a, b, tol: float) -> None:
    assert [d.name for d in a.domains] == [d.name for d in b.domains]
    assert [d.rank for d in a.domains] == [d.rank for d in b.domains]
    for x, y in zip(a.domains, b.domains):
        assert x.priority == pytest.approx(y.priority, abs=tol, rel=tol)
        assert x.mean == pytest.approx(y.mean, abs=tol, rel=tol)
    for x, y in zip(a.per_example, b.per_example):
        assert x["priority"] == pytest.approx(y["priority"], abs=tol, rel=tol)
    assert [d["kind"] for d in a.extras["diagnosis"]] == [d["kind"] for d in b.extras["diagnosis"]]
    for x, y in zip(a.extras["ranking"]["priority_interval"], b.extras["ranking"]["priority_interval"]):
        assert x == pytest.approx(y, abs=tol, rel=tol)


def test_an_edit_recomputes_one_domain_and_equals_a_fresh_analysis_in_float64(tiny_llama_dir, counted):
    from dowsing.pipelines.analysis import pilot_status

    model, config = str(tiny_llama_dir), AnalysisConfig(dtype="float64")
    assert pilot_status(model, FOUR, config)["message"] == "all 4 domains computed"
    first = run_analysis(model, FOUR, config)
    assert len(counted) == 4 and first.extras["units"]["pilot"]["reused"] == []

    counted.clear()
    edited = _edited(FOUR, 1)
    # told before the run, without the model
    assert pilot_status(model, edited, config) == {"computed": ["Beta"], "reused": ["Alpha", "Gamma", "Delta"],
                                                   "no_pilot": [], "message": "1 of 4 domains recomputed, 3 from cache"}
    said = []
    incremental = run_analysis(model, edited, config, progress=lambda p: said.append(p.message))
    assert len(counted) == 1
    assert "pilot curves: 1 of 4 domains recomputed, 3 from cache" in said
    assert "pilot fine-tunes, domain 1 of 4 (from cache)" in said and "pilot fine-tunes, domain 2 of 4" in said
    assert incremental.extras["units"]["pilot"] == {"computed": ["Beta"], "reused": ["Alpha", "Gamma", "Delta"]}
    fresh = run_analysis(model, edited, config, use_cache=False)
    _same(incremental, fresh, 1e-6)

    counted.clear()
    five = edited + [_domain("Omega")]
    added = run_analysis(model, five, config)
    assert len(counted) == 1
    assert added.extras["units"]["pilot"]["computed"] == ["Omega"]
    _same(added, run_analysis(model, five, config, use_cache=False), 1e-6)
    # a domain's curve depends on neither its neighbours nor its position
    shuffled = run_analysis(model, five[::-1], config, use_cache=False)
    by_name = {d.name: d.priority for d in shuffled.domains}
    for d in added.domains:
        assert d.priority == pytest.approx(by_name[d.name], rel=1e-6, abs=1e-9)


def test_the_same_ranking_after_an_edit_in_float32(tiny_gpt2_dir, counted):
    model, config = str(tiny_gpt2_dir), AnalysisConfig()
    run_analysis(model, FOUR, config)
    edited = _edited(FOUR, 2)
    counted.clear()
    incremental = run_analysis(model, edited, config)
    assert len(counted) == 1
    fresh = run_analysis(model, edited, config, use_cache=False)
    assert [d.rank for d in incremental.domains] == [d.rank for d in fresh.domains]
    assert [d.priority for d in incremental.domains] == pytest.approx([d.priority for d in fresh.domains], rel=1e-3,
                                                                      abs=1e-5)


def test_a_plan_after_an_analysis_of_the_same_domains_runs_no_pilot_and_no_forward_pass(tiny_llama_dir, counted,
                                                                                        monkeypatch):
    import dowsing.kernels.forward
    from dowsing.pipelines.plan import PlanConfig, run_plan

    model = str(tiny_llama_dir)
    analysed = run_analysis(model, FOUR, AnalysisConfig(dtype="float64"))
    counted.clear()
    passes = []
    real = dowsing.kernels.forward.split_pass
    monkeypatch.setattr(dowsing.kernels.forward, "split_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    config = PlanConfig(budget=100, dtype="float64")
    plan = run_plan(model, FOUR, config)
    assert counted == [] and passes == []
    fresh = run_plan(model, FOUR, config, use_cache=False)
    assert len(counted) == 4 and passes == [1]
    assert [d["collect"] for d in plan.domains] == [d["collect"] for d in fresh.domains]
    # the plan's "split by the ranking's score" reads the default ranking's own scores off the same pilots
    from dowsing.pipelines.plan import fit_pilots, pilot_measurements, proportional_counts, ranking_scores

    scores = ranking_scores(fit_pilots(pilot_measurements(model, FOUR, config).to_dict(), config))
    assert analysed.estimator == "pilot_curve"
    assert scores == pytest.approx([analysed.domain(d.name).ranking_priority for d in as_domains(FOUR)], rel=1e-9)
    assert list(plan.totals["ranking"]["counts"].values()) == proportional_counts(
        100, [max(v, 0.0) for v in scores], [100] * 4)
    for a, b in zip(plan.domains, fresh.domains):
        assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-9)
        assert (a["gain"] is None) == (b["gain"] is None)
        if a["gain"] is not None:
            assert a["gain"] == pytest.approx(b["gain"], rel=1e-6, abs=1e-9)


def test_a_plan_with_one_new_domain_measures_only_that_one(tiny_llama_dir, counted):
    from dowsing.pipelines.plan import PlanConfig, run_plan

    model, config = str(tiny_llama_dir), PlanConfig(budget=100, dtype="float64")
    run_plan(model, FOUR, config)
    counted.clear()
    run_plan(model, FOUR + [_domain("Omega")], config)
    assert len(counted) == 1


def test_the_ranking_stage_stops_before_the_paper_and_the_full_run_sends_its_ranking_first(tiny_llama_dir, counted):
    from dataclasses import replace

    model, config = str(tiny_llama_dir), AnalysisConfig(dtype="float64")
    sent = []
    full = run_analysis(model, FOUR, config, on_ranking=sent.append)
    assert len(sent) == 1 and "partial" in sent[0].extras and "partial" not in full.extras
    early = sent[0]
    assert all(d.mean is None and d.delta_n_reason == "computing…" for d in early.domains)
    assert "solve" not in early.timings and early.timings["ranking_ready"] < full.timings["total"]
    assert [d.priority for d in early.domains] == [d.priority for d in full.domains]
    assert early.extras["diagnosis"] == full.extras["diagnosis"]

    counted.clear()
    ranking = run_analysis(model, FOUR, replace(config, stage="ranking"))
    assert counted == [] and ranking.extras["units"]["pilot"]["reused"] == [d.name for d in FOUR]
    assert "solve" not in ranking.timings and "partial" not in ranking.extras
    assert all(d.mean is None and "stage ranking" in d.delta_n_reason for d in ranking.domains)
    assert [d.rank for d in ranking.domains] == [d.rank for d in full.domains]
    assert [d.priority for d in ranking.domains] == pytest.approx([d.priority for d in full.domains], rel=1e-9)
    with pytest.raises(ValueError, match="stage ranking cannot skip"):
        AnalysisConfig(estimator="paper", stage="ranking")


def test_analyze_stage_ranking_on_the_command_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import json

    from dowsing.cli import main

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps({"domains": [{"name": d.name, "facts": list(d.facts)} for d in FOUR[:2]]}))
    out = tmp_path / "ranking.json"
    args = ["analyze", "--quiet", "--model", str(tiny_llama_dir), "--domains", str(domains), "--stage", "ranking"]
    assert main([*args, "--out", str(out)]) == 0
    assert "stopped after the ranking" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["config"]["stage"] == "ranking" and all(d["mean"] is None for d in written["domains"])
    assert main([*args, "--estimator", "paper"]) == 2
    assert "cannot skip" in capsys.readouterr().err
