"""The estimator registry: one contract checked for every registered
estimator (one finite priority per domain, per-fact values that belong to
the right facts, seeded and repeatable), a toy estimator added in a test
reaching the analysis, the CLI and the benchmark's leaderboard through its
family module alone, estimator names spelled only by their families, and the
package's layering (no import circle, each layer importing only from the
layers below it, no private name taken from another layer, no function over
80 lines)."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from dowsing import estimators
from dowsing.config import AnalysisConfig
from dowsing.domains import Domain
from dowsing.estimators import EstimatorContext, EstimatorSettings, compute, registry
from dowsing.kernels.forward import split_pass
from dowsing.access.models import load_model
from dowsing.kernels.splitting import split_domains
from dowsing.kernels.training import Recipe

PACKAGE = Path(__file__).resolve().parent.parent / "dowsing"
DOMAINS = [Domain(name, tuple(f"{name} fact number {i} says {word} is {i + 2}." for i in range(6)))
           for name, word in (("Alpha", "red"), ("Beta", "green"), ("Gamma", "blue"), ("Delta", "amber"))]


@pytest.fixture(scope="module")
def split(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype="float64")
    train, held = split_domains(DOMAINS, seed=0)
    return loaded, split_pass(loaded, train, held, capture_block=0)


def _context(split, seed: int = 0) -> EstimatorContext:
    loaded, passed = split
    settings = EstimatorSettings(blocks=1, adam_batches=2, seed=seed, lissa_depth=50, ekfac_blocks=1,
                                 ekfac_fit_facts=12, recipe=Recipe("trajectory", steps=2, blocks=1, batch=4,
                                                                   added_batch=2))
    return EstimatorContext(loaded, passed, settings)


@pytest.mark.parametrize("family", list(estimators.FAMILIES))
def test_every_registered_estimator_meets_the_contract(split, family):
    """Each family's members, computed twice on the same split: one finite
    priority per domain, per-fact values (where the estimator has them) for
    each training fact averaging to the priority where the estimator is a mean
    over facts, a label, and the same numbers both times (seeded)."""
    members = [n for n, e in estimators.ESTIMATORS.items() if e.family == family]
    _, passed = split
    first = compute(_context(split), members)
    again = compute(_context(split), members)
    assert [s.name for s in first] == members
    for score, repeat in zip(first, again):
        entry = estimators.get(score.name)
        assert score.label == entry.label and entry.summary and callable(estimators.FAMILIES[family].cost)
        assert len(score.priority) == len(DOMAINS)
        assert all(math.isfinite(p) for p in score.priority), score.name
        assert score.priority == repeat.priority, f"{score.name} is not repeatable"
        assert score.time_s >= passed.forward_s
        if score.per_example is not None:
            assert [len(v) for v in score.per_example] == [len(r) for r in passed.train_rows], score.name


def test_labels_and_names_are_unique_and_every_place_reads_them():
    from dowsing.cli import build_parser
    from dowsing.validation.benchmark import BenchmarkConfig
    from dowsing.validation.validate import ValidationConfig

    labels = [e.label for e in estimators.ESTIMATORS.values()]
    assert len(labels) == len(set(labels))
    assert BenchmarkConfig().estimators == estimators.names("benchmark")
    assert ValidationConfig().estimators == estimators.names("validation")
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["analyze"]._actions
                  if a.dest == "estimator")
    assert tuple(action.choices) == estimators.names("analysis")
    for name in estimators.names("analysis"):
        assert name in action.help
    with pytest.raises(ValueError, match="unknown estimator"):
        estimators.check_names(["paper", "nonsense"])


def _token_counts(d):
    """A toy: each fact's token count, the domain's mean of them."""
    ids = d.ctx.split.ids
    per_example = [float(len(ids[r])) for r in d.example_rows]
    return sum(len(ids[r]) for r in d.rows) / len(d.rows), per_example, None


@pytest.fixture
def toy_estimator():
    """A toy estimator added to the subspace family exactly as its module
    adds one: a declaration and its per-domain function."""
    from dowsing.estimators import subspace

    registry.register(registry.Estimator("toy_tokens", "Toy: mean tokens per fact", "subspace",
                                         "the domain's mean fact length in tokens", in_analysis=True))
    subspace.DOMAIN_SCORES["toy_tokens"] = _token_counts
    yield "toy_tokens"
    registry.unregister("toy_tokens")
    del subspace.DOMAIN_SCORES["toy_tokens"]


def test_a_toy_estimator_reaches_the_analysis_the_cli_and_the_leaderboard(toy_estimator, tiny_llama_dir,
                                                                           tmp_path, monkeypatch):
    from dowsing.pipelines.analysis import analyze
    from dowsing.cli import build_parser
    from dowsing.validation.benchmark import BenchmarkConfig, run_benchmark

    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_llama_dir))
    args = build_parser().parse_args(["analyze", "--estimator", toy_estimator])
    assert args.estimator == toy_estimator
    result = analyze(loaded, DOMAINS, AnalysisConfig(estimator=toy_estimator))
    lengths = [[len(loaded.tokenizer(f)["input_ids"]) for f in d.facts] for d in DOMAINS]
    assert [d.priority for d in result.domains] == pytest.approx([sum(v) / len(v) for v in lengths])
    assert [e["priority"] for e in result.per_example] == [float(n) for v in lengths for n in v]
    assert result.extras["ranking"]["label"] == "Toy: mean tokens per fact"
    config = BenchmarkConfig.quick(estimators=("mean_loss", toy_estimator), seeds=1, curve_domains=(),
                                   recipes=(Recipe("adamw", steps=1, blocks=1),), align_blocks=1, bootstrap=50,
                                   max_facts=0, sample_facts=4, test_facts=1, doses=(1,))
    with pytest.warns(UserWarning, match="no power"):
        bench = run_benchmark(loaded, DOMAINS, config)
    row = next(r for r in bench.leaderboard if r["estimator"] == toy_estimator)
    assert row["label"] == "Toy: mean tokens per fact"
    train = {name: facts for name, facts in bench.split["train"].items()}
    toy = next(s for s in bench.estimators if s["name"] == toy_estimator)
    assert toy["priority"] == pytest.approx(
        [sum(len(loaded.tokenizer(f)["input_ids"]) for f in train[d.name]) / len(train[d.name]) for d in DOMAINS])


def _module_imports() -> dict:
    """{module: {modules of the package it imports, anywhere in its code}}."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    if target in modules and target != name:
                        found.add(target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules and a.name != name)
        graph[name] = found
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    graph = _module_imports()
    # the walk sees the imports the layers rest on
    assert "dowsing.estimators" in graph["dowsing.pipelines.ranking"] and "dowsing.pipelines.ranking" in graph["dowsing.pipelines.analysis"]
    assert _cycles(graph) == []


