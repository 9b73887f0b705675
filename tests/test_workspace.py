"""The workspace: named domain sets on disk that survive a restart."""
from __future__ import annotations

import json

import pytest

from dowsing.domains import Domain, DomainError, default_domains


@pytest.fixture
def ws_module(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path))
    import dowsing.workspace as module

    return module


def raw(name, *facts):
    return {"name": name, "facts": list(facts)}


def test_new_workspace_starts_with_the_default_set(ws_module):
    assert ws_module.list_sets() == [ws_module.DEFAULT_SET]
    assert ws_module.active_set() == ws_module.DEFAULT_SET
    assert ws_module.load_set(ws_module.DEFAULT_SET) == default_domains()


def test_sets_survive_a_restart(ws_module, tmp_path):
    ws_module.save_set_raw("Mine", [raw("Physics", "Light bends.", "Mass attracts."), raw("", "half typed")])
    ws_module.set_active("Mine")
    # A restart: nothing is kept in memory, so a fresh Workspace on the same
    # folder is what a restarted server sees. (No importlib.reload: it would
    # give other tests' modules a second WorkspaceError class.)
    again = ws_module.Workspace(tmp_path / "workspace")
    assert again.list_sets() == ["Mine", ws_module.DEFAULT_SET]
    assert again.active_set() == "Mine"
    assert again.load_set_raw("Mine") == [raw("Physics", "Light bends.", "Mass attracts."), raw("", "half typed")]


def test_an_invalid_set_is_saved_but_does_not_load_as_domains(ws_module):
    ws_module.save_set_raw("Draft", [raw("Physics", "only one fact"), raw("physics ", "", "x")])
    assert ws_module.load_set_raw("Draft")[1] == raw("physics ", "", "x")
    with pytest.raises(DomainError):
        ws_module.load_set("Draft")


def test_save_set_takes_domains_and_load_set_gives_them_back(ws_module):
    domains = [Domain("A", ("a one.", "a two.")), Domain("B", ("b one.", "b two."))]
    ws_module.save_set("Two", domains)
    assert ws_module.load_set("Two") == domains


def test_writes_are_atomic_and_leave_no_temporary_files(ws_module, tmp_path):
    ws = ws_module.Workspace()
    for i in range(5):
        ws.save_set_raw("S", [raw("D", f"fact {i}.", "other.")])
        ws.set_active("S")
        ws.trash_domain("S", raw("Gone", "x", "y"), 0)
    ws.restore_last("S")
    ws.rename_set("S", "T")
    files = [p for p in (tmp_path / "workspace").rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.name.startswith(".") or p.name.endswith(".tmp")]
    for path in files:
        json.loads(path.read_text())  # every file is whole JSON


def test_several_sets_rename_and_delete(ws_module):
    ws = ws_module.Workspace()
    ws.create_set("b set", [raw("X", "x1", "x2")])
    ws.create_set("A set")
    assert ws.list_sets() == ["A set", "b set", ws_module.DEFAULT_SET]
    ws.set_active("b set")
    ws.trash_domain("b set", raw("Y", "y1"), 1)
    assert ws.rename_set("b set", "  C set ") == "C set"
    assert ws.active_set() == "C set"  # the active mark follows the rename
    assert ws.load_set_raw("C set") == [raw("X", "x1", "x2")]
    assert ws.restore_last("C set") == raw("Y", "y1")  # and so does the trash
    ws.delete_set("C set")
    assert ws.list_sets() == ["A set", ws_module.DEFAULT_SET]
    assert ws.active_set() in ws.list_sets()
    ws.delete_set(ws_module.DEFAULT_SET)
    # Deleting the default set is kept across restarts: no re-seeding...
    assert ws_module.Workspace().list_sets() == ["A set"]
    assert ws.active_set() == "A set"
    # ...unless the last set goes: the workspace is never empty.
    ws.delete_set("A set")
    assert ws.list_sets() == [ws_module.DEFAULT_SET] == [ws.active_set()]
    assert ws.load_set(ws_module.DEFAULT_SET) == default_domains()


def test_trash_restores_in_reverse_order_at_the_old_positions(ws_module):
    ws = ws_module.Workspace()
    ws.save_set_raw("S", [raw("A", "a"), raw("B", "b"), raw("C", "c"), raw("D", "d")])
    assert ws.delete_domain("S", 1) == raw("B", "b")
    assert ws.delete_domain("S", 2) == raw("D", "d")
    # The page's way: it removes the domain itself and records it.
    edited = ws.load_set_raw("S")
    gone = edited.pop(0)
    ws.save_set_raw("S", edited)
    ws.trash_domain("S", gone, 0)
    assert [d["name"] for d in ws.load_set_raw("S")] == ["C"]
    assert ws_module.Workspace().restore_last("S") == raw("A", "a")  # survives a restart
    assert ws.restore_last("S") == raw("D", "d")
    assert ws.restore_last("S") == raw("B", "b")
    assert [d["name"] for d in ws.load_set_raw("S")] == ["A", "B", "C", "D"]
    assert ws.restore_last("S") is None


def test_restore_into_a_shorter_set_appends(ws_module):
    ws = ws_module.Workspace()
    ws.save_set_raw("S", [raw("A", "a")])
    ws.trash_domain("S", raw("Z", "z"), 7)
    ws.restore_last("S")
    assert [d["name"] for d in ws.load_set_raw("S")] == ["A", "Z"]


@pytest.mark.parametrize(
    "name, words",
    [("", "needs a name"), ("   ", "needs a name"), ("a/b", "path separator"), ("a\\b", "path separator"),
     ("..", "starts with a dot"), ("x" * 200, "at most"), ("two\nlines", "control")],
)
def test_bad_names_are_refused_with_a_sentence(ws_module, name, words):
    ws = ws_module.Workspace()
    with pytest.raises(ValueError, match=words):
        ws.save_set_raw(name, [])
    with pytest.raises(ValueError, match=words):
        ws.rename_set(ws_module.DEFAULT_SET, name)


def test_rename_onto_an_existing_set_and_missing_sets_are_refused(ws_module):
    ws = ws_module.Workspace()
    ws.create_set("Other")
    with pytest.raises(ValueError, match="already exists"):
        ws.rename_set("Other", ws_module.DEFAULT_SET)
    with pytest.raises(ValueError, match="already exists"):
        ws.create_set("Other")
    with pytest.raises(ValueError, match="no domain set named 'Nope'"):
        ws.load_set_raw("Nope")
    with pytest.raises(ValueError, match="no domain set"):
        ws.set_active("Nope")
    assert ws.load_set_raw("Other") == []
