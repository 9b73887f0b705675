"""Per-domain units of work, addressed by what they read.

A unit is one domain's piece of a run that depends on that domain alone: its
pilot learning curve (`pilots.pilot_curve` on its two seeded halves, with
the per-fact losses the drops are measured from), and its share of the
analysis' forward pass (`forward.domain_forward` over its facts: the summed
concept vector, the per-token quantities, the per-fact losses, and the
block inputs the ranking asks for; tensors stored by `tensors`). Its key is
the sha256 of

    (kind, model identity, the unit's own facts in the order it reads them,
     the settings that unit reads, ENGINE_VERSION, UNITS_VERSION)

and never of the whole request: the other domains, their order, the
budget or the ranking estimator are not in it (only the block whose inputs
a forward piece keeps, which the ranking estimator and the diagnosis pick).
So editing one fact of one domain, or adding a domain, leaves every other
domain's units where they were, and an analysis and a plan of the same
domains share their pilots.

The facts are keyed as text in the order the unit reads them: a forward
piece the domain's facts as given (a renamed domain with the same facts
reuses it), a pilot the halves A and B of `splitting.split_order`, seeded
by (seed, domain name), so the split is part of the content and a renamed
domain, whose halves differ, is a new pilot. The model identity is the same
string whether it comes from a loaded model (`loaded_identity`) or from a
model id without loading it (`analysis.model_fingerprint`), with the dtype
and the device.

An entry of the plan's transfer matrix (what training on one domain's half
does to another's held-out half) reads exactly two domains and is a unit
keyed by both (`transfer_key`). What spans more domains is not a unit and
is recomputed from them: the paper's curvature and solve (H_k sums over
every fact of every domain), ranks, shares, bootstraps over domains, the
fallback's fitted line, the diagnosis and the plan's allocation.

Values are JSON (through `store.JsonStore`, which stores text only).
"""
from __future__ import annotations

import hashlib
import json

from ..result import ENGINE_VERSION

UNITS_VERSION = 1  # bump when what a unit holds, or how it is computed, changes


def loaded_identity(info) -> str:
    """A loaded model's identity (`models.ModelInfo`): the same string as
    `analysis.model_fingerprint` of its id, with its dtype and device."""
    if info.source == "hub":
        fingerprint = f"hub:{info.id}@{info.fingerprint}"
    else:
        fingerprint = f"{info.source}:{info.fingerprint}"
    return model_identity(fingerprint, info.dtype, info.device)


def model_identity(fingerprint: str, dtype: str, device: str) -> str:
    return f"{fingerprint}|{dtype}|{device}"


