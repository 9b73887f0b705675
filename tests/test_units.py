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


# --- the forward pass as per-domain units -----------------------------------------------------------------------

def _uneven_domains() -> list:
    """Domains of 3, 7 and 5 facts: with batches of 4, the pass over every
    fact mixes domains in a batch, the per-domain pieces never do."""
    return [_domain("Alpha", 3), _domain("Beta", 7), _domain("Gamma", 5)]


@pytest.mark.parametrize("block", [None, 1])
def test_the_merged_per_domain_pieces_are_the_pass_over_every_fact(tiny64, block):
    import torch

    from dowsing.kernels.alignment import block_inputs_by_fact, capture_inputs_during
    from dowsing.kernels.forward import domain_forward, forward_pass, merge_pieces
    from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches

    net, anatomy = tiny64.model, find_anatomy(tiny64.model)
    domains = _uneven_domains()
    facts = [f for d in domains for f in d.facts]
    groups = [k for k, d in enumerate(domains) for _ in d.facts]
    encoded = encode_facts(tiny64.tokenizer, facts, anatomy.max_positions)
    batches = make_batches(encoded, 4, "cpu")
    captured = []
    if block is None:
        directions, norms, tokens = forward_pass(net, anatomy, batches, groups, len(domains))
    else:
        with capture_inputs_during(net, block, captured):
            directions, norms, tokens = forward_pass(net, anatomy, batches, groups, len(domains))
    starts = [0, 3, 10, 15]
    merged = merge_pieces([domain_forward(net, anatomy, encoded.ids[a:b], 4, block)
                           for a, b in zip(starts, starts[1:])])
    assert torch.allclose(merged.directions, directions, rtol=0, atol=1e-8)
    assert torch.allclose(merged.norms, norms, rtol=1e-8, atol=1e-8)
    got = merged.tokens
    for name in ("x", "h", "token_scale", "fact_losses"):
        assert getattr(got, name).shape == getattr(tokens, name).shape, name
        assert torch.allclose(getattr(got, name), getattr(tokens, name), rtol=1e-8, atol=1e-8), name
    assert torch.equal(got.targets, tokens.targets) and torch.equal(got.token_fact, tokens.token_fact)
    assert got.tail_matches == tokens.tail_matches is True
    assert merged.ids == encoded.ids
    if block is None:
        assert merged.block_inputs is None
    else:
        expected = block_inputs_by_fact(batches, captured)
        assert len(merged.block_inputs) == len(expected) == len(facts)
        for a, b in zip(merged.block_inputs, expected):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-8, atol=1e-8)


def test_domains_computed_side_by_side_are_the_pieces_computed_one_after_another(tiny_gpt2_dir):
    import torch

    from dowsing.access.models import load_model
    from dowsing.kernels.forward import domain_forward
    from dowsing.kernels.subspace import encode_facts, find_anatomy
    from dowsing.pipelines.forward_units import domain_pieces

    tiny = load_model(str(tiny_gpt2_dir))  # float32: the dtype where a different order of sums would show
    net, anatomy = tiny.model, find_anatomy(tiny.model)
    domains = _uneven_domains()
    ids = [encode_facts(tiny.tokenizer, list(d.facts), anatomy.max_positions).ids for d in domains]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers, whatever this machine has
    try:
        side, notes = domain_pieces(net, anatomy, tiny.tokenizer, [d.name for d in domains], [d.facts for d in domains],
                                    4, 1)
    finally:
        torch.set_num_threads(saved)
    assert notes == []
    # each thread's hooks took its own passes only: every piece is the one computed alone, bit for bit
    for piece, own in zip(side, ids):
        alone = domain_forward(net, anatomy, own, 4, 1)
        assert piece.ids == alone.ids and piece.n_facts == alone.n_facts
        for name in ("concept_sum", "x", "h", "targets", "token_fact", "token_scale", "fact_losses"):
            assert torch.equal(getattr(piece, name), getattr(alone, name)), name
        assert all(torch.equal(a, b) for a, b in zip(piece.block_inputs, alone.block_inputs))


