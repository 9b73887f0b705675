"""Domain files: round trips, every kind of bad input, the bundled sets."""
import csv
import io
import json

import pytest

from dowsing.domains import (
    Domain,
    DomainError,
    default_domains,
    domains_fingerprint,
    domains_to_csv,
    domains_to_json,
    example_sets,
    load_domains,
    parse_domains_csv,
    parse_domains_json,
    validate_domains,
    validation_problems,
)

TRICKY = [
    Domain("Physics", ("Force, mass and acceleration: F = ma.",
                       'Einstein called it "spooky action at a distance".',
                       "A line break\ninside a fact, and a comma.")),
    Domain("Norwegian (Bokmål)", ("Vann fryser til is ved null grader.",
                                  "Ærlig talt, øl på Ås er best — «sa han».")),
    Domain("German", ("Die Straße ist größer als üblich.", "Grüße aus Köln, 'sagte' er.")),
]


def _json(*domains) -> str:
    return json.dumps({"domains": [{"name": n, "facts": f} for n, f in domains]})


def _error(fn, *args) -> str:
    with pytest.raises(DomainError) as info:
        fn(*args)
    return str(info.value)


# --- round trips ------------------------------------------------------------

def test_json_round_trip_keeps_every_character():
    text = domains_to_json(TRICKY)
    assert "Bokmål" in text and "\\u" not in text  # ensure_ascii=False
    assert json.loads(text)["domains"][0] == {"name": "Physics", "facts": list(TRICKY[0].facts)}
    assert parse_domains_json(text) == TRICKY


def test_csv_round_trip_keeps_every_character():
    text = domains_to_csv(TRICKY)
    assert text.splitlines()[0] == "domain,fact"
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 1 + sum(len(d.facts) for d in TRICKY)
    assert parse_domains_csv(text) == TRICKY


def test_files_round_trip_through_load_domains(tmp_path):
    (tmp_path / "set.json").write_text(domains_to_json(TRICKY), encoding="utf-8")
    (tmp_path / "set.CSV").write_text(domains_to_csv(TRICKY), encoding="utf-8")
    assert load_domains(tmp_path / "set.json") == TRICKY
    assert load_domains(str(tmp_path / "set.CSV")) == TRICKY


def test_csv_columns_in_any_order_extra_columns_bom_and_grouping():
    text = ("\ufeffsource, Fact ,Domain\n"
            "wiki,f1,A\n"
            "wiki,g1,B\n"
            "\n"
            'book,"f2, with comma",A\n'
            "book,g2,B\n")
    assert parse_domains_csv(text) == [Domain("A", ("f1", "f2, with comma")), Domain("B", ("g1", "g2"))]


