"""Domains: edit the concept domains (one table of facts per domain), keep
several named sets, import and export JSON/CSV. Every edit is saved at once."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from dowsing import workspace
from dowsing.domains import (
    Domain,
    DomainError,
    domains_to_csv,
    domains_to_json,
    example_sets,
    load_domains,
    parse_domains_csv,
    parse_domains_json,
    validation_problems,
)

from dowsing.safe_text import md_escape, md_lines
from pages import _shared

_shared.ensure_router()
st.title("Domains")
st.caption(
    "Each domain is a concept (Physics, Astronomy, …) described by short, true, one-sentence facts. "
    "Edits are saved as you type; they survive a refresh and a restart."
)
saved_box = st.empty()  # filled after the editors, once this run's edits are on disk

# --- state: which set, and the "generation" of the editors ------------------
# An editor's session state holds edits relative to the table it was created
# with; the base tables stay fixed until a structural change (add, delete,
# move, import, undo, another set) starts a new generation of editors.

set_name = workspace.active_set()


def _raw() -> list[dict]:
    return [{"name": str(d.get("name", "")), "facts": [str(f) for f in d.get("facts", [])]}
            for d in workspace.load_set_raw(set_name)]


def _new_generation() -> None:
    st.session_state["dom_gen"] = st.session_state.get("dom_gen", 0) + 1
    st.session_state.pop("dom_base", None)


base_info = st.session_state.get("dom_base")
if base_info is None or base_info["set"] != set_name:
    st.session_state["dom_gen"] = st.session_state.get("dom_gen", 0) + 1
    base_info = {"set": set_name, "raw": _raw()}
    st.session_state["dom_base"] = base_info
gen = st.session_state["dom_gen"]
base = base_info["raw"]


def _edit_structure(change) -> None:
    """Apply `change(raw) -> raw` to the saved set, then start fresh editors."""
    raw = _raw()
    new_raw = change(raw)
    if new_raw is not None:
        workspace.save_set_raw(set_name, new_raw)
    _new_generation()


def _unique_name(stem: str, taken) -> str:
    taken = {t.casefold() for t in taken}
    if stem.casefold() not in taken:
        return stem
    k = 2
    while f"{stem} {k}".casefold() in taken:
        k += 1
    return f"{stem} {k}"


# --- callbacks ----------------------------------------------------------------

def _add_domain() -> None:
    name = (st.session_state.get("new_domain_name") or "").strip()
    def change(raw):
        raw.append({"name": _unique_name(name or "New domain", [d["name"] for d in raw]), "facts": ["", ""]})
        return raw
    _edit_structure(change)
    st.session_state["new_domain_name"] = ""


def _delete_domain(i: int) -> None:
    raw = _raw()
    if 0 <= i < len(raw):
        trashed = raw.pop(i)
        workspace.trash_domain(set_name, trashed, i)
        workspace.save_set_raw(set_name, raw)
        st.session_state["dom_flash"] = f"Deleted the domain “{trashed['name']}”. “Undo delete” restores it."
    _new_generation()


def _move(i: int, step: int) -> None:
    def change(raw):
        j = i + step
        if 0 <= i < len(raw) and 0 <= j < len(raw):
            raw[i], raw[j] = raw[j], raw[i]
        return raw
    _edit_structure(change)


def _undo() -> None:
    restored = workspace.restore_last(set_name)
    st.session_state["dom_flash"] = "Restored the last deleted domain." if restored else "Nothing to restore."
    _new_generation()


def _switch_set(name: str) -> None:
    workspace.set_active(name)
    _new_generation()


def _new_set(kind: str) -> None:
    names = workspace.list_sets()
    if kind == "empty":
        name = _unique_name("Untitled set", names)
        raw = [{"name": "New domain", "facts": ["", ""]}]
    else:
        path = example_sets()[kind]
        name = _unique_name(kind, names)
        raw = [{"name": d.name, "facts": list(d.facts)} for d in load_domains(path)]
    workspace.save_set_raw(name, raw)
    _switch_set(name)


def _rename_set() -> None:
    new = (st.session_state.get("rename_set_to") or "").strip()
    if not new or new == set_name:
        return
    if new in workspace.list_sets():
        st.session_state["dom_flash_error"] = f"A set named “{new}” already exists."
        return
    try:
        workspace.rename_set(set_name, new)
    except (ValueError, OSError) as exc:
        st.session_state["dom_flash_error"] = str(exc)
        return
    _switch_set(new)


def _delete_set() -> None:
    names = workspace.list_sets()
    workspace.delete_set(set_name)
    rest = [n for n in names if n != set_name]
    if rest:
        _switch_set(rest[0])
    else:
        _new_generation()
    st.session_state["dom_flash"] = f"Deleted the set “{set_name}”."


def _import_text(text: str, source: str, fmt: str) -> None:
    """Parse JSON/CSV text into a new set; a bad file changes nothing and says
    which line or field is wrong."""
    try:
        if fmt == "json":
            domains = parse_domains_json(text, source)
        elif fmt == "csv":
            domains = parse_domains_csv(text, source)
        else:
            raise DomainError(f"{source}: unknown file type; use a .json or .csv file.")
    except DomainError as exc:
        st.session_state["dom_import_error"] = str(exc)
        return
    stem = Path(source).stem.strip(" .") if source != "pasted text" else "Pasted set"
    name = _unique_name(stem or "Imported set", workspace.list_sets())
    try:
        workspace.save_set_raw(name, [{"name": d.name, "facts": list(d.facts)} for d in domains])
    except ValueError as exc:  # WorkspaceError: a file name that cannot be a set name
        st.session_state["dom_import_error"] = str(exc)
        return
    _switch_set(name)
    st.session_state["dom_flash"] = f"Imported {len(domains)} domains from {source} as the set “{name}”."


def _import_upload(uploaded) -> None:
    data = uploaded.getvalue()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        st.session_state["dom_import_error"] = (
            f"{uploaded.name}, line {line}: the file is not UTF-8 text (byte {exc.start}); save it as UTF-8.")
        return
    _import_text(text, uploaded.name, Path(uploaded.name).suffix.lower().lstrip("."))


def _import_pasted() -> None:
    text = st.session_state.get("paste_text") or ""
    if not text.strip():
        st.session_state["dom_import_error"] = "Paste JSON or CSV text first."
        return
    fmt = "json" if text.lstrip().startswith(("{", "[")) else "csv"
    _import_text(text, "pasted text", fmt)


# --- set management -------------------------------------------------------------

sets = workspace.list_sets()
top = st.columns([3, 2, 2], vertical_alignment="bottom")
with top[0]:
    st.selectbox("Domain set", sets, index=sets.index(set_name) if set_name in sets else 0,
                 key=f"set_pick_{set_name}", help="The set the next analysis uses.",
                 on_change=lambda: _switch_set(st.session_state[f"set_pick_{set_name}"]))
with top[1]:
    with st.popover("New set", icon=":material/add:", width="stretch"):
        st.button("Empty set", on_click=_new_set, args=("empty",), width="stretch")
        for example in example_sets():
            st.button(f"Example: {example}", on_click=_new_set, args=(example,), width="stretch",
                      key=f"example_{example}")
with top[2]:
    with st.popover("Rename / delete set", icon=":material/settings:", width="stretch"):
        st.text_input("New name", value=set_name, key="rename_set_to")
        st.button("Rename", on_click=_rename_set)
        st.divider()
        st.button("Delete this set", on_click=_delete_set, type="primary", disabled=len(sets) <= 1,
                  help="The last set cannot be deleted.")

for key, show in (("dom_flash", st.success), ("dom_flash_error", st.error)):
    if key in st.session_state:
        show(md_escape(st.session_state.pop(key)))

# --- the editors ------------------------------------------------------------------

current: list[dict] = []
for i, domain in enumerate(base):
    with st.container(border=True):
        head = st.columns([6, 1, 1, 1], vertical_alignment="bottom")
        name = head[0].text_input("Domain name", value=domain["name"], key=f"name-{gen}-{i}",
                                  label_visibility="collapsed", placeholder="Domain name")
        head[1].button("", icon=":material/arrow_upward:", key=f"up-{gen}-{i}", help="Move up",
                       on_click=_move, args=(i, -1), disabled=i == 0, width="stretch")
        head[2].button("", icon=":material/arrow_downward:", key=f"down-{gen}-{i}", help="Move down",
                       on_click=_move, args=(i, 1), disabled=i == len(base) - 1, width="stretch")
        head[3].button("", icon=":material/delete:", key=f"del-{gen}-{i}", help="Delete this domain (undo below)",
                       on_click=_delete_domain, args=(i,), width="stretch")
        edited = st.data_editor(
            pd.DataFrame({"fact": domain["facts"]}, dtype="object"),
            key=f"facts-{gen}-{i}",
            num_rows="dynamic",
            hide_index=True,
            width="stretch",
            column_config={"fact": st.column_config.TextColumn(
                "Fact", help="One true sentence about the domain.", width="large")},
        )
        facts = ["" if f is None or (isinstance(f, float) and pd.isna(f)) else str(f) for f in edited["fact"]]
        current.append({"name": name, "facts": facts})
        problems = validation_problems([Domain(name, tuple(facts))])
        st.caption(f"{len(facts)} facts")
        for problem in problems:
            st.warning(md_escape(problem), icon=":material/error:")

# Autosave: what the editors show now is what is on disk.
if current != _raw():
    workspace.save_set_raw(set_name, current)
    st.session_state["dom_saved_at"] = (set_name, datetime.now().strftime("%H:%M:%S"))
    st.toast(f"Saved “{set_name}”", icon=":material/check:")
saved = st.session_state.get("dom_saved_at")
if saved and saved[0] == set_name:
    saved_box.caption(f":green[:material/check_circle:] Saved at {saved[1]}: “{md_escape(set_name)}” is on disk as "
                      "shown.")

add = st.columns([4, 1], vertical_alignment="bottom")
add[0].text_input("New domain", key="new_domain_name", placeholder="Name of a new domain, e.g. Chemistry")
add[1].button("Add domain", icon=":material/add:", on_click=_add_domain, width="stretch")

# --- validation of the whole set, undo, import/export ---------------------------------

domains = [Domain(d["name"], tuple(d["facts"])) for d in current]
set_problems = [p for p in validation_problems(domains) if p not in
                {q for d in domains for q in validation_problems([d])}]
if set_problems:
    for problem in set_problems:
        st.warning(md_escape(problem), icon=":material/error:")
elif domains and not validation_problems(domains):
    st.success(f"{len(domains)} domains, {sum(len(d.facts) for d in domains)} facts: ready to analyse on the Run page.",
               icon=":material/check_circle:")

undoable = workspace.Workspace().trash_size(set_name)
st.button("Undo delete", icon=":material/undo:", on_click=_undo, disabled=not undoable,
          help="Restore the most recently deleted domain of this set." if undoable else
               "Nothing to undo: no domain of this set has been deleted.")

st.subheader("Import and export")
st.caption("JSON `{\"domains\": [{\"name\": …, \"facts\": […]}]}` or CSV with columns `domain,fact`. "
           "An import becomes a new set; a bad file changes nothing.")
cols = st.columns([2, 1, 1], vertical_alignment="bottom")
with cols[0]:
    uploaded = st.file_uploader("Import domains", type=["json", "csv"], key="import_file")
    if uploaded is not None and st.session_state.get("dom_imported") != uploaded.file_id:
        st.session_state["dom_imported"] = uploaded.file_id
        _import_upload(uploaded)
        st.rerun()
cols[1].download_button("Export JSON", domains_to_json(domains), file_name=f"{set_name}.json",
                        mime="application/json", icon=":material/download:", width="stretch")
cols[2].download_button("Export CSV", domains_to_csv(domains), file_name=f"{set_name}.csv",
                        mime="text/csv", icon=":material/download:", width="stretch")
with st.expander("Paste JSON or CSV instead"):
    st.text_area("Domains as JSON or CSV", key="paste_text", height=160,
                 placeholder="domain,fact\nPhysics,Light travels at about 300,000 km per second.\n…")
    st.button("Import pasted text", on_click=_import_pasted)
if "dom_import_error" in st.session_state:
    st.error(md_lines(st.session_state.pop("dom_import_error")), icon=":material/error:")
