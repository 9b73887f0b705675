"""The estimate before a run: the cost model's arithmetic against numbers
computed by hand for a tiny random model, the calibration and its cache, and
--estimate on the command line and the pages (exit 0, nothing written,
nothing run; bad input as a run; the refusal of a run that exceeds the
memory available)."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from dowsing.estimates import analysis_costs, calibration, cost_report
from dowsing import costs
from dowsing.kernels import pilots
from dowsing.estimates import estimate as est
from dowsing.estimators import pilot as pilot_family
from dowsing.validation import costs as validation_costs
from tiny_models import SMALL_VOCAB
from dowsing.cli import main
from dowsing.config import AnalysisConfig
from dowsing.kernels.training import Recipe

GOOD = {"domains": [
    {"name": "Physics", "facts": ["Energy is conserved in a closed system.", "Light travels faster than sound.",
                                  "A force changes the motion of a body.", "Heat flows from hot to cold."]},
    {"name": "Biology", "facts": ["Cells are the basic unit of life.", "DNA carries genetic information.",
                                  "Plants make sugar from light.", "The heart pumps blood around the body."]},
]}


def many_facts(n: int) -> dict:
    """Two domains of n distinct facts each."""
    return {"domains": [{"name": name, "facts": [f"{name} fact number {i} is about {topic}." for i in range(n)]}
                        for name, topic in (("Physics", "energy"), ("Biology", "cells"))]}


# The tiny GPT-2 of tests/tiny_models.py by hand: d_model 16, MLP 24, 2 blocks, 128 positions. A block: two
# LayerNorms (2 x 32), attention c_attn 16 x 48 + 48 and c_proj 16 x 16 + 16, MLP c_fc 16 x 24 + 24 and
# c_proj 24 x 16 + 16. The arithmetic below uses it with the embedded tokenizer's 49 152 tokens; the model
# the tests build has the small test tokenizer's 1 024 (SMALL_VOCAB).
TINY_BLOCK = 2 * 32 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 24 + 24) + (24 * 16 + 16)
TINY_HEAD = 49152 * 16
TINY_PARAMS = TINY_HEAD + 128 * 16 + 2 * TINY_BLOCK + 32
BUILT_HEAD = SMALL_VOCAB * 16
BUILT_PARAMS = BUILT_HEAD + 128 * 16 + 2 * TINY_BLOCK + 32


def tiny_calibration(**changes) -> est.Calibration:
    """The tiny GPT-2's shape with round rates, so every number below can be
    worked out by hand."""
    fields = dict(
        model="tiny", fingerprint="tiny", device="cpu", dtype="float32", threads=1, n_params=TINY_PARAMS, n_layers=2,
        d_model=16, d_ff=24, vocab=49152, max_positions=128, block_params=TINY_BLOCK, head_params=TINY_HEAD,
        linear_shapes=((16, 48), (16, 16), (16, 24), (24, 16)), dtype_bytes=4, start_s=3.0, load_s=1.0,
        forward_s_per_token=1e-3, line_s_per_token=1e-3, tail_s_per_param_token=1e-9,
        grad_call_s=0.01, vector_s_per_element=0.0, copy_s=0.0, matmul_flops=1e9, matmul32_flops=2e9, factor_flops=5e8,
        substitution_size=24, substitution_1_s=1e-6, substitution_32_s=32e-6, bootstrap_s_per_curve=1e-4,
        leaderboard_s_per_resample=1e-4, base_bytes=100_000_000, model_bytes=0, forward_bytes_per_token=1000.0,
        coef_bytes_per_token=2000.0, step_bytes_per_token=500.0, seconds=1.0, created_at="2026-01-01T00:00:00")
    fields.update(changes)
    return est.Calibration(**fields)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, so every estimate here finds the one calibration
    (and a calibration on shared cores does not stall between threads)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def calibrated(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2's calibration at one torch thread, made once; tests
    copy it into their private cache."""
    folder = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        est.calibrate(str(tiny_gpt2_dir), threads=1)
    assert len(list((folder / "estimates").glob("*.json"))) == 1
    return folder / "estimates"


def use_calibration(calibrated: Path) -> None:
    from dowsing.paths import cache_dir

    shutil.copytree(calibrated, cache_dir() / "estimates", dirs_exist_ok=True)


# --- arithmetic ----------------------------------------------------------------------------------------------------

def test_model_shape_counts_the_tiny_model_by_hand(tiny_gpt2_dir):
    from dowsing.access.models import load_model

    shape = calibration.model_shape(load_model(str(tiny_gpt2_dir)).model)
    assert shape["block_params"] == TINY_BLOCK == 1960
    assert shape["head_params"] == BUILT_HEAD
    assert shape["n_params"] == BUILT_PARAMS == 22384
    assert (shape["n_layers"], shape["d_model"], shape["d_ff"], shape["vocab"]) == (2, 16, 24, SMALL_VOCAB)
    assert set(shape["linear_shapes"]) == {(16, 48), (16, 16), (16, 24), (24, 16)}


def test_padding_and_the_expected_longest_fact_against_enumeration():
    lengths = [3, 7, 4, 9, 5]
    assert costs.padded_tokens(lengths, 2) == 2 * 7 + 2 * 9 + 1 * 5
    # a fine-tune's read: batches of 48 sorted by length, as TailTrainer.losses takes them
    assert costs.read_tokens(lengths) == 5 * 9
    assert costs.read_tokens([2] * 47 + [9, 3]) == 48 * 3 + 1 * 9  # 47 twos and the 3, then the 9
    from dowsing.kernels.training import TailTrainer
    import inspect
    assert inspect.signature(TailTrainer.losses).parameters["batch_size"].default == costs.READ_BATCH
    assert costs.predicted_tokens(lengths) == 2 + 6 + 3 + 8 + 4
    assert costs.chunked(lengths, 2) == (3, 37)
    for k in range(1, 6):
        draws = list(itertools.combinations(lengths, k))
        assert costs.expected_longest(lengths, k) == pytest.approx(sum(max(d) for d in draws) / len(draws))
    assert costs.expected_padded(lengths, 9) == 5 * 9


def test_passes_through_the_last_blocks_by_hand():
    cal = tiny_calibration()
    # forward: head + 2 blocks; backward through 1 trained block: head again + 2 x that block
    work = TINY_HEAD + 2 * 1960 + TINY_HEAD + 2 * 1960
    assert costs.tail_work(cal, 2, 1) == work
    assert costs.tail_pass_s(cal, 100, 2, 1) == pytest.approx(1e-9 * 100 * work)
    assert costs.gradients_s(cal, 3, 100, 2, 1) == pytest.approx(3 * 0.01 + 1e-9 * 100 * work)
    eval_work = TINY_HEAD + 2 * 1960
    assert costs.finetune_s(cal, 4, 50, 2, 1, 30) == pytest.approx(4 * 1e-9 * 50 * work + 1e-9 * 30 * eval_work)
    assert costs.tail_params(cal, 1) == TINY_PARAMS - 1960
    assert costs.hessian_s(cal, 10) == pytest.approx(2 * 10 * 24 ** 2 / 1e9)
    # the substitutions read the factor: 1e-6 s per right-hand side at 24 x 24, growing with the size squared
    assert costs.substitution_s(cal, 48, 3) == pytest.approx(3e-6 * 4)
    assert costs.solve_s(cal, 24) == pytest.approx(24 ** 3 / 3 / 5e8 + 1e-6)


