"""Named domain sets that survive a browser refresh and a server restart.

Layout under ``cache_dir()/"workspace"``::

    sets/<name>.json     {"version": 1, "domains": [{"name": ..., "facts": [...]}, ...]}
    trash/<name>.json    [{"domain": {...}, "position": i, "deleted_at": ...}, ...]  (undo stack)
    workspace.json       {"version": 1, "active": <name>, "seeded": true, "model_pick": {...}}

Sets are stored raw (names and facts as typed), so a set that does not
validate yet is still saved: a user mid-edit never loses work. Every write
goes to a temporary file beside the target and is renamed over it.

A new workspace starts with the default set "Science (paper)".
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .paths import atomic_write_text, cache_dir

DEFAULT_SET = "Science (paper)"
FORMAT_VERSION = 1
# A set name is a file name: the bound is in UTF-8 bytes, the unit file systems
# count (255 at most for a name, here with ".json" and a temporary file's prefix).
MAX_NAME_BYTES = 80
# The sidebar's model picker, kept in workspace.json (never in the URL).
MODEL_PICK_KEYS = ("source", "model", "checkpoints_text")
# Undo depth per set: older deletions are forgotten.
TRASH_DEPTH = 50


class WorkspaceError(ValueError):
    """A bad set name or a missing set; the message is one sentence."""


def check_name(name: object) -> str:
    """The set name, stripped; WorkspaceError when it cannot be a set name."""
    if not isinstance(name, str) or not name.strip():
        raise WorkspaceError("A domain set needs a name.")
    name = name.strip()
    if "/" in name or "\\" in name or os.sep in name:
        raise WorkspaceError(f"The set name {name!r} contains a path separator ('/' or '\\'); choose another.")
    if name.startswith("."):
        raise WorkspaceError(f"The set name {name!r} starts with a dot; choose another.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise WorkspaceError("A set name cannot contain control characters such as line breaks.")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise WorkspaceError(f"A set name can have at most {MAX_NAME_BYTES} bytes in UTF-8 (fewer letters with "
                             f"accents or emoji); this one has {size}.")
    return name


def raw_domains(value: object) -> list[dict]:
    """Normalise editor input to [{"name": str, "facts": [str, ...]}, ...].

    Accepts Domain objects or dicts; keeps empty names and facts (mid-edit)."""
    if not isinstance(value, (list, tuple)):
        raise WorkspaceError("A domain set must be a list of domains.")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            name, facts = item.get("name", ""), item.get("facts", [])
        elif hasattr(item, "name") and hasattr(item, "facts"):
            name, facts = item.name, item.facts
        else:
            raise WorkspaceError(f"Domain {i + 1} of the set is neither a Domain nor a {{name, facts}} mapping.")
        if isinstance(facts, str) or not isinstance(facts, (list, tuple)):
            raise WorkspaceError(f"The facts of domain {i + 1} must be a list of sentences.")
        out.append({
            "name": "" if name is None else str(name),
            "facts": ["" if fact is None else str(fact) for fact in facts],
        })
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        return default


class Workspace:
    """The domain sets of one workspace folder (default: cache_dir()/"workspace")."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "workspace"
        self.sets_dir = self.root / "sets"
        self.trash_dir = self.root / "trash"
        self.state_path = self.root / "workspace.json"
        self.sets_dir.mkdir(parents=True, exist_ok=True)
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        self._seed()

    # -- files -------------------------------------------------------------
    def _set_path(self, name: str) -> Path:
        return self.sets_dir / f"{name}.json"

    def _trash_path(self, name: str) -> Path:
        return self.trash_dir / f"{name}.json"

    def _state(self) -> dict:
        state = _read_json(self.state_path, {})
        return state if isinstance(state, dict) else {}

    def _write_state(self, **changes) -> None:
        state = self._state()
        state.update(changes, version=FORMAT_VERSION)
        atomic_write_text(self.state_path, json.dumps(state, indent=2, ensure_ascii=False))

    def _seed(self) -> None:
        # Only a workspace that was never used gets the default set: a user
        # who deleted it must not see it come back.
        if self._state().get("seeded"):
            return
        from .domains import default_domains

        if not self.exists(DEFAULT_SET):
            self.save_set_raw(DEFAULT_SET, raw_domains(default_domains()))
        self._write_state(seeded=True, active=self._state().get("active") or DEFAULT_SET)

    def _require(self, name: str) -> str:
        name = check_name(name)
        if not self.exists(name):
            raise WorkspaceError(f"There is no domain set named {name!r}.")
        return name

    # -- sets --------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self._set_path(check_name(name)).is_file()

    def list_sets(self) -> list[str]:
        """Set names, sorted ignoring case."""
        names = [p.name[: -len(".json")] for p in self.sets_dir.glob("*.json") if not p.name.startswith(".")]
        return sorted(names, key=lambda n: (n.casefold(), n))

    def load_set_raw(self, name: str) -> list[dict]:
        """The set as saved: [{"name", "facts"}], possibly not valid yet."""
        name = self._require(name)
        data = _read_json(self._set_path(name), None)
        if not isinstance(data, dict) or not isinstance(data.get("domains"), list):
            raise WorkspaceError(f"The file of domain set {name!r} is damaged: {self._set_path(name)}.")
        return raw_domains(data["domains"])

    def load_set(self, name: str) -> list:
        """The set as validated Domains (names and facts stripped).

        Raises DomainError when the set does not validate yet."""
        from .domains import Domain, validate_domains

        raw = self.load_set_raw(name)
        return validate_domains([Domain(name=d["name"], facts=tuple(d["facts"])) for d in raw])

    def save_set_raw(self, name: str, domains: list) -> None:
        """Create or overwrite the set; saves even when it does not validate."""
        name = check_name(name)
        payload = {"version": FORMAT_VERSION, "saved_at": _now(), "domains": raw_domains(domains)}
        atomic_write_text(self._set_path(name), json.dumps(payload, indent=2, ensure_ascii=False))

    def save_set(self, name: str, domains: list) -> None:
        """Same as save_set_raw; takes Domains or {"name", "facts"} dicts."""
        self.save_set_raw(name, domains)

    def create_set(self, name: str, domains: list | None = None) -> str:
        """A new set (empty unless `domains`); WorkspaceError if the name is taken."""
        name = check_name(name)
        if self.exists(name):
            raise WorkspaceError(f"A domain set named {name!r} already exists.")
        self.save_set_raw(name, domains or [])
        return name

    def delete_set(self, name: str) -> None:
        """Delete a set and its undo trash. The workspace is never empty:
        deleting the last set brings back the default set."""
        name = self._require(name)
        self._set_path(name).unlink(missing_ok=True)
        self._trash_path(name).unlink(missing_ok=True)
        if self._state().get("active") == name or not self.list_sets():
            self._write_state(active=None)
            self.active_set()  # picks the first set, or recreates the default

    def rename_set(self, old: str, new: str) -> str:
        """Rename a set (with its trash and the active mark); returns the new name."""
        old = self._require(old)
        new = check_name(new)
        if new == old:
            return new
        if self.exists(new):
            raise WorkspaceError(f"A domain set named {new!r} already exists; choose another name.")
        try:
            # link + unlink: never overwrites a set created meanwhile.
            os.link(self._set_path(old), self._set_path(new))
        except FileExistsError:
            raise WorkspaceError(f"A domain set named {new!r} already exists; choose another name.") from None
        self._set_path(old).unlink()
        if self._trash_path(old).exists():
            os.replace(self._trash_path(old), self._trash_path(new))
        if self._state().get("active") == old:
            self._write_state(active=new)
        return new

    # -- active set ----------------------------------------------------------
    def active_set(self) -> str:
        """The set the app shows: the one last set active, else the first set.
        The stored name is checked as a set name and must be one of the sets
        listed, so a tampered workspace.json names no file outside `sets/`."""
        active = self._state().get("active")
        names = self.list_sets()
        try:
            if isinstance(active, str) and check_name(active) == active and active in names:
                return active
        except WorkspaceError:
            pass
        if not names:
            from .domains import default_domains

            self.save_set_raw(DEFAULT_SET, raw_domains(default_domains()))
            names = [DEFAULT_SET]
        self._write_state(active=names[0])
        return names[0]

    def set_active(self, name: str) -> None:
        self._write_state(active=self._require(name))

    # -- the sidebar's model pick --------------------------------------------------
    def model_pick(self) -> dict:
        """The model last picked in the app's sidebar, {widget key: text} for
        MODEL_PICK_KEYS, so a refresh or a new tab starts from it ({} when
        none). Only short strings are kept; the app checks them as typed text."""
        pick = self._state().get("model_pick")
        if not isinstance(pick, dict):
            return {}
        return {k: v for k, v in pick.items() if k in MODEL_PICK_KEYS and isinstance(v, str) and len(v) <= 4096}

    def set_model_pick(self, pick: dict) -> None:
        self._write_state(model_pick={k: str(pick.get(k) or "")[:4096] for k in MODEL_PICK_KEYS})

    # -- undo trash -----------------------------------------------------------
    def _trash(self, name: str) -> list[dict]:
        items = _read_json(self._trash_path(name), [])
        return items if isinstance(items, list) else []

    def trash_domain(self, set_name: str, domain: dict, position: int) -> None:
        """Remember a domain the caller has deleted from the set at `position`,
        so `restore_last` can put it back. Does not change the set itself."""
        set_name = check_name(set_name)
        entry = {"domain": raw_domains([domain])[0], "position": int(position), "deleted_at": _now()}
        items = (self._trash(set_name) + [entry])[-TRASH_DEPTH:]
        atomic_write_text(self._trash_path(set_name), json.dumps(items, indent=2, ensure_ascii=False))

    def delete_domain(self, set_name: str, position: int) -> dict:
        """Remove the domain at `position` from the saved set and put it in the
        trash; returns it."""
        raw = self.load_set_raw(set_name)
        if not 0 <= position < len(raw):
            raise WorkspaceError(f"The set {set_name!r} has no domain {position + 1}.")
        domain = raw.pop(position)
        self.save_set_raw(set_name, raw)
        self.trash_domain(set_name, domain, position)
        return domain

    def trash_size(self, set_name: str) -> int:
        return len(self._trash(check_name(set_name)))

    def restore_last(self, set_name: str) -> dict | None:
        """Undo the last deletion: put the domain back at its old position (or
        at the end when the set is shorter now); None when nothing is in the trash."""
        set_name = self._require(set_name)
        items = self._trash(set_name)
        if not items:
            return None
        entry = items.pop()
        domain = raw_domains([entry.get("domain") or {}])[0]
        raw = self.load_set_raw(set_name)
        position = min(max(int(entry.get("position", len(raw))), 0), len(raw))
        raw.insert(position, domain)
        self.save_set_raw(set_name, raw)
        atomic_write_text(self._trash_path(set_name), json.dumps(items, indent=2, ensure_ascii=False))
        return domain


