"""Results on disk: diskcache under cache/results, keyed by the engine's cache key
(and, for other JSON records such as the collection plan's pilot curves,
`JsonStore` under a folder of its own).

Entries are JSON text with its sha256 beside it, stored through
`caches.DataCache` (str and bytes as they are; a pickled row is refused
unread, a damaged store moved aside and started empty); a corrupt entry is
dropped and recomputed, never shown. Each store is bounded in size, least
recently used entries first out.
"""
from __future__ import annotations

import hashlib
import json

from .caches import BOUNDED, DataCache
from ..paths import cache_dir
from ..result import Result


def checked_text(cache, key: str) -> str | None:
    """The text stored under key, or None when absent; an entry whose sha256
    does not match its text (a torn or corrupt write) is dropped."""
    entry = cache.get(key)
    if entry is None:
        return None
    try:
        digest, text = entry.split("\n", 1)
    except (ValueError, AttributeError):
        cache.delete(key)
        return None
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        cache.delete(key)
        return None
    return text


def put_checked_text(cache, key: str, text: str) -> None:
    """Store text with its sha256 in front, for `checked_text`."""
    cache.set(key, hashlib.sha256(text.encode()).hexdigest() + "\n" + text)


class _CheckedStore:
    """A bounded diskcache of checked text entries (`put_checked_text`):
    what the result store and the JSON store share besides how they read."""

    def __init__(self, folder):
        self.folder = folder
        self._cache = DataCache(self.folder, **BOUNDED)

    def delete(self, key: str) -> None:
        self._cache.delete(key)

    def has(self, key: str) -> bool:
        """Whether an entry is stored under key, without reading it."""
        return self._cache.contains(key)

    def keys(self) -> list[str]:
        return list(self._cache.iterkeys())


class ResultStore(_CheckedStore):
    def __init__(self, folder=None):
        super().__init__(folder or cache_dir() / "results")

    def get(self, key: str) -> Result | None:
        text = checked_text(self._cache, key)
        try:
            return None if text is None else Result.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._cache.delete(key)
            return None

    def put(self, key: str, result: Result) -> None:
        put_checked_text(self._cache, key, result.to_json(indent=None))


class JsonStore(_CheckedStore):
    """JSON-able dicts on disk (diskcache under cache/<name>), stored as the
    result store stores results: text with its sha256 beside it, a corrupt
    entry dropped."""

    def __init__(self, name: str, folder=None):
        super().__init__(folder or cache_dir() / name)

    def get(self, key: str) -> dict | None:
        text = checked_text(self._cache, key)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            self._cache.delete(key)
            return None

    def put(self, key: str, value: dict, max_bytes: int | None = None) -> None:
        """Store value as JSON; ValueError when it holds a NaN or an
        infinity, EntryTooLarge when its text passes max_bytes (nothing is
        stored then)."""
        text = json.dumps(value, allow_nan=False)
        if max_bytes is not None and len(text) > max_bytes:
            raise EntryTooLarge(f"{len(text)} bytes, more than the {max_bytes} an entry may take")
        put_checked_text(self._cache, key, text)


class EntryTooLarge(ValueError):
    """A value whose JSON text is larger than its store takes for one entry."""
