"""The plan's transfer between domains against independent computations: on
tiny float64 models, the matrix's diagonal against the pilot curve's own
drop (in the same run and from stored pilot units), an off-diagonal entry
against a fine-tune run here with the trainer and read on the other
domain's halves, and its units keyed by both domains; the ratios and
effective weights against a hand computation; the plan with an identity-like
matrix against the plan without transfer; the allocation against a brute
force on the weighted gain over all domains; and `plan --transfer` on the
tiny Llama model."""
from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from dowsing.kernels import curves
from dowsing.cli import main
from dowsing.domains import Domain
from dowsing.pipelines.plan import (DomainCurve, PilotConfig, PlanConfig, PlanResult, build_plan, effective_weights,
                          measure_pilots, transfer_ratios)
from dowsing.storage.units import DomainUnits

FACTS = {"Alpha": "red", "Beta": "green", "Gamma": "blue"}


def _domains(edit: str | None = None) -> list:
    out = []
    for k, (name, word) in enumerate(FACTS.items()):
        facts = [f"{name} item {i} is stored in box {word}{i * 7 % 5}." for i in range(8 + 2 * k)]
        if name == edit:
            facts[0] = f"{name} item zero moved to a shelf."
        out.append(Domain(name, tuple(facts)))
    return out


class MemoryStore:
    """A store in memory with the JsonStore's get/put, values through JSON as on disk."""

    def __init__(self):
        self.values = {}

    def get(self, key):
        return json.loads(self.values[key]) if key in self.values else None

    def put(self, key, value, max_bytes=None):
        text = json.dumps(value, allow_nan=False)
        assert max_bytes is None or len(text) <= max_bytes
        self.values[key] = text


@pytest.fixture(scope="module")
def measured(tiny64):
    store = MemoryStore()
    pilots_only = measure_pilots(tiny64, _domains(), PilotConfig(), units=DomainUnits(None, store=store))
    with_transfer = measure_pilots(tiny64, _domains(), PilotConfig(transfer=True), units=DomainUnits(None, store=store))
    fresh = measure_pilots(tiny64, _domains(), PilotConfig(transfer=True))
    return tiny64, store, pilots_only, with_transfer, fresh


def test_the_diagonal_is_the_pilot_curves_own_drop_at_its_largest_size(measured):
    _, _, pilots_only, with_transfer, fresh = measured
    for run, pilots in ((fresh, fresh), (with_transfer, pilots_only)):  # one run, then pilots a run before stored
        matrix = run["transfer"]["matrix"]
        for j, entry in enumerate(pilots["domains"]):
            assert run["transfer"]["sizes"][j] == entry["sizes"][-1]
            assert matrix[j][j] == pytest.approx(entry["drop"][-1], rel=1e-6, abs=1e-12)
    assert all(v is not None and np.isfinite(v) for row in fresh["transfer"]["matrix"] for v in row)
    # read from the pilots' own runs (fresh) or from two fine-tunes after stored pilots: the same matrix
    assert np.ravel(with_transfer["transfer"]["matrix"]) == pytest.approx(np.ravel(fresh["transfer"]["matrix"]),
                                                                          rel=1e-6, abs=1e-12)


def test_an_off_diagonal_entry_is_a_fine_tune_on_one_domain_read_on_the_others_halves(measured):
    from dowsing.kernels.forward import split_pass
    from dowsing.kernels.pilots import PILOT_RECIPE
    from dowsing.kernels.splitting import split_domains
    from dowsing.kernels.training import TailTrainer

    loaded, _, _, _, fresh = measured
    train, held = split_domains(_domains(), seed=0)
    split = split_pass(loaded, train, held, capture_block=0)  # the tiny models have 2 blocks: both train
    trainer = TailTrainer(loaded, split)
    recipe = dataclasses.replace(PILOT_RECIPE, blocks=2)
    base = split.tokens.fact_losses
    for j, i in ((0, 2), (2, 1)):  # Alpha's facts on Gamma, Gamma's on Beta
        n = min(len(train[j].facts), len(held[j].facts))
        drops = []
        for trained, read in ((split.train_rows[j][:n], split.held_rows[i]), (split.held_rows[j][:n],
                                                                               split.train_rows[i])):
            trainer.train(recipe, 0, list(trained))
            drops.append(float((base[list(read)] - trainer.losses(list(read))).mean()))
        assert fresh["transfer"]["matrix"][i][j] == pytest.approx(0.5 * sum(drops), rel=1e-6, abs=1e-12)
        assert fresh["transfer"]["sizes"][j] == n


