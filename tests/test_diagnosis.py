"""The diagnosis: each kind from the numbers it states, against absolute cut
points fitted on the benchmark, never on the other domains analysed."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dowsing.kernels import diagnosis as dg
from dowsing.kernels.diagnosis import HELPS, KINDS, Cuts, diagnose

CUTS = Cuts(drop_share=0.04, high_loss=4.5, saturated_loss=1.0)
NAMES = ["Garbled", "Codes", "Known", "Gap", "Clash", "Converged"]
LOSS = [7.7, 3.0, 3.0, 5.0, 4.0, 0.29]
DROP = [0.23, 0.40, 0.02, 0.30, -0.50, -0.03]


def test_each_kind_follows_from_its_own_loss_and_drop_and_states_its_numbers():
    out = {d.domain: d for d in diagnose(NAMES, LOSS, DROP, cuts=CUTS)}
    assert out["Garbled"].kind == "hard to learn" and not HELPS["hard to learn"]
    assert "7.70 nats" in out["Garbled"].sentence and "0.230 nats" in out["Garbled"].sentence
    assert "the highest of 6" in out["Garbled"].sentence and "4.0%" in out["Garbled"].sentence
    assert out["Codes"].kind == "overlapping" and "0.400 nats" in out["Codes"].sentence
    assert out["Known"].kind == "known"
    assert out["Gap"].kind == "learnable gap" and HELPS["learnable gap"]
    assert out["Clash"].kind == "contradictory" and "raised" in out["Clash"].sentence
    assert "by 0.500 nats (12.5% of its loss)" in out["Clash"].sentence
    assert out["Converged"].kind == "saturated" and "the lowest of 6" in out["Converged"].sentence
    assert out["Codes"].drop_pct_of_loss == 0.40 / 3.0 * 100
    assert out["Codes"].loss_rank == 4 and out["Codes"].drop_rank == 1
    assert set(d.kind for d in out.values()) <= set(KINDS) and set(KINDS) == set(HELPS)
    # a level word ("high") only where the absolute cut says so; ranks are order, not level
    for d in out.values():
        assert ("(high:" in d.sentence) == (d.loss >= CUTS.high_loss), d.sentence
        assert "low loss" not in d.sentence.lower() and "high loss" not in d.sentence.lower()


def test_a_kind_does_not_change_when_other_domains_are_removed_or_added():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.2, 8.0, 24)
    drop = loss * rng.uniform(-0.08, 0.2, 24)
    names = [f"D{i}" for i in range(24)]
    full = {d.domain: d.kind for d in diagnose(names, loss, drop)}
    for k in range(24):
        others = [i for i in range(24) if i != k]
        kept = sorted([k] + list(rng.choice(others, size=len(others) // 2, replace=False)))
        part = diagnose([names[i] for i in kept], loss[kept], drop[kept])
        assert next(d.kind for d in part if d.domain == names[k]) == full[names[k]]


def test_scrambled_text_is_not_told_more_helps_and_a_converged_domain_is_saturated():
    # the hard cases of an outside check: 7.7-8.0 nats with a pilot drop of 3% of the loss, and a
    # domain fine-tuned to convergence (0.29 nats, a drop of -0.03 within noise)
    out = diagnose(["Scrambled A", "Scrambled B", "Converged", "Codes"], [7.7, 8.0, 0.29, 5.05],
                   [0.03 * 7.7, 0.03 * 8.0, -0.03, 0.85])
    assert [HELPS[d.kind] for d in out] == [False, False, False, True]
    assert out[2].kind == "saturated"
    assert all("gap" not in d.sentence for d in out[:3])


def _split_by_hand(x, y):
    """Every cut between sorted neighbours, the two sides' squared error from np.var."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, float)[order], np.asarray(y, float)[order]
    best = None
    for i in range(1, len(xs)):
        if xs[i] == xs[i - 1]:
            continue
        sse = np.var(ys[:i]) * i + np.var(ys[i:]) * (len(ys) - i)
        if best is None or sse < best[0] - 1e-12:
            best = (sse, (xs[i] + xs[i - 1]) / 2)
    return best[1]


@pytest.mark.parametrize("seed", range(5))
def test_the_split_point_is_the_least_squares_stump(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.uniform(0, 1, 30), 2)
    y = (x > 0.6) * 2.0 + rng.normal(0, 0.5, 30)
    assert dg.split_point(x, y) == pytest.approx(_split_by_hand(x, y))


def test_the_shipped_cuts_are_fitted_on_the_shipped_benchmark_rows():
    data = json.loads(dg.BENCHMARK_FILE.read_text())["domains"]
    loss = np.array([r["mean_loss"] for r in data])
    share = np.array([r["pilot_drop"] for r in data]) / loss
    realised = np.log(np.array([r["gain_32"] for r in data]) / loss)
    cuts = dg.benchmark_cuts()
    assert len(data) == 37
    assert cuts.drop_share == pytest.approx(_split_by_hand(share, realised))
    assert cuts.high_loss == pytest.approx(_split_by_hand(loss, realised))


def test_on_the_benchmark_the_told_helps_domains_gain_at_least_twice_the_fraction_of_the_rest():
    data = json.loads(dg.BENCHMARK_FILE.read_text())["domains"]
    cuts = dg.benchmark_cuts()
    fraction = np.array([r["gain_32"] / r["mean_loss"] for r in data])
    helps = np.array([r["pilot_drop"] / r["mean_loss"] >= cuts.drop_share for r in data])
    ratio = fraction[helps].mean() / fraction[~helps].mean()
    summary = dg.agreement(dg.benchmark_rows())
    assert summary["ratio"] == pytest.approx(ratio) and ratio >= 2
    # cross-validated: each domain's kind from cuts fitted on the other 36
    assert dg.agreement(dg.benchmark_rows(), leave_one_out=True)["ratio"] >= 2
    for group in ("scrambled", "grab-bag"):
        assert not any(HELPS[k] for k in summary["groups"][group]), group


def test_ordinals_read_naturally():
    ranks = [dg._place(r, 4, "highest", "lowest") for r in range(1, 5)]
    assert ranks == ["the highest of 4", "2nd highest of 4", "2nd lowest of 4", "the lowest of 4"]
    assert dg._place(1, 1, "highest", "lowest") == "the only domain"
    assert dg._ordinal(11) == "11th" and dg._ordinal(22) == "22nd"


def test_a_domain_without_a_pilot_rests_on_its_loss():
    out = diagnose(["A", "B", "C"], [2.0, 1.0, 5.0], [0.1, None, float("nan")], cuts=CUTS)
    assert out[1].pilot_drop is None and "loss alone" in out[1].sentence and out[1].kind == "known"
    assert out[2].pilot_drop is None and out[2].kind == "learnable gap"


def test_classify_covers_every_kind_on_a_grid():
    seen = {dg.classify(L, L * s, CUTS) for L, s in itertools.product([0.3, 2.0, 6.0], [-0.2, 0.0, 0.02, 0.1])}
    assert seen == set(KINDS)
