"""The plain forward pass over facts that every estimator and the analysis
share: concept vectors, the per-token quantities of the last MLP projection
and the final norm, each fact's loss, and (on request) each fact's input to
one transformer block."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .alignment import block_inputs_by_fact, capture_inputs_during
from .curvature import tail_function
from .subspace import capture_tail_inputs, encode_facts, find_anatomy, make_batches, per_fact_losses


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
    xs, hs, ys, facts, scales, losses = [], [], [], [], [], []
    tail = tail_function(anatomy)
    tail_ok = True
    sums = None
    with torch.no_grad():
        for input_ids, mask, rows in batches:
            store: dict = {}
            with capture_tail_inputs(anatomy, store):
                out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            losses.append(per_fact_losses(out.logits, input_ids, mask).to(torch.float64))
            hidden = out.hidden_states[-1]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            fact_means = ((hidden * m).sum(dim=1) / m.sum(dim=1)).to(torch.float64)
            if sums is None:
                sums = torch.zeros((n_domains, hidden.shape[-1]), dtype=torch.float64, device=hidden.device)
            for j, row in enumerate(rows):
                sums[fact_domain[row]] += fact_means[j]
                length = int(mask[j].sum())
                xs.append(store["x"][j, : length - 1])
                hs.append(store["h"][j, : length - 1])
                ys.append(input_ids[j, 1:length])
                facts.append(torch.full((length - 1,), row, dtype=torch.long))
                scales.append(torch.full((length - 1,), 1.0 / (length - 1), dtype=torch.float64))
            if tail_ok:
                logits_again = tail(store["h"])
                scale = out.logits.abs().max().clamp_min(1.0)
                tol = 1e-3 if out.logits.dtype != torch.float64 else 1e-9
                tail_ok = bool(((logits_again - out.logits).abs().max() / scale) < tol)
    counts = torch.bincount(torch.tensor(fact_domain), minlength=n_domains).to(sums)
    means = sums / counts.unsqueeze(-1)
    norms = means.norm(dim=1)
    if not torch.isfinite(norms).all() or (norms == 0).any():
        raise ValueError("A concept vector is zero or not finite: the model's hidden states are degenerate.")
    device = xs[0].device
    tokens = FactTokens(
        x=torch.cat(xs), h=torch.cat(hs), targets=torch.cat(ys).to(device),
        token_fact=torch.cat(facts).to(device), token_scale=torch.cat(scales).to(device),
        fact_losses=torch.cat(losses), tail_matches=tail_ok,
    )
    return means / norms.unsqueeze(-1), norms, tokens


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
    batches = make_batches(encoded, batch_size, next(net.parameters()).device)
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
    right-padded batches of `batch_size` facts taken in order
    (`costs.padded_tokens`). passes: tokens per fact of each pass."""
    from ..costs import padded_tokens

    return cal.forward_s_per_token * sum(padded_tokens(lengths, batch_size) for lengths in passes)