def test_analysis_stages_and_memory_by_hand():
    from dowsing.kernels.saturation import n_grid

    cal = tiny_calibration()
    domains = [("A", [5, 6]), ("B", [4, 3, 8])]
    got = est.analysis_cost(cal, domains, AnalysisConfig(estimator="mean_loss"))
    # each domain in batches of its own: A's 2 facts padded to 6 tokens, B's 3 to 8; 21 predicted tokens, 9 in A
    # and 12 in B
    assert (got.stages_s["start-up"], got.stages_s["load model"]) == (3.0, 1.0)
    assert got.stages_s["forward pass"] == pytest.approx(1e-3 * (2 * 6 + 3 * 8))
    d, n, flops, factor = 24, 21, 1e9, 5e8
    # every token's coefficients along both domains' directions in one pass: the calibration's pass along 4
    # directions (1e-3 s a token) scaled by the work per token, 2 d_model + 6 K + 16 vocabulary-sized operations
    solve = n * 1e-3 * (2 * 16 + 6 * 2 + 16) / (2 * 16 + 6 * 4 + 16)
    for r, m in ((9, 2), (12, 3)):  # both low rank (r < d_ff): Woodbury
        solve += 2 * n * d * d / flops + (d ** 3 / 3 / factor + 1e-6)
        solve += (2 * d ** 3 / 3) / factor + r * 1e-6 + 2 * r * r * d / flops
    assert got.stages_s["solve"] == pytest.approx(solve)
    assert got.stages_s["ranking"] == 0.0  # mean loss reuses the forward pass
    points = [len(n_grid(m, 24, 1000.0)) for m in (2, 3)]
    # the grid from one eigendecomposition per domain: the fit's brentq is O(r) per step
    saturation = sum(p * 8 * r / flops for p, r in zip(points, (9, 12)))
    assert got.stages_s["saturation"] == pytest.approx(saturation)
    # the kernels and the curve's grid for the m + 1 rows [G; g]: eig of diag(d) P (20 r^3 / 1.5) and the complex
    # LU of its eigenvectors (4 r^3 / 1.5) with 4 substitutions, the rows' products, two Woodbury solves at the
    # grid's ends, 8 r (m + 1)^2 per grid point; then 200 resampled curves per domain
    bootstrap = 2 * 200 * 1e-4
    for p, r, m in zip(points, (9, 12), (2, 3)):
        rows = m + 1
        products = 1e-6 * rows * (d / 24) ** 2 + (4 * r * d * rows + 2 * rows * rows * d) / flops
        woodbury = products + r ** 3 / 1.5 / factor + 1e-6 * rows * (r / 24) ** 2
        spectrum = 24 * r ** 3 / 1.5 / factor + 4 * 1e-6 * rows * (r / 24) ** 2
        bootstrap += spectrum + products + 2 * woodbury + p * 8 * r * rows * rows / flops
    assert got.stages_s["bootstrap"] == pytest.approx(bootstrap)
    assert got.total_s == pytest.approx(sum(got.stages_s.values()))
    weights, tokens = TINY_PARAMS * 4, n * (24 + 16) * 4 + n * 8 * 3
    assert got.memory_bytes["forward pass"] == 100_000_000 + weights + tokens + 1000 * 24  # B's batch
    # the coefficients' pass: one chunk's vocabulary rows (2000 bytes a token here) and (a, c) per domain
    solve_bytes = (5 * d + 4 * d * d + 2 * 12 * d + 12 * 12) * 8 + max(2000 * n + 2 * n * 2 * 8, 2 * n * d * 8)
    assert got.memory_bytes["solve"] == 100_000_000 + weights + tokens + solve_bytes
    assert got.peak_bytes == max(got.memory_bytes.values())


def test_alignment_ranking_counts_one_gradient_per_fact_and_per_chunk():
    cal = tiny_calibration(grad_call_s=1.0, tail_s_per_param_token=0.0, vector_s_per_element=1e-6)
    domains = [("A", [5] * 20), ("B", [6] * 3)]
    got = analysis_costs.ranking_cost(cal, domains, AnalysisConfig(estimator="alignment")).seconds
    # A: 2 chunks of 16 and 20 single facts; B: 1 chunk and 3 singles. A chunk's gradient is flattened and
    # scaled (2 passes over the 2 x 1960 trained parameters), a fact's flattened, squared, and dotted with
    # itself and the domain's sum (4 passes)
    vectors = ((2 + 1) * 2 + (20 + 3) * 4) * 2 * 1960 * 1e-6
    assert got == pytest.approx(2 + 20 + 1 + 3 + vectors)
    adam = analysis_costs.ranking_cost(cal, domains, AnalysisConfig(estimator="alignment_adam", adam_batches=8)).seconds
    # Adam's moment: 8 more gradients, each squared in float64 and summed (3 passes)
    assert adam == pytest.approx(got + 8 + 8 * 3 * 2 * 1960 * 1e-6)


