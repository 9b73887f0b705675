"""The trajectory estimators against independent computations on tiny
float64 models: the finite-difference Hessian-gradient product against
double backprop, Diff-In on one step against its closed form (and against
the loss difference it approximates), VoG and the checkpoint scores against
numpy over per-fact gradients computed one fact at a time; AirRep's labels
and ranking loss against explicit loops, its fit against a planted model,
and its cross-validation (no fold trains on the domains it scores)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dowsing.kernels.alignment import tail_grad_fn, tail_parameters
from dowsing.kernels.subspace import find_anatomy, per_fact_losses
from dowsing.kernels.forward import split_pass
from dowsing.kernels.training import Recipe, TailTrainer
from dowsing.kernels.splitting import split_domains
from dowsing.estimators.trajectory import (TRAJECTORY_ESTIMATORS, finite_difference_hvp, flat, load_checkpoint,
                                           mean_grad, record_trajectory, trajectory_scores, working_precision)

torch.set_num_threads(1)

DOMAINS = [
    {"name": "Cats", "facts": ["The cat sat on the mat today.", "Cats purr when they are content.",
                               "A kitten is a young cat.", "Cats chase mice at night."]},
    {"name": "Water", "facts": ["Water boils at one hundred degrees.", "Ice floats on liquid water.",
                                "Rain is water falling from clouds.", "Rivers carry water to the sea."]},
    {"name": "Music", "facts": ["The violin has four strings.", "A piano has black and white keys.",
                                "Drums keep the rhythm of a song.", "A choir sings in several voices."]},
]


@pytest.fixture(scope="module")
def setup(tiny64_embedded):
    """The split with every block's input cached (both blocks of the tiny model kept).
    The embedded tokenizer: the Diff-In bounds were set on it."""
    tiny64 = tiny64_embedded
    train, held = split_domains(DOMAINS, 0)
    depth = len(find_anatomy(tiny64.model).down_projs)
    split = split_pass(tiny64, train, held, capture_block=0)
    return tiny64, split, depth


def _fact_loss(trainer, row, hidden=None):
    """l_i of one fact, unpadded, one forward of its own (no batching)."""
    data = trainer.data
    ids = torch.tensor([data.ids[row]])
    h = data.block_inputs[row].unsqueeze(0) if hidden is None else hidden
    logits = trainer.work(inputs_embeds=trainer.embed(h), attention_mask=torch.ones_like(ids), use_cache=False).logits
    return per_fact_losses(logits, ids, torch.ones_like(ids))[0], logits[0, :-1], ids[0, 1:]


def _mean_loss(trainer, rows):
    return sum(_fact_loss(trainer, r)[0] for r in rows) / len(rows)


def _grad(trainer, rows, params):
    return flat(torch.autograd.grad(_mean_loss(trainer, rows), params))


def _exact_hvp(trainer, rows, params, v):
    """H v by double backprop of the mean loss over `rows`."""
    g = torch.autograd.grad(_mean_loss(trainer, rows), params, create_graph=True)
    return flat(torch.autograd.grad(flat(g) @ v, params))


def test_finite_difference_hvp_matches_double_backprop(setup):
    loaded, split, depth = setup
    trainer = TailTrainer(loaded, split)
    params = tail_parameters(trainer.work, depth)
    rows = split.held_rows[0] + split.held_rows[1]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_of = tail_grad_fn(trainer.work, trainer.embed, trainer.data.ids, trainer.data.block_inputs, params)
    before = [p.detach().clone() for p in params]
    precision = working_precision(trainer.work)
    got = finite_difference_hvp(lambda: mean_grad(grad_of, rows), params, v, precision=precision)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored exactly
    want = _exact_hvp(trainer, rows, params, v)
    assert float(want.norm()) > 1e-3
    rel = float((got - want).norm() / want.norm())
    # GPT-2 is float64 throughout; Llama's RMSNorm computes in float32, which bounds the difference
    assert rel < (1e-7 if precision < 1e-10 else 5e-3)


def test_diffin_on_one_step_is_its_closed_form(setup):
    """One SGD step on the whole pool (batch >= pool: the minibatch is every
    training fact), so theta_1 = theta_0 - eta grad L_pool(theta_0) and
    D_k = eta q^T u + eta (H_Q u)^T (Delta - eta u / 2), u = w g_k, all
    computed here by plain autograd from theta_0."""
    loaded, split, depth = setup
    lr, weight = 0.05, 0.7
    recipe = Recipe("one", "sgd", lr=lr, steps=1, blocks=depth, batch=1000, added_weight=weight)
    scores = {s.name: s for s in trajectory_scores(loaded, split, ("diffin", "tracin_ckpt"), recipe, seed=5)}
    trainer = TailTrainer(loaded, split)
    params = tail_parameters(trainer.work, depth)
    pool = [r for rows in split.train_rows for r in rows]
    # GPT-2 is float64 throughout; Llama's RMSNorm computes in float32, which bounds how well a padded
    # batch reproduces a fact alone (exact) and the finite difference (tol)
    float64 = working_precision(trainer.work) < 1e-10
    exact, tol = (1e-9, 1e-6) if float64 else (1e-5, 1e-2)
    delta = -lr * _grad(trainer, pool, params)
    # the recorded trajectory is that step
    trajectory = record_trajectory(TailTrainer(loaded, split), recipe, seed=5)
    step = flat(trajectory.checkpoints[1]) - flat(trajectory.checkpoints[0])
    assert float((step - delta).norm() / delta.norm()) < exact
    diffin = scores["diffin"]
    for k in range(len(DOMAINS)):
        u = weight * _grad(trainer, split.train_rows[k], params)
        q = _grad(trainer, split.held_rows[k], params)
        hu = _exact_hvp(trainer, split.held_rows[k], params, u)
        first = lr * float(q @ u)
        second = lr * float(hu @ (delta - 0.5 * lr * u))
        assert abs(second) > 1e-3 * abs(first)  # the correction is not negligible here
        assert scores["tracin_ckpt"].priority[k] == pytest.approx(first, rel=exact)
        assert diffin.details["first_order"][k] == pytest.approx(first, rel=exact)
        # a relative error r of H u moves the dot product by at most r ||H u|| ||Delta - eta u / 2||
        bound = tol * lr * float(hu.norm() * (delta - 0.5 * lr * u).norm())
        assert diffin.details["second_order"][k] == pytest.approx(second, abs=bound)
        assert diffin.priority[k] == pytest.approx(first + second, abs=bound + exact * abs(first))


def test_diffin_second_order_tracks_the_loss_difference_it_expands(setup):
    """D_k approximates L_Q(theta_1) - L_Q(theta_1 - eta u) to third order,
    TracIn's first term only to second: at a small step Diff-In is the closer."""
    loaded, split, depth = setup
    lr, weight = 1e-3, 1.0
    recipe = Recipe("one", "sgd", lr=lr, steps=1, blocks=depth, batch=1000, added_weight=weight)
    scores = {s.name: s for s in trajectory_scores(loaded, split, ("diffin", "tracin_ckpt"), recipe, seed=5)}
    trainer = TailTrainer(loaded, split)
    params = tail_parameters(trainer.work, depth)
    trajectory = record_trajectory(trainer, recipe, seed=5)
    errors = []
    for k in range(len(DOMAINS)):
        load_checkpoint(params, trajectory.checkpoints[0])
        u = weight * _grad(trainer, split.train_rows[k], params)
        load_checkpoint(params, trajectory.checkpoints[1])
        with torch.no_grad():
            after = float(_mean_loss(trainer, split.held_rows[k]))
            for p, s in zip(params, torch.split(u, [p.numel() for p in params])):
                p.sub_(lr * s.view(p.shape))
            counterfactual = float(_mean_loss(trainer, split.held_rows[k]))
        actual = after - counterfactual
        errors.append((abs(scores["diffin"].priority[k] - actual), abs(scores["tracin_ckpt"].priority[k] - actual)))
    diffin_err, tracin_err = np.sum(errors, axis=0)
    assert diffin_err < 0.2 * tracin_err