def test_batches_by_length_name_their_facts_and_pad_less():
    from dowsing.kernels.subspace import Encoded, make_batches

    ids = [[1] * n for n in (9, 2, 7, 2, 5, 9, 3)]
    plain = make_batches(Encoded(ids, []), 3, "cpu")
    by_length = make_batches(Encoded(ids, []), 3, "cpu", by_length=True)
    assert [rows for _, _, rows in by_length] == [[1, 3, 6], [4, 2, 0], [5]]  # ties keep fact order
    for input_ids, mask, rows in by_length:
        assert [int(m.sum()) for m in mask] == [len(ids[r]) for r in rows]
    assert sum(m.numel() for _, m, _ in by_length) == 3 * 3 + 3 * 9 + 9 < sum(m.numel() for _, m, _ in plain)


def test_merging_keeps_the_degenerate_concept_vector_error(tiny_llama64):
    import torch

    from dowsing.kernels.forward import domain_forward, merge_pieces
    from dowsing.kernels.subspace import encode_facts, find_anatomy

    anatomy = find_anatomy(tiny_llama64.model)
    ids = encode_facts(tiny_llama64.tokenizer, list(FOUR[0].facts), anatomy.max_positions).ids
    piece = domain_forward(tiny_llama64.model, anatomy, ids, 4)
    piece.concept_sum = torch.zeros_like(piece.concept_sum)
    with pytest.raises(ValueError, match="concept vector is zero"):
        merge_pieces([piece])


@pytest.fixture
def forward_counted(monkeypatch):
    """A list that grows by each domain's fact count for each per-domain
    forward pass actually run."""
    from dowsing.kernels import forward
    from dowsing.pipelines import forward_units

    runs = []
    real = forward.domain_forward

    def counting(net, anatomy, ids, batch_size, capture_block=None):
        runs.append(len(ids))
        return real(net, anatomy, ids, batch_size, capture_block)

    monkeypatch.setattr(forward_units, "domain_forward", counting)
    return runs


def _same_paper(a, b, tol: float) -> None:
    """The paper's fields: Mean, each fact's influence, the concept vectors'
    norms, the transfer matrix, the losses, and the ranking."""
    assert [d.rank for d in a.domains] == [d.rank for d in b.domains]
    for x, y in zip(a.domains, b.domains):
        assert x.priority == pytest.approx(y.priority, abs=tol, rel=tol)
        assert x.mean == pytest.approx(y.mean, abs=tol, rel=tol)
    for x, y in zip(a.per_example, b.per_example):
        assert x["influence"] == pytest.approx(y["influence"], abs=tol, rel=tol)
    assert [d.concept_vector_norm for d in a.domains] == pytest.approx([d.concept_vector_norm for d in b.domains],
                                                                       rel=tol)
    for x, y in zip(a.extras["transfer"]["matrix"], b.extras["transfer"]["matrix"]):
        assert x == pytest.approx(y, abs=tol, rel=tol)
    assert a.extras["domain_loss"] == pytest.approx(b.extras["domain_loss"], rel=tol)