def test_benchmark_counts_the_protocols_fine_tunes_by_hand():
    from dowsing.validation.benchmark import BenchmarkConfig

    cal = tiny_calibration()
    # the quick protocol: samples of 8 (halves of 4), 4 test facts, pools of 8; doses 4 and 8 and the second
    # reading; one recipe (4 steps, the last 2 blocks, 4 sample facts + 4 added facts a step), 2 seeds.
    # Every fact 6 tokens, so each minibatch's padding is its size times 6.
    config = BenchmarkConfig.quick(curve_domains=("B",))
    names = ("A", "B", "C")
    train, held = [(n, [6] * 4) for n in names], [(n, [6] * 4) for n in names]
    test, pool = [(n, [6] * 4) for n in names], [(n, [6] * 8) for n in names]
    got = est.benchmark_cost(cal, train, held, test, pool, config)
    units = validation_costs.benchmark_units_s(cal, [[6] * 8] * 3, [[6] * 4] * 3, [[6] * 8] * 3, config, 2)
    # per seed: the baseline and per domain 2 doses and its sample: 1 + 3 x 3 = 10, twice
    assert len(units) == 2 * 10
    train_work = 2 * TINY_HEAD + 6 * TINY_BLOCK  # forward and backward through the 2 trained blocks
    read_work = TINY_HEAD + 2 * TINY_BLOCK
    # dose_steps = max(4, ceil(2 x 8 / 4)) = 4 steps each; the baseline reads the 12 test facts before and after
    baseline = 1e-9 * (4 * 4 * 6 * train_work + 2 * 12 * 6 * read_work)
    added = 1e-9 * (4 * 8 * 6 * train_work + 4 * 6 * read_work)  # a dose or the sample, read on 4 test facts
    assert sum(units) == pytest.approx(2 * (baseline + 9 * added))
    check = 1e-9 * 12 * 6 * read_work  # the trainer's check: the first 16 test facts (there are 12)
    assert got.stages_s["fine-tunes"] == pytest.approx(sum(units) + check)
    # two forward passes: the 24 sample facts, and all 60 (samples, pools, test facts)
    assert got.stages_s["forward pass"] == pytest.approx(1e-3 * (24 + 60) * 6)
    assert {"subspace estimators", "alignment estimators", "EK-FAC", "trajectory estimators", "AirRep",
            "pilot estimators"} <= set(got.stages_s)
    assert "20 fine-tunes of 4 steps (1 recipes x 2 seeds x 10: the baseline and per domain 2 doses and its sample)" \
        in " ".join(got.basis)
    # the leaderboard: per estimator, both readings and the per-group boards of all and the ordinary domains
    # (no hard case here)
    assert got.stages_s["leaderboard"] == pytest.approx(len(config.estimators) * (2 + 2) * 500 * 1e-4)
    # the memory holds both passes' per-token tensors and block inputs
    tokens = (24 + 60) * 5 * (24 + 16 + 6) * 4 + (24 + 60) * 6 * 16 * 4
    assert got.memory_bytes["forward pass"] == 100_000_000 + TINY_PARAMS * 4 + tokens + 1000 * 16 * 6
    # on 2 Ray workers sharing this machine: (estimators + fine-tunes at one thread) / 2, beside the estimators
    ray = est.benchmark_cost(cal, train, held, test, pool, config, ray_workers=2, ray_local=True)
    families = ("subspace estimators", "alignment estimators", "EK-FAC", "trajectory estimators", "AirRep",
                "pilot estimators")
    estimators = sum(v for k, v in ray.stages_s.items() if k in families)
    assert ray.stages_s["fine-tunes"] == pytest.approx(max((estimators + sum(units)) / 2 - estimators, 0.0) + check)
    # without the second reading, one run fewer per domain and seed
    single = validation_costs.benchmark_units_s(cal, [[6] * 8] * 3, [[6] * 4] * 3, [[6] * 8] * 3,
                                   BenchmarkConfig.quick(second_reading=False), 2)
    assert len(single) == 2 * 7 and sum(single) == pytest.approx(2 * (baseline + 6 * added))


def test_a_dose_walks_its_pool_so_every_step_adds_a_full_minibatch():
    base = [6] * 24
    # one pool fact of 9 tokens: the cycled minibatch repeats it (4 + 4 facts), a drawn one holds it once
    assert costs.step_padded(base, [9], 4, 4, cycled=True) == 8 * 9
    assert costs.step_padded(base, [9], 4, 4) == 5 * 9
    assert costs.step_padded(base, None, 4, 4) == 4 * 6


def test_pilot_estimators_by_hand():
    cal = tiny_calibration()
    train, held = [[6] * 4, [6] * 4, [6] * 1], [[6] * 4, [6] * 4, [6] * 1]  # the third domain is too small
    train_work = 2 * TINY_HEAD + 6 * TINY_BLOCK  # PILOT_RECIPE trains min(4, keep = 2) blocks
    read_work = TINY_HEAD + 2 * TINY_BLOCK
    check = 1e-9 * 9 * 6 * read_work  # the pilot trainer's check on the 9 facts of the halves B
    # pilot_gain: the smaller half's whole size (4 facts), both ways: 4 steps of all 4 facts, a read of the other 4
    run = 1e-9 * (4 * 4 * 6 * train_work + 4 * 6 * read_work)
    assert pilot_family.pilot_family_s(cal, train, held, ["pilot_gain"], 2, (2, 4)) == pytest.approx(check + 2 * 2 * run)
    # pilot_curve: sizes 2 and 4, both ways
    small = 1e-9 * (4 * 2 * 6 * train_work + 4 * 6 * read_work)
    assert pilot_family.pilot_family_s(cal, train, held, ["pilot_gain", "pilot_curve"], 2, (2, 4)) == pytest.approx(
        check + 2 * 2 * (run + small))
    # lookahead_sign: per half a forward pass over its 4 facts and a backward through the head and both blocks
    half = 1e-3 * 24 + 1e-9 * 24 * (TINY_HEAD + 4 * TINY_BLOCK)
    assert pilot_family.pilot_family_s(cal, train, held, ["lookahead_sign"], 2) == pytest.approx(2 * 2 * half)
    # memory: the pilots' trainer (block inputs of the 18 facts, a tail copy and its starting weights, gradients
    # and AdamW's moments of 2 blocks) with a step over the larger half (4 facts); the lookahead's whole-model
    # gradients and signs with a batch's activations (the one-block step's 500 B a token, then the other block's
    # 10 x 16 + 4 x 24 values)
    trainer = 18 * 6 * 16 * 4 + 2 * TINY_PARAMS * 4 + 3 * 2 * TINY_BLOCK * 4  # both blocks kept: the whole model
    step = 500 * 4 * 6
    lookahead = 4 * TINY_PARAMS * 4 + (500 + (10 * 16 + 4 * 24) * 4) * 16 * 6
    assert pilot_family.pilot_memory(cal, train, held, 2, ["pilot_gain"]) == trainer + step
    assert pilot_family.pilot_memory(cal, train, held, 2, ["lookahead_sign"]) == lookahead
    assert pilot_family.pilot_memory(cal, train, held, 2, ["pilot_curve", "lookahead_sign"]) == trainer + max(step, lookahead)


def test_the_analysis_counts_its_diagnosis_and_pilot_rankings():
    cal = tiny_calibration()
    domains = [("A", [6] * 8), ("B", [6] * 8)]
    plain = est.analysis_cost(cal, domains, AnalysisConfig(estimator="mean_loss", diagnose=False))
    assert "diagnosis" not in plain.stages_s
    diagnosed = est.analysis_cost(cal, domains, AnalysisConfig(estimator="mean_loss"))
    halves = ([[6] * 4] * 2, [[6] * 4] * 2)
    want = pilot_family.pilot_family_s(cal, *halves, ["pilot_gain"], 2)
    assert diagnosed.stages_s["diagnosis"] == pytest.approx(want) and want > 0
    assert diagnosed.total_s == pytest.approx(plain.total_s + want)
    # ranked by the pilot gain, the diagnosis reuses it; its cost is the ranking's
    pilot = est.analysis_cost(cal, domains, AnalysisConfig(estimator="pilot_gain"))
    assert "diagnosis" not in pilot.stages_s and pilot.stages_s["ranking"] == pytest.approx(want)
    curve = est.analysis_cost(cal, domains, AnalysisConfig(estimator="pilot_curve", diagnose=False))
    assert curve.stages_s["ranking"] == pytest.approx(pilot_family.pilot_family_s(cal, *halves, ["pilot_curve"], 2))
    assert curve.stages_s["ranking"] > want
    # ranked by the pilot curve, the diagnosis reads the curve's largest runs (`analysis._diagnosis`): no more runs
    assert est.analysis_cost(cal, domains, AnalysisConfig(estimator="pilot_curve")).stages_s == curve.stages_s