# Module-level functions on the default workspace (cache_dir() is read at
# each call, so DOWSING_CACHE set later is honoured).
def _ws() -> Workspace:
    return Workspace()


def list_sets() -> list[str]:
    return _ws().list_sets()


def load_set(name: str) -> list:
    return _ws().load_set(name)


def load_set_raw(name: str) -> list[dict]:
    return _ws().load_set_raw(name)


def unchecked_domains(raw: list[dict]) -> list:
    """A set's raw domains as Domains, not validated: a page shows their
    problems (`domains.validation_problems`) beside the editor instead of
    refusing the set."""
    from .domains import Domain

    return [Domain(str(d.get("name", "")), tuple(str(f) for f in d.get("facts", []))) for d in raw]


def save_set(name: str, domains: list) -> None:
    _ws().save_set(name, domains)


def save_set_raw(name: str, domains: list) -> None:
    _ws().save_set_raw(name, domains)


def create_set(name: str, domains: list | None = None) -> str:
    return _ws().create_set(name, domains)


def delete_set(name: str) -> None:
    _ws().delete_set(name)


def rename_set(old: str, new: str) -> str:
    return _ws().rename_set(old, new)


def active_set() -> str:
    return _ws().active_set()


def set_active(name: str) -> None:
    _ws().set_active(name)


def model_pick() -> dict:
    return _ws().model_pick()


def set_model_pick(pick: dict) -> None:
    _ws().set_model_pick(pick)


def trash_domain(set_name: str, domain: dict, position: int) -> None:
    _ws().trash_domain(set_name, domain, position)


def delete_domain(set_name: str, position: int) -> dict:
    return _ws().delete_domain(set_name, position)


def restore_last(set_name: str) -> dict | None:
    return _ws().restore_last(set_name)
