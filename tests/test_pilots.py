"""The pilot fine-tunes and the one-step lookahead against independent
computations on tiny float64 models: the lookahead against explicit
autograd gradients over every parameter, its per-fact form against central
differences of the losses, each pilot point against a hand-run fine-tune,
and the curve's line against scipy's regression."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dowsing.kernels import pilots
from dowsing.kernels.alignment import padded_block_batch, tail_parameters
from dowsing.domains import Domain
from dowsing.kernels.forward import split_pass
from dowsing.kernels.splitting import split_domains
from dowsing.kernels.subspace import per_fact_losses
from dowsing.kernels.training import Recipe, TailTrainer

DOMAINS = [Domain(name, tuple(f"{name} item {i} is stored in box {word}{i * 7 % 5}." for i in range(8)))
           for name, word in (("Alpha", "red"), ("Beta", "green"))]


@pytest.fixture(scope="module")
def passed(tiny64):
    train, held = split_domains(DOMAINS, seed=0)
    return tiny64, split_pass(tiny64, train, held, capture_block=0)


def _mean_grad(net, ids, rows):
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    total = None
    for r in rows:
        x = torch.tensor([ids[r]])
        loss = per_fact_losses(net(input_ids=x, use_cache=False).logits, x, torch.ones_like(x))[0] / len(rows)
        g = torch.autograd.grad(loss, params)
        total = list(g) if total is None else [t + gi for t, gi in zip(total, g)]
    for p in params:
        p.requires_grad_(False)
    return torch.cat([t.flatten() for t in total])


def test_lookahead_is_lr_times_sign_of_one_half_dotted_with_the_other(passed):
    loaded, split = passed
    a, b = split.train_rows[0], split.held_rows[0]
    got = pilots.sign_lookahead(loaded.model, split.ids, a, b, lr=1e-3, per_fact=True, batch_size=3)
    g_a, g_b = _mean_grad(loaded.model, split.ids, a), _mean_grad(loaded.model, split.ids, b)
    assert got["drop_ab"] == pytest.approx(1e-3 * float(torch.sign(g_a) @ g_b), rel=1e-9)
    assert got["drop_ba"] == pytest.approx(1e-3 * float(torch.sign(g_b) @ g_a), rel=1e-9)
    assert got["score"] == pytest.approx(0.5 * (got["drop_ab"] + got["drop_ba"]))
    assert np.mean(got["per_fact_b"]) == pytest.approx(got["drop_ab"], rel=1e-6)  # padded batches vs one fact
    # each fact's own value: forward-mode derivative of its loss along a direction, against the reverse-mode
    # gradient of that fact alone (the direction given explicitly: sign(g_A) from another summation order
    # can flip where g_A ~ 0)
    net = loaded.model
    params = list(net.parameters())
    direction = torch.sign(g_a)
    pieces, offset = [], 0
    for p in params:
        pieces.append(direction[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    got = pilots.directional_losses(net, params, split.ids, [b[0], b[1]], pieces)
    for j, fact in enumerate(b[:2]):
        want = float(direction @ _mean_grad(net, split.ids, [fact]))
        assert float(got[j]) == pytest.approx(want, rel=1e-6)


def test_each_pilot_point_is_a_fine_tune_on_that_many_facts_of_one_half(passed):
    loaded, split = passed
    trainer = TailTrainer(loaded, split)
    recipe = Recipe("pilot", "adamw", lr=1e-3, steps=3, blocks=1, batch=64)
    a, b = list(split.train_rows[1]), list(split.held_rows[1])
    assert min(len(a), len(b)) == 4
    curve = pilots.pilot_curve(trainer, recipe, 0, a, b, sizes=(2, 3, 8))
    assert curve["sizes"] == [2, 3, 4]  # the largest size cut to the smaller half
    assert pilots.pilot_curve(trainer, recipe, 0, a, b, sizes=(2, 3))["sizes"] == [2, 3]  # never past the largest

    def full_logits(rows):
        # the tail model's whole forward, logits at every position, as the reference for the trainer's own path
        ids, mask, hidden = padded_block_batch([trainer.data.ids[r] for r in rows],
                                               [trainer.data.block_inputs[r] for r in rows], trainer.device)
        return trainer.work(inputs_embeds=trainer.embed(hidden), attention_mask=mask, use_cache=False).logits, ids, mask

    # by hand: a plain (unfused) AdamW loop on the tail, every fact of the run in every step
    for i, n in enumerate(curve["sizes"]):
        drops = []
        for train_rows, eval_rows in ((a[:n], b), (b[:n], a)):
            trainer.reset()
            trainable = tail_parameters(trainer.work, 1)
            opt = torch.optim.AdamW(trainable, lr=1e-3, foreach=False)
            for _ in range(3):
                logits, ids, mask = full_logits(train_rows)
                loss = per_fact_losses(logits, ids, mask).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                after = per_fact_losses(*full_logits(eval_rows)).to(torch.float64)
            drops.append(float((split.tokens.fact_losses[eval_rows] - after).mean()))
        assert curve["drop"][i] == pytest.approx(0.5 * sum(drops), rel=1e-6, abs=1e-9)
        assert np.mean(curve["per_fact_by_size"][i]) == pytest.approx(curve["drop"][i], rel=1e-9, abs=1e-12)


def test_the_curve_is_scipys_least_squares_line_in_ln_n():
    sizes, values = [2, 4, 8], [0.11, 0.19, 0.23]
    fit = stats.linregress(np.log(sizes), values)
    a, b = pilots.log_fit(sizes, values)
    assert (a, b) == pytest.approx((fit.intercept, fit.slope))
    assert pilots.extrapolate(sizes, values, 32) == pytest.approx(fit.intercept + fit.slope * math.log(32))
    assert pilots.log_fit([8], [0.2]) == (0.2, 0.0)
    assert pilots.pilot_sizes((2, 4, 8), 8, 7) == [2, 4, 7]
    assert pilots.pilot_sizes((2, 4, 8), 1, 1) == [1]
    assert pilots.pilot_sizes((2, 4, 8), 17, 16) == [2, 4, 8]  # halves beyond the largest size: not trained on


def test_an_analysis_ranks_a_domain_too_small_for_a_pilot_by_mean_loss_and_says_so(tiny_llama_dir, tmp_path,
                                                                                    monkeypatch):
    from dowsing.pipelines.analysis import analyze
    from dowsing.config import AnalysisConfig
    from dowsing.access.models import load_model

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    loaded = load_model(str(tiny_llama_dir))
    domains = DOMAINS + [Domain("Small", ("A small cat sat on the mat.", "Two dogs ran in the park today.",
                                          "The old bird sang at dawn."))]
    result = analyze(loaded, domains, AnalysisConfig(estimator="pilot_gain"))
    notes = " ".join(result.extras["warnings"])
    assert "Small: too few facts" in notes and "ranked by mean loss" in notes
    fallback = result.extras["ranking"]["details"]["fallback"]
    losses = [float(x) for x in result.extras["domain_loss"]]
    small = next(d for d in result.domains if d.name == "Small")
    assert small.priority == pytest.approx(fallback["intercept"] + fallback["slope"] * losses[2], rel=1e-6)
    kinds = {d["domain"]: d for d in result.extras["diagnosis"]}
    assert kinds["Small"]["pilot_drop"] is None and "loss alone" in kinds["Small"]["sentence"]
    assert kinds["Alpha"]["pilot_drop"] == pytest.approx(result.domains[0].priority)


def test_the_head_on_predicting_positions_alone_gives_every_facts_loss():
    from dowsing.kernels.subspace import head_losses

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 3]
    hidden = torch.randn(4, 7, 6, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(6, 11, bias=False).to(torch.float64)
    ids = torch.randint(0, 11, (4, 7), generator=gen)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    got = head_losses(hidden, head, ids, mask).detach()
    want = per_fact_losses(head(hidden), ids, mask).detach()
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # and by hand for one fact: the mean cross-entropy of its 4 predicted tokens
    logp = torch.log_softmax(head(hidden[0]), dim=-1).detach()
    assert float(got[0]) == pytest.approx(float(-sum(logp[t, ids[0, t + 1]] for t in range(4)) / 4), rel=1e-12)


def test_a_pool_runs_a_curves_fine_tunes_side_by_side_with_the_numbers_of_one_trainer(passed):
    from dowsing.kernels.side_by_side import TrainerPool, pool_workers, threads_per_run

    loaded, split = passed
    recipe = Recipe("pilot", "adamw", lr=1e-3, steps=3, blocks=1, batch=64)
    a, b = list(split.train_rows[0]), list(split.held_rows[0])
    trainer = TailTrainer(loaded, split)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = pilots.pilot_curve(trainer, recipe, 0, a, b, sizes=(2, 3))
    finally:
        torch.set_num_threads(saved)
    pool = TrainerPool(trainer, 3, threads=3)
    assert pool.threads == 1 and torch.get_num_threads() == saved
    side = pilots.pilot_curve(pool, recipe, 0, a, b, sizes=(2, 3), targets=[(a, b)])
    assert len(pool.trainers) == 3  # the twins were made for the four runs
    assert torch.get_num_threads() == saved  # the caller's threads are given back
    # each run on one thread, whichever thread took it: the same numbers, bit for bit
    assert side["drop"] == alone["drop"] and side["per_fact_by_size"] == alone["per_fact_by_size"]
    # a domain's own halves as the target: its pilot drop at the largest size, from the same two runs
    assert side["transfer"][0]["drop"] == pytest.approx(side["drop"][-1], rel=1e-12)
    # each twin trains its own copy of the weights and goes back to the first trainer's starting weights
    trainer.reset()
    for twin in pool.trainers[1:]:
        assert any(not torch.equal(p, q) for p, q in zip(twin.params, trainer.params))  # its last run's weights
        twin.reset()
        for p, q in zip(twin.params, trainer.params):
            assert p is not q and torch.equal(p, q)
    assert pool_workers("cuda", 16) == 1 and pool_workers("cpu", 2) == 2 and pool_workers("cpu", 16, runs=2) == 2
    assert threads_per_run(2, 16) == 8 and threads_per_run(4, 2) == 1


def test_a_run_that_fails_in_a_pool_fails_the_map_on_the_callers_thread(passed):
    from dowsing.kernels.side_by_side import TrainerPool

    loaded, split = passed
    pool = TrainerPool(TailTrainer(loaded, split), 2, threads=2)

    def run(trainer, item):
        if item == 3:
            raise ValueError("run 3 failed")
        return item * 10

    assert pool.map(run, [0, 1, 2]) == [0, 10, 20]
    with pytest.raises(ValueError, match="run 3 failed"):
        pool.map(run, [0, 1, 2, 3, 4, 5])


def test_an_analysis_copies_the_tail_once_and_its_pilots_equal_a_trainer_built_apart(tiny_llama_dir, monkeypatch):
    """The tail the ranking checks is the one the pilot curve trains: one
    copy of the model's last blocks in the run, not one to check and one to
    train. Its priorities and per-fact values equal, bit for bit, a run where
    the family copies and checks a tail of its own."""
    from dowsing.access.models import load_model
    from dowsing.config import AnalysisConfig
    from dowsing.estimators.context import EstimatorContext
    from dowsing.kernels import alignment, training
    from dowsing.pipelines import ranking
    from dowsing.pipelines.analysis import analyze

    loaded = load_model(str(tiny_llama_dir), dtype="float64")
    copies = []

    def counted(net, first):
        copies.append(first)
        return alignment.tail_model(net, first)

    monkeypatch.setattr(ranking, "tail_model", counted)
    monkeypatch.setattr(training, "tail_model", counted)
    config = AnalysisConfig(dtype="float64", estimator="pilot_curve", stage="ranking")
    shared = analyze(loaded, DOMAINS, config)
    assert len(copies) == 1

    monkeypatch.setattr(EstimatorContext, "take_tail", lambda self: None)
    apart = analyze(loaded, DOMAINS, config)
    assert len(copies) == 3  # the ranking's check, then the family's own copy
    assert [d.priority for d in shared.domains] == [d.priority for d in apart.domains]
    assert [e["priority"] for e in shared.per_example] == [e["priority"] for e in apart.per_example]
    # ranked by mean loss, nothing of the ranking reads the tail: the diagnosis's pilots alone copy one
    analyze(loaded, DOMAINS, AnalysisConfig(dtype="float64", estimator="mean_loss", stage="ranking"))
    assert len(copies) == 4
