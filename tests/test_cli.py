"""The CLI: bad input gives one clear line and exit code 2 with nothing written;
the default model and domains run end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dowsing.cli import main

REPO = Path(__file__).resolve().parent.parent
GOOD = {"domains": [
    {"name": "Physics", "facts": ["Energy is conserved in a closed system.", "Light travels faster than sound."]},
    {"name": "Biology", "facts": ["Cells are the basic unit of life.", "DNA carries genetic information."]},
]}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _run(capsys, *args):
    code = main(["analyze", "--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_DOMAIN_FILES = {
    "empty.json": ({"domains": []}, "no domains"),
    "one_fact.json": ({"domains": [{"name": "A", "facts": ["Only one fact is here."]},
                                   {"name": "B", "facts": ["First fact here.", "Second fact here."]}]}, "2"),
    "dupe_names.json": ({"domains": [{"name": "A", "facts": ["A first fact.", "A second fact."]},
                                     {"name": "a", "facts": ["B first fact.", "B second fact."]}]}, "repeats the name"),
    "blank_fact.json": ({"domains": [{"name": "A", "facts": ["A first fact.", "   "]},
                                     {"name": "B", "facts": ["B first fact.", "B second fact."]}]}, "empty"),
    "dupe_facts.json": ({"domains": [{"name": "A", "facts": ["Same fact.", "Same fact."]},
                                     {"name": "B", "facts": ["B first fact.", "B second fact."]}]}, "Same fact"),
    "malformed.json": ('{"domains": [', "line 1"),
    "malformed.csv": ("domain,fact\nA,\"unclosed\n", "line 2"),
    "nocolumns.csv": ("topic,text\nA,B\n", "domain"),
    "latin1.json": ('{"domains": [{"name": "Norsk", "facts": ["Blåbær er gode.", "Ærlig talt."]}]}'.encode("latin-1"),
                    "UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_DOMAIN_FILES))
def test_bad_domain_files_exit_2_and_write_nothing(name, tmp_path, capsys, tiny_gpt2_dir):
    content, expected = BAD_DOMAIN_FILES[name]
    path = _write(tmp_path / name, content)
    out = tmp_path / "out.json"
    code, stdout, stderr = _run(capsys, "--model", str(tiny_gpt2_dir), "--domains", str(path), "--out", str(out))
    assert code == 2
    assert stderr.startswith("error: ") and expected.lower() in stderr.lower()
    assert len(stderr.strip().splitlines()) <= 3
    assert not out.exists()


@pytest.mark.parametrize("model,expected", [
    ("/no/such/model/dir", "not found"),
    ("nonexistent-org/nonexistent-model-xyz", "hub"),
])
def test_unknown_model_exit_2(model, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    domains = _write(tmp_path / "d.json", GOOD)
    code, _, stderr = _run(capsys, "--model", model, "--domains", str(domains), "--out", str(tmp_path / "o.json"))
    assert code == 2 and expected in stderr and not (tmp_path / "o.json").exists()


def test_unreadable_model_directory_exit_2(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    domains = _write(tmp_path / "d.json", GOOD)
    code, _, stderr = _run(capsys, "--model", str(folder), "--domains", str(domains))
    assert code == 2 and "could not be loaded" in stderr


def test_nan_weights_exit_2(tmp_path, capsys, tiny_gpt2_dir):
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_gpt2_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    domains = _write(tmp_path / "d.json", GOOD)
    out = tmp_path / "o.json"
    code, _, stderr = _run(capsys, "--model", str(folder), "--domains", str(domains), "--out", str(out))
    assert code == 2 and "not finite" in stderr and not out.exists()


def test_bad_settings_and_output_paths_exit_2(tmp_path, capsys, tiny_gpt2_dir):
    domains = _write(tmp_path / "d.json", GOOD)
    model = str(tiny_gpt2_dir)
    assert _run(capsys, "--model", model, "--domains", str(domains), "--damping", "-1")[0] == 2
    assert _run(capsys, "--model", model, "--domains", str(domains), "--blocks", "9")[0] == 2
    assert _run(capsys, "--model", model, "--domains", str(domains), "--dtype", "bfloat16")[0] == 2
    code, _, stderr = _run(capsys, "--model", model, "--domains", str(domains), "--align-blocks", "0")
    assert code == 2 and "align_blocks" in stderr
    code, _, stderr = _run(capsys, "--model", model, "--domains", str(domains), "--out", str(tmp_path / "no" / "o.json"))
    assert code == 2 and "does not exist" in stderr
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--solver", "magic"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--estimator", "tracin"])
    assert exc.value.code == 2


def test_long_fact_is_truncated_with_a_warning(tmp_path, capsys, tiny_gpt2_dir):
    long_fact = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    data = {"domains": [{"name": "Long", "facts": [long_fact, "A short second fact."]}, GOOD["domains"][1]]}
    domains = _write(tmp_path / "d.json", data)
    out = tmp_path / "o.json"
    code, stdout, stderr = _run(capsys, "--model", str(tiny_gpt2_dir), "--domains", str(domains), "--out", str(out))
    assert code == 0
    assert "truncated" in stderr
    result = json.loads(out.read_text())
    assert any("truncated" in w for w in result["extras"]["warnings"])


def test_csv_domains_and_json_output(tmp_path, capsys, tiny_llama_dir):
    csv = "domain,fact\nPhysics,Energy is conserved in a closed system.\nPhysics,\"Light, in vacuum, is fast.\"\n" \
          "Biology,Cells are the basic unit of life.\nBiology,DNA carries genetic information.\n"
    domains = _write(tmp_path / "d.csv", csv)
    out = tmp_path / "o.json"
    code, stdout, _ = _run(capsys, "--model", str(tiny_llama_dir), "--domains", str(domains), "--out", str(out))
    assert code == 0 and "Rank" in stdout and "Physics" in stdout
    result = json.loads(out.read_text())
    assert {d["name"] for d in result["domains"]} == {"Physics", "Biology"}
    for key in ("rank", "mean", "share_pct", "t_vs_rest", "p_value", "n_facts", "delta_n_10pct", "delta_n_direct",
                "delta_n_reason", "saturation", "solver", "concept_vector_norm"):
        assert key in result["domains"][0]
    assert set(result["model"]) >= {"id", "parameters", "fingerprint"}
    assert len(result["per_example"]) == 4 and "timings" in result


@pytest.mark.slow
def test_cli_end_to_end_on_embedded_default_model(tmp_path, monkeypatch, converted_embedded_model):
    """The real default model and domains, as a user runs it (a subprocess)."""
    monkeypatch.delenv("DOWSING_CACHE")  # reuse the converted model under cache/
    out = tmp_path / "default.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The memory check before the run has its own tests (tests/test_estimate.py); here its first calibration
    # on this model, half a minute on a fresh checkout, would only lengthen the suite's longest test.
    proc = subprocess.run([sys.executable, "-m", "dowsing", "analyze", "--no-cache", "--quiet",
                           "--ignore-memory-estimate", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["model"]["id"] == "embedded:SmolLM2-135M-Instruct"
    assert result["model"]["parameters"] > 100_000_000
    assert [d["name"] for d in result["domains"]] == ["Physics", "Astronomy", "Biology", "Economics"]
    assert sorted(d["rank"] for d in result["domains"]) == [1, 2, 3, 4]
    assert sum(d["share_pct"] for d in result["domains"]) == pytest.approx(100.0)
    for d in result["domains"]:
        assert d["n_facts"] >= 25
        points = dict((round(n, 6), mu) for n, mu in d["saturation"]["points"])
        assert points[float(d["n_facts"])] == pytest.approx(d["mean"], rel=1e-6, abs=1e-12)
        assert (d["delta_n_10pct"] is None) == (d["delta_n_reason"] is not None)
    ranked = sorted(result["domains"], key=lambda d: d["rank"])
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Rank  Concept"))
    assert ranked[0]["name"] in lines[header + 1]
    from dowsing.config import DEFAULT_ESTIMATOR

    assert result["extras"]["bootstrap"] is not None and result["extras"]["ranking"]["estimator"] == DEFAULT_ESTIMATOR


def _fake_hub_cache(root: Path, repo: str, model_dir: Path, commits: list[str]) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_cache = root / ("models--" + repo.replace("/", "--"))
    for commit in commits:
        shutil.copytree(model_dir, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
    (repo_cache / "refs" / "main").write_text(commits[-1])
    return repo_cache


def test_a_hub_id_loads_from_the_local_cache_offline_and_keys_on_its_snapshot(tmp_path, monkeypatch, capsys,
                                                                              tiny_gpt2_dir):
    from huggingface_hub import constants

    from dowsing.pipelines.analysis import cache_key, model_fingerprint

    repo, old, new = "dowsing-test/tiny-gpt2", "a" * 40, "b" * 40
    hub = tmp_path / "hub"
    repo_cache = _fake_hub_cache(hub, repo, tiny_gpt2_dir, [old, new])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert model_fingerprint(repo) == f"hub:{repo}@{new}"
    assert model_fingerprint("dowsing-test/not-there") == "hub:dowsing-test/not-there@not-cached"
    key_new = cache_key(repo, GOOD["domains"])
    (repo_cache / "refs" / "main").write_text(old)  # the cached model moved to another commit
    assert model_fingerprint(repo) == f"hub:{repo}@{old}" and cache_key(repo, GOOD["domains"]) != key_new

    # The real loader, by id, offline, as a user runs it (in this process; the end-to-end test
    # above is the real `python -m dowsing analyze`).
    domains = _write(tmp_path / "d.json", GOOD)
    out = tmp_path / "o.json"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, stderr = _run(capsys, "--model", repo, "--domains", str(domains), "--out", str(out))
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["model"]["id"] == repo and result["model"]["source"] == "hub"
    assert result["model"]["fingerprint"] == old  # the revision of the snapshot that was loaded


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Rank  Concept"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_the_estimator_ranks_and_paper_reproduces_the_ranking_by_mean(tmp_path, capsys, tiny_gpt2_dir):
    """--estimator paper: the old ranking by the paper's Mean (checked against the
    Mean column); the default: rank and share follow the estimator's priority."""
    from dowsing import estimators
    from dowsing.config import DEFAULT_ESTIMATOR
    from dowsing.validation.evidence import evidence_sentence
    from dowsing.kernels.metrics import ranks_by_mean, shares_pct

    data = {"domains": GOOD["domains"] + [
        {"name": "Economics", "facts": ["Prices rise when demand exceeds supply.", "Taxes pay for public services."]}]}
    domains = _write(tmp_path / "d.json", data)
    runs = {}
    for estimator in ("paper", None):
        out = tmp_path / f"{estimator}.json"
        args = ["--model", str(tiny_gpt2_dir), "--domains", str(domains), "--out", str(out)]
        code, stdout, _ = _run(capsys, *args, *(["--estimator", estimator] if estimator else []))
        assert code == 0
        runs[estimator or DEFAULT_ESTIMATOR] = (json.loads(out.read_text()), stdout)

    paper, stdout = runs["paper"]
    means = [d["mean"] for d in paper["domains"]]
    assert [d["rank"] for d in paper["domains"]] == ranks_by_mean(means)
    assert [d["priority"] for d in paper["domains"]] == means
    rows = _table_rows(stdout)
    # The printed order is the order of the Mean (paper) column, descending.
    by_name = {d["name"]: d for d in paper["domains"]}
    assert [r[1] for r in rows] == sorted(by_name, key=lambda n: -by_name[n]["mean"])
    assert stdout.splitlines()[1] == evidence_sentence("paper")

    default, stdout = runs[DEFAULT_ESTIMATOR]
    assert default["config"]["estimator"] == DEFAULT_ESTIMATOR
    priorities = [d["priority"] for d in default["domains"]]
    assert [d["rank"] for d in default["domains"]] == ranks_by_mean(priorities)
    assert [d["share_pct"] for d in default["domains"]] == pytest.approx(shares_pct(priorities))
    # The paper's numbers do not depend on the estimator.
    assert [d["mean"] for d in default["domains"]] == pytest.approx(means, rel=1e-9)
    assert estimators.label(DEFAULT_ESTIMATOR) in stdout.splitlines()[0]
    assert stdout.splitlines()[1] == evidence_sentence(DEFAULT_ESTIMATOR)
    rows = _table_rows(stdout)
    by_name = {d["name"]: d for d in default["domains"]}
    assert [r[1] for r in rows] == sorted(by_name, key=lambda n: by_name[n]["rank"])
