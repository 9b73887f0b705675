"""Concept domains: named sets of facts, read from and written to JSON or CSV.

A domain is a name and its facts (one sentence each). Files are either JSON,
``{"domains": [{"name": ..., "facts": [...]}, ...]}``, or CSV with the
columns ``domain`` and ``fact`` (one row per fact, any column order, extra
columns ignored). Every problem is reported as one sentence naming the file
and the CSV line or the JSON field path (``domains[2].facts[4]``), so a user
can find and fix it.

The parse functions validate what they read, so they (and `load_domains`)
return only domains the engine can use, with surrounding whitespace stripped.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import limits
from .safe_text import csv_cell, csv_value

DATA_DIR = Path(__file__).resolve().parent / "data"
MIN_FACTS = 2  # Welch's t-test on a domain's per-fact scores needs two samples.
# A joined error message lists at most this many problems, then a count.
MAX_PROBLEMS_IN_MESSAGE = 20


@dataclass(frozen=True)
class Domain:
    """One concept domain: a display name and its facts (one sentence each)."""

    name: str
    facts: tuple[str, ...]

    def __post_init__(self) -> None:
        # A list is the natural thing to pass; keep the dataclass hashable.
        if not isinstance(self.facts, (tuple, str)):
            object.__setattr__(self, "facts", tuple(self.facts))


class DomainError(ValueError):
    """Bad domain input. The message is one clear sentence that names the file,
    and the line (CSV) or the field path (JSON, e.g. domains[2].facts[4]) at
    fault; several problems are joined one per line."""


# --- validation -------------------------------------------------------------

# A locator says where domain i (fact j, when given; j = NAME for its name;
# i = -1 for the whole set) came from: a file position such as "my.json, domains[2].facts[4]",
# which leads the message, or a note in parentheses such as "(fact 5)",
# which ends it; "" says nothing extra.
Locator = Callable[[int, "int | None"], str]
NAME = -1


def _in_app_locator(i: int, j: int | None) -> str:
    return "" if i < 0 or j is None or j == NAME else f"(fact {j + 1})"


def _at(where: str, sentence: str) -> str:
    """`sentence` (ending in a full stop) with its location, as one sentence."""
    if where.startswith("("):
        sentence = f"{sentence[:-1]} {where}."
    elif where:
        return f"{where}: {sentence}"
    return sentence[:1].upper() + sentence[1:]


def _fact_key(fact: str) -> str:
    """Facts that differ only in case or spacing count as the same fact."""
    return " ".join(fact.split()).casefold()


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problems(domains: list[Domain], where: Locator) -> list[str]:
    problems: list[str] = []
    if not domains:
        return [_at(where(-1, None), "there are no domains; at least one domain with two facts is needed.")]
    cap = limits.LIMITS
    if len(domains) > cap.max_domains:
        return [_at(where(-1, None), f"there are {len(domains):,} domains; a set holds at most "
                                     f"{cap.max_domains:,}.")]
    seen_names: dict[str, int] = {}
    # fact key -> index of the domain where it first appears
    seen_facts: dict[str, int] = {}
    for i, domain in enumerate(domains):
        name = domain.name.strip() if isinstance(domain.name, str) else domain.name
        # A file position already says which domain; in the app, count from 1.
        unnamed = "the unnamed domain" if where(i, None) else f"unnamed domain {i + 1}"
        if not isinstance(name, str):
            problems.append(_at(where(i, NAME), f"{unnamed} has a name that is not text ({name!r})."))
            label = unnamed
        elif not name:
            problems.append(_at(where(i, NAME), f"{unnamed} has an empty name."))
            label = unnamed
        else:
            label = f"domain {name!r}"
            key = name.casefold()
            if key in seen_names:
                first = domains[seen_names[key]].name.strip()
                problems.append(_at(where(i, NAME), (
                    f"{label} repeats the name of an earlier domain"
                    f"{'' if first == name else f' ({first!r})'}; domain names must differ, ignoring case.")))
            else:
                seen_names[key] = i
        facts = domain.facts
        if isinstance(facts, str):
            problems.append(_at(where(i, None), f"{label} has its facts as one string, not a list of facts."))
            continue
        if len(facts) < MIN_FACTS:
            problems.append(_at(where(i, None), (
                f"{label} has {len(facts)} fact{'' if len(facts) == 1 else 's'}, "
                f"but at least {MIN_FACTS} are needed for the t-test.")))
        if len(facts) > cap.max_facts_per_domain:
            problems.append(_at(where(i, None), (
                f"{label} has {len(facts):,} facts; a domain holds at most {cap.max_facts_per_domain:,}.")))
            continue
        for j, fact in enumerate(facts):
            if not isinstance(fact, str):
                problems.append(_at(where(i, j),
                                    f"{label} has a fact that is not text but {type(fact).__name__} {fact!r}."))
                continue
            if not fact.strip():
                problems.append(_at(where(i, j), f"{label} has an empty fact."))
                continue
            size = len(fact.strip().encode("utf-8", "surrogatepass"))
            if size > cap.max_fact_bytes:
                problems.append(_at(where(i, j), (
                    f"{label} has a fact of {size:,} bytes; a fact is at most {cap.max_fact_bytes:,} bytes "
                    "in UTF-8.")))
                continue
            key = _fact_key(fact)
            if key not in seen_facts:
                seen_facts[key] = i
                continue
            first_i = seen_facts[key]
            if first_i == i:
                problems.append(_at(where(i, j), (
                    f"{label} has the fact {_short(fact)!r} twice.")))
            else:
                first_name = domains[first_i].name
                problems.append(_at(where(i, j), (
                    f"the fact {_short(fact)!r} is in both {label} and domain "
                    f"{str(first_name).strip()!r}.")))
    return problems


def _stripped(domains: list[Domain]) -> list[Domain]:
    return [Domain(d.name.strip(), tuple(f.strip() for f in d.facts)) for d in domains]


def _raise_if(problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_PROBLEMS_IN_MESSAGE]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems.")
    raise DomainError("\n".join(shown))


def validation_problems(domains: list[Domain]) -> list[str]:
    """Every problem with `domains`, one sentence each; [] when they are usable.

    Rules: at least one domain and at most `limits.LIMITS.max_domains`; each
    name non-empty text, unique ignoring case and surrounding whitespace; each
    domain has >= 2 facts (Welch's t-test needs two samples) and at most
    `max_facts_per_domain`; each fact non-empty text of at most
    `max_fact_bytes` UTF-8 bytes; no fact twice, neither in one domain
    nor across two (facts compare ignoring case and spacing).
    """
    return _problems(list(domains), _in_app_locator)


def as_domains(domains) -> list[Domain]:
    """Domain objects or {"name", "facts"} dicts as a validated Domain list
    (DomainError, one line, on bad input)."""
    converted = [d if isinstance(d, Domain) else Domain(d["name"], tuple(d["facts"])) for d in domains]
    return validate_domains(converted)


def validate_domains(domains: list[Domain]) -> list[Domain]:
    """`domains` with names and facts stripped of surrounding whitespace.

    Raises DomainError listing every problem (see `validation_problems`).
    """
    domains = list(domains)
    _raise_if(validation_problems(domains))
    return _stripped(domains)


def facts_from_text(text: str) -> list[str]:
    """Facts typed one per line: each line stripped, blank lines dropped."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def with_added_facts(raw: list[dict], added: dict) -> list[dict]:
    """The set `raw` ({"name", "facts"} dicts, in order) with `added[name]`
    (a list of facts) appended to each named domain's facts. A DomainError
    for a name not in the set, or listing every problem of the result
    (`validation_problems`: the limits, a fact repeated within a domain or
    across two), so a set is never saved with them."""
    names = [str(d.get("name", "")) for d in raw]
    unknown = [name for name in added if name not in names]
    if unknown:
        raise DomainError(f"the new facts name domain(s) not in the set: {', '.join(map(repr, unknown))}")
    out = [{"name": str(d.get("name", "")), "facts": [str(f) for f in d.get("facts", [])] + list(added.get(
        str(d.get("name", "")), []))} for d in raw]
    _raise_if(validation_problems([Domain(d["name"], tuple(d["facts"])) for d in out]))
    return out


# --- JSON -------------------------------------------------------------------

def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_short(value, 30)!r})"
    if isinstance(value, list):
        return "a list"
    return "an object"


