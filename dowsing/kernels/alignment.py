"""Gradient alignment between a domain's facts, in the space of the
parameters that training changes, optionally with Adam's preconditioner.

Training on domain k's facts lowers the loss of a held-out fact q of the same
domain, to first order in the step, by  lr * grad l_q^T P grad L_train,k,
where P is the optimizer's preconditioner (the identity for SGD,
diag(1 / (sqrt(v) + eps)) for Adam with second moment v). The estimators here
measure exactly that quantity, without a held-out set:

    pairs_k = 1 / (N (N - 1)) * sum_{i != j in k} g_i^T P g_j
            = (||S_k||_P^2 - sum_i ||g_i||_P^2) / (N (N - 1)),   S_k = sum_i g_i,

the mean alignment of each fact with the *other* facts of its domain: an
unbiased estimate of (E g)^T P (E g), the first-order gain on an unseen fact of
the domain. Dropping the i = j terms matters: they reward domains whose facts
are merely memorisable one by one. With a held-out set Q_k the same quantity
is also estimated as  query_k = mean_{i in k} g_i^T P grad L_Q,k.

g_i = grad_theta l_i over the chosen parameters theta (the last blocks and the
final norm), l_i a fact's mean next-token loss.

Adam's second moment is taken where a fine-tune on the mixture starts:
v = (1/R) sum_r (grad L_{B_r})^2 over R seeded minibatches B_r of the whole
pool of facts (every domain), its bias correction included; eps = 1e-8 as in
torch's Adam. The same P serves every domain, so domains are compared under one
optimizer state.
"""
from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
import random
from dataclasses import dataclass
from typing import Callable

import torch

from .subspace import BLOCK_PATHS, dotted_attr, per_fact_losses

ADAM_EPS = 1e-8

GradFn = Callable[[list], list]  # rows -> [tensor per parameter]: grad of the MEAN loss over those facts


@dataclass
class Alignment:
    """One domain's alignment numbers for one preconditioner."""

    pairs: float  # U-statistic over the domain's facts (i != j)
    per_fact_pairs: list  # g_i^T P (S_k - g_i) / (N - 1): mean is `pairs`
    query: float | None = None  # mean_i g_i^T P grad L_Q (with query facts)
    per_fact_query: list | None = None
    self_norm: float = 0.0  # mean_i ||g_i||_P^2, for diagnostics


def _flat(tensors: list) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def adam_preconditioner(grad_of: GradFn, pool: list, batch_size: int, n_batches: int, seed: int,
                        eps: float = ADAM_EPS) -> list:
    """P = 1 / (sqrt(v) + eps), v = mean over n_batches seeded minibatches of
    the pool of the squared minibatch-mean gradient."""
    rng = random.Random(seed)
    v = None
    for _ in range(n_batches):
        pick = rng.sample(pool, min(batch_size, len(pool)))
        g = grad_of(pick)
        sq = [x.double() ** 2 for x in g]
        v = sq if v is None else [a + b for a, b in zip(v, sq)]
    return [(1.0 / ((x / n_batches).sqrt() + eps)).to(torch.float32) for x in v]


