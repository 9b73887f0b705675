"""The diskcaches dowsing keeps under the cache folder: data only, private to
the user, and rebuilt when damaged.

- `DataDisk` reads and writes only what dowsing stores (str, bytes, int,
  float). diskcache's own `Disk` unpickles any row in its pickle mode, so a
  row written by someone else could run code on read; here such a row is
  refused unread and dropped like a corrupt entry, and nothing is ever
  written as a pickle.
- `DataCache` opens one store in a folder created 0700 with its SQLite file
  0600. A store SQLite reports as damaged ("database disk image is
  malformed", "file is not a database") on open or on use is moved aside
  (``<folder>.damaged-<UTC time>``), said so in one line (logged, and kept
  for the pages and the CLI in `damage_notes`), and started empty.
- STORE_SIZE_LIMIT_BYTES bounds each store of results or units, evicting the
  least recently used entries; UNIT_SIZE_LIMIT_BYTES bounds one per-domain
  unit (a larger one is not kept). Model conversions (``cache/models``) are
  plain folders, not stores, and are never evicted.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import diskcache
from diskcache.core import MODE_PICKLE

from ..paths import private, private_dir

logger = logging.getLogger("dowsing.cache")

# Each store of results, units or plans stays under this size; past it the
# least recently read or written entries go first (a result is recomputed).
STORE_SIZE_LIMIT_BYTES = 2 * 2 ** 30
BOUNDED = {"size_limit": STORE_SIZE_LIMIT_BYTES, "eviction_policy": "least-recently-used"}
# No single per-domain unit larger than this is kept (it is used in its run and computed again in the
# next): a forward piece of a model with a wide MLP or a domain of thousands of facts runs to hundreds
# of MB, and storing it would evict many small units that are cheaper to keep.
UNIT_SIZE_LIMIT_BYTES = STORE_SIZE_LIMIT_BYTES // 16

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")


class _Refused:
    """What `DataDisk` reads instead of a pickled row: never the row's value."""

    def __repr__(self) -> str:
        return "<refused pickled row>"


REFUSED = _Refused()


class StoreDamaged(RuntimeError):
    """A store was found damaged inside a transaction; it has been moved aside
    and started empty, and the transaction's work was not done."""


class DataDisk(diskcache.Disk):
    """diskcache's Disk for data only: str, bytes, int and float keys and
    values are stored as diskcache stores them; anything else is refused on
    write (never pickled), and a row in pickle mode reads as REFUSED,
    unread."""

    def put(self, key):
        if type(key) not in (str, bytes, int, float):
            raise TypeError(f"dowsing's caches take str, bytes, int or float keys, not {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        return super().get(key, raw) if raw else REFUSED

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if not read and type(value) not in (str, bytes, int, float):
            raise TypeError(f"dowsing's caches store str, bytes, int or float, not {type(value).__name__} "
                            "(never a pickle)")
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            return REFUSED
        return super().fetch(mode, filename, value, read)


def is_damage(exc: BaseException) -> bool:
    """Whether SQLite says the file is damaged or not a database (not busy,
    locked or full: those pass)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


_notes: list[str] = []
_notes_lock = threading.Lock()


def damage_notes() -> list[str]:
    """The one-line notes of stores moved aside since the last call (then
    forgotten), for a page or the CLI to show."""
    with _notes_lock:
        notes = list(_notes)
        _notes.clear()
    return notes


def _note(text: str) -> None:
    logger.warning(text)
    with _notes_lock:
        _notes.append(text)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class DataCache:
    """One diskcache store in `folder`, through `DataDisk`, recovering from
    damage. owns_folder: the folder holds this store alone, so a damaged
    store moves the whole folder aside; else only its SQLite files move
    (into ``<folder>/cache.damaged-<UTC time>``), and the folder's other
    files stay. settings: diskcache's (eviction_policy, size_limit, ...)."""

    def __init__(self, folder, owns_folder: bool = True, **settings):
        self.folder = Path(folder)
        self.owns_folder = owns_folder
        self._settings = settings
        self._depth = 0  # open transactions: inside one, damage is recovered when it ends
        self._cache = None
        self._open()

    @property
    def db_path(self) -> Path:
        return self.folder / DB_FILES[0]

    def _open(self) -> None:
        private_dir(self.folder)
        self._inode = _inode(self.db_path)
        try:
            self._cache = diskcache.Cache(str(self.folder), disk=DataDisk, **self._settings)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            self._move_aside(exc)
            private_dir(self.folder)
            self._cache = diskcache.Cache(str(self.folder), disk=DataDisk, **self._settings)
        self._inode = _inode(self.db_path)
        for name in DB_FILES:  # SQLite gives the -wal and -shm files the database's mode
            private(self.folder / name, 0o600)

    def _move_aside(self, exc: BaseException) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        if self.owns_folder:
            target = self.folder.with_name(f"{self.folder.name}.damaged-{stamp}")
            os.rename(self.folder, target)
        else:
            target = self.folder / f"cache.damaged-{stamp}"
            target.mkdir(mode=0o700)
            for name in DB_FILES:
                if (self.folder / name).exists():
                    os.rename(self.folder / name, target / name)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _note(f"The cache store {self.folder} was damaged ({reason}); it was moved aside to {target} "
              "and started empty.")

    def _recover(self, exc: BaseException) -> None:
        try:
            self._cache.close()
        except Exception:  # noqa: BLE001 - a damaged connection may fail to close; it is dropped either way
            pass
        # Another process may have moved it aside and rebuilt it already: then
        # the file in the folder is not the one that failed, and stays.
        if self._inode is not None and _inode(self.db_path) == self._inode:
            self._move_aside(exc)
        self._open()

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self._cache, method)(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if self._depth or not is_damage(exc):
                raise
            self._recover(exc)
            return getattr(self._cache, method)(*args, **kwargs)

    def _refused(self, key) -> None:
        _note(f"A row of the cache store {self.folder} was stored as a pickle, which dowsing never writes; "
              "it was dropped unread.")
        self._call("delete", key)

    # -- what the stores use ------------------------------------------------
    def get(self, key, default=None):
        value = self._call("get", key, default)
        if value is REFUSED:
            self._refused(key)
            return default
        return value

    def set(self, key, value) -> None:
        self._call("set", key, value)

    def delete(self, key) -> None:
        self._call("delete", key)

    def contains(self, key) -> bool:
        """Whether key is stored, without reading (or unpickling) its value."""
        return bool(self._call("__contains__", key))

    def iterkeys(self) -> list:
        """Every key (a list, read at once); keys stored pickled are left out."""
        try:
            keys = list(self._cache.iterkeys())
        except sqlite3.DatabaseError as exc:
            if self._depth or not is_damage(exc):
                raise
            self._recover(exc)
            keys = list(self._cache.iterkeys())
        return [k for k in keys if k is not REFUSED]

    def clear(self) -> int:
        """Remove every entry (and its value file), in place, so that every
        process that has this store open sees it empty; how many."""
        return self._call("clear")

    def volume(self) -> int:
        return self._call("volume")

    def __len__(self) -> int:
        return self._call("__len__")

    @contextmanager
    def transact(self):
        """diskcache's transaction. Damage found inside one moves the store
        aside when it ends and raises StoreDamaged (its work was not done)."""
        try:
            self._depth += 1
            try:
                with self._cache.transact():
                    yield
            finally:
                self._depth -= 1
        except sqlite3.DatabaseError as exc:
            if self._depth or not is_damage(exc):
                raise
            self._recover(exc)
            raise StoreDamaged(f"the cache store {self.folder} was damaged and has been started empty") from exc

    def close(self) -> None:
        self._cache.close()
