"""The plain forward pass over facts that every estimator and the analysis
share: concept vectors, the per-token quantities of the last MLP projection
and the final norm, each fact's loss, and (on request) each fact's input to
one transformer block. Over all facts at once (`forward_pass`), or one domain
at a time (`domain_forward`) with the pieces merged (`merge_pieces`) into the
same pass, so a domain's piece can be kept while another domain changes."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .alignment import block_inputs_by_fact, capture_inputs_during
from .curvature import tail_function
from .subspace import (Encoded, capture_tail_inputs, encode_facts, find_anatomy, make_batches,
                       per_fact_losses)


@dataclass
class FactTokens:
    """What one plain forward pass over all facts gives every domain."""

    x: torch.Tensor  # (N, d_ff) input of the last MLP projection at each predicting position
    h: torch.Tensor  # (N, d_model) residual stream entering the final norm there
    targets: torch.Tensor  # (N,) next-token ids
    token_fact: torch.Tensor  # (N,) fact index of each position
    token_scale: torch.Tensor  # (N,) 1 / (T_i - 1), float64
    fact_losses: torch.Tensor  # (M,) l_i, float64
    tail_matches: bool  # final norm + LM head reproduce the model's logits


def forward_pass(model, anatomy, batches, fact_domain, n_domains):
    """Concept vectors and the per-token quantities, in one pass."""
    sums, tokens = summed_pass(model, anatomy, batches, fact_domain, n_domains)
    counts = torch.bincount(torch.tensor(fact_domain), minlength=n_domains).to(sums)
    directions, norms = concept_directions(sums, counts)
    return directions, norms, tokens


def summed_pass(model, anatomy, batches, fact_domain, n_domains):
    """(sums, tokens): the forward pass with the concept vectors left as
    sums[k] = the sum over domain k's facts of each fact's mean last hidden
    state (float64), so passes over parts of the facts add up to the pass
    over all of them. The tokens are laid out fact by fact in fact order
    whatever order the batches take the facts in."""
    by_fact: dict = {}  # row -> (x, h, targets, loss)
    tail = tail_function(anatomy)
    tail_ok = True
    sums = None
    with torch.no_grad():
        for input_ids, mask, rows in batches:
            store: dict = {}
            with capture_tail_inputs(anatomy, store):
                out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            losses = per_fact_losses(out.logits, input_ids, mask).to(torch.float64)
            hidden = out.hidden_states[-1]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            fact_means = ((hidden * m).sum(dim=1) / m.sum(dim=1)).to(torch.float64)
            if sums is None:
                sums = torch.zeros((n_domains, hidden.shape[-1]), dtype=torch.float64, device=hidden.device)
            for j, row in enumerate(rows):
                sums[fact_domain[row]] += fact_means[j]
                length = int(mask[j].sum())
                by_fact[row] = (store["x"][j, : length - 1], store["h"][j, : length - 1], input_ids[j, 1:length],
                                losses[j])
            if tail_ok:
                # the final norm and the head against the model's logits, on one fact of each batch: whether
                # they match is the architecture's, and the whole batch again would be a second LM-head pass
                logits_again = tail(store["h"][:1])
                scale = out.logits[:1].abs().max().clamp_min(1.0)
                tol = 1e-3 if out.logits.dtype != torch.float64 else 1e-9
                tail_ok = bool(((logits_again - out.logits[:1]).abs().max() / scale) < tol)
    rows = sorted(by_fact)
    xs, hs, ys, losses = zip(*(by_fact[r] for r in rows))
    counts = [len(y) for y in ys]
    device = xs[0].device
    tokens = FactTokens(
        x=torch.cat(xs), h=torch.cat(hs), targets=torch.cat(ys).to(device),
        token_fact=torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in zip(rows, counts)]).to(device),
        token_scale=torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64) for n in counts]).to(device),
        fact_losses=torch.stack(losses), tail_matches=tail_ok,
    )
    return sums, tokens


def concept_directions(sums: torch.Tensor, counts: torch.Tensor) -> tuple:
    """(directions, norms) of the concept vectors means = sums / counts."""
    means = sums / counts.unsqueeze(-1)
    norms = means.norm(dim=1)
    if not torch.isfinite(norms).all() or (norms == 0).any():
        raise ValueError("A concept vector is zero or not finite: the model's hidden states are degenerate.")
    return means / norms.unsqueeze(-1), norms


@dataclass
class ForwardPiece:
    """One domain's share of the analysis' forward pass, run over its facts
    alone (`domain_forward`): what `merge_pieces` needs to build the pass
    over every domain, and nothing that depends on the other domains."""

    concept_sum: torch.Tensor  # (d_model,) float64: sum over the facts of each fact's mean last hidden state
    n_facts: int
    x: torch.Tensor  # (N, d_ff)
    h: torch.Tensor  # (N, d_model)
    targets: torch.Tensor  # (N,) long
    token_fact: torch.Tensor  # (N,) long: the fact of each position, 0..n_facts-1 within the domain
    token_scale: torch.Tensor  # (N,) float64
    fact_losses: torch.Tensor  # (n_facts,) float64
    tail_matches: bool
    ids: list  # token ids per fact
    block_inputs: list | None = None  # per fact (T_i, d_model): input of the captured block


def domain_forward(net, anatomy, ids: list, batch_size: int, capture_block: int | None = None) -> ForwardPiece:
    """The forward pass over one domain's facts (token ids per fact), in
    batches of its own; with capture_block, each fact's input to that block
    from the same pass. Right padding leaves every real token as it is, so
    the result does not depend on which facts share a batch."""
    device = next(net.parameters()).device
    batches = make_batches(Encoded(list(ids), []), batch_size, device, by_length=True)
    captured: list = []
    with capture_inputs_during(net, capture_block, captured) if capture_block is not None else nullcontext():
        sums, tokens = summed_pass(net, anatomy, batches, [0] * len(ids), 1)
    block_inputs = block_inputs_by_fact(batches, captured) if capture_block is not None else None
    return ForwardPiece(sums[0], len(ids), tokens.x, tokens.h, tokens.targets, tokens.token_fact,
                        tokens.token_scale, tokens.fact_losses, tokens.tail_matches, [list(i) for i in ids],
                        block_inputs)


@dataclass
class MergedForward:
    """The forward pass over every domain, from their pieces in domain order."""

    directions: torch.Tensor  # (K, d_model), unit
    norms: torch.Tensor  # (K,)
    tokens: FactTokens  # facts in domain order, then each domain's own order
    ids: list
    block_inputs: list | None


def merge_pieces(pieces: list) -> MergedForward:
    """What `forward_pass` over all the domains' facts (in domain order)
    gives, from each domain's `ForwardPiece`: the concept vectors from the
    summed hidden states, each piece's fact rows moved past the facts of the
    domains before it. Block inputs only when every piece has them."""
    sums = torch.stack([p.concept_sum for p in pieces])
    counts = torch.tensor([p.n_facts for p in pieces], dtype=sums.dtype, device=sums.device)
    directions, norms = concept_directions(sums, counts)
    offsets = [0]
    for p in pieces[:-1]:
        offsets.append(offsets[-1] + p.n_facts)
    tokens = FactTokens(
        x=torch.cat([p.x for p in pieces]), h=torch.cat([p.h for p in pieces]),
        targets=torch.cat([p.targets for p in pieces]),
        token_fact=torch.cat([p.token_fact + start for p, start in zip(pieces, offsets)]),
        token_scale=torch.cat([p.token_scale for p in pieces]),
        fact_losses=torch.cat([p.fact_losses for p in pieces]),
        tail_matches=all(p.tail_matches for p in pieces),
    )
    whole = all(p.block_inputs is not None for p in pieces)
    block_inputs = [b for p in pieces for b in p.block_inputs] if whole else None
    return MergedForward(directions, norms, tokens, [i for p in pieces for i in p.ids], block_inputs)


def check_piece(piece: ForwardPiece) -> None:
    """ValueError unless the piece's parts agree with each other and with its
    token ids (a piece read back from storage is checked before use, so a
    damaged one is recomputed instead of failing later in the analysis).
    Each check reads only what the ones before it have checked."""
    n, lengths = piece.n_facts, [len(i) for i in piece.ids]
    tokens = sum(lengths) - n
    per_token = (piece.x, piece.h, piece.targets, piece.token_fact, piece.token_scale)
    checks = [
        (lambda: n > 0 and len(lengths) == n and min(lengths) >= 2, "a fact count and token ids per fact"),
        (lambda: piece.concept_sum.dim() == 1 and piece.concept_sum.dtype == torch.float64, "a float64 concept sum"),
        (lambda: piece.x.dim() == 2 and piece.h.dim() == 2 and piece.x.dtype == piece.h.dtype,
         "x and h of one dtype"),
        (lambda: piece.h.shape[1] == piece.concept_sum.shape[0], "h as wide as the concept sum"),
        (lambda: all(t.dim() >= 1 and t.shape[0] == tokens for t in per_token), "one row per predicted token"),
        (lambda: tuple(piece.fact_losses.shape) == (n,) and piece.fact_losses.dtype == torch.float64,
         "one float64 loss per fact"),
        (lambda: piece.targets.dtype == torch.long and piece.token_fact.dtype == torch.long,
         "long targets and fact rows"),
        (lambda: torch.equal(piece.targets.cpu(), torch.tensor([t for i in piece.ids for t in i[1:]])),
         "its token ids as targets"),
        (lambda: torch.equal(piece.token_fact.cpu(), torch.arange(n).repeat_interleave(torch.tensor(lengths) - 1)),
         "each token's fact row"),
        (lambda: torch.equal(piece.token_scale.cpu(), torch.cat(
            [torch.full((t - 1,), 1.0 / (t - 1), dtype=torch.float64) for t in lengths])),
         "1 / (T_i - 1) as each token's scale"),
        (lambda: piece.block_inputs is None or (len(piece.block_inputs) == n and all(
            b.dim() == 2 and b.shape[0] == t and b.shape[1] == piece.h.shape[1] and b.dtype == piece.h.dtype
            for b, t in zip(piece.block_inputs, lengths))), "one block input row per token of each fact"),
    ]
    for ok, what in checks:
        if not ok():
            raise ValueError(f"A forward piece must have {what}.")


@dataclass
class SplitPass:
    """One forward pass over every domain's training and held-out facts.

    train_rows[k] / held_rows[k]: the fact rows of domain k's training and
    held-out facts. From `split_pass`, rows 0..M_train-1 are the training
    facts (domain by domain) and the rest the held-out facts, and
    directions[k] is v_k from domain k's training facts only, so nothing of
    the held-out half leaks into S_k.
    """

    anatomy: object
    directions: torch.Tensor  # (K, d_model), unit
    tokens: object  # FactTokens over all facts
    train_rows: list  # list[list[int]]
    held_rows: list  # list[list[int]]
    n_facts: int
    forward_s: float
    ids: list | None = None  # token ids per fact
    block_inputs: list | None = None  # per fact (T_i, d): input of block `capture_block`
    capture_block: int | None = None
    names: list | None = None  # the domains' names
    line: object | None = None  # the LogitLine over these tokens, built on first use (`subspace_terms.logit_line`)
    terms: list | None = None  # DomainTerms per domain, computed on first use (`estimators.subspace.domain_terms_of`)
    # the truncated model that reads block_inputs, checked against them (`pipelines.ranking.ranking_split`),
    # at its starting weights until a family that trains it takes it (`EstimatorContext.take_tail`)
    tail: object | None = None

    @property
    def n_train(self) -> int:
        return sum(len(r) for r in self.train_rows)


def split_pass(loaded, train, held, batch_size: int = 16, capture_block: int | None = None) -> SplitPass:
    """Run the model once over train + held-out facts (lists of Domain).

    capture_block: also keep each fact's input to that transformer block
    (for fine-tuning only the blocks after it without re-running the rest).
    """
    t0 = time.perf_counter()
    net = loaded.model
    anatomy = find_anatomy(net)
    facts, groups = [], []
    for k, d in enumerate(train):
        facts += list(d.facts)
        groups += [k] * len(d.facts)
    for k, d in enumerate(held):
        facts += list(d.facts)
        groups += [len(train) + k] * len(d.facts)
    encoded = encode_facts(loaded.tokenizer, facts, anatomy.max_positions)
    batches = make_batches(encoded, batch_size, next(net.parameters()).device, by_length=True)
    captured: list = []
    if capture_block is None:
        directions, _, tokens = forward_pass(net, anatomy, batches, groups, 2 * len(train))
    else:
        with capture_inputs_during(net, capture_block, captured):
            directions, _, tokens = forward_pass(net, anatomy, batches, groups, 2 * len(train))
    block_inputs = block_inputs_by_fact(batches, captured) if capture_block is not None else None
    rows = [[i for i, g in enumerate(groups) if g == k] for k in range(2 * len(train))]
    return SplitPass(anatomy, directions[: len(train)], tokens, rows[: len(train)], rows[len(train):], len(facts),
                     time.perf_counter() - t0, encoded.ids, block_inputs, capture_block, [d.name for d in train])


def forward_pass_s(cal, batch_size: int, *passes) -> float:
    """What forward passes cost before they run: the calibrated seconds per
    token (`calibration.Calibration`) times the tokens of each pass's
    right-padded batches of `batch_size` facts taken by length
    (`costs.padded_tokens`). passes: tokens per fact of each pass."""
    from ..costs import padded_tokens

    return cal.forward_s_per_token * sum(padded_tokens(sorted(lengths), batch_size) for lengths in passes)