def unit_key(kind: str, model: str, content: dict, settings: dict) -> str:
    """sha256 over (kind, model identity, content, settings, engine and unit versions)."""
    payload = json.dumps({"kind": kind, "model": model, "content": content, "settings": settings,
                          "engine": ENGINE_VERSION, "units": UNITS_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def pilot_key(model: str, half_a: list, half_b: list, recipe_label: str, seed: int, sizes: list) -> str:
    """The key of one domain's two-way pilot curve: the texts of its
    halves A and B in order, the recipe, the seed of the minibatches and the
    nested sizes actually run (`pilots.pilot_sizes`)."""
    return unit_key("pilot", model, {"a": list(half_a), "b": list(half_b)},
                    {"recipe": recipe_label, "seed": int(seed), "sizes": [int(n) for n in sizes]})


def forward_key(model: str, facts_text: list, settings: dict) -> str:
    """The key of one domain's forward piece: its facts' texts in order and
    the settings the piece depends on (the batch size, the block whose
    inputs are captured, None for none)."""
    return unit_key("forward", model, {"facts": list(facts_text)}, dict(settings))


def transfer_key(model: str, source: tuple, target: tuple, recipe_label: str, seed: int, size: int) -> str:
    """The key of one entry of the transfer matrix: what training on the
    source domain's halves (A_j[:n], B_j[:n]) does to the target's halves.
    It reads two domains, so it is keyed by both domains' halves in order
    (source = (A_j, B_j), target = (A_i, B_i)), the recipe, the seed and the
    size n: an edit of either domain is a new unit, any other domain's is
    not."""
    return unit_key("transfer", model, {"source": {"a": list(source[0]), "b": list(source[1])},
                                        "target": {"a": list(target[0]), "b": list(target[1])}},
                    {"recipe": recipe_label, "seed": int(seed), "size": int(size)})


class DomainUnits:
    """The per-domain units of one run: where they are stored (cache/units
    as JSON) and which were computed and which reused, per kind, by domain
    name. `row_text[r]` is the text of the run's fact row r, for keys built
    from row numbers."""

    def __init__(self, model: str, row_text: list | None = None, store=None):
        if store is None:
            from .store import JsonStore

            store = JsonStore("domain_units")
        self.model = model
        self.row_text = list(row_text) if row_text is not None else None
        self.store = store
        self.computed: dict = {}
        self.reused: dict = {}
        self.not_kept: dict = {}  # kind -> domains whose unit was too large to keep

    def texts(self, rows) -> list:
        return [self.row_text[r] for r in rows]

    def get(self, kind: str, key: str, name: str, decode=None):
        """The unit stored under key (through `decode`, when given), or None
        when absent or when decode raises ValueError: a damaged entry is
        computed again, and only a unit actually used counts as reused."""
        value = self.store.get(key)
        if value is not None and decode is not None:
            try:
                value = decode(value)
            except ValueError:
                value = None
        if value is not None:
            self.reused.setdefault(kind, []).append(name)
        return value

    def put(self, kind: str, key: str, name: str, value: dict) -> None:
        """Keep a computed unit; one over UNIT_SIZE_LIMIT_BYTES, or holding a
        NaN or an infinity (not JSON), is used in this run and not kept, and
        a larger one is named in `not_kept`."""
        from .caches import UNIT_SIZE_LIMIT_BYTES
        from .store import EntryTooLarge

        try:
            self.store.put(key, value, max_bytes=UNIT_SIZE_LIMIT_BYTES)
        except EntryTooLarge:
            self.not_kept.setdefault(kind, []).append(name)
        except ValueError:
            pass
        self.computed.setdefault(kind, []).append(name)

    def note_blocks(self, blocks: int) -> None:
        """Remember the model's number of blocks (the pilot recipe's depth
        is min(4, blocks)), so which domains a run will recompute can be told
        before the model is loaded (`analysis.pilot_status`)."""
        if self.model is not None:
            self.store.put(unit_key("model", self.model, {}, {}), {"blocks": int(blocks)})

    def blocks(self) -> int | None:
        stored = self.store.get(unit_key("model", self.model, {}, {})) if self.model is not None else None
        return stored.get("blocks") if isinstance(stored, dict) else None

    def has(self, key: str) -> bool:
        return self.store.get(key) is not None

    def present(self, key: str) -> bool:
        """`has`, without reading the entry where the store can tell (a
        forward piece is megabytes): a damaged one still counts, and is
        computed again when the run reads it."""
        has = getattr(self.store, "has", None)
        return has(key) if has is not None else self.has(key)

    def summary(self, kind: str) -> dict:
        out = {"computed": list(self.computed.get(kind, [])), "reused": list(self.reused.get(kind, []))}
        if self.not_kept.get(kind):
            out["not_kept"] = list(self.not_kept[kind])
        return out

    def to_dict(self) -> dict:
        return {kind: self.summary(kind) for kind in sorted(set(self.computed) | set(self.reused))}


def recomputed_message(to_compute: int, total: int, what: str = "domains") -> str:
    """'2 of 4 domains recomputed, 2 from cache' (or 'all 4 ... computed')."""
    cached = total - to_compute
    if cached == 0:
        return f"all {total} {what} computed"
    if to_compute == 0:
        return f"all {total} {what} from cache"
    return f"{to_compute} of {total} {what} recomputed, {cached} from cache"
