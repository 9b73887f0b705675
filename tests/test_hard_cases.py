"""The shipped hard-case domains: enough of each kind, usable facts, and exactly what the
seeded generator writes."""
import importlib.util
import json
import re
from collections import Counter

import pytest

from dowsing.domains import (DATA_DIR, as_domains, benchmark_domains, benchmark_file, benchmark_groups,
                             hard_case_domains, hard_case_groups)

KINDS = {"noise", "scrambled", "contradiction", "grab-bag", "redundant"}


@pytest.fixture(scope="module")
def generator():
    # The script lives beside the data, not in the package; load it as a file.
    spec = importlib.util.spec_from_file_location("make_hard_cases", DATA_DIR / "make_hard_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_name():
    return {d.name: d.facts for d in hard_case_domains()}


def test_shipped_hard_cases_have_every_kind_and_enough_facts():
    domains = hard_case_domains()
    groups = hard_case_groups()
    assert len(domains) >= 10 and all(len(d.facts) >= 60 for d in domains)
    assert set(groups) == {d.name for d in domains}
    per_kind = Counter(groups.values())
    assert set(per_kind) >= KINDS and all(n >= 2 for n in per_kind.values())
    quick = hard_case_domains(quick=True)
    assert sorted(groups[d.name] for d in quick) == sorted(set(groups.values()))
    assert all(8 <= len(f.split()) <= 30 and f.endswith(".") for d in domains for f in d.facts)


def test_hard_cases_are_in_the_default_benchmark_after_the_ordinary_ones_and_repeat_no_fact():
    everything = benchmark_domains()
    ordinary = benchmark_domains(hard=False)
    hard = hard_case_domains()
    # the default benchmark scores the hard cases too: the ordinary domains first, then every hard case
    assert [d.name for d in everything] == [d.name for d in ordinary] + [d.name for d in hard]
    assert not {d.name for d in ordinary} & set(hard_case_groups())
    assert {benchmark_groups()[d.name] for d in hard} == KINDS
    # the quick set: one hard case per kind after the quick ordinary domains
    quick = benchmark_domains(quick=True)
    quick_ordinary = benchmark_domains(quick=True, hard=False)
    assert [d.name for d in quick] == [d.name for d in quick_ordinary] + [d.name for d in hard_case_domains(quick=True)]
    # as_domains rejects a repeated name or fact (ignoring case and spacing) across all of them.
    as_domains(everything)


def test_the_generator_reproduces_the_shipped_file(generator, tmp_path):
    shipped = benchmark_file().read_text(encoding="utf-8")
    data = json.loads(shipped)
    without = {k: v for k, v in data.items() if k not in generator.HARD_KEYS}
    copy = tmp_path / "benchmark.json"
    copy.write_text(json.dumps(without, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    generator.main(copy)
    assert copy.read_text(encoding="utf-8") == shipped
    generator.main(copy)  # a second run over its own output changes nothing
    assert copy.read_text(encoding="utf-8") == shipped


def test_scrambled_facts_are_shuffled_real_sentences(generator):
    shipped = _by_name()
    for name, sources in generator.SCRAMBLE_SOURCES.items():
        assert hard_case_groups()[name] == "scrambled"
        assert len(shipped[name]) == len(sources)
        for fact, source in zip(shipped[name], sources):
            assert fact != source
            assert sorted(fact.removesuffix(".").split()) == sorted(source.removesuffix(".").split())


def test_redundant_paraphrases_are_adjacent_pairs(generator):
    shipped = _by_name()
    for name, pairs in generator.PARAPHRASE_PAIRS.items():
        assert hard_case_groups()[name] == "redundant"
        assert list(shipped[name]) == [f for pair in pairs for f in pair]
        assert all(a != b for a, b in pairs)


def test_contradictions_are_adjacent_pairs_that_differ_only_in_the_answer():
    groups = hard_case_groups()
    for name, facts in _by_name().items():
        if groups[name] != "contradiction":
            continue
        assert len(facts) % 2 == 0
        for a, b in zip(facts[::2], facts[1::2]):
            *question_a, answer_a = a.removesuffix(".").split()
            *question_b, answer_b = b.removesuffix(".").split()
            assert question_a == question_b and answer_a != answer_b


def test_noise_facts_fill_one_fixed_frame(generator):
    shipped = _by_name()
    for name, frame in generator.NOISE_FRAMES.items():
        assert hard_case_groups()[name] == "noise"
        pattern = re.compile("".join(r"(\S+)" if part == "{}" else re.escape(part)
                                     for part in re.split(r"(\{\})", frame)))
        assert all(pattern.fullmatch(f) for f in shipped[name])
