"""The concept subspace S_k and the forward passes that live in it.

S_k is a rank-1 adapter on the MLP output projection of each of the last B
blocks: W_b <- W_b + v_k u_b^T with u_b in R^{d_ff}, zero at the model's
weights. The projection maps x (d_ff) to y (d_model), so the adapter adds
v_k * (x . u_b) to y at every token. Its gradient at u = 0 is
sum_t x_t (v_k . dL/dy_t) = (dL/dW)^T v_k: the full weight gradient projected
on the concept direction.

The adapter is a forward hook, so one code path serves GPT-2 (Conv1D) and
Llama/Qwen-style (nn.Linear) blocks. Each example in a batch carries its own
copy of u (shape (batch, B, d_ff)): the gradient of a weighted sum of
per-fact losses with respect to those copies is every fact's own gradient, in
one backward pass; expanding one shared u to all rows gives the ordinary
gradient and Hessian-vector products.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..limits import too_many_tokens
from ..access.models import ModelError


@dataclass
class Anatomy:
    """Where the pieces dowsing needs sit in a causal LM."""

    down_projs: list  # MLP output projection of every block, in order
    final_norm: torch.nn.Module
    lm_head: torch.nn.Module
    d_ff: int
    d_model: int
    max_positions: int


# Where each supported family keeps its list of transformer blocks.
BLOCK_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")
_DOWN_NAMES = ("mlp.c_proj", "mlp.down_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.fc_out")
_NORM_PATHS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")


def dotted_attr(obj, dotted: str):
    """`obj.a.b.c` for `dotted` = "a.b.c", or None where a part is missing."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_anatomy(model) -> Anatomy:
    blocks = next((b for p in BLOCK_PATHS if (b := dotted_attr(model, p)) is not None), None)
    norm = next((n for p in _NORM_PATHS if (n := dotted_attr(model, p)) is not None), None)
    head = model.get_output_embeddings()
    if blocks is None or norm is None or head is None:
        raise ModelError(
            f"{type(model).__name__} is not supported: dowsing needs transformer blocks with an MLP output "
            "projection, a final norm and an LM head (GPT-2, Llama, Qwen, Mistral, GPT-NeoX families)."
        )
    downs = []
    for block in blocks:
        down = next((d for n in _DOWN_NAMES if (d := dotted_attr(block, n)) is not None), None)
        if down is None:
            raise ModelError(f"{type(model).__name__}: no MLP output projection found in its blocks.")
        downs.append(down)
    weight = downs[-1].weight
    # Conv1D (GPT-2) stores (in, out); nn.Linear stores (out, in).
    if type(downs[-1]).__name__ == "Conv1D":
        d_ff, d_model = weight.shape
    else:
        d_model, d_ff = weight.shape
    config = model.config
    max_positions = (
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    )
    return Anatomy(downs, norm, head, int(d_ff), int(d_model), int(max_positions))


@dataclass
class Encoded:
    """Tokenised facts, each at least two tokens long (one next-token target)."""

    ids: list  # list[list[int]]
    truncated: list  # indices of facts cut to the model's context


def encode_facts(tokenizer, facts, max_positions: int) -> Encoded:
    """The facts' token ids, each cut to the model's context; ValueError once
    they come to more tokens than a run accepts (`limits.LIMITS`)."""
    ids, truncated = [], []
    total = 0
    for i, fact in enumerate(facts):
        tokens = list(tokenizer(fact)["input_ids"])
        total += min(len(tokens), max_positions)
        refusal = too_many_tokens(total)
        if refusal:
            raise ValueError(refusal[:1].upper() + refusal[1:])
        if len(tokens) > max_positions:
            tokens = tokens[:max_positions]
            truncated.append(i)
        if len(tokens) < 2:
            raise ValueError(f"Fact {fact!r} is a single token: it has no next-token loss. Write a full sentence.")
        ids.append(tokens)
    if truncated:
        warnings.warn(
            f"{len(truncated)} fact(s) are longer than the model's context of {max_positions} tokens "
            "and were truncated.",
            stacklevel=2,
        )
    return Encoded(ids, truncated)


def pad_ids(rows: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, right-padded to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(row)
        mask[j, : len(row)] = 1
    return input_ids.to(device), mask.to(device)


def make_batches(encoded: Encoded, batch_size: int, device, by_length: bool = False) -> list:
    """Right-padded batches (input_ids, attention_mask, fact indices).

    Right padding keeps every real token's position id and causal context
    unchanged, so results do not depend on batching. by_length: the facts
    ordered by length first (ties in fact order), so a batch pads little;
    each batch still names its facts.
    """
    order = list(range(len(encoded.ids)))
    if by_length:
        order.sort(key=lambda i: len(encoded.ids[i]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        input_ids, mask = pad_ids([encoded.ids[i] for i in rows], device)
        out.append((input_ids, mask, rows))
    return out


def per_fact_losses(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """l_i = mean next-token cross-entropy over the fact's predicted tokens."""
    pred = logits[:, :-1, :]
    target = input_ids[:, 1:]
    valid = mask[:, 1:].to(pred.dtype)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.view(target.shape) * valid
    return ce.sum(dim=1) / valid.sum(dim=1)


def head_losses(hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """`per_fact_losses` from the last hidden states (after the final norm),
    putting only the predicting positions through the LM head: every fact's
    tokens but its last, no padding. The head is most of a short pass's
    work, and padding and last positions are a third of its rows on facts of
    uneven length; the losses are the same numbers."""
    valid = mask[:, 1:].bool()
    h = hidden[:, :-1][valid]
    target = input_ids[:, 1:][valid]
    ce = F.cross_entropy(head(h), target, reduction="none")
    fact = torch.arange(valid.shape[0], device=valid.device).unsqueeze(1).expand_as(valid)[valid]
    sums = torch.zeros(valid.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, fact, ce)
    return sums / valid.sum(dim=1).to(ce.dtype)


@contextmanager
def concept_adapter(anatomy: Anatomy, direction: torch.Tensor, u_rows: torch.Tensor):
    """Add v * (x . u_b) to the output of the last B MLP output projections.

    u_rows: (batch, B, d_ff), one copy of u per example (expand a shared u to
    get ordinary gradients). Block b of the B adapted blocks is
    down_projs[-B + b].
    """
    n_blocks = u_rows.shape[1]
    handles = []

    def make_hook(b: int):
        def hook(module, inputs, output):
            x = inputs[0]
            s = torch.einsum("btf,bf->bt", x, u_rows[:, b, :])
            return output + s.unsqueeze(-1) * direction

        return hook

    try:
        for b, module in enumerate(anatomy.down_projs[-n_blocks:]):
            handles.append(module.register_forward_hook(make_hook(b)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_tail_inputs(anatomy: Anatomy, store: dict):
    """Record the last MLP projection's input x and the final norm's input h
    of the forward passes this thread runs (another thread may run its own
    pass through the same modules at the same time)."""
    owner = threading.get_ident()

    def down_hook(module, inputs, output):
        if threading.get_ident() == owner:
            store["x"] = inputs[0].detach()

    def norm_hook(module, inputs, output):
        if threading.get_ident() == owner:
            store["h"] = inputs[0].detach()

    handles = [
        anatomy.down_projs[-1].register_forward_hook(down_hook),
        anatomy.final_norm.register_forward_hook(norm_hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