def test_a_plan_counts_its_pilot_fine_tunes_by_hand():
    from dowsing.pipelines.plan import PilotConfig

    cal = tiny_calibration()
    # A: halves of 4 facts of 5 tokens (pilot sizes 2, 4); B: halves of 8 facts of 6 tokens (2, 4, 8)
    train, held = [("A", [5] * 4), ("B", [6] * 8)], [("A", [5] * 4), ("B", [6] * 8)]
    got = est.plan_cost(cal, train, held, PilotConfig())
    assert len(pilots.plan_units_s(cal, [[5] * 4, [6] * 8], [[5] * 4, [6] * 8], (2, 4, 8), 4, 2)) == 2 * (2 + 3)
    # both blocks of the tiny model train (the pilot recipe's 4, cut to 2); every fact of n in each of 4 steps
    train_work, eval_work = 2 * TINY_HEAD + 6 * TINY_BLOCK, TINY_HEAD + 2 * TINY_BLOCK
    steps = 4 * (2 + 4) * 5 * 2 + 4 * (2 + 4 + 8) * 6 * 2
    reads = 4 * 5 * 4 + 8 * 6 * 6  # the other half's losses after each of the 10 fine-tunes
    check = 16 * 6  # the trainer's check: 16 facts padded to the longest
    assert got.stages_s["pilot fine-tunes"] == pytest.approx(1e-9 * (steps * train_work + (reads + check) * eval_work))
    assert got.stages_s["forward pass"] == pytest.approx(1e-3 * (16 * 6 + 8 * 6))  # batches of 16, in split order
    assert list(got.stages_s) == ["start-up", "load model", "forward pass", "pilot fine-tunes"]
    assert got.peak_stage == "pilot fine-tunes" and "10 pilot fine-tunes of 4 steps" in " ".join(got.basis)


# --- what is stored, and where a run stops ------------------------------------------------------------------------

# A, B, C: fact lengths differ per domain; A (recomputed below) comes first, so the pilot trainer's check (the first
# 16 held-out facts of the run, `TailTrainer.check`) reads A's facts whether B and C are in the run or not
STORED_CASE = [("A", [5] * 32), ("B", [6] * 32), ("C", [7] * 20)]


@pytest.mark.parametrize("estimator, stage", [("pilot_curve", "ranking"), ("pilot_gain", "ranking"),
                                              ("mean_loss", "diagnosis")])
def test_stored_pilots_price_exactly_the_other_domains_pilots(estimator, stage):
    from dowsing.kernels.splitting import split_order

    cal = tiny_calibration()
    config = AnalysisConfig(estimator=estimator)
    fresh = est.analysis_cost(cal, STORED_CASE, config)
    got = est.analysis_cost(cal, STORED_CASE, config, pilots_stored={"B", "C"})
    # the pilot stage: what an analysis of A alone would price for it
    alone = est.analysis_cost(cal, STORED_CASE[:1], config)
    assert got.stages_s[stage] == pytest.approx(alone.stages_s[stage]) and got.stages_s[stage] > 0
    # and through the family's own function, on A's seeded halves
    a, b = split_order([5] * 32, "A", 0)
    names = ["pilot_gain"] if stage == "diagnosis" else [estimator]
    assert got.stages_s[stage] == pytest.approx(pilot_family.pilot_family_s(cal, [a], [b], names, 2))
    assert got.stages_s[stage] < fresh.stages_s[stage]
    # every other stage, the forward pass over all three domains included, is the fresh estimate's
    assert {k: v for k, v in got.stages_s.items() if k != stage} == {
        k: v for k, v in fresh.stages_s.items() if k != stage}
    assert got.notes[0].startswith(f"2 of 3 domains' pilot curves from cache: the {stage} counts")
    # every curve stored: no trainer, no pilot fine-tune
    every = est.analysis_cost(cal, STORED_CASE, config, pilots_stored={"A", "B", "C"})
    assert every.stages_s[stage] == 0.0 and every.notes[0].startswith("3 of 3")
    # names of domains not in the run, or a run with no pilots, change nothing
    assert est.analysis_cost(cal, STORED_CASE, config, pilots_stored={"Z"}).stages_s == fresh.stages_s
    plain = AnalysisConfig(estimator="mean_loss", diagnose=False)
    assert (est.analysis_cost(cal, STORED_CASE, plain, pilots_stored={"B"}).stages_s
            == est.analysis_cost(cal, STORED_CASE, plain).stages_s)


def test_stored_forward_pieces_price_exactly_the_other_domains_forward_pass():
    cal = tiny_calibration()
    config = AnalysisConfig(estimator="mean_loss")
    fresh = est.analysis_cost(cal, STORED_CASE, config)
    got = est.analysis_cost(cal, STORED_CASE, config, forward_stored={"B", "C"})
    # A's facts in batches of their own, as an analysis of A alone runs them
    alone = est.analysis_cost(cal, STORED_CASE[:1], config)
    assert got.stages_s["forward pass"] == pytest.approx(alone.stages_s["forward pass"]) == pytest.approx(1e-3 * 32 * 5)
    # each domain in batches of its own: C's 20 facts one batch of 16 and one of 4
    assert fresh.stages_s["forward pass"] == pytest.approx(1e-3 * (32 * 5 + 32 * 6 + 20 * 7))
    # the other stages span every domain (the solve needs every domain's tokens, stored or not)
    assert {k: v for k, v in got.stages_s.items() if k != "forward pass"} == {
        k: v for k, v in fresh.stages_s.items() if k != "forward pass"}
    assert "2 of 3 domains' forward passes from cache: the forward pass counts the other 1" in got.notes
    assert est.analysis_cost(cal, STORED_CASE, config, forward_stored={"A", "B", "C"}).stages_s["forward pass"] == 0.0
    assert est.analysis_cost(cal, STORED_CASE, config, forward_stored={"Z"}).stages_s == fresh.stages_s


