"""kronfluence-based EK-FAC influence (dowsing.validation.ekfac) against
independent computations with torch.autograd, on the tiny GPT-2 and Llama."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from dowsing.access.models import load_model
from dowsing.estimators.ekfac import ekfac_pairwise_scores, tracked_module_names

from dowsing.kernels.alignment import tail_model

FIRST = 1  # keep the last of the two blocks
FACTS = [
    "Paris is the capital of France.",
    "Water boils at one hundred degrees.",
    "The cat sat.",
    "Gold is a soft yellow metal used in jewelry and coins.",
    "Two plus two is four.",
    "Mount Everest is the highest mountain on Earth.",
]
QUERY_ROWS = [0, 2, 3]  # queries that are also training facts
EXTRA_QUERY = "Rome is the capital of Italy."


def _train_tail(work):
    """Grads on for all but embeddings and LM head (as dowsing's trainable_parameters)."""
    for name, p in work.named_parameters():
        p.requires_grad_(not any(key in name for key in ("wte", "wpe", "embed_tokens", "lm_head")))


def _blocks(net):
    return net.transformer.h if hasattr(net, "transformer") else net.model.layers


def _items(net, tokenizer, texts):
    """(ids, input of block FIRST) per fact, captured by a forward pre-hook."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach()[0])

    handle = _blocks(net)[FIRST].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for text in texts:
                net(input_ids=torch.tensor([tokenizer(text)["input_ids"]]), use_cache=False)
    finally:
        handle.remove()
    return [(tokenizer(text)["input_ids"], hidden) for text, hidden in zip(texts, captured)]


def _tracked_params(work):
    kinds = (torch.nn.Linear, Conv1D)
    return [p for m in work.modules() if isinstance(m, kinds) and all(q.requires_grad for q in m.parameters())
            for p in m.parameters()]


def _fact_loss(work, embed, ids, hidden):
    logits = work(inputs_embeds=embed(hidden.unsqueeze(0)), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))


def _gradients(work, embed, items):
    """(n, n_params) float64: grad l_i over the tracked parameters, by autograd, one fact at a time."""
    params = _tracked_params(work)
    rows = []
    for ids, hidden in items:
        grads = torch.autograd.grad(_fact_loss(work, embed, ids, hidden), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).to(torch.float64))
    return torch.stack(rows)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request):
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    loaded = load_model(str(folder), dtype="float32")
    net = loaded.model
    work, embed = tail_model(net, FIRST)
    _train_tail(work)
    train = _items(net, loaded.tokenizer, FACTS)
    query = [train[r] for r in QUERY_ROWS] + _items(net, loaded.tokenizer, [EXTRA_QUERY])
    # the tail on captured block inputs reproduces the full model
    ids, hidden = train[3]
    with torch.no_grad():
        full = net(input_ids=torch.tensor([ids]), use_cache=False).logits
        tail = work(inputs_embeds=embed(hidden.unsqueeze(0)), use_cache=False).logits
    assert torch.allclose(full, tail, atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in work.state_dict().items()}
    flags = [p.requires_grad for p in work.parameters()]
    kinds = [type(m) for m in work.modules()]
    # batches of 4: the six training facts come right-padded in two batches
    identity = ekfac_pairwise_scores(work, embed, train, query, damping=None, strategy="identity", batch_size=4)
    # `work` is left exactly as it was
    assert [p.requires_grad for p in work.parameters()] == flags
    assert [type(m) for m in work.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in work.state_dict().items())
    return {"kind": request.param, "work": work, "embed": embed, "train": train, "query": query,
            "identity": identity}


def test_tracked_modules_are_the_trainable_projections(case):
    names = tracked_module_names(case["work"])
    if case["kind"] == "gpt2":
        want = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        prefix = "transformer.h.0."
    else:
        want = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        prefix = "model.layers.0."
    assert names == [prefix + w for w in want]  # kept block only; lm_head (frozen) excluded


def test_identity_equals_autograd_gradient_dot_products(case):
    work, embed, scores = case["work"], case["embed"], case["identity"]
    want = _gradients(work, embed, case["query"]) @ _gradients(work, embed, case["train"]).T
    assert scores.dtype == torch.float64
    assert scores.shape == (len(case["query"]), len(case["train"]))
    assert _rel(scores, want) < 1e-4


@pytest.mark.parametrize("strategy", ["diagonal", "ekfac"])
def test_huge_damping_approaches_identity_over_damping(case, strategy):
    damping = 1e6
    scores = ekfac_pairwise_scores(case["work"], case["embed"], case["train"], case["query"], damping=damping,
                                   strategy=strategy, batch_size=3)
    assert scores.shape == case["identity"].shape
    assert torch.isfinite(scores).all()
    assert _rel(scores * damping, case["identity"]) < 1e-2


def test_sign_positive_means_helpful(case):
    work, embed, train, query = case["work"], case["embed"], case["train"], case["query"]
    ekfac = ekfac_pairwise_scores(work, embed, train, query, damping=None, strategy="ekfac", batch_size=4)
    assert torch.isfinite(ekfac).all()
    for q, t in enumerate(QUERY_ROWS):  # a training fact identical to the query
        assert ekfac[q, t] > 0
    if case["kind"] == "llama":  # (one model is enough; each call costs a second)
        again = ekfac_pairwise_scores(work, embed, train, query, damping=None, strategy="ekfac", batch_size=4)
        assert torch.equal(ekfac, again)  # the sampled-label Fisher is seeded: deterministic

    # the convention itself: one small gradient step on training fact t changes
    # query q's loss by about -lr * S_identity[q, t]
    q = 3  # the fact that is not a training fact, and its most influential training fact
    t = int(case["identity"][q].abs().argmax())
    lr = 1e-3 / float(case["identity"][q, t].abs())
    stepped = copy.deepcopy(work)
    grads = torch.autograd.grad(_fact_loss(stepped, embed, *train[t]), _tracked_params(stepped))
    with torch.no_grad():
        before = float(_fact_loss(stepped, embed, *query[q]))
        for p, g in zip(_tracked_params(stepped), grads):
            p.sub_(lr * g)
        after = float(_fact_loss(stepped, embed, *query[q]))
    predicted = -lr * float(case["identity"][q, t])
    assert (after - before) == pytest.approx(predicted, rel=0.2)


def test_domain_scores_equal_block_means_of_the_pairwise_matrix(case):
    """Aggregated queries per domain give the block means of the full
    pairwise EK-FAC matrix (same factors: the whole training set, same order)."""
    from dowsing.estimators.ekfac import ekfac_domain_scores

    train, query = case["train"], case["query"]
    domains_train = [train[:3], train[3:]]
    domains_query = [query[:2], query[2:]]
    pairwise = ekfac_pairwise_scores(case["work"], case["embed"], train, query[:2] + query[2:], damping=1e-3,
                                     strategy="ekfac", batch_size=4)
    per_domain = ekfac_domain_scores(case["work"], case["embed"], domains_train, domains_query, damping=1e-3,
                                     batch_size=4, fit_max_examples=None)
    want = [pairwise[:2, :3].mean(dim=0), pairwise[2:, 3:].mean(dim=0)]
    for got, block in zip(per_domain, want):
        assert _rel(torch.tensor(got, dtype=torch.float64), block) < 1e-4