def test_each_entry_is_a_unit_of_its_two_domains(measured):
    loaded, store, _, with_transfer, _ = measured
    units = DomainUnits(None, store=store)
    again = measure_pilots(loaded, _domains(edit="Gamma"), PilotConfig(transfer=True), units=units)
    names = list(FACTS)
    involve = {f"{a} -> {b}" for a in names for b in names if "Gamma" in (a, b)}
    assert set(units.summary("transfer")["computed"]) == involve
    assert set(units.summary("transfer")["reused"]) == {f"{a} -> {b}" for a in names for b in names} - involve
    assert units.summary("pilot") == {"computed": ["Gamma"], "reused": ["Alpha", "Beta"]}
    for i, j in itertools.product(range(2), range(2)):  # the pairs of unedited domains: from the store
        assert again["transfer"]["matrix"][i][j] == with_transfer["transfer"]["matrix"][i][j]
    assert again["transfer"]["computed_sources"] == names


# --- the ratios, the effective weights and the plan ---------------------------------

def test_the_ratios_and_effective_weights_match_a_hand_computation():
    matrix = [[0.2, 0.6, -0.3],
              [0.1, 0.4, 0.5],
              [None, -0.8, -0.1]]
    ratios = transfer_ratios(matrix)
    # column 0: own drop 0.2, Beta gains 0.1/0.2, Gamma was not measured; column 1: own 0.4, Alpha's 0.6/0.4 = 1.5
    # clipped to 1 and Gamma's -0.8/0.4 = -2 to -1; column 2: Gamma's own drop is not positive, so it scales nothing
    assert ratios == [[1.0, 1.0, 0.0], [0.5, 1.0, 0.0], [0.0, -1.0, 1.0]]
    weights = [1.0, 2.0, 0.5]
    assert effective_weights(ratios, weights) == pytest.approx([1 + 2 * 0.5, 1 + 2 - 0.5, 0.5])
    assert transfer_ratios([[0.2, 0.1], [0.1, 0.2]], clip=(-0.25, 0.25)) == [[1.0, 0.25], [0.25, 1.0]]


def _per_fact(sizes, facts, rng, slope):
    return [list(0.01 + slope * np.log(n) + rng.normal(0, 0.004, facts)) for n in sizes]


def _domain(name, slope, seed):
    rng = np.random.default_rng(seed)
    curve = curves.fit_curve([2, 4, 8], _per_fact([2, 4, 8], 16, rng, slope), [8, 8], n_resamples=300, seed=seed)
    return DomainCurve(name, 16, 3.0 + seed, curve)


DOMAIN_CURVES = [_domain("A", 0.03, 1), _domain("B", 0.01, 2), _domain("C", 0.02, 3)]


def _measured(matrix):
    return {"transfer": {"domains": ["A", "B", "C"], "matrix": matrix, "sizes": [8, 8, 8], "transfer_s": 0.0}}


def test_with_an_identity_like_matrix_the_plan_is_the_plan_without_transfer():
    config = PlanConfig(budget=30, have=8, bootstrap_resamples=300, weights={"B": 2.0})
    without = build_plan(DOMAIN_CURVES, config)
    identity = _measured([[0.3, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.2]])
    with_t = build_plan(DOMAIN_CURVES, dataclasses.replace(config, transfer=True), identity)
    assert [d["collect"] for d in with_t.domains] == [d["collect"] for d in without.domains]
    for key in ("plan", "even", "mean_loss", "highest_loss"):
        assert with_t.totals[key]["expected"] == pytest.approx(without.totals[key]["expected"], rel=1e-12)
    assert with_t.transfer["effective_weights"] == [1.0, 2.0, 1.0] and not without.transfer


def _log_domain(name, slope, seed):
    """A log curve with positive bootstrap slopes around `slope`: its mean gain from have h is mean_r(b_r) ln((h+m)/h)."""
    rng = np.random.default_rng(seed)
    draws = np.column_stack([rng.normal(0.01, 0.002, 300), slope * rng.uniform(0.5, 1.5, 300)])
    curve = curves.LearningCurve([2, 4, 8], [0.0] * 3, "log", (0.01, slope), draws=draws)
    return DomainCurve(name, 16, 3.0, curve)