def test_vog_and_checkpoint_scores_equal_numpy_over_separate_gradients(setup):
    loaded, split, depth = setup
    recipe = Recipe("short", "adamw", lr=1e-2, steps=3, blocks=1)
    names = ("vog", "ckpt_confidence", "ckpt_variability", "el2n")
    scores = {s.name: s for s in trajectory_scores(loaded, split, names, recipe, seed=2)}
    # the same run again (same seed: the same checkpoints), then each fact alone at each checkpoint
    trainer = TailTrainer(loaded, split)
    trajectory = record_trajectory(trainer, recipe, seed=2)
    params = tail_parameters(trainer.work, recipe.blocks)
    # GPT-2 is float64 throughout; Llama's RMSNorm computes in float32 (a padded batch vs a fact alone)
    rel = 1e-8 if working_precision(trainer.work) < 1e-10 else 1e-6
    for k, rows in enumerate(split.train_rows):
        vog, conf, var, el2n = [], [], [], []
        for r in rows:
            grads, losses, errs = [], [], []
            for values in trajectory.checkpoints:
                load_checkpoint(params, values)
                hidden = trainer.data.block_inputs[r].unsqueeze(0).clone().requires_grad_(True)
                loss, logits, target = _fact_loss(trainer, r, hidden)
                grads.append(torch.autograd.grad(loss, hidden)[0][0].detach().numpy())
                losses.append(float(loss.detach()))
                p = torch.softmax(logits.detach(), -1).numpy()
                onehot = np.zeros_like(p)
                onehot[np.arange(len(target)), target.numpy()] = 1.0
                errs.append(np.linalg.norm(p - onehot, axis=-1).mean())
            grads = np.stack(grads)
            assert grads.std(axis=0).mean() > 0
            vog.append(np.sqrt(np.var(grads, axis=0)).mean())
            prob = np.exp(-np.asarray(losses))
            conf.append(1 - prob.mean())
            var.append(prob.std())
            el2n.append(np.mean(errs))
        assert scores["vog"].per_example[k] == pytest.approx(vog, rel=rel)
        assert scores["vog"].priority[k] == pytest.approx(np.mean(vog), rel=rel)
        assert scores["ckpt_confidence"].priority[k] == pytest.approx(np.mean(conf), rel=rel)
        assert scores["ckpt_variability"].priority[k] == pytest.approx(np.mean(var), rel=100 * rel)
        assert scores["el2n"].priority[k] == pytest.approx(np.mean(el2n), rel=rel)