def domain_alignment(grad_of: GradFn, rows: list, preconditioners: dict, query_rows: list | None = None,
                     sum_batch: int = 16) -> dict:
    """{name: Alignment} for each named preconditioner (None = identity).
    With a single fact `pairs` is NaN (no pair to average) and only the
    query alignment is defined.

    Costs one backward pass per fact (the per-fact norms) plus batched passes
    for S_k and the query gradient. Gradients are flattened once; P S_k and
    P grad L_Q are formed once per domain, so each fact costs three dot
    products whatever the number of parameters.
    """
    n = len(rows)
    if n < 1:
        raise ValueError("gradient alignment needs at least 1 fact per domain")
    total = None
    for start in range(0, n, sum_batch):
        part = rows[start: start + sum_batch]
        g = _flat(grad_of(part)) * len(part)
        total = g if total is None else total + g
    query = _flat(grad_of(query_rows)) if query_rows else None
    weights = {name: (None if p is None else _flat(p).to(total.dtype)) for name, p in preconditioners.items()}
    p_total = {name: total if w is None else w * total for name, w in weights.items()}
    p_query = {name: (query if w is None else w * query) if query is not None else None for name, w in weights.items()}
    out = {name: {"pairs": [], "query": [], "self": []} for name in preconditioners}
    for r in rows:
        g = _flat(grad_of([r]))
        g2 = g * g
        for name, w in weights.items():
            own = float(g2.sum(dtype=torch.float64) if w is None else (g2 * w).sum(dtype=torch.float64))
            with_all = float((g * p_total[name]).sum(dtype=torch.float64))
            out[name]["self"].append(own)
            # one fact has no other to align with: the U-statistic is undefined
            out[name]["pairs"].append((with_all - own) / (n - 1) if n > 1 else float("nan"))
            if query is not None:
                out[name]["query"].append(float((g * p_query[name]).sum(dtype=torch.float64)))
        del g, g2
    result = {}
    for name, vals in out.items():
        pairs = vals["pairs"]
        result[name] = Alignment(
            pairs=sum(pairs) / n, per_fact_pairs=pairs,
            query=sum(vals["query"]) / n if query is not None else None,
            per_fact_query=vals["query"] if query is not None else None,
            self_norm=sum(vals["self"]) / n)
    return result


# --- gradients of the last blocks from cached block inputs -------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook: the blocks after it are not needed."""


def blocks_of(net):
    return next(b for p in BLOCK_PATHS if (b := dotted_attr(net, p)) is not None)


