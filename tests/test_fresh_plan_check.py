"""The plan check where the sample is not in training: its whole-model
fine-tune, its losses, its allocations and its calibration, each against an
independent computation."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dowsing.validation.fresh_plan_check import (FreshCheckConfig, allocations, benchmark_domains, calibration,
                                                 collected_ids, encode, fact_losses, fresh_split, train_full_batch)

FACTS = ["The river runs to the sea.", "Copper conducts heat well.", "Owls hunt at night in the woods.",
         "Bread rises with yeast.", "A prism splits white light into colours.", "Ice floats on water."]


def _one_by_one(model, ids):
    """Each fact's mean next-token loss, one unpadded fact at a time."""
    out = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            logits = model(input_ids=x).logits[0, :-1]
            out.append(float(F.cross_entropy(logits, x[0, 1:])))
    return np.array(out)


def test_fact_losses_match_unpadded_one_by_one(gpt2_64):
    ids = encode(gpt2_64.tokenizer, FACTS, 64)
    got = fact_losses(gpt2_64.model, ids, size=4)
    np.testing.assert_allclose(got, _one_by_one(gpt2_64.model, ids), rtol=1e-10, atol=1e-10)


def test_micro_batches_make_one_full_batch_step(tiny_llama64):
    """A step summed over micro-batches of 2 equals one AdamW step computed
    on the whole set at once, fact by fact, without padding."""
    model = tiny_llama64.model
    ids = encode(tiny_llama64.tokenizer, FACTS, 64)
    start = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    config = FreshCheckConfig(lr=1e-3, steps=2, micro_batch=2)
    try:
        history = train_full_batch(model, ids, config)
        ours = {k: v.clone() for k, v in model.state_dict().items()}

        model.load_state_dict(start)
        opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3, weight_decay=0.0)
        want = []
        for _ in range(2):
            opt.zero_grad()
            losses = []
            for row in ids:
                x = torch.tensor([row])
                losses.append(F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:]))
            loss = torch.stack(losses).mean()
            loss.backward()
            want.append(float(loss.detach()))
            opt.step()
        np.testing.assert_allclose(history, want, rtol=1e-9)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(ours[k], v, rtol=1e-7, atol=1e-9)
        assert history[1] < history[0]
    finally:
        model.load_state_dict(start)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_split_and_collected_facts():
    config = FreshCheckConfig(sample=10, test=12, cap=5)
    domains = benchmark_domains(["Physics", "Noise: parcel scans"])
    split = fresh_split(domains, 0, config)
    for d, s, t, p in zip(domains, split["sample"], split["test"], split["pool"]):
        assert (len(s.facts), len(t.facts), len(p.facts)) == (10, 12, 5)
        assert not set(s.facts) & set(t.facts) and not set(p.facts) & (set(s.facts) | set(t.facts))
        assert set(s.facts) | set(t.facts) | set(p.facts) <= set(d.facts)
    assert collected_ids([[1, 2, 3], [4, 5]], [2, 0]) == [1, 2]
    with pytest.raises(ValueError, match="not benchmark domains"):
        benchmark_domains(["Physics", "Alchemy"])


def _plan(counts, even, by_loss, recommend):
    names = [f"d{k}" for k in range(len(counts))]
    return SimpleNamespace(domains=[{"collect": m} for m in counts], verdict={"recommend": recommend},
                           totals={"even": {"counts": dict(zip(names, even))},
                                   "mean_loss": {"counts": dict(zip(names, by_loss))}})


def test_allocations_follow_the_verdict_and_split_by_score():
    plan = _plan([6, 0, 0], [2, 2, 2], [3, 2, 1], "plan")
    out = allocations(plan, [3.0, 1.0, -2.0], 6, [10, 10, 10])
    assert out["plan"] == out["recommended"] == [6, 0, 0]
    assert out["ranking"] == [5, 1, 0]  # 6 * 3/4 and 6 * 1/4 by largest remainders; a negative score gets none
    out = allocations(_plan([6, 0, 0], [2, 2, 2], [3, 2, 1], "even"), [None, float("nan"), 0.0], 6, [10, 10, 10])
    assert out["recommended"] == [2, 2, 2] and out["ranking"] == [2, 2, 2]


def test_calibration_against_hand_computation():
    rows = [{"domain": "a", "predicted": 1.0, "realised": 2.0, "collected": True, "seed": "0", "budget": "9"},
            {"domain": "b", "predicted": 2.0, "realised": 2.0, "collected": True, "seed": "0", "budget": "9"},
            {"domain": "c", "predicted": 1.0, "realised": 4.0, "collected": True, "seed": "0", "budget": "9"},
            {"domain": "d", "predicted": 0.0, "realised": 0.5, "collected": False, "seed": "0", "budget": "9"}]
    got = calibration(rows)
    assert got["n"] == 3
    assert got["scale"] == pytest.approx(8.5 / 4.0)  # every domain's gain over the predictions' sum
    without = {"a": 6.5 / 3.0, "b": 6.5 / 2.0, "c": 4.5 / 3.0, "d": 8.0 / 4.0}
    cv = [abs(without[r["domain"]] * r["predicted"] - r["realised"]) / r["realised"] for r in rows[:3]]
    assert got["cv_median_error"] == pytest.approx(float(np.median(cv)))
    calibrated = sum(without[r["domain"]] * r["predicted"] for r in rows)
    assert got["totals_median_error"] == pytest.approx(abs(calibrated - 8.5) / 8.5)
    assert got["uncalibrated_totals_median_error"] == pytest.approx(abs(4.0 - 8.5) / 8.5)


def test_diagnosis_agreement_is_the_ratio_of_mean_gain_fractions():
    from dowsing.validation.fresh_plan_check import diagnosis_agreement

    rows = [{"helps": True, "gain_fraction": 0.3}, {"helps": True, "gain_fraction": 0.1},
            {"helps": False, "gain_fraction": 0.05}, {"helps": None, "gain_fraction": 9.0}]
    got = diagnosis_agreement(rows)
    assert got["helps"] == {"n": 2, "mean_gain_fraction": pytest.approx(0.2)}
    assert got["not"]["n"] == 1 and got["ratio"] == pytest.approx(4.0)


def test_runs_apart_merge_by_seed_and_budget():
    from dowsing.validation.fresh_plan_check import merged

    config = {"domains": ["A"], "sample": 10, "test": 12, "cap": 32, "lr": 1e-5, "steps": 6, "micro_batch": 16,
              "weight_decay": 0.0, "seeds": [0], "budgets_per_domain": [3, 12]}
    a = {"config": config, "seeds": {"0": {"before": [1.0], "budgets": {"3": "a3", "12": "a12"}}}}
    b = {"config": {**config, "seeds": [1], "budgets_per_domain": [3]},
         "seeds": {"1": {"before": [2.0], "budgets": {"3": "b3"}}}}
    out = merged([a, b])
    assert out["config"]["seeds"] == [0, 1] and out["config"]["budgets_per_domain"] == [3, 12]
    assert out["seeds"]["0"]["budgets"] == {"3": "a3", "12": "a12"} and out["seeds"]["1"]["budgets"] == {"3": "b3"}
    with pytest.raises(ValueError, match="differ"):
        merged([a, {**b, "config": {**b["config"], "lr": 1e-4}}])


def test_the_recommended_allocation_is_the_split_the_verdict_names():
    plan = _plan([6, 0, 0], [2, 2, 2], [3, 2, 1], "mean_loss")
    assert allocations(plan, [1.0, 1.0, 1.0], 6, [10, 10, 10])["recommended"] == [3, 2, 1]