def parse_domains_json(text: str, source: str = "<json>") -> list[Domain]:
    """Domains from JSON text ``{"domains": [{"name": ..., "facts": [...]}]}``.

    Extra keys are ignored; a leading BOM is tolerated. Raises DomainError
    naming `source` and the line/column (malformed JSON) or field path
    (wrong shape, or a validation problem) of every fault found.
    """
    text = text.removeprefix("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DomainError(
            f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}).") from None
    if not isinstance(data, dict):
        raise DomainError(
            f'{source}: the top level must be an object with a "domains" list, not {_json_kind(data)}.')
    if "domains" not in data:
        raise DomainError(f'{source}: the top-level object has no "domains" field.')
    items = data["domains"]
    if not isinstance(items, list):
        raise DomainError(f'{source}: "domains" must be a list, not {_json_kind(items)}.')

    problems: list[str] = []
    domains: list[Domain] = []
    for i, item in enumerate(items):
        path = f"domains[{i}]"
        if not isinstance(item, dict):
            problems.append(f'{source}: {path} must be an object with "name" and "facts", '
                            f"not {_json_kind(item)}.")
            continue
        name = item.get("name")
        facts = item.get("facts")
        ok = True
        if "name" not in item:
            problems.append(f'{source}: {path} has no "name" field.')
            ok = False
        elif not isinstance(name, str):
            problems.append(f"{source}: {path}.name must be a string, not {_json_kind(name)}.")
            ok = False
        if "facts" not in item:
            problems.append(f'{source}: {path} has no "facts" field.')
            ok = False
        elif not isinstance(facts, list):
            problems.append(f"{source}: {path}.facts must be a list of strings, not {_json_kind(facts)}.")
            ok = False
        else:
            for j, fact in enumerate(facts):
                if not isinstance(fact, str):
                    problems.append(f"{source}: {path}.facts[{j}] must be a string, not {_json_kind(fact)}.")
                    ok = False
        if ok:
            domains.append(Domain(name, tuple(facts)))
    _raise_if(problems)

    def where(i: int, j: int | None) -> str:
        if i < 0:
            return f"{source}, domains"
        if j == NAME:
            return f"{source}, domains[{i}].name"
        return f"{source}, domains[{i}]" + ("" if j is None else f".facts[{j}]")

    _raise_if(_problems(domains, where))
    return _stripped(domains)


