"""Results on disk: diskcache under cache/results, keyed by the engine's cache key
(and, for other JSON records such as the collection plan's pilot curves,
`JsonStore` under a folder of its own).

Entries are JSON text with its sha256 beside it (diskcache stores str and
bytes as they are, without pickling); a corrupt entry is dropped and
recomputed, never shown.
"""
from __future__ import annotations

import hashlib
import json

import diskcache

from .paths import cache_dir
from .result import Result


class ResultStore:
    def __init__(self, folder=None):
        self.folder = folder or cache_dir() / "results"
        self._cache = diskcache.Cache(str(self.folder))

    def get(self, key: str) -> Result | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        try:
            digest, text = entry.split("\n", 1)
            if hashlib.sha256(text.encode()).hexdigest() != digest:
                raise ValueError("checksum mismatch")
            return Result.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            self._cache.delete(key)
            return None

    def put(self, key: str, result: Result) -> None:
        text = result.to_json(indent=None)
        self._cache.set(key, hashlib.sha256(text.encode()).hexdigest() + "\n" + text)

    def delete(self, key: str) -> None:
        self._cache.delete(key)

    def keys(self) -> list[str]:
        return list(self._cache.iterkeys())


class JsonStore:
    """JSON-able dicts on disk (diskcache under cache/<name>), stored as the
    result store stores results: text with its sha256 beside it, a corrupt
    entry dropped."""

    def __init__(self, name: str, folder=None):
        self.folder = folder or cache_dir() / name
        self._cache = diskcache.Cache(str(self.folder))

    def get(self, key: str) -> dict | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        try:
            digest, text = entry.split("\n", 1)
            if hashlib.sha256(text.encode()).hexdigest() != digest:
                raise ValueError("checksum mismatch")
            return json.loads(text)
        except (ValueError, AttributeError, json.JSONDecodeError):
            self._cache.delete(key)
            return None

    def put(self, key: str, value: dict) -> None:
        text = json.dumps(value, allow_nan=False)
        self._cache.set(key, hashlib.sha256(text.encode()).hexdigest() + "\n" + text)

    def delete(self, key: str) -> None:
        self._cache.delete(key)