def test_bom_csv_file_loads(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("domain,fact\nX,één\nX,twee\n".encode("utf-8-sig"))
    assert load_domains(path) == [Domain("X", ("één", "twee"))]


def test_surrounding_whitespace_is_stripped():
    text = _json(("  Physics ", ["  a fact. ", "\tanother fact.\n"]), ("B", ["x", "y"]))
    assert parse_domains_json(text)[0] == Domain("Physics", ("a fact.", "another fact."))
    assert validate_domains([Domain(" P ", (" a ", "b "))]) == [Domain("P", ("a", "b"))]


def test_domain_accepts_a_list_of_facts():
    domain = Domain("X", ["a", "b"])
    assert domain.facts == ("a", "b")
    hash(domain)


# --- validation ---------------------------------------------------------------

def test_valid_domains_have_no_problems():
    assert validation_problems(TRICKY) == []


@pytest.mark.parametrize("domains, expected", [
    ([], "no domains"),
    ([Domain("Solo", ("only one",))], "Domain 'Solo' has 1 fact, but at least 2"),
    ([Domain("Empty", ())], "Domain 'Empty' has 0 facts"),
    ([Domain("A", ("a", "b")), Domain(" a ", ("c", "d"))], "Domain 'a' repeats the name of an earlier domain ('A')"),
    ([Domain("  ", ("a", "b"))], "Unnamed domain 1 has an empty name"),
    ([Domain("A", ("a", "  "))], "Domain 'A' has an empty fact (fact 2)"),
    ([Domain("A", ("Same fact.", "same  fact."))], "Domain 'A' has the fact 'same fact.' twice (fact 2)"),
    ([Domain("A", ("x", "Shared.")), Domain("B", ("Shared.", "y"))],
     "The fact 'Shared.' is in both domain 'B' and domain 'A' (fact 1)"),
    ([Domain("A", ("x", 3))], "Domain 'A' has a fact that is not text but int 3 (fact 2)"),
])
def test_each_rule_gives_a_clear_problem(domains, expected):
    problems = validation_problems(domains)
    assert any(expected in p for p in problems), problems
    with pytest.raises(DomainError) as info:
        validate_domains(domains)
    assert expected in str(info.value)


def test_all_problems_are_reported_together():
    domains = [Domain("A", ("x",)), Domain("a", ("x", ""))]
    problems = validation_problems(domains)
    assert len(problems) == 4, problems  # one fact; repeated name; shared fact; empty fact
    message = _error(validate_domains, domains)
    assert message.splitlines() == problems


def test_long_problem_lists_are_capped_in_the_message():
    domains = [Domain(f"D{i}", (f"only {i}",)) for i in range(30)]
    assert len(validation_problems(domains)) == 30
    message = _error(validate_domains, domains)
    assert message.splitlines()[-1] == "... and 10 more problems."


# --- bad JSON -----------------------------------------------------------------

def test_malformed_json_names_line_and_column():
    text = '{"domains": [\n  {"name": "A",\n   "facts": ["a" "b"]}\n]}'
    message = _error(parse_domains_json, text, "mine.json")
    assert message.startswith("mine.json: malformed JSON at line 3, column 18")


@pytest.mark.parametrize("data, expected", [
    ([], 'mine.json: the top level must be an object with a "domains" list, not a list.'),
    ({"domain": []}, 'mine.json: the top-level object has no "domains" field.'),
    ({"domains": {"A": ["a"]}}, 'mine.json: "domains" must be a list, not an object.'),
    ({"domains": ["A"]}, "mine.json: domains[0] must be an object"),
    ({"domains": [{"facts": ["a", "b"]}]}, 'mine.json: domains[0] has no "name" field.'),
    ({"domains": [{"name": 7, "facts": ["a", "b"]}]}, "mine.json: domains[0].name must be a string, not a number (7)."),
    ({"domains": [{"name": "A"}]}, 'mine.json: domains[0] has no "facts" field.'),
    ({"domains": [{"name": "A", "facts": "a, b"}]}, "mine.json: domains[0].facts must be a list of strings"),
    ({"domains": [{"name": "A", "facts": ["a", "b"]}, {"name": "B", "facts": ["c", None]}]},
     "mine.json: domains[1].facts[1] must be a string, not null."),
])
def test_wrong_json_shape_names_the_field(data, expected):
    assert expected in _error(parse_domains_json, json.dumps(data), "mine.json")


@pytest.mark.parametrize("domains, expected", [
    ([], "mine.json, domains: there are no domains"),
    ([("A", ["a"])], "mine.json, domains[0]: domain 'A' has 1 fact"),
    ([("A", ["a", "b"]), ("a", ["c", "d"])], "mine.json, domains[1].name: domain 'a' repeats the name"),
    ([("A", ["a", "b"]), ("", ["c", "d"])], "mine.json, domains[1].name: the unnamed domain has an empty name."),
    ([("A", ["a", "b", " "])], "mine.json, domains[0].facts[2]: domain 'A' has an empty fact."),
    ([("A", ["a", "b", "a"])], "mine.json, domains[0].facts[2]: domain 'A' has the fact 'a' twice."),
    ([("A", ["a", "b"]), ("B", ["c", "b"])],
     "mine.json, domains[1].facts[1]: the fact 'b' is in both domain 'B' and domain 'A'."),
])
def test_json_validation_problems_name_the_field(domains, expected):
    assert expected in _error(parse_domains_json, _json(*domains), "mine.json")


def test_json_collects_all_structural_problems():
    data = {"domains": [{"name": "A", "facts": ["a", 1]}, {"facts": []}, 5]}
    lines = _error(parse_domains_json, json.dumps(data), "m.json").splitlines()
    assert [line.split(":")[0] for line in lines] == ["m.json"] * 3
    assert ["domains[0].facts[1]" in lines[0], "domains[1]" in lines[1], "domains[2]" in lines[2]] == [True] * 3


# --- bad CSV ------------------------------------------------------------------

def test_csv_without_the_columns_names_the_header_line():
    message = _error(parse_domains_csv, "\nname,text\nA,a\n", "mine.csv")
    assert message.startswith("mine.csv, line 2: the header must have the columns 'domain' and 'fact'")
    assert "'name', 'text'" in message


def test_empty_csv():
    assert "mine.csv: the file is empty" in _error(parse_domains_csv, "\n\n", "mine.csv")


def test_csv_row_with_a_missing_cell_names_its_line():
    # A quoted cell spans lines 2-3 and the bad row spans 4-5: the row's first line counts.
    text = 'domain,fact\nA,"two\nlines"\n"A\nA"\nB,b1\n,b2\nB,b3\n'
    lines = _error(parse_domains_csv, text, "mine.csv").splitlines()
    assert lines == ["mine.csv, line 4: the row has 1 cell and no 'fact' cell.",
                     "mine.csv, line 7: the 'domain' cell is empty."]


def test_csv_validation_problems_name_the_line():
    text = ("domain,fact\n"
            "A,a\n"
            "A,\n"           # line 3: empty fact
            "B,a\n"          # line 4: shared with A
            "B,b\n"
            "C,c\n"          # line 6: only one fact
            "a,x\n"          # line 7: repeats A
            "a,y\n")
    message = _error(parse_domains_csv, text, "mine.csv")
    assert "mine.csv, line 3: domain 'A' has an empty fact." in message
    assert "mine.csv, line 4: the fact 'a' is in both domain 'B' and domain 'A'." in message
    assert "mine.csv, line 6: domain 'C' has 1 fact" in message
    assert "mine.csv, line 7: domain 'a' repeats the name of an earlier domain ('A')" in message


def test_csv_with_an_unclosed_quote_names_the_row_where_it_opens():
    message = _error(parse_domains_csv, 'domain,fact\nA,a\nA,"b\nA,c\n', "mine.csv")
    assert message.startswith("mine.csv, line 3: the CSV cannot be read")
    assert "quotes" in message


# --- files --------------------------------------------------------------------

def test_non_utf8_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("domain,fact\nX,caf\u00e9 au lait\n".encode("latin-1"))
    message = _error(load_domains, path)
    assert str(path) in message and "line 2" in message
    assert "byte 0xe9 at byte offset 17" in message


def test_missing_file_and_unknown_extension(tmp_path):
    assert "no such file" in _error(load_domains, tmp_path / "nope.json")
    (tmp_path / "set.txt").write_text("domain,fact\n", encoding="utf-8")
    assert "unknown file type '.txt'" in _error(load_domains, tmp_path / "set.txt")
    (tmp_path / "dir.json").mkdir()
    assert "cannot be read" in _error(load_domains, tmp_path / "dir.json")


def test_load_domains_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(_json(("A", ["a"])), encoding="utf-8")
    assert _error(load_domains, path).startswith(f"{path}, domains[0]: domain 'A' has 1 fact")


# --- bundled sets -------------------------------------------------------------

def test_default_domains_are_the_papers_four():
    domains = default_domains()
    assert [d.name for d in domains] == ["Physics", "Astronomy", "Biology", "Economics"]
    assert all(len(d.facts) >= 28 for d in domains)
    assert validate_domains(domains) == domains


@pytest.mark.parametrize("name", ["Science (paper)", "Languages (low-resource)"])
def test_example_sets_exist_and_are_valid(name):
    path = example_sets()[name]
    assert path.is_file()
    domains = load_domains(path)
    assert all(len(d.facts) >= 25 for d in domains)
    assert validation_problems(domains) == []
    for d in domains:
        assert all(8 <= len(f.split()) <= 25 for f in d.facts if name == "Science (paper)"), d.name


def test_language_set_is_the_same_facts_translated():
    domains = load_domains(example_sets()["Languages (low-resource)"])
    assert [d.name for d in domains] == ["English", "Norwegian (Bokmål)", "German"]
    assert len({len(d.facts) for d in domains}) == 1
    # Translations keep their numbers: the same digits in the same fact.
    for facts in zip(*(d.facts for d in domains)):
        digits = [sorted("".join(c if c.isdigit() else " " for c in f).split()) for f in facts]
        assert digits[0] == digits[1] == digits[2], facts
    assert default_domains() == load_domains(example_sets()["Science (paper)"])


# --- fingerprint --------------------------------------------------------------

def test_fingerprint_is_stable_and_sensitive():
    base = domains_fingerprint(TRICKY)
    assert len(base) == 64 and int(base, 16) >= 0
    assert domains_fingerprint(parse_domains_json(domains_to_json(TRICKY))) == base
    changed = [TRICKY[0], Domain(TRICKY[1].name, (TRICKY[1].facts[0], TRICKY[1].facts[1] + "!")), TRICKY[2]]
    assert domains_fingerprint(changed) != base
    assert domains_fingerprint(list(reversed(TRICKY))) != base
    renamed = [Domain("Physik", TRICKY[0].facts), *TRICKY[1:]]
    assert domains_fingerprint(renamed) != base
    # Moving a fact across the domain boundary must change it too.
    moved = [Domain("A", ("x", "y")), Domain("B", ("z", "w"))]
    assert domains_fingerprint(moved) != domains_fingerprint([Domain("A", ("x",)), Domain("B", ("y", "z", "w"))])
