"""The ranking estimator: the analysis' alignment priorities pinned to an
independent float64 computation on the FULL model (not the truncated tail the
engine runs), rank / share / t following the priority, and older results
without a priority still loading."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from dowsing.kernels import metrics
from dowsing.presentation import report
from dowsing.pipelines.analysis import analyze
from dowsing.config import AnalysisConfig
from dowsing.access.models import load_model
from dowsing.pipelines.ranking import rank, ranking_split
from dowsing.result import Result
from dowsing.kernels.subspace import encode_facts, find_anatomy, make_batches

# Three domains of four facts: twelve facts, so Adam's minibatches of 8 differ.
DOMAINS = [
    {"name": "Physics", "facts": ["Energy is conserved in a closed system.", "Light travels faster than sound.",
                                  "Force equals mass times acceleration of a body.", "Heat flows from hot to cold."]},
    {"name": "Biology", "facts": ["Cells are the basic unit of life.", "DNA carries genetic information.",
                                  "Plants make sugar by photosynthesis.", "The heart pumps blood around the body."]},
    {"name": "Economics", "facts": ["Inflation reduces the purchasing power of money.",
                                    "Prices rise when demand exceeds supply.", "Banks lend the money they hold.",
                                    "Taxes pay for public services."]},
]
FACTS = [f for d in DOMAINS for f in d["facts"]]



def float64_rel(loaded) -> float:
    """Relative tolerance of a float64 comparison on a tiny model: Llama's
    RMSNorm (transformers) computes in float32 whatever the model's dtype, so
    two float64 routes through it agree only to float32-level rounding."""
    return 2e-5 if "llama" in loaded.info.architecture.lower() else 1e-6

def _tail_params(net, blocks: int) -> list:
    """The parameters of the last `blocks` blocks and of the final norm, named
    by the architecture (no dowsing helper involved)."""
    if hasattr(net, "transformer"):
        layers, norm = net.transformer.h, net.transformer.ln_f
    else:
        layers, norm = net.model.layers, net.model.norm
    chosen = [p for block in list(layers)[-blocks:] for p in block.parameters()] + list(norm.parameters())
    return chosen


def _full_model_fact_gradients(loaded, blocks: int) -> list:
    """g_i = grad of fact i's mean next-token cross-entropy, one fact at a time
    through the whole model (no padding), over the chosen parameters; float64."""
    net = loaded.model
    params = _tail_params(net, blocks)
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    grads = []
    try:
        for fact in FACTS:
            ids = torch.tensor([loaded.tokenizer(fact)["input_ids"]])
            logits = net(input_ids=ids, use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1], ids[0, 1:])
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
    return grads, sum(p.numel() for p in params)


def _adam_second_moment(grads: list, n_batches: int, seed: int, batch: int = 8) -> torch.Tensor:
    """v = mean over seeded minibatches of (mean of the batch's per-fact gradients)^2,
    the minibatches drawn as random.Random(seed).sample(pool, 8) per batch."""
    rng = random.Random(seed)
    pool = list(range(len(grads)))
    v = torch.zeros_like(grads[0])
    for _ in range(n_batches):
        pick = rng.sample(pool, min(batch, len(pool)))
        v += torch.stack([grads[i] for i in pick]).mean(0) ** 2
    return v / n_batches


def _reference_alignment(grads: list, rows: list, p: torch.Tensor | None):
    """The explicit double sum over i != j, and per fact g_i^T P sum_{j != i} g_j / (N - 1)."""
    n = len(rows)
    weight = torch.ones_like(grads[0]) if p is None else p
    per_fact = []
    total = 0.0
    for i in rows:
        row = 0.0
        for j in rows:
            if i != j:
                row += float((grads[i] * weight * grads[j]).sum())
        total += row
        per_fact.append(row / (n - 1))
    return total / (n * (n - 1)), per_fact


@pytest.mark.parametrize("estimator,align_blocks", [("alignment", 1), ("alignment_adam", 1), ("alignment_adam", 5)])
def test_alignment_priorities_equal_an_independent_full_model_computation(tiny64, estimator, align_blocks):
    config = AnalysisConfig(dtype="float64", estimator=estimator, align_blocks=align_blocks, adam_batches=5, seed=3)
    result = analyze(tiny64, DOMAINS, config)
    depth = len(find_anatomy(tiny64.model).down_projs)
    blocks = min(align_blocks, depth)
    grads, n_params = _full_model_fact_gradients(tiny64, blocks)
    p = None
    if estimator == "alignment_adam":
        p = 1.0 / (_adam_second_moment(grads, n_batches=5, seed=3).sqrt() + 1e-8)
    ranking = result.extras["ranking"]
    assert ranking["estimator"] == estimator and ranking["details"]["parameters"] == n_params
    assert ranking["details"]["blocks"] == blocks
    # More blocks asked than the model has: all of them, and the result says so.
    assert any("align_blocks = 5" in w for w in result.extras["warnings"]) == (align_blocks > depth)
    start = 0
    for d in DOMAINS:
        rows = list(range(start, start + len(d["facts"])))
        start += len(rows)
        pairs, per_fact = _reference_alignment(grads, rows, p)
        got = result.domain(d["name"])
        assert got.priority == pytest.approx(pairs, rel=float64_rel(tiny64))
        shown = [e["priority"] for e in result.per_example if e["domain"] == d["name"]]
        assert shown == pytest.approx(per_fact, rel=float64_rel(tiny64), abs=1e-9 * max(abs(x) for x in per_fact))
    # The paper's Mean is computed whatever ranks the domains.
    paper = analyze(tiny64, DOMAINS, AnalysisConfig(dtype="float64", estimator="paper"))
    assert [d.mean for d in result.domains] == pytest.approx([d.mean for d in paper.domains], rel=1e-9)


def test_rank_share_and_t_follow_the_priority(tiny64):
    result = analyze(tiny64, DOMAINS, AnalysisConfig(dtype="float64", estimator="alignment", align_blocks=1))
    priorities = [d.priority for d in result.domains]
    order = sorted(range(len(priorities)), key=lambda k: -priorities[k])
    assert [result.domains[k].rank for k in order] == [1, 2, 3]
    magnitudes = np.abs(priorities)
    assert [d.share_pct for d in result.domains] == pytest.approx(list(magnitudes / magnitudes.sum() * 100))
    per_fact = [[e["priority"] for e in result.per_example if e["domain"] == d.name] for d in result.domains]
    for k, d in enumerate(result.domains):
        assert np.mean(per_fact[k]) == pytest.approx(d.priority, rel=1e-9)
        rest = [x for j, other in enumerate(per_fact) if j != k for x in other]
        welch = stats.ttest_ind(per_fact[k], rest, equal_var=False)
        assert d.t_vs_rest == pytest.approx(float(welch.statistic), rel=1e-9)
        assert d.p_value == pytest.approx(float(welch.pvalue), rel=1e-9)
    ranking = result.extras["ranking"]
    assert ranking["n_resamples"] == result.extras["bootstrap"]["n_resamples"]
    assert ranking["level"] == result.extras["bootstrap"]["level"]
    for k, d in enumerate(result.domains):
        lo, hi = ranking["priority_interval"][k]
        assert lo <= hi and sum(ranking["rank_probabilities"][k]) == pytest.approx(1.0)


@pytest.mark.parametrize("estimator", ["paper", "mean_loss"])
def test_paper_and_mean_loss_estimators(tiny64, estimator):
    result = analyze(tiny64, DOMAINS, AnalysisConfig(dtype="float64", estimator=estimator))
    means = [d.mean for d in result.domains]
    if estimator == "paper":
        # The paper's ranking, share and per-fact influences, unchanged.
        assert [d.priority for d in result.domains] == means
        assert [d.rank for d in result.domains] == metrics.ranks_by_mean(means)
        totals = [sum(e["influence"] for e in result.per_example if e["domain"] == d.name) for d in result.domains]
        assert [d.share_pct for d in result.domains] == pytest.approx(metrics.shares_pct(totals))
        assert all(e["priority"] == e["influence"] for e in result.per_example)
        boot = result.extras["bootstrap"]["domains"]
        assert result.extras["ranking"]["priority_interval"] == [b["mean_interval"] for b in boot]
    else:
        assert [d.priority for d in result.domains] == pytest.approx(result.extras["domain_loss"], rel=1e-12)
        assert [d.rank for d in result.domains] == metrics.ranks_by_mean(result.extras["domain_loss"])


def test_a_tail_that_does_not_reproduce_the_loss_is_refused(tiny64):
    """Block inputs from the wrong block: the truncated model's losses differ
    from the model's, and the estimator says it cannot run."""
    net = tiny64.model
    anatomy = find_anatomy(net)
    encoded = encode_facts(tiny64.tokenizer, FACTS, anatomy.max_positions)
    batches = make_batches(encoded, 4, "cpu")
    from dowsing.kernels.alignment import capture_block_inputs
    from dowsing.kernels.forward import forward_pass

    fact_domain = [k for k, d in enumerate(DOMAINS) for _ in d["facts"]]
    directions, _, tokens = forward_pass(net, anatomy, batches, fact_domain, len(DOMAINS))
    rows_of = [[i for i, k in enumerate(fact_domain) if k == kk] for kk in range(len(DOMAINS))]
    config = AnalysisConfig(dtype="float64", estimator="alignment", align_blocks=1)
    names = [d["name"] for d in DOMAINS]

    def ranked(block_inputs):
        split = ranking_split(net, anatomy, directions, tokens, encoded.ids, block_inputs, 1, rows_of, names, config,
                              0.0)
        return rank(tiny64, split, rows_of, config, [0.0] * 3, [[0.0]] * 3)

    wrong = capture_block_inputs(net, batches, 0)  # the input of block 0, not of block 1
    with pytest.raises(ValueError, match="cannot run on this model"):
        ranked(wrong)
    right = ranked(capture_block_inputs(net, batches, 1))
    full = analyze(tiny64, DOMAINS, config)
    assert right.priority == pytest.approx([d.priority for d in full.domains], rel=float64_rel(tiny64))


def test_an_old_result_without_priority_loads_and_shows_mean_as_priority(tiny_gpt2_dir):
    loaded = load_model(str(tiny_gpt2_dir), dtype="float64")
    new = analyze(loaded, DOMAINS[:2], AnalysisConfig(dtype="float64", estimator="mean_loss"))
    data = new.to_dict()
    for d in data["domains"]:
        del d["priority"]
    for e in data["per_example"]:
        del e["priority"]
    data["config"] = {k: v for k, v in data["config"].items() if k not in ("estimator", "align_blocks", "adam_batches")}
    data["extras"] = {k: v for k, v in data["extras"].items() if k != "ranking"}
    data["engine_version"] = "1.2.0"
    old = Result.from_json(json.dumps(data))
    assert old.estimator == "paper"
    assert all(d.priority is None and d.ranking_priority == d.mean for d in old.domains)
    table = report.formatted_table(old)
    assert list(table["Priority"]) == list(table["Mean (paper)"])
    assert "Priority" in old.table().columns


@pytest.mark.parametrize("estimator", ["alignment_heldout", "alignment_heldout_adam"])
def test_heldout_alignment_splits_like_the_benchmark_and_equals_the_explicit_sum(tiny64, estimator):
    """The analysis splits each domain's facts with the benchmark's seeded rule
    (dowsing.kernels.splitting.split_domains) and scores g_bar_A^T P g_bar_B, each fact
    against the other half."""
    from dowsing.kernels.splitting import split_domains

    config = AnalysisConfig(dtype="float64", estimator=estimator, align_blocks=1, adam_batches=5, seed=3)
    result = analyze(tiny64, DOMAINS, config)
    grads, _ = _full_model_fact_gradients(tiny64, 1)
    p = torch.ones_like(grads[0])
    if estimator.endswith("_adam"):
        p = 1.0 / (_adam_second_moment(grads, n_batches=5, seed=3).sqrt() + 1e-8)
    train, held = split_domains(DOMAINS, seed=3)
    for d, tr, he in zip(DOMAINS, train, held):
        row = {f: FACTS.index(f) for f in d["facts"]}
        a, b = [row[f] for f in tr.facts], [row[f] for f in he.facts]
        mean_a = torch.stack([grads[i] for i in a]).mean(0)
        mean_b = torch.stack([grads[i] for i in b]).mean(0)
        assert result.domain(d["name"]).priority == pytest.approx(float((mean_a * p * mean_b).sum()),
                                                                 rel=float64_rel(tiny64))
        want = {i: float((grads[i] * p * (mean_b if i in a else mean_a)).sum()) for i in a + b}
        shown = [e["priority"] for e in result.per_example if e["domain"] == d["name"]]
        assert shown == pytest.approx([want[row[f]] for f in d["facts"]], rel=float64_rel(tiny64))
