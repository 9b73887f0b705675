"""A user's training checkpoints as the trajectory: the checks on the list
(one-line errors, exit 2, nothing written), and the trajectory estimators
over real saved checkpoints against independent computations that load each
checkpoint as a whole model and differentiate it end to end (no cached
block inputs, no truncated copy)."""
from __future__ import annotations

import json

import pytest
import torch

from dowsing.access.checkpoints import CheckpointError, parse_list, validate_checkpoints
from dowsing.access.models import load_model
from dowsing.kernels.subspace import per_fact_losses
from dowsing.kernels.forward import split_pass
from dowsing.kernels.training import Recipe, TailTrainer
from dowsing.kernels.splitting import split_domains
from dowsing.estimators.trajectory import load_user_trajectory, trajectory_scores
from test_trajectory import DOMAINS
from tiny_models import build_tiny

torch.set_num_threads(1)

BLOCKS = 2  # of the 3: the first block changes between checkpoints too, so the block inputs do


def _perturbed(source, target, seed: int, scale: float = 0.02):
    """A copy of the model folder `source` with every parameter moved (lower
    blocks and embeddings too), saved with its tokenizer at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)
    return target


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trajectory_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    first = build_tiny(request.param, root / "step0", n_layer=3)
    second = _perturbed(first, root / "step1", 1)
    third = _perturbed(second, root / "step2", 2)
    return request.param, [first, second, third]


@pytest.fixture(scope="module")
def prepared(trajectory_dirs):
    """(kind, folders, checked checkpoints, last model in float64, train, held, split with block 1's inputs)."""
    kind, dirs = trajectory_dirs
    checked = validate_checkpoints([str(d) for d in dirs])
    last = load_model(str(dirs[-1]), dtype="float64")
    train, held = split_domains(DOMAINS, 0)
    return kind, dirs, checked, last, train, held, split_pass(last, train, held, capture_block=1)


def _tolerance(kind: str) -> float:
    # transformers' RMSNorm computes in float32 whatever the dtype
    return 2e-5 if kind == "llama" else 1e-7


def _full_grad(loaded, facts: list, names: list) -> torch.Tensor:
    """grad of the mean over facts of each fact's own mean next-token loss,
    one unpadded forward per fact through the whole model, over the named
    parameters; float64, flat."""
    params = dict(loaded.model.named_parameters())
    chosen = [params[n] for n in names]
    for p in chosen:
        p.requires_grad_(True)
    total = 0.0
    for fact in facts:
        ids = torch.tensor([loaded.tokenizer(fact)["input_ids"]])
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        total = total + per_fact_losses(logits, ids, torch.ones_like(ids))[0] / len(facts)
    grads = torch.autograd.grad(total, chosen)
    for p in chosen:
        p.requires_grad_(False)
    return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


def _tail_names(loaded, blocks: int) -> list:
    """Names of the last `blocks` blocks' parameters and the final norm."""
    depth = loaded.model.config.num_hidden_layers
    keep = []
    for name, _ in loaded.model.named_parameters():
        layer = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if layer is not None and layer >= depth - blocks:
            keep.append(name)
        elif layer is None and any(k in name for k in ("model.norm", "ln_f")):
            keep.append(name)
    return keep


def test_block_inputs_and_weights_are_each_checkpoints_own(prepared):
    kind, dirs, checked, last, train, held, split = prepared
    trainer = TailTrainer(last, split)
    trajectory = load_user_trajectory(checked, trainer, BLOCKS, lr=0.5)
    assert trajectory.steps == 2 and trajectory.lrs == [0.5, 0.5] and trajectory.lr_source == "given"
    for t, folder in enumerate(dirs):
        own = split_pass(load_model(str(folder), dtype="float64"), train, held, capture_block=1)
        for got, want in zip(trajectory.block_inputs[t], own.block_inputs):
            assert torch.equal(got, want)
    # checkpoint 0's first block differs from the last's: the inputs really move
    assert not torch.equal(trajectory.block_inputs[0][0], trajectory.block_inputs[2][0])


def test_tracin_and_step_lengths_over_saved_checkpoints_equal_whole_model_gradients(prepared):
    kind, dirs, checked, last, train, held, split = prepared
    recipe = Recipe("checkpoints", "sgd", blocks=BLOCKS)  # P = I: nothing sampled
    given, estimated = (trajectory_scores(last, split, ["tracin_ckpt", "diffin"], recipe, checkpoints=checked,
                                          checkpoint_lr=lr) for lr in (0.3, None))
    models = [load_model(str(d), dtype="float64") for d in dirs]
    names = _tail_names(models[0], BLOCKS)
    want_given, want_lrs = [0.0] * len(DOMAINS), []
    for t in range(2):
        theta = [torch.cat([dict(m.model.named_parameters())[n].reshape(-1) for n in names]).to(torch.float64)
                 for m in (models[t], models[t + 1])]
        pool = [f for d in train for f in d.facts]
        want_lrs.append(float((theta[1] - theta[0]).norm() / _full_grad(models[t], pool, names).norm()))
        for k in range(len(DOMAINS)):
            g = _full_grad(models[t], list(train[k].facts), names)
            q = _full_grad(models[t], list(held[k].facts), names)
            want_given[k] += 0.3 * float(q @ g)
    tol = _tolerance(kind)
    assert given[0].priority == pytest.approx(want_given, rel=tol, abs=1e-12)
    assert given[0].details["step_size_source"] == "given"
    assert estimated[0].details["step_sizes"] == pytest.approx(want_lrs, rel=tol)
    assert estimated[0].details["step_size_source"] == "step length"
    # Diff-In = TracIn + its finite-difference correction; the correction is there and smaller
    second = estimated[1].details["second_order"]
    assert any(abs(s) > 0 for s in second)
    assert [a + b for a, b in zip(estimated[1].details["first_order"], second)] == pytest.approx(
        estimated[1].priority)


def test_per_fact_values_average_to_the_priority_and_inputs_are_restored(prepared):
    kind, dirs, checked, last, train, held, split = prepared
    trainer = TailTrainer(last, split)
    before = [b.clone() for b in trainer.data.block_inputs]
    weights = [p.detach().clone() for p in trainer.params]
    recipe = Recipe("checkpoints", "adamw", blocks=BLOCKS)
    tracin, vog = trajectory_scores(last, split, ["tracin_ckpt", "vog"], recipe, checkpoints=checked,
                                    trainer=trainer, all_facts=True)
    for k in range(len(DOMAINS)):
        n_train = len(train[k].facts)
        assert len(tracin.per_example[k]) == n_train + len(held[k].facts)
        mean_train = sum(tracin.per_example[k][:n_train]) / n_train
        assert mean_train == pytest.approx(tracin.priority[k], rel=1e-6, abs=1e-14)
        assert vog.priority[k] == pytest.approx(sum(vog.per_example[k]) / len(vog.per_example[k]))
    assert all(torch.equal(a, b) for a, b in zip(trainer.data.block_inputs, before))
    assert all(torch.equal(p, w) for p, w in zip(trainer.params, weights))


def test_analysis_ranks_by_a_checkpoint_estimator(trajectory_dirs):
    from dowsing.pipelines.analysis import analyze
    from dowsing.config import AnalysisConfig

    kind, dirs = trajectory_dirs
    last = load_model(str(dirs[-1]))
    config = AnalysisConfig(estimator="tracin_ckpt", checkpoints=tuple(str(d) for d in dirs), align_blocks=BLOCKS,
                            bootstrap_resamples=200)
    result = analyze(last, DOMAINS, config)
    ranking = result.extras["ranking"]
    assert ranking["estimator"] == "tracin_ckpt"
    assert len(result.per_example) == 12 and all(r["priority"] == r["priority"] for r in result.per_example)
    assert ranking["details"]["trajectory"] == "user checkpoints"
    assert ranking["details"]["checkpoints"] == [str(d) for d in dirs]
    with pytest.raises(CheckpointError, match="must be the last checkpoint"):
        analyze(load_model(str(dirs[0])), DOMAINS, config)


# --- bad input: one line each ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-bad")
    return {"llama2": build_tiny("llama", root / "llama2", n_layer=2),
            "llama3": build_tiny("llama", root / "llama3", n_layer=3, seed=1),
            "llama2b": build_tiny("llama", root / "llama2b", seed=2),
            "gpt2": build_tiny("gpt2", root / "gpt2", n_layer=2),
            "root": root}


def _one_line_error(specs, pattern):
    with pytest.raises(CheckpointError, match=pattern) as exc:
        validate_checkpoints(specs)
    assert "\n" not in str(exc.value)


def test_bad_checkpoint_lists_give_one_line(shapes):
    root = shapes["root"]
    _one_line_error([str(shapes["llama2"])], "at least 2 checkpoints.*only 1")
    _one_line_error([], "at least 2 checkpoints.*none")
    _one_line_error([str(shapes["llama2"]), str(shapes["gpt2"])], "checkpoint 2 .* gpt2 model.*one architecture")
    _one_line_error([str(shapes["llama2"]), str(shapes["llama3"])], "num_hidden_layers = 3.*one architecture")
    _one_line_error([str(shapes["llama2"]), str(root / "missing")], "checkpoint 2 .*no such folder")
    _one_line_error([str(shapes["llama2"]), str(shapes["llama2"])], "listed twice")
    (root / "empty").mkdir()
    _one_line_error([str(shapes["llama2"]), str(root / "empty")], "no config.json")
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text((shapes["llama2"] / "config.json").read_text())
    _one_line_error([str(shapes["llama2"]), str(root / "noweights")], "holds no weights")
    (root / "file").write_text("x")
    _one_line_error([str(root / "file"), str(shapes["llama2"])], "checkpoint 1 .*not a folder")
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{not json")
    _one_line_error([str(root / "badjson"), str(shapes["llama2"])], "config.json cannot be read")
    _one_line_error([str(shapes["llama2"]), "owner/name"], "no such folder .*owner/name@revision")
    _one_line_error([str(shapes["llama2"]), "owner/name@"], "neither a folder nor a hub step")


def test_a_different_tokenizer_is_refused_and_a_missing_one_inherits(shapes, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(shapes["llama2b"], other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<dowsing-extra>"])
    tokenizer.save_pretrained(other)
    _one_line_error([str(other), str(shapes["llama2"])], "checkpoint 1 .*different tokenizer")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in shapes["llama2b"].iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    checked = validate_checkpoints([str(bare), str(shapes["llama2"])])
    assert checked[0].tokenizer is None and checked[1].tokenizer is not None


def test_parse_list_skips_blank_lines_and_comments():
    assert parse_list("# oldest first\n/a/step0\n\n  /a/step1  \n") == ["/a/step0", "/a/step1"]


@pytest.mark.parametrize("command", ["analyze", "benchmark", "validate"])
def test_cli_bad_checkpoints_exit_2_and_write_nothing(command, shapes, tmp_path, capsys):
    from dowsing.cli import main

    out = tmp_path / "out.json"
    cases = [
        [str(shapes["llama2"])],
        [str(shapes["llama2"]), str(shapes["gpt2"])],
        [str(shapes["llama2"]), str(tmp_path / "nowhere")],
    ]
    for checkpoints in cases:
        extra = {"analyze": ["--estimator", "tracin_ckpt"], "benchmark": ["--quick"], "validate": []}[command]
        code = main([command, "--checkpoints", *checkpoints, "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("error: ") and "\n" not in err
        assert not out.exists()
    # the model must be the last checkpoint
    code = main([command, "--model", str(shapes["llama2"]), "--checkpoints", str(shapes["llama2"]),
                 str(shapes["llama2b"]), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "must be the last checkpoint" in err and not out.exists()


def test_analysis_config_needs_checkpoints_for_their_estimators():
    from dowsing.config import AnalysisConfig
    from dowsing.pipelines.ranking import check_estimator

    with pytest.raises(ValueError, match="at least 2") as exc:
        check_estimator(AnalysisConfig(estimator="diffin"))
    assert "\n" not in str(exc.value)
    check_estimator(AnalysisConfig(estimator="diffin", checkpoints=["a", "b"]))
    config = AnalysisConfig(estimator="vog", checkpoints=["a", "b"])
    assert config.checkpoints == ("a", "b")
    assert AnalysisConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_benchmark_reads_the_users_trajectory(trajectory_dirs):
    from dowsing.validation.benchmark import BenchmarkConfig, run_benchmark

    kind, dirs = trajectory_dirs
    if kind != "llama":
        pytest.skip("one architecture is enough for the plumbing")
    # two more facts a domain for the smallest collection protocol (a sample of 4, 1 test fact, a dose of 1)
    domains = [{"name": d["name"], "facts": d["facts"] + [f"{d['name']} fact number {i} is one more." for i in (5, 6)]}
               for d in DOMAINS]
    config = BenchmarkConfig(recipes=[{"name": "adamw", "optimizer": "adamw", "steps": 2, "blocks": BLOCKS}],
                             seeds=1, estimators=("mean_loss", "tracin_ckpt", "ckpt_confidence"), curve_domains=(),
                             bootstrap=0, checkpoints=tuple(str(d) for d in dirs), checkpoint_lr=0.1,
                             sample_facts=4, test_facts=1, doses=(1,))
    with pytest.warns(UserWarning, match="no power"):
        result = run_benchmark(str(dirs[-1]), domains, config)
    by_name = {e["name"]: e for e in result.estimators}
    assert by_name["tracin_ckpt"]["details"]["trajectory"] == "user checkpoints"
    assert by_name["tracin_ckpt"]["details"]["step_sizes"] == [0.1, 0.1]
    assert by_name["ckpt_confidence"]["details"]["checkpoints"] == 3
    with pytest.raises(CheckpointError, match="must be the last checkpoint"):
        run_benchmark(str(dirs[0]), domains, config)


def test_validation_reads_the_users_trajectory(trajectory_dirs):
    from dowsing.validation.validate import ValidationConfig, validate

    kind, dirs = trajectory_dirs
    if kind != "llama":
        pytest.skip("one architecture is enough for the plumbing")
    config = ValidationConfig(finetune_steps=2, finetune_blocks=BLOCKS, estimators=("mean_loss", "tracin_ckpt"),
                              subspace=False, bootstrap=0, checkpoints=tuple(str(d) for d in dirs),
                              checkpoint_lr=0.1)
    result = validate(str(dirs[-1]), DOMAINS, config)
    by_name = {e["name"]: e for e in result.estimators}
    assert by_name["tracin_ckpt"]["details"]["trajectory"] == "user checkpoints"
    assert by_name["tracin_ckpt"]["details"]["step_sizes"] == [0.1, 0.1]
    assert ValidationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(CheckpointError, match="must be the last checkpoint"):
        validate(str(dirs[0]), DOMAINS, config)
    with pytest.raises(ValueError, match="at least 2"):
        ValidationConfig(checkpoints=(str(dirs[0]),))


def test_a_hub_step_that_cannot_be_fetched_is_one_line(shapes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error([str(shapes["llama2"]), "no-such-org/no-such-model@step1000"],
                    "checkpoint 2 .*not in the local Hugging Face cache and the hub cannot be reached")