def test_an_edit_reruns_the_forward_pass_of_that_domain_alone(tiny_llama_dir, counted, forward_counted):
    from dowsing.pipelines.analysis import forward_status
    from dowsing.storage.units import recomputed_message

    model, config = str(tiny_llama_dir), AnalysisConfig(dtype="float64")
    first = run_analysis(model, FOUR, config)
    assert forward_counted == [8] * 4
    assert first.extras["units"]["forward"] == {"computed": [d.name for d in FOUR], "reused": []}

    forward_counted.clear()
    edited = _edited(FOUR, 2)
    # told before the run, without the model
    assert forward_status(model, edited, config) == {"computed": ["Gamma"], "reused": ["Alpha", "Beta", "Delta"],
                                                     "message": "1 of 4 domains recomputed, 3 from cache"}
    said = []
    incremental = run_analysis(model, edited, config, progress=lambda p: said.append(p.message))
    assert forward_counted == [8]
    done = incremental.extras["units"]["forward"]
    assert done == {"computed": ["Gamma"], "reused": ["Alpha", "Beta", "Delta"]}
    assert recomputed_message(len(done["computed"]), 4) == "1 of 4 domains recomputed, 3 from cache"
    assert "forward pass, domain 3 of 4: Gamma" in said
    assert incremental.extras["units"]["pilot"]["computed"] == ["Gamma"]

    forward_counted.clear()
    fresh = run_analysis(model, edited, config, use_cache=False)
    assert forward_counted == [8] * 4
    _same(incremental, fresh, 1e-6)
    _same_paper(incremental, fresh, 1e-6)


def test_a_damaged_forward_piece_is_computed_again(tiny_llama_dir, counted, forward_counted):
    from dowsing.storage.store import JsonStore, ResultStore

    model, config = str(tiny_llama_dir), AnalysisConfig(dtype="float64", estimator="mean_loss", diagnose=False)
    first = run_analysis(model, FOUR[:2], config)
    ResultStore().delete(first.cache_key)  # the request again, not its stored result
    store = JsonStore("domain_units")
    keys = [k for k in store.keys() if (store.get(k) or {}).get("n_facts") == 8]
    assert len(keys) == 2
    damaged = store.get(keys[0])
    damaged["x"]["shape"][0] += 1  # a shape its bytes do not fill
    store.put(keys[0], damaged)
    edited = store.get(keys[1])
    edited["targets"]["data"] = edited["token_fact"]["data"]  # well-formed, but not the facts' tokens
    store.put(keys[1], edited)

    forward_counted.clear()
    again = run_analysis(model, FOUR[:2], config)
    assert forward_counted == [8, 8]
    assert again.extras["units"]["forward"] == {"computed": ["Alpha", "Beta"], "reused": []}
    _same_paper(again, first, 1e-9)


@pytest.fixture(scope="module")
def stored_piece(tiny_llama64):
    """One domain's forward piece with its block inputs, and its JSON value as the store keeps it."""
    import json

    from dowsing.kernels.forward import domain_forward
    from dowsing.kernels.subspace import encode_facts, find_anatomy
    from dowsing.pipelines.forward_units import piece_value

    anatomy = find_anatomy(tiny_llama64.model)
    ids = encode_facts(tiny_llama64.tokenizer, list(FOUR[1].facts), anatomy.max_positions).ids
    piece = domain_forward(tiny_llama64.model, anatomy, ids, 3, capture_block=1)
    return piece, ids, json.loads(json.dumps(piece_value(piece), allow_nan=False))


def test_a_forward_piece_comes_back_from_json_bit_for_bit(stored_piece):
    import torch

    from dowsing.pipelines.forward_units import TENSORS, piece_from_value

    piece, ids, value = stored_piece
    back = piece_from_value(value, ids, "cpu", torch.float64)
    for name in TENSORS:
        assert torch.equal(getattr(back, name), getattr(piece, name)), name
        assert getattr(back, name).dtype == getattr(piece, name).dtype
    assert (back.n_facts, back.tail_matches, back.ids) == (piece.n_facts, piece.tail_matches, piece.ids)
    assert len(back.block_inputs) == len(piece.block_inputs) == 8
    assert all(torch.equal(a, b) for a, b in zip(back.block_inputs, piece.block_inputs))