def test_entry_point_gives_one_finite_priority_per_domain_quickly(setup):
    loaded, split, depth = setup
    recipe = Recipe("quick", "adamw", lr=1e-3, steps=2, blocks=depth)
    t0 = time.perf_counter()
    scores = trajectory_scores(loaded, split, TRAJECTORY_ESTIMATORS, recipe, seed=0, adam_batches=2)
    assert time.perf_counter() - t0 < 20
    assert [s.name for s in scores] == list(TRAJECTORY_ESTIMATORS)
    for s in scores:
        assert len(s.priority) == len(DOMAINS) and np.isfinite(s.priority).all(), s.name
        assert s.time_s > 0 and s.label
        assert np.ptp(s.priority) > 0, s.name
    with pytest.raises(ValueError, match="unknown trajectory estimator"):
        trajectory_scores(loaded, split, ("paper",), recipe)


# --- AirRep ------------------------------------------------------------------------------------------------


def test_airrep_labels_and_ranking_loss_equal_explicit_loops():
    from dowsing.estimators.airrep import normalized_labels, pairwise_ranking_loss

    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    pred = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = normalized_labels(losses)
    arr = losses.numpy()
    assert np.allclose(y.numpy(), -(arr - arr.mean(0)) / arr.std(0))
    low, high = 0.3, 1.5
    num = den = 0.0
    for x in range(3):
        for r in range(5):
            for s in range(r + 1, 5):
                gap = abs(float(y[r, x] - y[s, x]))
                if gap < low:
                    continue
                w = min(gap, high)
                sign = 1.0 if y[r, x] > y[s, x] else -1.0
                num += w * np.log1p(np.exp(-sign * float(pred[r, x] - pred[s, x])))
                den += w
    assert float(pairwise_ranking_loss(pred, y, low, high)) == pytest.approx(num / den, rel=1e-12)


def test_airrep_recovers_a_planted_ranking_on_unseen_groups():
    """Losses made by a hidden AirRep model: the fitted one ranks new groups
    for the same targets as the hidden one does (a sign error or a broken
    objective gives rho <= 0)."""
    from scipy import stats

    from dowsing.estimators.airrep import AirRepConfig, AirRepModel, fit_airrep

    gen = torch.Generator().manual_seed(1)
    features = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    hidden = AirRepModel(8, 4, seed=7)
    targets = list(range(40, 60))
    rng = np.random.default_rng(2)
    groups = [rng.choice(40, 5, replace=False).tolist() for _ in range(24)]
    with torch.no_grad():
        e = hidden.embed(features)
        truth = torch.stack([hidden.score(e[targets], e[g]) for g in groups])
    config = AirRepConfig(dim=4, steps=300, low=0.05)
    model, fit = fit_airrep(features, groups[:16], targets, -truth[:16], config)
    assert fit["loss_end"] < fit["loss_start"]
    with torch.no_grad():
        e = model.embed(features)
        pred = torch.stack([model.score(e[targets], e[g]) for g in groups[16:]])
    rhos = [stats.spearmanr(pred[:, x], truth[16:, x]).statistic for x in range(len(targets))]
    assert np.mean(rhos) > 0.5


def test_airrep_scores_every_domain_without_training_on_it(setup):
    from dowsing.estimators.airrep import AirRepConfig, airrep_scores

    loaded, split, depth = setup
    recipe = Recipe("quick", "adamw", lr=1e-2, steps=2, blocks=1)
    config = AirRepConfig(dim=4, folds=3, runs_per_fold=4, subset_facts=2, steps=50)
    t0 = time.perf_counter()
    score = airrep_scores(loaded, split, recipe, seed=0, config=config)
    assert time.perf_counter() - t0 < 30
    assert len(score.priority) == len(DOMAINS) and np.isfinite(score.priority).all()
    folds = score.details["folds"]
    assert sorted(k for f in folds for k in f["domains"]) == list(range(len(DOMAINS)))
    for f in folds:
        own = {r for k in f["domains"] for r in list(split.train_rows[k]) + list(split.held_rows[k])}
        assert own and not own & set(f["trained_on_rows"])
    assert score.details["fine_tunes"] == 3 * 4
    assert score.details["data_s"] > 0 and score.details["train_s"] > 0