def domains_to_json(domains: list[Domain]) -> str:
    """JSON text ``{"domains": [{"name": ..., "facts": [...]}, ...]}``, indent 2,
    non-ASCII kept as is, ending in a newline."""
    data = {"domains": [{"name": d.name, "facts": list(d.facts)} for d in domains]}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# --- CSV --------------------------------------------------------------------

def parse_domains_csv(text: str, source: str = "<csv>") -> list[Domain]:
    """Domains from CSV text with header columns ``domain`` and ``fact``.

    Column order is free and extra columns are ignored; header names match
    ignoring case and spaces; a leading BOM is tolerated; blank rows are
    skipped. A cell that starts with an apostrophe before a spreadsheet formula
    start (`=`, `+`, `-`, `@`), as `domains_to_csv` writes it, loses that
    apostrophe. Rows are grouped by domain, keeping the order in which domains and
    facts first appear. Raises DomainError naming `source` and the line of
    every fault found (line numbers count physical lines, from 1).
    """
    text = text.removeprefix("\ufeff")
    # strict: an unclosed quote is an error, not a cell that swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems: list[str] = []
    header: list[str] | None = None
    header_line = 0
    domain_col = fact_col = -1
    facts_by_name: dict[str, list[str]] = {}
    lines_by_name: dict[str, list[int]] = {}
    first_line_by_name: dict[str, int] = {}
    line_end = 0
    while True:
        line = line_end + 1  # a quoted cell may span lines; report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"{source}, line {line}: the CSV cannot be read ({exc}); check the quotes in this row.")
            break
        line_end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header, header_line = [c.strip().lower() for c in row], line
            for col in ("domain", "fact"):
                if header.count(col) > 1:
                    problems.append(f"{source}, line {line}: the header has more than one {col!r} column.")
            if "domain" not in header or "fact" not in header:
                raise DomainError(
                    f"{source}, line {line}: the header must have the columns 'domain' and 'fact', "
                    f"but it has {', '.join(repr(c) for c in row)}.")
            domain_col, fact_col = header.index("domain"), header.index("fact")
            continue
        if len(row) <= max(domain_col, fact_col):
            missing = "domain" if len(row) <= domain_col else "fact"
            problems.append(f"{source}, line {line}: the row has {len(row)} "
                            f"cell{'' if len(row) == 1 else 's'} and no {missing!r} cell.")
            continue
        name = csv_value(row[domain_col].strip())
        if not name:
            problems.append(f"{source}, line {line}: the 'domain' cell is empty.")
            continue
        if name not in facts_by_name:
            facts_by_name[name], lines_by_name[name] = [], []
            first_line_by_name[name] = line
        facts_by_name[name].append(csv_value(row[fact_col].strip()))
        lines_by_name[name].append(line)
    if header is None:
        raise DomainError(f"{source}: the file is empty; it needs a header line 'domain,fact'.")
    _raise_if(problems)

    names = list(facts_by_name)
    domains = [Domain(n, tuple(facts_by_name[n])) for n in names]

    def where(i: int, j: int | None) -> str:
        if i < 0:
            return f"{source}, line {header_line}"
        n = names[i]
        return f"{source}, line {first_line_by_name[n] if j is None or j == NAME else lines_by_name[n][j]}"

    _raise_if(_problems(domains, where))
    return _stripped(domains)