def _tampered_pieces(value: dict) -> list:
    """(what, tampered copy) pairs of a stored piece: each is well-formed JSON."""
    import copy

    import torch

    from dowsing.storage.tensors import decode_tensor, encode_tensor

    def with_tensor(name, change):
        out = copy.deepcopy(value)
        out[name] = encode_tensor(change(decode_tensor(value[name])))
        return out

    def edited(change):
        out = copy.deepcopy(value)
        change(out)
        return out

    return [
        ("a field missing", {k: v for k, v in value.items() if k != "h"}),
        ("other token ids", edited(lambda v: v["ids"][0].__setitem__(1, v["ids"][0][1] + 1))),
        ("a fact count as text", edited(lambda v: v.__setitem__("n_facts", "8"))),
        ("a wrong fact count", edited(lambda v: v.__setitem__("n_facts", 7))),
        ("a tail flag as a number", edited(lambda v: v.__setitem__("tail_matches", 1))),
        ("another dtype than the model's", with_tensor("x", lambda t: t.to(torch.float32))),
        ("a scalar concept sum", with_tensor("concept_sum", lambda t: t[0])),
        ("a token row missing", with_tensor("x", lambda t: t[1:])),
        ("fact rows out of order", with_tensor("token_fact", lambda t: t.flip(0))),
        ("targets that are not its tokens", with_tensor("targets", lambda t: t + 1)),
        ("token scales edited", with_tensor("token_scale", lambda t: t * 2)),
        ("one loss too many", with_tensor("fact_losses", lambda t: torch.cat([t, t[:1]]))),
        ("losses in float32", with_tensor("fact_losses", lambda t: t.to(torch.float32))),
        ("a block input missing", edited(lambda v: v["block_inputs"].pop())),
        ("block inputs not a list", edited(lambda v: v.__setitem__("block_inputs", {"0": 1}))),
        ("a block input cut short", edited(lambda v: v["block_inputs"].__setitem__(
            0, encode_tensor(decode_tensor(v["block_inputs"][0])[1:])))),
        ("a tensor's bytes cut short", edited(lambda v: v["h"].__setitem__("data", v["h"]["data"][:-8]))),
        ("a tensor as a pickle", edited(lambda v: v["x"].__setitem__("dtype", "object"))),
    ]


def test_a_tampered_forward_piece_is_refused_and_the_run_computes_it_again(stored_piece, tmp_path):
    import torch

    from dowsing.pipelines.forward_units import piece_from_value
    from dowsing.storage.store import JsonStore
    from dowsing.storage.units import DomainUnits

    _, ids, value = stored_piece
    cases = _tampered_pieces(value)
    for what, tampered in cases:
        with pytest.raises(ValueError, match="forward piece|stored tensor"):
            piece_from_value(tampered, ids, "cpu", torch.float64)
    # through the units: a tampered entry reads as missing and is not counted as reused
    units = DomainUnits("model", store=JsonStore("units", folder=tmp_path / "units"))
    units.store.put("k", cases[-1][1])
    assert units.get("forward", "k", "Beta", lambda v: piece_from_value(v, ids, "cpu", torch.float64)) is None
    assert units.summary("forward") == {"computed": [], "reused": []}
    units.store.put("k", value)
    assert units.get("forward", "k", "Beta", lambda v: piece_from_value(v, ids, "cpu", torch.float64)) is not None
    assert units.summary("forward") == {"computed": [], "reused": ["Beta"]}


def test_a_unit_too_large_to_keep_is_used_named_and_not_stored(tmp_path, monkeypatch):
    from dowsing.storage import caches
    from dowsing.storage.store import JsonStore
    from dowsing.storage.units import DomainUnits

    monkeypatch.setattr(caches, "UNIT_SIZE_LIMIT_BYTES", 100)
    units = DomainUnits("model", store=JsonStore("units", folder=tmp_path / "units"))
    small, large = {"drop": [0.1, 0.2]}, {"x": "a" * 200}
    units.put("forward", "small", "Alpha", small)
    units.put("forward", "large", "Beta", large)
    assert units.store.get("small") == small and units.store.get("large") is None
    assert not units.has("large")
    assert units.summary("forward") == {"computed": ["Alpha", "Beta"], "reused": [], "not_kept": ["Beta"]}
