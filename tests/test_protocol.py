"""The collection protocol: the split, its checks, the dose units against a
hand-run fine-tune, the per-group leaderboards against scipy, and the rule
that picks the default."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.domains import Domain
from dowsing.estimators import EstimatorScore
from dowsing.kernels.forward import split_pass
from dowsing.kernels.training import Recipe, TailTrainer, cycled
from dowsing.validation import protocol
from dowsing.validation.leaderboard import choose_default, group_leaderboards

DOMAINS = [Domain(name, tuple(f"{name} record {i} reads {word} {i * 3 % 7}." for i in range(12)))
           for name, word in (("Alpha", "red"), ("Beta", "green"), ("Gamma", "blue"))]


def test_the_split_is_disjoint_seeded_by_name_and_independent_of_order():
    parts = protocol.collection_split(DOMAINS, seed=3, sample=5, test=3)
    again = protocol.collection_split(list(reversed(DOMAINS)), seed=3, sample=5, test=3)
    for k, d in enumerate(DOMAINS):
        s, t, p = (parts[x][k].facts for x in ("sample", "test", "pool"))
        assert (len(s), len(t), len(p)) == (5, 3, 4)
        assert sorted(s + t + p) == sorted(d.facts)
        assert s == again["sample"][len(DOMAINS) - 1 - k].facts
    other = protocol.collection_split(DOMAINS, seed=4, sample=5, test=3)
    assert other["sample"][0].facts != parts["sample"][0].facts


def test_a_domain_too_small_for_the_protocol_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        protocol.check_protocol_domains(DOMAINS, sample=5, test=3, doses=(2, 8))
    assert str(err.value) == ("Domain 'Alpha' has 12 facts; the collection protocol needs 16: a sample of 5, 3 test "
                              "facts and a pool of 8 for the largest dose.")


def test_the_cli_refuses_a_domain_too_small_and_writes_nothing(tmp_path, capsys, tiny_llama_dir):
    import json

    from dowsing.cli import main

    source = tmp_path / "domains.json"
    source.write_text(json.dumps({"domains": [{"name": d.name, "facts": list(d.facts)} for d in DOMAINS]}))
    out = tmp_path / "bench.json"
    code = main(["benchmark", "--model", str(tiny_llama_dir), "--domains", str(source), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.count("\n") == 0 and "Domain 'Alpha' has 12 facts" in err and "needs 60" in err


def test_cycled_minibatches_show_every_added_fact_at_least_twice():
    items = list(range(32))
    stream = cycled(items, 8 * protocol.dose_steps(Recipe("r", steps=8, added_batch=8), 32), random.Random(1))
    counts = np.bincount(stream, minlength=32)
    assert counts.min() == 2 and counts.max() == 2
    assert protocol.dose_steps(Recipe("r", steps=2, added_batch=4), 32) == 16


def test_dose_gains_equal_a_hand_run_fine_tune(tiny64):
    parts = protocol.collection_split(DOMAINS, seed=0, sample=4, test=3)
    grown = [Domain(s.name, s.facts + p.facts) for s, p in zip(parts["sample"], parts["pool"])]
    split = split_pass(tiny64, grown, parts["test"], capture_block=0)
    trainer = TailTrainer(tiny64, split)
    recipe = Recipe("adamw", "adamw", lr=1e-3, steps=2, blocks=1, batch=3, added_batch=2)
    units = protocol.protocol_units(recipe, 0, len(DOMAINS), (2, 4), 4, second_reading=True)
    values = {u.key: protocol.protocol_unit(trainer, *u.args) for u in units}
    gains = protocol.protocol_gains(split.held_rows, values, units, len(DOMAINS), (2, 4))
    # by hand: the same minibatches (the base mixture's seeded draws, the pool's seeded permutations), AdamW
    from dowsing.kernels.alignment import tail_parameters

    base = [r for rows in split.train_rows for r in rows[:4]]
    steps = protocol.dose_steps(recipe, 4)

    def run(added, weight):
        trainer.reset()
        opt = torch.optim.AdamW(tail_parameters(trainer.work, 1), lr=1e-3, fused=True)  # the trainer's optimizer
        rng, added_rng = random.Random(0), random.Random(1)
        stream = cycled(added, recipe.added_batch * steps, added_rng) if added else None
        for step in range(steps):
            pick = rng.sample(base, 3)
            weights = [1 / 3] * 3
            if stream:
                extra = stream[step * 2: step * 2 + 2]
                pick, weights = pick + extra, weights + [weight / 2] * 2
            losses = trainer.fact_losses(pick)  # the kernel is checked against full logits in test_pilots
            loss = (losses * torch.tensor(weights, dtype=losses.dtype)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    run(None, 0.0)
    baseline = [float(trainer.losses(rows).mean()) for rows in split.held_rows]
    for k in range(len(DOMAINS)):
        for n in (2, 4):
            run(split.train_rows[k][4: 4 + n], n / 4)
            assert gains["dose"][n][k] == pytest.approx(baseline[k] - float(trainer.losses(split.held_rows[k]).mean()),
                                                        rel=1e-9, abs=1e-12)
    assert all(g is not None for g in gains["sample"])


def _score(name, priority):
    return EstimatorScore(name, name, list(priority), None, 1.0)


def test_group_leaderboards_are_scipy_spearman_on_each_set():
    rng = np.random.default_rng(0)
    gains = rng.normal(size=(2, 9)).tolist()
    groups = ["everyday"] * 5 + ["noise", "scrambled", "redundant", "grab-bag"]
    scores = [_score("mean_loss", rng.normal(size=9)), _score("pilot_gain", rng.normal(size=9))]
    boards = group_leaderboards(scores, gains, groups, 200, 0)
    target = np.mean(gains, axis=0)
    for name, rows in (("all", range(9)), ("ordinary", range(5)), ("hard", range(5, 9))):
        rows = list(rows)
        row = next(r for r in boards[name]["rows"] if r["estimator"] == "pilot_gain")
        want = stats.spearmanr(np.asarray(scores[1].priority)[rows], target[rows]).statistic
        base = stats.spearmanr(np.asarray(scores[0].priority)[rows], target[rows]).statistic
        assert row["spearman"] == pytest.approx(want) and row["diff_vs_mean_loss"] == pytest.approx(want - base)
        assert boards[name]["n_domains"] == len(rows)


def _board(rows_all, rows_ordinary):
    def rows(spec):
        return [{"estimator": n, "spearman": rho, "diff_vs_mean_loss": d, "diff_interval": iv}
                for n, rho, d, iv in spec]
    return {"all": {"rows": rows(rows_all)}, "ordinary": {"rows": rows(rows_ordinary)}}


def test_the_default_is_picked_by_the_stated_rule():
    base = ("mean_loss", 0.5, None, None)
    winner = _board([base, ("pilot_gain", 0.8, 0.3, [0.1, 0.5]), ("lookahead_sign", 0.9, 0.4, [-0.1, 0.8])],
                    [base, ("pilot_gain", 0.5, -0.04, [-0.3, 0.2]), ("lookahead_sign", 0.6, 0.1, [-0.1, 0.3])])
    assert choose_default(winner)["estimator"] == "pilot_gain"
    worse_on_ordinary = _board([base, ("pilot_gain", 0.8, 0.3, [0.1, 0.5])],
                               [base, ("pilot_gain", 0.4, -0.1, [-0.3, 0.1])])
    picked = choose_default(worse_on_ordinary)
    assert picked["estimator"] == "mean_loss" and "no estimator qualified" in picked["reason"]
    assert "above 0" in picked["rule"] and "0.05" in picked["rule"]


def test_the_stacked_estimator_never_scores_a_domain_it_was_fitted_on():
    from dowsing.validation.leaderboard import stacked_scores

    rng = np.random.default_rng(1)
    scores = [_score("mean_loss", rng.normal(size=8)), _score("pilot_gain", rng.normal(size=8)),
              _score("tracin", rng.normal(size=8))]
    gains = rng.normal(size=(2, 8))
    first = stacked_scores(scores, gains.tolist())
    assert first.details["inputs"] == ["mean_loss", "pilot_gain"]
    changed = gains.copy()
    changed[:, 3] += 100.0  # domain 3's own gain: its prediction must not move, the others' may
    second = stacked_scores(scores, changed.tolist())
    assert second.priority[3] == pytest.approx(first.priority[3])
    # one fold by hand: least squares of the gain's rank on the inputs' ranks over the other domains
    x = np.column_stack([(stats.rankdata(s.priority) - 1) / 7 for s in scores[:2]])
    rest = [j for j in range(8) if j != 0]
    y = (stats.rankdata(gains.mean(axis=0)[rest]) - 1) / 6
    coef = np.linalg.lstsq(np.column_stack([np.ones(7), x[rest]]), y, rcond=None)[0]
    assert first.priority[0] == pytest.approx(coef[0] + x[0] @ coef[1:])