def domains_to_csv(domains: list[Domain]) -> str:
    """CSV text: header ``domain,fact``, then one row per fact, quoted by the
    csv module where a cell holds a comma, quote or line break; a cell that
    starts like a spreadsheet formula gets a leading apostrophe
    (`safe_text.csv_cell`), which `parse_domains_csv` takes off again."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["domain", "fact"])
    for d in domains:
        writer.writerows([csv_cell(d.name), csv_cell(fact)] for fact in d.facts)
    return out.getvalue()


# --- files ------------------------------------------------------------------

def load_domains(path: str | Path) -> list[Domain]:
    """Validated domains from a .json or .csv file (strict UTF-8).

    Raises DomainError for an unknown extension, a missing or unreadable
    file, bytes that are not UTF-8 (naming the byte offset and line), and
    every parse or validation problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    parsers = {".json": parse_domains_json, ".csv": parse_domains_csv}
    if suffix not in parsers:
        raise DomainError(f"{path}: unknown file type {suffix or '(none)'!r}; use a .json or .csv file.")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DomainError(f"{path}: no such file.") from None
    except OSError as exc:
        raise DomainError(f"{path}: the file cannot be read ({exc.strerror or exc}).") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DomainError(
            f"{path}, line {line}: the file is not UTF-8 text; byte 0x{data[exc.start]:02x} "
            f"at byte offset {exc.start} cannot be decoded (save the file as UTF-8).") from None
    return parsers[suffix](text, str(path))


def default_domains() -> list[Domain]:
    """The paper's four domains: Physics, Astronomy, Biology, Economics."""
    return load_domains(DATA_DIR / "default.json")


def example_sets() -> dict[str, Path]:
    """The bundled domain sets, by display name."""
    return {
        "Science (paper)": DATA_DIR / "default.json",
        "Languages (low-resource)": DATA_DIR / "languages.json",
    }


def domains_fingerprint(domains: list[Domain]) -> str:
    """sha256 hex of the canonical JSON ``[[name, [facts...]], ...]`` (order kept).

    Part of the cache key: any change to a name, a fact or their order
    changes it. Fingerprint validated (stripped) domains.
    """
    canonical = json.dumps([[d.name, list(d.facts)] for d in domains],
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def benchmark_file() -> Path:
    return DATA_DIR / "benchmark.json"


HARD_KINDS = ("noise", "scrambled", "contradiction", "grab-bag", "redundant")


def _benchmark_data() -> dict:
    return json.loads(benchmark_file().read_text(encoding="utf-8"))


def benchmark_domains(quick: bool = False, hard: bool = True) -> list[Domain]:
    """The shipped benchmark domains: the ordinary ones, then (hard) the
    hard cases; or the quick set of each (six ordinary, one hard case per
    kind) when quick."""
    data = _benchmark_data()
    keep = set(data["quick"]) | set(data["hard_case_quick"]) if quick else None
    rows = list(data["domains"]) + (list(data["hard_cases"]) if hard else [])
    return [Domain(d["name"], tuple(d["facts"])) for d in rows if keep is None or d["name"] in keep]


def benchmark_groups() -> dict:
    """{domain name: group} of every shipped benchmark domain: the ordinary
    domains' familiarity group (everyday, encyclopedic, ...) and the hard
    cases' kind (`HARD_KINDS`)."""
    data = _benchmark_data()
    return {**dict(data["groups"]), **dict(data["hard_case_groups"])}


def domain_set(group: str | None) -> str | None:
    """"hard" for a hard-case kind, "ordinary" for any other known group,
    None for a domain outside the shipped benchmark."""
    if group is None:
        return None
    return "hard" if group in HARD_KINDS else "ordinary"


def hard_case_domains(quick: bool = False) -> list[Domain]:
    """The shipped hard-case domains (noise, scrambled, contradiction,
    grab-bag, redundant; see BENCHMARK.md), or one per kind when quick."""
    data = _benchmark_data()
    keep = set(data["hard_case_quick"]) if quick else None
    return [Domain(d["name"], tuple(d["facts"])) for d in data["hard_cases"] if keep is None or d["name"] in keep]


def hard_case_groups() -> dict:
    """{domain name: kind} of the shipped hard-case domains."""
    return dict(_benchmark_data()["hard_case_groups"])