@pytest.mark.parametrize("route", [dict(blocks=1), dict(blocks=2, solver="exact"), dict(blocks=2, solver="cg")])
def test_stage_ranking_drops_exactly_the_papers_stages(route):
    cal = tiny_calibration()
    paper = {"solve", "saturation", "bootstrap"}
    for workers in (0, 2):
        full = est.analysis_cost(cal, STORED_CASE, AnalysisConfig(**route), workers)
        ranked = est.analysis_cost(cal, STORED_CASE, AnalysisConfig(stage="ranking", **route), workers)
        assert set(full.stages_s) - set(ranked.stages_s) == paper and set(ranked.stages_s) < set(full.stages_s)
        assert ranked.stages_s == {k: v for k, v in full.stages_s.items() if k not in paper}
        assert ranked.memory_bytes == {k: v for k, v in full.memory_bytes.items() if k not in paper}
        assert ranked.total_s == pytest.approx(full.total_s - sum(full.stages_s[k] for k in paper))
        assert any(n.startswith("stage ranking") for n in ranked.notes)
        assert not any("CG" in n or "Hessian-vector" in n for n in ranked.notes)


def test_a_plan_with_stored_pilots_prices_only_the_others():
    from dowsing.pipelines.plan import PilotConfig, PlanConfig

    cal = tiny_calibration()
    train, held = [("A", [5] * 4), ("B", [6] * 8)], [("A", [5] * 4), ("B", [6] * 8)]
    got = est.plan_cost(cal, train, held, PilotConfig(), pilots_stored={"B"})
    alone = est.plan_cost(cal, train[:1], held[:1], PilotConfig())
    # measure_pilots reads and fine-tunes only the domains it measures
    assert got.stages_s == alone.stages_s and got.memory_bytes == alone.memory_bytes
    assert got.notes[0].startswith("1 of 2 domains' pilot curves from cache")
    every = est.plan_cost(cal, train, held, PilotConfig(), pilots_stored={"A", "B"})
    assert list(every.stages_s) == ["start-up", "load model"]
    # a transfer matrix may need every domain's block inputs: the forward pass reads them all
    both = est.plan_cost(cal, train, held, PilotConfig(transfer=True), pilots_stored={"B"})
    assert both.stages_s["forward pass"] == est.plan_cost(cal, train, held, PilotConfig()).stages_s["forward pass"]
    assert both.stages_s["pilot fine-tunes"] < est.plan_cost(cal, train, held, PilotConfig()).stages_s[
        "pilot fine-tunes"]
    # the transfer matrix, none of its entries stored: after each source's two runs every domain's halves are
    # read through the kept blocks (A: 2 x 4 facts of 5 tokens, B: 2 x 8 of 6, one padded batch each); B's pilot
    # is stored, so its two runs at its largest pilot size (8 facts of 6 tokens, every fact each step) come first
    from dowsing.costs import finetune_s, tail_pass_s
    from dowsing.kernels.pilots import PILOT_RECIPE

    keep, steps = min(PILOT_RECIPE.blocks, cal.n_layers), PILOT_RECIPE.steps
    reads = tail_pass_s(cal, 2 * 4 * 5, keep) + tail_pass_s(cal, 2 * 8 * 6, keep)
    runs_b = 2 * finetune_s(cal, steps, 8 * 6, keep, keep, 0)
    assert both.stages_s["transfer"] == pytest.approx(2 * reads + runs_b)
    assert "transfer" not in est.plan_cost(cal, train, held, PilotConfig(), pilots_stored={"B"}).stages_s
    # a whole plan fits each domain's curve: resamples x the calibrated per-curve fit, per domain with a pilot
    planned = est.plan_cost(cal, train, held, PlanConfig(budget=10, bootstrap_resamples=500), pilots_stored={"B"})
    assert planned.stages_s["fits"] == pytest.approx(2 * 500 * 1e-4)
    assert {k: v for k, v in planned.stages_s.items() if k != "fits"} == got.stages_s


def test_estimates_after_a_ranking_stage_analysis_read_its_stored_units(tiny_gpt2_dir, calibrated):
    from dowsing.pipelines.analysis import forward_status, pilot_status, run_analysis
    from dowsing.pipelines.plan import PlanConfig

    use_calibration(calibrated)
    model = str(tiny_gpt2_dir)
    config = AnalysisConfig(stage="ranking", bootstrap_resamples=200)
    run_analysis(model, GOOD["domains"], config)
    # the same request again: the result cache returns it at once
    again = est.estimate_analysis(model, GOOD["domains"], config)
    assert again.total_s == 0.0 and "cached" in again.notes[0]
    # a third domain: its pilot curve alone is computed, the two stored ones are not priced
    chemistry = {"name": "Chemistry", "facts": ["Water is two hydrogens and one oxygen.", "Salt dissolves in water.",
                                                "Acids turn litmus red.", "Iron rusts in moist air."]}
    three = GOOD["domains"] + [chemistry]
    assert pilot_status(model, three, config)["reused"] == ["Physics", "Biology"]
    got = est.estimate_analysis(model, three, config)
    fresh = est.estimate_analysis(model, three, config, use_cache=False)
    assert got.notes[0].startswith("2 of 3 domains' pilot curves from cache")
    assert 0 < got.stages_s["ranking"] < fresh.stages_s["ranking"]
    # and its forward pass alone: the two stored domains' forward pieces are not priced either
    assert forward_status(model, three, config) == {"computed": ["Chemistry"], "reused": ["Physics", "Biology"],
                                                    "message": "1 of 3 domains recomputed, 2 from cache"}
    alone = est.estimate_analysis(model, [chemistry], config, use_cache=False)
    assert 0 < got.stages_s["forward pass"] == pytest.approx(alone.stages_s["forward pass"])
    assert got.stages_s["forward pass"] < fresh.stages_s["forward pass"]
    assert "2 of 3 domains' forward passes from cache: the forward pass counts the other 1" in got.notes
    assert not {"solve", "saturation", "bootstrap"} & set(got.stages_s)
    # a plan of the same domains finds the analysis' curves: no forward pass, no fine-tune, only the fits
    plan = est.estimate_plan(model, GOOD["domains"], PlanConfig(budget=10))
    assert list(plan.stages_s) == ["start-up", "load model", "fits"]
    assert plan.notes[0].startswith("2 of 2 domains' pilot curves from cache")


