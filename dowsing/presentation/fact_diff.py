"""What differs between two sets of domains ({"name", "facts"} rows, as a job
request or a saved domain set holds them): domains added or removed, and per
domain the facts added, removed or changed. The Results and Run pages use it
to say a run is out of date, the run labels to say what differs, and Compare
to show the facts beside the rank changes."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass
class DomainDiff:
    """One domain's facts: added, removed, and changed (old, new) pairs: a
    removed and an added fact at the same place in the list, close in wording."""

    name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


@dataclass
class SetDiff:
    domains_added: list[str] = field(default_factory=list)
    domains_removed: list[str] = field(default_factory=list)
    domains: list[DomainDiff] = field(default_factory=list)  # only those with a change

    @property
    def empty(self) -> bool:
        return not (self.domains_added or self.domains_removed or self.domains)

    def summary(self) -> str:
        """'Biology: 1 fact added, 2 facts changed; Chemistry added', '' when nothing differs."""
        parts = [f"{name} added" for name in self.domains_added]
        parts += [f"{name} removed" for name in self.domains_removed]
        for d in self.domains:
            counts = [f"{len(x)} fact{'' if len(x) == 1 else 's'} {what}"
                      for x, what in ((d.added, "added"), (d.removed, "removed"), (d.changed, "changed")) if x]
            parts.append(f"{d.name}: " + ", ".join(counts))
        return "; ".join(parts)


def _rows(domains) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in domains or []:
        if isinstance(d, dict):
            name, facts = d.get("name"), d.get("facts")
        else:
            name, facts = getattr(d, "name", None), getattr(d, "facts", None)
        out[str(name)] = [str(f) for f in facts or []]
    return out


def domain_diff(name: str, before: list[str], after: list[str]) -> DomainDiff:
    """The facts of one domain, before and after: a replaced block pairs its
    facts in order as changed, the rest of it is added or removed."""
    out = DomainDiff(name)
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        old, new = before[i1:i2], after[j1:j2]
        if op == "replace":
            pairs = min(len(old), len(new))
            out.changed += list(zip(old[:pairs], new[:pairs]))
            old, new = old[pairs:], new[pairs:]
        out.removed += old
        out.added += new
    return out


def set_diff(before, after) -> SetDiff:
    """What changed from `before` to `after` (each a list of {"name", "facts"}
    or Domains), domains in the order of `after`."""
    a, b = _rows(before), _rows(after)
    out = SetDiff(domains_added=[n for n in b if n not in a], domains_removed=[n for n in a if n not in b])
    for name in b:
        if name in a:
            d = domain_diff(name, a[name], b[name])
            if not d.empty:
                out.domains.append(d)
    return out


def diff_rows(diff: SetDiff) -> list[dict]:
    """One row per difference for a table: {"Domain", "Change", "Before", "After"}."""
    rows = [{"Domain": n, "Change": "domain added", "Before": "", "After": ""} for n in diff.domains_added]
    rows += [{"Domain": n, "Change": "domain removed", "Before": "", "After": ""} for n in diff.domains_removed]
    for d in diff.domains:
        rows += [{"Domain": d.name, "Change": "fact added", "Before": "", "After": f} for f in d.added]
        rows += [{"Domain": d.name, "Change": "fact removed", "Before": f, "After": ""} for f in d.removed]
        rows += [{"Domain": d.name, "Change": "fact changed", "Before": o, "After": n} for o, n in d.changed]
    return rows