def capture_block_inputs(net, batches, first: int) -> list:
    """Per fact (in batch-row order), the input hidden states of block
    `first` over the fact's real tokens. The forward pass stops there (the
    hook raises), so this costs the embeddings and the blocks before it."""
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    out = {}
    handle = blocks_of(net)[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for input_ids, mask, rows in batches:
                try:
                    net(input_ids=input_ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
                for j, row in enumerate(rows):
                    out[row] = captured["h"][j, : int(mask[j].sum())]
    finally:
        handle.remove()
    return [out[i] for i in range(len(out))]


def tail_parameters(work, blocks: int) -> list:
    """The parameters of the last `blocks` transformer blocks of `work` and
    every parameter after them (the final norm; the tied LM head stays frozen
    with the embeddings). Switches grads on for them, off for the rest."""
    kept = blocks_of(work)
    chosen_ids = set()
    for block in list(kept)[max(0, len(kept) - blocks):]:
        chosen_ids |= {id(p) for p in block.parameters()}
    block_ids = {id(p) for p in kept.parameters()}
    chosen = []
    for name, p in work.named_parameters():
        frozen_kind = any(key in name for key in ("wte", "wpe", "embed_tokens", "lm_head"))
        if id(p) in chosen_ids or (id(p) not in block_ids and not frozen_kind):
            chosen.append(p)
    for p in work.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def tail_model(net, first: int):
    """A deep copy that runs only blocks first.. on given block inputs.

    GPT-2 adds position embeddings to inputs_embeds, so they are taken off
    the block input first; the caller checks the copy reproduces the logits.
    """
    path = next(p for p in BLOCK_PATHS if dotted_attr(net, p) is not None)
    # the blocks before `first` are cut out of the copy at once: the copy shares them instead of copying
    # them (most of the model's weights), and drops them below
    work = copy.deepcopy(net, {id(block): block for block in list(dotted_attr(net, path))[:first]})
    parent_path, attr = path.rsplit(".", 1)
    parent = dotted_attr(work, parent_path)
    setattr(parent, attr, torch.nn.ModuleList(list(getattr(parent, attr))[first:]))
    return work, tail_embedding(work)


def tail_embedding(work):
    """hidden -> what a truncated copy takes as inputs_embeds so that its
    first kept block sees `hidden`: GPT-2 adds its position embeddings to
    inputs_embeds, so they are taken off first; other models take it as is."""
    wpe = getattr(getattr(work, "transformer", None), "wpe", None)

    def embed(hidden):
        if wpe is None:
            return hidden
        return hidden - wpe(torch.arange(hidden.shape[1], device=hidden.device)).unsqueeze(0)

    return embed


def padded_block_batch(rows_ids, rows_hidden, device):
    """Right-padded (input_ids, attention_mask, block inputs) for a list of facts."""
    width = max(len(r) for r in rows_ids)
    d = rows_hidden[0].shape[-1]
    input_ids = torch.zeros((len(rows_ids), width), dtype=torch.long)
    mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    hidden = torch.zeros((len(rows_ids), width, d), dtype=rows_hidden[0].dtype)
    for j, (ids, hid) in enumerate(zip(rows_ids, rows_hidden)):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        mask[j, : len(ids)] = 1
        hidden[j, : len(ids)] = hid
    return input_ids.to(device), mask.to(device), hidden.to(device)


def tail_grad_fn(work, embed, ids: list, block_inputs: list, params: list) -> GradFn:
    """rows -> grad of mean_{i in rows} l_i over params, running only the
    blocks kept in `work` from the cached block inputs."""
    device = params[0].device

    def grad_of(rows):
        input_ids, mask, hidden = padded_block_batch([ids[r] for r in rows], [block_inputs[r] for r in rows], device)
        logits = work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits
        loss = per_fact_losses(logits, input_ids, mask).mean()
        return [g.detach() for g in torch.autograd.grad(loss, params)]

    return grad_of


def alignment_blocks(net, align_blocks: int) -> tuple[int, int, str | None]:
    """(first, blocks, note): the alignment uses blocks first..depth-1, with
    blocks = min(align_blocks, depth) and first = depth - blocks; a note when
    the model has fewer blocks than asked."""
    depth = len(blocks_of(net))
    first, blocks = alignment_span(depth, align_blocks)
    note = None
    if align_blocks > depth:
        note = (f"align_blocks = {align_blocks} but the model has {depth} blocks: the alignment used all "
                f"{depth} blocks and the final norm.")
    return first, blocks, note


def alignment_span(depth: int, align_blocks: int) -> tuple[int, int]:
    """(first, blocks) of `alignment_blocks` for a model of `depth` blocks."""
    blocks = min(align_blocks, depth)
    return depth - blocks, blocks


@contextmanager
def capture_inputs_during(net, first: int, captured: list):
    """While active, each forward pass appends the (padded) input of block
    `first` to `captured`: block inputs come with a forward pass the analysis
    makes anyway, instead of a second one (`capture_block_inputs`). Only
    this thread's passes: another thread may run its own through the model."""
    owner = threading.get_ident()

    def grab(module, args, kwargs):
        if threading.get_ident() == owner:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = blocks_of(net)[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def block_inputs_by_fact(batches, captured: list) -> list:
    """Per fact (row order), its real tokens' rows of the captured block inputs."""
    out = {}
    for (_, mask, rows), hidden in zip(batches, captured):
        for j, row in enumerate(rows):
            out[row] = hidden[j, : int(mask[j].sum())]
    return [out[i] for i in range(len(out))]


def check_tail(work, embed, ids, block_inputs, fact_losses, batch_size: int, instead: tuple,
               rows: list | None = None) -> None:
    """The truncated model must reproduce the facts' losses from their block
    inputs; otherwise the architecture does something on the way (e.g.
    position embeddings added inside the model) that tail_model cannot undo.
    rows: the facts checked (None: every fact). instead: the estimators the
    refusal suggests, named by the caller (the registry is a layer above)."""
    device = next(work.parameters()).device
    checked = list(range(len(ids))) if rows is None else list(rows)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(checked), batch_size):
            rows = checked[start: start + batch_size]
            input_ids, mask, hidden = padded_block_batch([ids[r] for r in rows], [block_inputs[r] for r in rows],
                                                         device)
            logits = work(inputs_embeds=embed(hidden), attention_mask=mask, use_cache=False).logits
            got = per_fact_losses(logits, input_ids, mask).to(torch.float64).cpu()
            want = fact_losses[rows].to(torch.float64).cpu()
            worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(1.0)).max()))
    dtype = next(work.parameters()).dtype
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 5e-2)
    if not worst <= tolerance:
        raise ValueError(f"The gradient-alignment estimators cannot run on this model: its last blocks do not "
                         f"reproduce its loss from their inputs (relative error {worst:.1e}). Choose the "
                         f"estimator {' or '.join(repr(name) for name in instead)}.")