def test_plan_estimate_exits_0_prints_and_writes_nothing(tmp_path, capsys, monkeypatch, tiny_gpt2_dir, calibrated):
    import dowsing.pipelines.plan
    from dowsing.paths import cache_dir

    use_calibration(calibrated)

    def no_run(*args, **kwargs):
        raise AssertionError("--estimate ran the plan")

    for name in ("run_plan", "pilot_measurements", "measure_pilots"):
        monkeypatch.setattr(dowsing.pipelines.plan, name, no_run)
    domains = tmp_path / "d.json"
    domains.write_text(json.dumps(GOOD))
    out = tmp_path / "out.json"
    def written():  # but the memo of the model files' hashes (cache/hashes) that finds its calibration
        return sorted(p.relative_to(cache_dir()) for p in cache_dir().rglob("*") if "hashes" not in p.parts)

    before = written()
    code = main(["plan", "--budget", "10", "--model", str(tiny_gpt2_dir), "--domains", str(domains), "--out",
                 str(out), "--estimate"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "Estimated plan:" in stdout and "pilot fine-tunes" in stdout and "fits" in stdout
    assert "Nothing was run" in stdout
    after = written()
    assert not out.exists() and after == before, after


@pytest.mark.parametrize("bad", ["domains", "budget", "model"])
def test_bad_input_to_plan_estimate_is_one_line_and_exit_2(bad, tmp_path, capsys, tiny_gpt2_dir):
    domains = tmp_path / "d.json"
    domains.write_text('{"domains": [' if bad == "domains" else json.dumps(GOOD))
    model = str(tmp_path / "no-such-model") if bad == "model" else str(tiny_gpt2_dir)
    out = tmp_path / "out.json"
    code = main(["plan", "--budget", "-5" if bad == "budget" else "10", "--model", model, "--domains", str(domains),
                 "--out", str(out), "--estimate"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_estimate_of_cached_pilots_says_they_return_at_once(tiny_gpt2_dir, calibrated):
    from dowsing.pipelines.plan import PilotConfig, PlanConfig, pilot_measurements

    use_calibration(calibrated)
    fresh = est.estimate_plan(str(tiny_gpt2_dir), GOOD["domains"], PilotConfig())
    assert fresh.total_s > 0 and "pilot fine-tunes" in fresh.stages_s
    pilot_measurements(str(tiny_gpt2_dir), GOOD["domains"], PilotConfig())
    got = est.estimate_plan(str(tiny_gpt2_dir), GOOD["domains"], PilotConfig())
    assert got.stages_s == {"cached pilots": 0.0} and "cached" in got.notes[0]
    # a whole plan on the same pilots still fits its curves: 2 domains x 300 resamples of the per-curve fit
    cal = est.cached_calibration(str(tiny_gpt2_dir), "cpu", "float32", 1)
    planned = est.estimate_plan(str(tiny_gpt2_dir), GOOD["domains"], PlanConfig(budget=10, bootstrap_resamples=300))
    assert planned.stages_s == {"cached pilots": 0.0, "fits": pytest.approx(2 * 300 * cal.bootstrap_s_per_curve)}


def test_memory_refusal_when_the_peak_exceeds_what_is_available(capsys, monkeypatch):
    estimate = est.Estimate("analysis", {"forward pass": 1.0}, {"forward pass": 5_000_000_000}, "cpu")
    assert est.memory_refusal(estimate, 10_000_000_000) is None
    refusal = est.memory_refusal(estimate, 1_000_000_000)
    assert "5.0 GB" in refusal and "1.0 GB" in refusal and "forward pass" in refusal
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1_000_000_000)
    assert est.report(lambda: [estimate]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "exceeds" in err and "refused" in err and len(err.splitlines()) == 1
    assert "Available memory: 1.0 GB" in out and "Nothing was run" in out


def test_a_busy_machine_is_named_in_the_estimate(monkeypatch):
    quiet = est.analysis_cost(tiny_calibration(load_average=0.0), [("A", [5, 6])], AnalysisConfig())
    assert "busy" not in " ".join(quiet.basis)
    busy = est.analysis_cost(tiny_calibration(load_average=64.0), [("A", [5, 6])], AnalysisConfig())
    assert "busy then, load average 64.0" in " ".join(busy.basis) and "cache" in " ".join(busy.basis)
    monkeypatch.setattr(est.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert est.load_note() is None
    monkeypatch.setattr(est.os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    assert "busy now (load average 64.0" in est.load_note()


# --- every family prices itself -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["subspace", "alignment", "ekfac", "trajectory", "airrep", "pilot"])
def test_every_family_declares_a_finite_cost_that_grows_with_its_facts(family):
    """Each shipped family's own cost function in a benchmark: finite,
    positive seconds and bytes, and more of both for twice the facts."""
    from dowsing.costs import RunShape
    from dowsing.estimators import ESTIMATORS, FAMILIES

    cal = tiny_calibration(copy_s=0.5, vector_s_per_element=1e-9)
    members = [n for n, e in ESTIMATORS.items() if e.family == family]
    recipe = Recipe("adamw", steps=4, blocks=2, batch=4, added_batch=4)

    def run(facts):
        return RunShape("benchmark", [[6] * facts] * 3, [[7] * facts] * 3, 2, recipe=recipe, recipes=(recipe,),
                        adam_batches=4, align_blocks=2, ekfac_blocks=1, ekfac_fit_facts=32)

    small, large = (FAMILIES[family].price(cal, run(n), members) for n in (4, 8))
    assert FAMILIES[family].stage
    assert 0 < small.seconds < large.seconds and math.isfinite(large.seconds)
    assert 0 < small.bytes <= large.bytes and math.isfinite(large.bytes)


@pytest.fixture
def toy_family():
    """A family registered the way a new one is, in one place: its estimator,
    its compute and its cost (one second per training fact, 1 MB per
    held-out fact); removed afterwards."""
    from dowsing.costs import Cost
    from dowsing.estimators import Estimator, registry

    def cost(cal, run, names):
        return Cost(1.0 * sum(map(len, run.train)) * len(names), 1e6 * sum(map(len, run.held)))

    registry.register(Estimator("toy_count", "Toy: facts counted", "toy", "counts facts", in_analysis=True))
    registry.register_family("toy", lambda ctx, names: [], cost, "toy estimators")
    yield "toy_count"
    registry.unregister_family("toy")


def test_a_registered_toy_family_is_in_every_estimate_without_an_edit_of_estimate(toy_family):
    from dowsing.validation.benchmark import BenchmarkConfig
    from dowsing.validation.validate import ValidationConfig

    cal = tiny_calibration()
    names = ("A", "B", "C")
    train, held = [(n, [6] * 4) for n in names], [(n, [6] * 4) for n in names]
    test, pool = [(n, [6] * 4) for n in names], [(n, [6] * 8) for n in names]
    plain = est.benchmark_cost(cal, train, held, test, pool, BenchmarkConfig.quick(estimators=("mean_loss",)))
    got = est.benchmark_cost(cal, train, held, test, pool,
                             BenchmarkConfig.quick(estimators=("mean_loss", toy_family)))
    # its own stage after the shipped ones: 12 training facts, 12 MB over what the estimators' stages hold
    assert list(got.stages_s)[list(got.stages_s).index("subspace estimators") + 1] == "toy estimators"
    assert got.stages_s["toy estimators"] == 12.0
    assert got.memory_bytes["toy estimators"] == got.memory_bytes["leaderboard"] + 12_000_000
    # the leaderboard has one more row to resample; every other stage is the same
    assert {k: v for k, v in got.stages_s.items() if k not in ("toy estimators", "leaderboard")} == {
        k: v for k, v in plain.stages_s.items() if k != "leaderboard"}
    validation = [(n, [6] * 8) for n in names], [(n, [6] * 2) for n in names]
    without = est.validation_cost(cal, *validation, ValidationConfig(estimators=("mean_loss",)))
    with_toy = est.validation_cost(cal, *validation, ValidationConfig(estimators=("mean_loss", toy_family)))
    assert with_toy.stages_s["estimators"] == pytest.approx(without.stages_s["estimators"] + 24.0)
    # the pilot estimators run in a validation too: their fine-tunes are priced over its halves (the last
    # finetune_blocks blocks kept, as the validation captures them)
    config = ValidationConfig(estimators=("mean_loss", "pilot_curve"))
    with_pilots = est.validation_cost(cal, *validation, config)
    tr, he = [list(x) for _, x in validation[0]], [list(x) for _, x in validation[1]]
    pilots = pilot_family.pilot_family_s(cal, tr, he, {"pilot_curve"}, min(config.finetune_blocks, cal.n_layers))
    assert pilots > 0
    assert with_pilots.stages_s["estimators"] == pytest.approx(without.stages_s["estimators"] + pilots)
    ranked = est.analysis_cost(cal, [(n, [6] * 8) for n in names], AnalysisConfig(estimator=toy_family,
                                                                                 diagnose=False))
    assert ranked.stages_s["ranking"] == 12.0  # the seeded halves' training facts: 4 of each domain's 8


# --- the calibration and the command line ----------------------------------------------------------------------------

def test_calibration_is_measured_once_and_cached(tiny_gpt2_dir, calibrated):
    from dowsing.paths import cache_dir

    use_calibration(calibrated)
    stored = {json.loads(p.read_text())["threads"]: p for p in (cache_dir() / "estimates").glob("*.json")}
    assert list(stored) == [1]
    cached, loaded = est.calibrate(str(tiny_gpt2_dir), threads=1)
    assert loaded is None  # read back, not measured again
    assert cached == est.Calibration.from_dict(json.loads(stored[1].read_text()))
    assert cached.block_params == TINY_BLOCK and cached.n_params == BUILT_PARAMS
    for name in ("forward_s_per_token", "line_s_per_token", "tail_s_per_param_token",
                 "matmul_flops", "factor_flops", "bootstrap_s_per_curve", "base_bytes", "forward_bytes_per_token"):
        assert getattr(cached, name) > 0, name
    # the batch's logits are held at once: the extra memory per token is at least one row of them
    assert cached.forward_bytes_per_token >= SMALL_VOCAB * cached.dtype_bytes
    assert est.Calibration.from_dict(cached.to_dict()) == cached


def test_analyze_estimate_exits_0_writes_nothing_and_runs_nothing(tmp_path, capsys, monkeypatch, tiny_gpt2_dir,
                                                                 calibrated):
    import dowsing.pipelines.analysis
    from dowsing.paths import cache_dir

    use_calibration(calibrated)

    def no_run(*args, **kwargs):
        raise AssertionError("--estimate ran the analysis")

    monkeypatch.setattr(dowsing.pipelines.analysis, "run_analysis", no_run)
    monkeypatch.setattr(dowsing.pipelines.analysis, "analyze", no_run)
    domains = tmp_path / "d.json"
    domains.write_text(json.dumps(GOOD))
    out = tmp_path / "out.json"
    code = main(["analyze", "--model", str(tiny_gpt2_dir), "--domains", str(domains), "--out", str(out), "--estimate"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "Estimated analysis:" in stdout and "forward pass" in stdout and "Nothing was run" in stdout
    assert not out.exists()
    results = cache_dir() / "results"
    assert not results.exists() or not any(results.iterdir())


@pytest.mark.parametrize("command", ["benchmark", "validate"])
def test_benchmark_and_validate_estimate(command, tmp_path, capsys, tiny_gpt2_dir, calibrated):
    use_calibration(calibrated)
    out = tmp_path / "out.json"
    code = main(real_run_args(command, tiny_gpt2_dir, tmp_path) + ["--estimate"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert f"Estimated {'benchmark' if command == 'benchmark' else 'validation'}:" in stdout
    assert "fine-tun" in stdout and not out.exists()
    if command == "benchmark":
        # 2 seeds x (the baseline + 2 domains x (1 dose and the sample))
        assert "10 fine-tunes" in stdout and "pilot estimators" in stdout


@pytest.mark.parametrize("command", ["analyze", "benchmark", "validate"])
def test_bad_input_with_estimate_is_the_runs_one_line_error(command, tmp_path, capsys, tiny_gpt2_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('{"domains": [')
    code = main([command, "--model", str(tiny_gpt2_dir), "--domains", str(bad), "--estimate"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    good = tmp_path / "good.json"
    # domains the run accepts (the benchmark's collection protocol needs 60 facts a domain), so only the model is bad
    good.write_text(json.dumps(many_facts(60) if command == "benchmark" else GOOD))
    code = main([command, "--model", str(tmp_path / "no-such-model"), "--domains", str(good), "--estimate"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "not found" in err.lower()


def test_an_estimate_of_a_cached_result_says_it_returns_at_once(tiny_gpt2_dir, calibrated):
    from dowsing.pipelines.analysis import run_analysis

    use_calibration(calibrated)
    config = AnalysisConfig(bootstrap_resamples=200)
    run_analysis(str(tiny_gpt2_dir), GOOD["domains"], config)
    got = est.estimate_analysis(str(tiny_gpt2_dir), GOOD["domains"], config)
    assert got.stages_s == {"cached result": 0.0} and "cached" in got.notes[0]
    fresh = est.estimate_analysis(str(tiny_gpt2_dir), GOOD["domains"], config, use_cache=False)
    assert "solve" in fresh.stages_s and fresh.total_s > 0


def test_run_benchmark_and_plan_pages_show_the_estimate_and_warn_about_memory(tiny_gpt2_dir, calibrated, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    use_calibration(calibrated)
    st.cache_resource.clear()
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    for page, key in (("pages/run.py", "run_estimate"), ("pages/plan.py", "plan_estimate"),
                      ("pages/benchmark.py", "bench_estimate")):
        at = AppTest.from_file(app, default_timeout=60)
        at.session_state["source"] = "directory"
        at.session_state["model"] = str(tiny_gpt2_dir)
        at.run()
        at.switch_page(page)
        at.run()
        assert not at.exception, at.exception
        _, shown, error = at.session_state[key]
        assert error is None and shown["total_s"] > 0
        assert [m.label for m in at.metric][-3:] == ["Predicted time", "Peak memory", "Available"]
        assert any("exceeds" in w.value for w in at.warning)
    st.cache_resource.clear()



# --- the memory check before a real run ------------------------------------------------------------------------------

RUNS = {"analyze": ("dowsing.pipelines.analysis", "run_analysis"), "validate": ("dowsing.validation.validate", "validate"),
        "benchmark": ("dowsing.validation.benchmark", "run_benchmark"), "plan": ("dowsing.pipelines.plan", "run_plan")}
ESTIMATES = {"analyze": "estimate_analysis", "validate": "estimate_validation", "benchmark": "estimate_benchmark",
             "plan": "estimate_plan"}


class Ran(Exception):
    """Raised where a command's run would begin."""


def real_run_args(command: str, model, tmp_path: Path) -> list:
    """`command` on the tiny model and the smallest domains it accepts, writing --out (no --estimate)."""
    domains = tmp_path / "d.json"
    extra = []
    if command == "benchmark":
        # six facts a domain and the smallest collection protocol: a sample of 4, 1 test fact, a dose of 1
        domains.write_text(json.dumps(many_facts(6)))
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"max_facts": 0, "sample_facts": 4, "test_facts": 1, "doses": [1]}))
        extra = ["--quick", "--config", str(config)]
    else:
        domains.write_text(json.dumps(GOOD))
    if command == "plan":
        extra = ["--budget", "10"]
    return [command, "--model", str(model), "--domains", str(domains), "--out", str(tmp_path / "out.json"),
            "--quiet", *extra]


def no_run_or_load(monkeypatch, command: str) -> None:
    """The command's run and the model loader raise Ran: a run that starts, or a model loaded, shows."""
    import importlib

    import dowsing.access.models

    def ran(*args, **kwargs):
        raise Ran(command)

    module, name = RUNS[command]
    monkeypatch.setattr(importlib.import_module(module), name, ran)
    monkeypatch.setattr(dowsing.access.models, "load_model", ran)


@pytest.mark.parametrize("command", list(RUNS))
def test_a_run_over_the_memory_available_is_refused_before_it_starts(command, tmp_path, capsys, monkeypatch,
                                                                     tiny_gpt2_dir, calibrated):
    from dowsing.paths import cache_dir

    use_calibration(calibrated)
    no_run_or_load(monkeypatch, command)
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    before = sorted(cache_dir().rglob("*"))
    code = main(real_run_args(command, tiny_gpt2_dir, tmp_path))
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: The predicted peak") and "1 kB" in lines[0]
    assert "--ignore-memory-estimate" in lines[1] and out == ""
    assert not (tmp_path / "out.json").exists()
    # nothing stored but the memo of the model files' hashes that finds the calibration; the results'
    # store may have been opened to look for a stored result (its database files, nothing in them)
    new = [p for p in sorted(cache_dir().rglob("*")) if p not in before and "hashes" not in p.parts]
    assert all(p.name.startswith("cache.db") or p.name == "results" for p in new), new


@pytest.mark.parametrize("command", list(RUNS))
def test_ignore_memory_estimate_runs_without_estimating(command, tmp_path, capsys, monkeypatch, tiny_gpt2_dir):
    def no_estimate(*args, **kwargs):
        raise AssertionError("an estimate was built")

    monkeypatch.setattr(est, ESTIMATES[command], no_estimate)
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    no_run_or_load(monkeypatch, command)
    with pytest.raises(Ran):
        main(real_run_args(command, tiny_gpt2_dir, tmp_path) + ["--ignore-memory-estimate"])
    assert "error" not in capsys.readouterr().err


def test_an_analysis_over_the_memory_estimate_runs_with_the_flag_and_as_before_with_memory(tmp_path, capsys,
                                                                                          monkeypatch, tiny_gpt2_dir,
                                                                                          calibrated):
    use_calibration(calibrated)
    out = tmp_path / "out.json"
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    code = main(real_run_args("analyze", tiny_gpt2_dir, tmp_path) + ["--ignore-memory-estimate"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "Rank" in stdout and json.loads(out.read_text())["domains"] and "memory" not in stderr
    out.unlink()
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 10 ** 15)
    code = main(real_run_args("analyze", tiny_gpt2_dir, tmp_path) + ["--no-cache"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "Rank" in stdout and out.exists() and "memory" not in stderr and "note" not in stderr


def test_a_stored_analysis_is_printed_without_a_memory_check(tmp_path, capsys, monkeypatch, tiny_gpt2_dir,
                                                              calibrated):
    use_calibration(calibrated)
    args = real_run_args("analyze", tiny_gpt2_dir, tmp_path)
    assert main(args) == 0
    first = json.loads((tmp_path / "out.json").read_text())
    capsys.readouterr()

    def no_estimate(*a, **k):
        raise AssertionError("an estimate was built for a stored result")

    monkeypatch.setattr(est, "estimate_analysis", no_estimate)
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["domains"] == first["domains"]
    # with --no-cache it computes again, so it is checked, and refused here
    monkeypatch.undo()
    monkeypatch.setattr(cost_report, "available_memory_bytes", lambda device="cpu": 1000)
    assert main(args + ["--no-cache"]) == 2 and "predicted peak" in capsys.readouterr().err


def test_the_first_check_says_it_measures_and_a_failed_estimate_does_not_block_the_run(tmp_path, capsys,
                                                                                       monkeypatch, tiny_gpt2_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("no calibration on this machine")

    monkeypatch.setattr(est, "calibrate", broken)  # no calibration is stored: the check must measure
    for quiet in (False, True):
        args = real_run_args("analyze", tiny_gpt2_dir, tmp_path) + ["--no-cache"]  # a stored result is not checked
        code = main([a for a in args if quiet or a != "--quiet"])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        notes = [line for line in stderr.splitlines() if line.startswith("note: ")]
        # the announcement is a progress line; the failed estimate is said even with --quiet
        assert len(notes) == 1 + (not quiet) and ("measuring this machine once" in notes[0]) != quiet
        assert "no calibration on this machine" in notes[-1] and "running anyway" in notes[-1]
        assert (tmp_path / "out.json").exists()


@pytest.mark.parametrize("command", list(RUNS))
def test_bad_input_to_a_real_run_is_the_same_one_line_error_with_or_without_the_check(command, tmp_path, capsys):
    # (the benchmark's run warns about its two domains before it loads the model; the check stops before that)
    args = real_run_args(command, tmp_path / "no-such-model", tmp_path)
    errors = []
    for flag in ([], ["--ignore-memory-estimate"]):
        code = main(args + flag)
        errors.append([line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")])
        assert code == 2 and len(errors[-1]) == 1 and errors[-1][0].startswith("error: ")
    assert errors[0] == errors[1] and "not found" in errors[0][0].lower()
    assert not (tmp_path / "out.json").exists()