# The package's layers, bottom first: a layer imports only from layers of a lower rank. The
# shared base is the package's own modules (configuration, records, domains, paths, costs...);
# the command line and the package's face stand on top.
LAYER_RANK = {"base": 0, "dowsing.access": 1, "dowsing.kernels": 2, "dowsing.storage": 2,
              "dowsing.estimators": 3, "dowsing.pipelines": 4, "dowsing.validation": 5,
              "dowsing.presentation": 6, "dowsing.estimates": 6, "dowsing.background": 6,
              "dowsing.data": 7, "top": 7}
TOP = {"dowsing", "dowsing.cli", "dowsing.__main__"}


def _layer(module: str) -> str:
    """The layer a module is in: its subpackage of dowsing, else the base (or the top)."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    return ".".join(parts[:2]) if (PACKAGE / parts[1]).is_dir() else "base"


def _layer_imports(graph: dict) -> dict:
    """The module graph with each module replaced by its layer (no arrow from a layer to itself)."""
    layers: dict = {}
    for module, targets in graph.items():
        layers.setdefault(_layer(module), set()).update(_layer(t) for t in targets)
    return {layer: targets - {layer} for layer, targets in layers.items()}


def test_each_layer_imports_only_from_layers_below_it():
    layers = _layer_imports(_module_imports())
    assert set(layers) == set(LAYER_RANK)
    # the walk sees the arrows the layers rest on
    assert {"dowsing.kernels", "dowsing.storage", "dowsing.estimators"} <= layers["dowsing.pipelines"]
    upward = sorted(f"{layer} -> {target}" for layer, targets in layers.items() for target in targets
                    if LAYER_RANK[target] >= LAYER_RANK[layer])
    assert upward == []
    assert _cycles(layers) == []


def test_no_private_name_is_imported_from_another_layer():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    crossing = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dowsing")):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                crossing += [f"{name}: {base}.{a.name}" for a in node.names
                             if a.name.startswith("_") and _layer(base) != _layer(name)]
    assert crossing == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_in_the_package_is_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.name}")
    assert long == []


# Module constants that spell an estimator's name but mean something else, or mirror one
# where the registry cannot be imported: {path: {constant: why}}. Every other quoted
# estimator name outside dowsing/estimators/ is an import of the family's constant.
SAME_SPELLING = {
    "dowsing/config.py": {
        "FALLBACK_ESTIMATOR": "the base layer's mirror of estimators.MEAN_LOSS (pinned below)",
    },
    "dowsing/result.py": {
        "PAPER_ESTIMATOR": "the base layer's mirror of estimators.PAPER (pinned below)",
    },
    "dowsing/kernels/diagnosis.py": {
        "MEAN_LOSS_KEY": "the column of the shipped benchmark rows that holds a domain's mean loss",
    },
    "dowsing/pipelines/plan.py": {
        "MEAN_LOSS_FIELD": "a stored domain curve's mean loss",
        "MEAN_LOSS_RULE": "the simple split in proportion to mean loss, a key of stored plans",
    },
    "dowsing/presentation/verdict.py": {
        "METHOD_WORDS": "words of a sentence, not a name",
    },
    "pages/results.py": {
        "PAPER_SECTION": "the page's anchor of the paper's section, a URL fragment",
    },
}


def _quoted_estimator_names() -> list:
    """'path:line: name' for every string literal equal to a registered
    estimator's name in the package outside dowsing/estimators/, the pages
    and app.py, but the values of the constants in SAME_SPELLING."""
    root = PACKAGE.parent
    paths = [p for p in PACKAGE.rglob("*.py") if "estimators" not in p.relative_to(PACKAGE).parts]
    paths += sorted((root / "pages").rglob("*.py")) + [root / "app.py"]
    found = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id in SAME_SPELLING.get(relative, {}) for t in targets):
                allowed.update(id(n) for n in ast.walk(node.value))
        found += [f"{relative}:{n.lineno}: {n.value}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in registry.ESTIMATORS
                  and id(n) not in allowed]
    return found


def test_estimator_names_are_spelled_only_by_their_family():
    """Adding or renaming an estimator touches its family's module alone:
    everything else imports the family's constant."""
    assert _quoted_estimator_names() == []


def test_the_base_layers_mirrors_of_estimator_names_match_the_registry():
    """The configuration and the result sit below the registry and spell the
    names they need themselves; they are the families' names."""
    from dowsing import config, result

    assert config.FALLBACK_ESTIMATOR == estimators.MEAN_LOSS
    assert result.PAPER_ESTIMATOR == estimators.PAPER


def test_the_name_check_sees_a_quoted_name(monkeypatch):
    """The walk finds a quoted name where no constant allows it."""
    monkeypatch.setitem(SAME_SPELLING, "dowsing/config.py", {})
    assert any(line.startswith("dowsing/config.py:") for line in _quoted_estimator_names())