def test_the_plan_buys_the_best_weighted_gain_over_all_domains_and_reports_it_per_domain():
    domains = [_log_domain("A", 0.03, 1), _log_domain("B", 0.01, 2), _log_domain("C", 0.02, 3)]
    matrix = [[0.3, 0.09, -0.05], [0.15, 0.1, 0.02], [0.15, 0.12, 0.2]]
    config = PlanConfig(budget=12, have=8, bootstrap_resamples=300, weights={"A": 0.0, "B": 1.0, "C": 2.0},
                        transfer=True)
    plan = build_plan(domains, config, _measured(matrix))
    ratios = [[1.0, 0.9, -0.25], [0.5, 1.0, 0.1], [0.5, 1.0, 1.0]]  # by hand: T[i][j] / T[j][j]
    weights = [0.0, 1.0, 2.0]
    effective = [sum(weights[i] * ratios[i][j] for i in range(3)) for j in range(3)]
    assert np.ravel(plan.transfer["ratio"]) == pytest.approx(np.ravel(ratios))
    assert plan.transfer["effective_weights"] == pytest.approx(effective)
    assert effective[0] > 0  # A weighs 0 itself but its facts help B: with transfer it may be bought

    slopes = [float(dc.curve.draws[:, 1].mean()) for dc in domains]
    # every allocation of the 12 examples, valued on all domains: sum_i w_i sum_j ratio_ij gain_j(m_j)
    best = max((sum(weights[i] * ratios[i][j] * slopes[j] * np.log((8 + counts[j]) / 8)
                    for i in range(3) for j in range(3)), counts)
               for counts in itertools.product(range(13), repeat=3) if sum(counts) <= 12)
    assert plan.totals["plan"]["expected"] == pytest.approx(best[0], rel=1e-9)
    assert [d["collect"] for d in plan.domains] == list(best[1]) and best[1][0] > 0
    on = plan.transfer["gain_on"]
    assert sum(w * row["expected"] for w, row in zip(weights, on)) == pytest.approx(plan.totals["plan"]["expected"])
    assert sum(w * row["gain"] for w, row in zip(weights, on)) == pytest.approx(plan.totals["plan"]["gain"])
    assert on[0]["by_source"]["B"] == pytest.approx(0.9 * plan.row("B")["expected_gain"])
    # without transfer A weighs 0 and gets nothing
    assert build_plan(domains, dataclasses.replace(config, transfer=False)).row("A")["collect"] == 0


def test_a_plan_with_transfer_refuses_pilots_measured_without_it():
    with pytest.raises(ValueError, match="transfer matrix"):
        build_plan(DOMAIN_CURVES, PlanConfig(budget=10, transfer=True), {})
    assert "transfer" not in PlanConfig(budget=1).curve_settings()
    assert PlanConfig(budget=1, transfer=True).curve_settings()["transfer"] is True


# --- the command ----------------------------------------------------------------

def test_plan_transfer_on_the_tiny_llama(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "domains.json"
    path.write_text(json.dumps({"domains": [{"name": d.name, "facts": list(d.facts)} for d in _domains()]}))
    out = tmp_path / "plan.json"
    args = ["plan", "--budget", "40", "--model", str(tiny_llama_dir), "--domains", str(path), "--out", str(out),
            "--quiet"]
    assert main(args + ["--transfer"]) == 0
    printed = capsys.readouterr().out
    plan = PlanResult.from_json(out.read_text())
    assert "Transfer matrix T[i][j]" in printed and "Transfer on:" in printed
    matrix = plan.transfer["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert [plan.row(n)["fit"]["drops"][-1] for n in FACTS] == pytest.approx([matrix[k][k] for k in range(3)],
                                                                            rel=1e-6)
    want = effective_weights(transfer_ratios(matrix), [1.0, 1.0, 1.0])
    assert plan.transfer["effective_weights"] == pytest.approx(want)
    assert [plan.row(n)["effective_weight"] for n in FACTS] == pytest.approx(want)
    assert sum(d["collect"] for d in plan.domains) <= 40
    assert main(args) == 0  # without transfer: its own cached measurement, no matrix in the plan
    assert not PlanResult.from_json(out.read_text()).transfer
