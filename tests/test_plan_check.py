"""The benchmark's plan check: the simple allocations, the plan's, the run
that trains on an allocation (against a hand-run fine-tune), the paired
interval (against scipy's bootstrap) and the extrapolation errors."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.kernels.curves import LearningCurve, log_params
from dowsing.domains import Domain
from dowsing.kernels.forward import split_pass
from dowsing.pipelines import plan as plan_mod
from dowsing.pipelines.plan import DomainCurve
from dowsing.kernels.training import Recipe, TailTrainer, cycled
from dowsing.validation import plan_check, protocol
from dowsing.validation.benchmark import BenchmarkConfig

DOMAINS = [Domain(name, tuple(f"{name} record {i} reads {word} {i * 3 % 7}." for i in range(12)))
           for name, word in (("Alpha", "red"), ("Beta", "green"), ("Gamma", "blue"))]


def test_even_counts_split_the_budget_as_evenly_as_the_caps_allow():
    assert plan_check.even_counts(12, [32, 32, 32]) == [4, 4, 4]
    assert plan_check.even_counts(14, [32, 32, 32]) == [5, 5, 4]
    # a capped domain's share goes to the others
    assert plan_check.even_counts(14, [2, 32, 32]) == [2, 6, 6]
    assert plan_check.even_counts(100, [2, 3, 4]) == [2, 3, 4]
    for budget, caps in itertools.product(range(0, 20), ([3, 5, 9], [0, 4, 4], [7, 7, 1])):
        counts = plan_check.even_counts(budget, caps)
        assert sum(counts) == min(budget, sum(caps)) and all(0 <= m <= c for m, c in zip(counts, caps))
        # no domain with room left has two fewer than another
        room = [m for m, c in zip(counts, caps) if m < c]
        assert not room or max(counts) - min(room) <= 1


def test_proportional_counts_follow_the_scores_within_the_caps():
    assert plan_check.proportional_counts(10, [1.0, 1.0, 3.0], [32] * 3) == [2, 2, 6]
    # shares 2.5, 2.5, 5: the remainders tie and go in the domains' order
    assert plan_check.proportional_counts(10, [1.0, 1.0, 2.0], [32] * 3) == [3, 2, 5]
    # a share above the cap is cut to it and the rest is split again over the others
    assert plan_check.proportional_counts(20, [1.0, 1.0, 8.0], [32, 32, 4]) == [8, 8, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.uniform(0.5, 5.0, size=5).tolist()
        caps = rng.integers(1, 20, size=5).tolist()
        budget = int(rng.integers(1, sum(caps) + 1))
        counts = plan_check.proportional_counts(budget, scores, caps)
        assert sum(counts) == budget and all(0 <= m <= c for m, c in zip(counts, caps))
        free = [k for k in range(5) if counts[k] < caps[k]]
        # uncapped domains are within one example of the budget's proportional share among them
        left = budget - sum(counts[k] for k in range(5) if k not in free)
        total = sum(scores[k] for k in free)
        for k in free:
            assert abs(counts[k] - left * scores[k] / total) < 1.0 + 1e-9


def _curve(name, b, have=16):
    sizes = [2.0, 4.0, 8.0]
    drops = [0.01 + b * math.log(n) for n in sizes]
    a, slope = log_params(sizes, drops)
    return DomainCurve(name, have, 1.0, LearningCurve(sizes, drops, "log", (a, slope), 0.0, {}, None,
                                                      np.tile([a, slope], (10, 1))))


def test_the_plan_allocation_is_the_best_split_by_brute_force():
    curves = [_curve("A", 0.03), _curve("B", 0.01), _curve("C", 0.0001)]
    check = plan_check.check_allocations(curves, 12, [8, 8, 8])
    counts = check["counts"]["plan"]

    def total(c):
        return sum(dc.curve.gain(dc.n_facts, m) for dc, m in zip(curves, c))

    best = max((c for c in itertools.product(range(9), repeat=3) if sum(c) <= 12), key=total)
    assert total(counts) == pytest.approx(total(best))
    assert counts[0] >= counts[1] >= counts[2]
    assert check["counts"]["even"] == [4, 4, 4] and check["spent"]["even"] == 12
    assert check["predicted"]["plan"]["gain"] >= check["predicted"]["even"]["gain"]


def test_the_plan_check_allocates_as_the_product_does_on_the_mean_gain_over_the_bootstrap_curves():
    rng = np.random.default_rng(3)
    curves = []
    for name, b in (("A", 0.03), ("B", 0.012), ("C", 0.01)):
        base = _curve(name, b)
        spread = rng.normal(0, [0.004, 0.6 * b], size=(40, 2))
        base.curve.draws = base.curve.draws[0] + spread
        curves.append(base)
    check = plan_check.check_allocations(curves, 10, [6, 6, 6])

    def mean_total(c):  # a falling resample (b < 0) read as flat, as the allocation reads it
        return float(np.mean(sum(np.maximum(dc.curve.draws[:, 1], 0) * np.log((dc.n_facts + m) / dc.n_facts)
                                 for dc, m in zip(curves, c))))

    best = max((c for c in itertools.product(range(7), repeat=3) if sum(c) <= 10), key=mean_total)
    assert check["rule"] == "expected" and mean_total(check["counts"]["plan"]) == pytest.approx(mean_total(best))


def test_the_weighted_have_is_the_sample_s_weight_in_added_facts():
    # 37 samples of 16 facts in the base draws, a largest dose of 32: a base fact weighs 8 / 592 over a run of
    # 8 steps, an added one 8 / 32, so a sample of 16 is worth 16 x 32 / 592 added facts
    assert plan_check.weighted_have(16, 592, 32, 1.0) == pytest.approx(16 * (8 / 592) / (8 / 32))
    assert plan_check.weighted_have(16, 592, 32, 2.0) == pytest.approx(16 * 32 / 592 / 2)
    curves = [_curve("A", 0.03), _curve("B", 0.01)]
    light = [_curve("A", 0.03, have=0.5), _curve("B", 0.01, have=0.5)]
    check = plan_check.check_allocations(curves, 20, [16, 16], weighted=light)
    # with less already had, the gains fall off faster and the budget spreads wider
    assert check["counts"]["plan_weighted"][1] > check["counts"]["plan"][1]
    assert list(check["counts"]) == ["plan", "plan_weighted", "recommended", "even", "proportional"]


def test_a_stored_plan_run_is_reused_only_for_the_same_allocation():
    recipe = Recipe("adamw", steps=2, added_batch=2)
    one = protocol.plan_units(recipe, 0, (2, 4), 4, {(5, "plan"): (3, 0, 2)})
    other = protocol.plan_units(recipe, 0, (2, 4), 4, {(5, "plan"): (2, 1, 2)})
    assert one[0].key != other[0].key and one[0].key.startswith(other[0].key.rsplit("/", 1)[0])


def test_the_paired_difference_and_its_interval_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(0.2, 0.1, size=(2, 30))
    b = a - rng.normal(0.05, 0.05, size=(2, 30))
    got = plan_check.realised_difference(a.tolist(), b.tolist(), 20000, 0, 90.0)
    per_domain = (a - b).mean(axis=0)
    assert got["diff"] == pytest.approx(per_domain.mean())
    assert got["per_seed"] == pytest.approx((a - b).mean(axis=1).tolist())
    want = stats.bootstrap((per_domain,), np.mean, confidence_level=0.9, n_resamples=20000, method="percentile",
                           random_state=1).confidence_interval
    assert got["interval"][0] == pytest.approx(want.low, abs=0.003)
    assert got["interval"][1] == pytest.approx(want.high, abs=0.003)


def test_the_extrapolation_refits_the_measured_doses_and_scales_the_pilot():
    dc = _curve("A", 0.02)
    gains = {2: 0.010, 4: 0.016, 8: 0.021, 32: 0.030}
    row = plan_check.extrapolation_row(dc, [2, 4, 8, 32], gains)
    # by hand: both forms fitted to (2, 4, 8); the form with the smaller leave-one-out error predicts 32
    x, y = np.log([2.0, 4.0, 8.0]), np.array([0.010, 0.016, 0.021])
    slope, intercept = np.polyfit(x, y, 1)
    log_pred = intercept + slope * math.log(32)
    beta, ln_c = np.polyfit(x, np.log(y), 1)
    power_pred = math.exp(ln_c) * 32 ** beta
    want = log_pred if row["doses"]["form"] == "log" else power_pred
    assert row["doses"]["predicted"] == pytest.approx(want)
    assert row["doses"]["error"] == pytest.approx(abs(want - 0.030) / 0.030)
    # the pilot's log curve: gain(m) = b ln((16 + m) / 16), scaled by the measured gain at 8
    ratio = math.log(48 / 16) / math.log(24 / 16)
    assert row["pilot_scaled"]["predicted"] == pytest.approx(0.021 * ratio)
    assert row["pilot"]["predicted"] == pytest.approx(0.02 * math.log(3.0))
    flat = DomainCurve("B", 16, 1.0, LearningCurve([2.0, 4.0], [0.0, 0.0], reason="flat"))
    assert plan_check.extrapolation_row(flat, [2, 4, 8, 32], gains)["pilot"] == {"predicted": None, "reason": "flat"}
    summary = plan_check.error_summary([row, row], ["ordinary", "hard"])
    assert summary["doses"]["ordinary"]["median"] == pytest.approx(row["doses"]["error"])
    assert summary["pilot"]["all"]["n"] == 2


@pytest.mark.parametrize("chunk", [48, 2])
def test_a_plan_run_equals_a_hand_run_fine_tune(tiny64, chunk, monkeypatch):
    # chunk 2: each step's 6 facts go through the trainer 2 at a time, their gradients summed
    monkeypatch.setattr("dowsing.kernels.training.STEP_CHUNK", chunk)
    parts = protocol.collection_split(DOMAINS, seed=0, sample=4, test=3)
    grown = [Domain(s.name, s.facts + p.facts) for s, p in zip(parts["sample"], parts["pool"])]
    split = split_pass(tiny64, grown, parts["test"], capture_block=0)
    trainer = TailTrainer(tiny64, split)
    recipe = Recipe("adamw", "adamw", lr=1e-3, steps=2, blocks=1, batch=3, added_batch=2)
    counts = (3, 0, 2)
    units = protocol.plan_units(recipe, 0, (2, 4), 4, {(5, "plan"): counts})
    got = protocol.protocol_unit(trainer, *units[0].args)
    from dowsing.kernels.alignment import tail_parameters

    # by hand: the protocol's 4 steps (2 x 4 pool facts / 2 a step); 5 added facts each seen at least twice,
    # so 3 a step (ceil(2 x 5 / 4)), with weight 5 / 4 (B / n_max) in all
    base = [r for rows in split.train_rows for r in rows[:4]]
    added = [r for k, m in enumerate(counts) for r in split.train_rows[k][4: 4 + m]]
    steps = protocol.dose_steps(recipe, 4)
    assert steps == 4
    trainer.reset()
    opt = torch.optim.AdamW(tail_parameters(trainer.work, 1), lr=1e-3, fused=True)  # the trainer's optimizer
    rng, added_rng = random.Random(0), random.Random(1)
    stream = cycled(added, 3 * steps, added_rng)
    assert min(stream.count(r) for r in added) >= 2
    for step in range(steps):
        pick = rng.sample(base, 3) + stream[step * 3: step * 3 + 3]
        weights = torch.tensor([1 / 3] * 3 + [(5 / 4) / 3] * 3, dtype=torch.float64)
        losses = trainer.fact_losses(pick)  # the kernel is checked against full logits in test_pilots
        loss = (losses * weights.to(losses.dtype)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tests = [r for rows in split.held_rows for r in rows]
    assert torch.allclose(torch.as_tensor(got), trainer.losses(tests), rtol=1e-9, atol=1e-12)


def test_the_config_checks_the_plan_budgets():
    with pytest.raises(ValueError, match="whole number of examples"):
        BenchmarkConfig(plan_budgets=(0,))
    with pytest.raises(ValueError, match="whole number of examples"):
        BenchmarkConfig(plan_budgets=(2.5,))
    with pytest.raises(ValueError, match="needs the pilot_curve and mean_loss"):
        BenchmarkConfig(plan_budgets=(10,), estimators=("mean_loss",))
    from dowsing.validation.benchmark import check_domains

    config = BenchmarkConfig(plan_budgets=(10,), sample_facts=4, test_facts=3, doses=(2, 4))
    with pytest.raises(ValueError, match="more than the domains' pools hold \\(15 facts\\)"):
        check_domains(DOMAINS, BenchmarkConfig(plan_budgets=(16,), sample_facts=4, test_facts=3, doses=(2, 4)))
    assert len(check_domains(DOMAINS, config)) == 3


def test_the_recommendation_and_the_ranking_split_are_checked_beside_the_plan():
    """The Plan page's recommendation is the plan where its paired band over
    the even split clears 0, else the even split; the ranking split follows
    max(score, 0) by largest remainders."""
    steep, flat = [_curve("A", 0.08), _curve("B", 0.001)], [_curve("A", 0.01), _curve("B", 0.01)]
    check = plan_check.check_allocations(steep, 12, [12, 12], ranking=[3.0, -1.0])
    shown = plan_mod.paired_difference(steep, check["counts"]["plan"], check["counts"]["even"], [1.0, 1.0])["shown"]
    assert check["counts"]["recommended"] == (check["counts"]["plan"] if shown else check["counts"]["even"])
    assert check["counts"]["ranking"] == [12, 0]
    check = plan_check.check_allocations(flat, 12, [12, 12], ranking=[None, float("nan")])
    assert check["counts"]["ranking"] == check["counts"]["even"] == [6, 6]
    assert "ranking" in check["predicted"] and "recommended" in check["predicted"]
