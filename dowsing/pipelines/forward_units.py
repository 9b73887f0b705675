"""The analysis' forward pass as per-domain units: each domain's piece
(`forward.domain_forward` over its facts alone) is found in or kept in the
run's `units.DomainUnits` under `units.forward_key`, and the pieces, stored
or fresh, are merged (`forward.merge_pieces`) into the pass over every
domain. A fresh analysis takes the same path with nothing stored, so an
analysis after an edit computes what a fresh one does.

A piece is stored as JSON: its tensors through `tensors.encode_tensor`,
its token ids and flags as they are. One read back is checked against the
run's own token ids and dtype and against itself (`forward.check_piece`)
before use; one that fails is computed again."""
from __future__ import annotations

import threading
import warnings

from ..kernels.forward import ForwardPiece, check_piece, domain_forward
from ..kernels.side_by_side import pool_workers, side_by_side, threads_per_run
from ..kernels.subspace import encode_facts
from ..progress import Progress
from ..storage.tensors import decode_tensor, encode_tensor
from ..storage.units import forward_key

TENSORS = ("concept_sum", "x", "h", "targets", "token_fact", "token_scale", "fact_losses")
FIELDS = set(TENSORS) | {"n_facts", "tail_matches", "ids", "block_inputs"}


def forward_settings(batch_size: int, capture_block: int | None) -> dict:
    """What a piece depends on besides the model and its facts: the batch
    size (the pass is the same up to rounding at any batch size, but a
    stored piece is the one computed) and the block whose inputs it keeps."""
    return {"batch_size": int(batch_size), "capture_block": None if capture_block is None else int(capture_block)}


def piece_value(piece: ForwardPiece) -> dict:
    """The piece as a JSON value (`piece_from_value` reads it back)."""
    value = {name: encode_tensor(getattr(piece, name)) for name in TENSORS}
    value.update(n_facts=int(piece.n_facts), tail_matches=bool(piece.tail_matches),
                 ids=[[int(t) for t in i] for i in piece.ids],
                 block_inputs=None if piece.block_inputs is None else [encode_tensor(b) for b in piece.block_inputs])
    return value


def piece_from_value(value, ids: list, device, dtype) -> ForwardPiece:
    """The piece `piece_value` wrote, on `device`; ValueError unless it is
    one for these token ids (per fact), the model's dtype, and whole."""
    if not isinstance(value, dict) or set(value) != FIELDS:
        raise ValueError("A stored forward piece has other fields than a forward piece.")
    if value["ids"] != [list(i) for i in ids]:
        raise ValueError("A stored forward piece is for other token ids.")
    if type(value["n_facts"]) is not int or type(value["tail_matches"]) is not bool:
        raise ValueError("A stored forward piece's fact count or tail flag is not what was written.")
    blocks = value["block_inputs"]
    if blocks is not None and not isinstance(blocks, list):
        raise ValueError("A stored forward piece's block inputs are not a list.")
    tensors = {name: decode_tensor(value[name], device) for name in TENSORS}
    piece = ForwardPiece(**tensors, n_facts=value["n_facts"], tail_matches=value["tail_matches"],
                         ids=[list(i) for i in ids],
                         block_inputs=None if blocks is None else [decode_tensor(b, device) for b in blocks])
    if piece.x.dtype != dtype:
        raise ValueError(f"A stored forward piece is in {piece.x.dtype}, the model in {dtype}.")
    check_piece(piece)
    return piece


def domain_pieces(net, anatomy, tokenizer, names: list, facts_of: list, batch_size: int,
                  capture_block: int | None, units=None, report=None) -> tuple[list, list]:
    """(pieces, notes): each domain's forward piece, in domain order, from `units` where one
    is stored for its facts and these settings, else computed (and kept
    there). facts_of: per domain its facts' texts; anatomy: the model's
    (`subspace.find_anatomy`).

    Every fact is tokenised first, all domains at once (`subspace.encode_facts`:
    the limit on a run's tokens is over all of them, and one warning names
    every truncated fact: that warning is in `notes`, for the user),
    whether its piece is stored or not: a stored piece is used only for the
    token ids its facts have now.

    The domains to compute run side by side (`side_by_side`), one per core
    on one thread each: a piece is the same whichever thread computes it
    and whatever runs beside it (each fact's numbers come from its own rows
    of every product)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_facts(tokenizer, [f for facts in facts_of for f in facts], anatomy.max_positions)
    notes = [str(w.message) for w in caught]
    starts = [0]
    for facts in facts_of:
        starts.append(starts[-1] + len(facts))
    ids_of = [encoded.ids[a:b] for a, b in zip(starts, starts[1:])]
    report = report or (lambda p: None)
    parameter = next(net.parameters())
    settings = forward_settings(batch_size, capture_block)
    keys = [forward_key(units.model, facts, settings) if units is not None else None for facts in facts_of]
    pieces = [None if key is None else units.get(
        "forward", key, name, lambda value, ids=ids: piece_from_value(value, ids, parameter.device, parameter.dtype))
        for key, name, ids in zip(keys, names, ids_of)]
    missing = [k for k, piece in enumerate(pieces) if piece is None]
    if not missing:
        return pieces, notes
    workers = pool_workers(parameter.device.type, runs=len(missing))
    report(Progress("concept vectors", 0.05, f"forward pass, domain {missing[0] + 1} of {len(names)}: "
                    f"{names[missing[0]]}" if len(missing) == 1 else
                    f"forward pass over {len(missing)} of {len(names)} domains, {workers} side by side"))
    finished = []
    lock = threading.Lock()

    def piece_of(model, k):
        piece = domain_forward(model, anatomy, ids_of[k], batch_size, capture_block)
        with lock:  # the pieces finish on the workers' threads
            finished.append(k)
            report(Progress("concept vectors", 0.05 + 0.05 * len(finished) / len(missing),
                            f"forward pass: {len(finished)} of {len(missing)} domains done"))
        return piece

    fresh = side_by_side(piece_of, missing, [net] * workers, threads_per_run(workers))
    for k, piece in zip(missing, fresh):
        pieces[k] = piece
        if keys[k] is not None:
            units.put("forward", keys[k], names[k], piece_value(piece))
    return pieces, notes
