"""The executor seam: units in this process or as Ray tasks on a real local
Ray (2 CPUs, no dashboard). The same seeded work gives the same numbers
either way; finished units survive a crash; a killed worker's unit is run
again; Cancel stops the tasks."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dowsing.domains import Domain
from dowsing.pipelines.executor import ExecutorConfig, LocalExecutor, RunCancelled, Shared, Unit, UnitStore
from dowsing.validation.benchmark import BenchmarkConfig, run_benchmark
from dowsing.kernels.training import Recipe
from dowsing.domains import benchmark_domains


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSING_CACHE", str(tmp_path / "cache"))


# --- in-process ------------------------------------------------------------------------------------------


def test_executor_config_rejects_nonsense():
    with pytest.raises(ValueError, match="executor must be"):
        ExecutorConfig(kind="dask")
    with pytest.raises(ValueError, match="needs --executor ray"):
        ExecutorConfig(kind="local", address="auto")
    with pytest.raises(ValueError, match="ray address"):
        ExecutorConfig(kind="ray", address="nonsense")
    assert ExecutorConfig.from_dict(ExecutorConfig(kind="ray", address="ray://h:10001").to_dict()).address == \
        "ray://h:10001"


def _square(context, x):
    context["calls"].append(x)
    return torch.tensor([float(x) ** 2])


def test_local_executor_keeps_finished_units_and_resumes_only_the_missing(tmp_path):
    store = UnitStore("run-a", folder=tmp_path / "units")
    units = [Unit(f"u{i}", (i,)) for i in range(5)]
    context = {"calls": []}
    seen = []

    def stop_after_two():
        return len(context["calls"]) >= 2

    with pytest.raises(RunCancelled):
        LocalExecutor().run(_square, units, Shared("s", context=context), store=store, should_stop=stop_after_two)
    assert context["calls"] == [0, 1] and store.count() == 2
    context["calls"].clear()
    values = LocalExecutor().run(_square, units, Shared("s", context=context), store=store,
                                 on_done=lambda key, value, done, total: seen.append((key, done, total)))
    assert context["calls"] == [2, 3, 4]  # only what was missing
    assert [float(values[f"u{i}"]) for i in range(5)] == [0.0, 1.0, 4.0, 9.0, 16.0]
    assert [s[1] for s in seen] == [1, 2, 3, 4, 5] and all(s[2] == 5 for s in seen)
    # another run's namespace sees nothing of this one
    assert UnitStore("run-b", folder=tmp_path / "units").get("u0") is None


def test_a_corrupt_stored_unit_is_recomputed_not_used(tmp_path):
    store = UnitStore("run", folder=tmp_path / "units")
    store.put("u0", {"x": torch.ones(2)})
    assert torch.equal(store.get("u0")["x"], torch.ones(2))
    store._cache.set("run/u0", b"not a torch file")
    assert store.get("u0") is None and store.count() == 0


# --- on a real local Ray -----------------------------------------------------------------------------------


# A small collection protocol on 8 facts a domain: a sample of 4, 2 test facts and a pool of 2 (one dose); with
# the second reading, every kind of the protocol's units runs.
SAMPLE, TEST, DOSES = 4, 2, (2,)


def _small_config(**changes):
    fields = dict(estimators=("mean_loss", "alignment_heldout"), seeds=1, bootstrap=50, curve_domains=("Cooking",),
                  recipes=(Recipe("adamw", "adamw", lr=3e-4, steps=2, blocks=2),), max_facts=0,
                  sample_facts=SAMPLE, test_facts=TEST, doses=DOSES, second_reading=True)
    fields.update(changes)
    return BenchmarkConfig.quick(**fields)


def _domains():
    return [Domain(d.name, d.facts[:8]) for d in benchmark_domains(quick=True)]


def _numbers(result) -> np.ndarray:
    out = []
    for truth in result.truth.values():
        out += list(np.ravel(truth["gains"])) + list(truth["baseline_drop"])
    for curve in result.curves:
        out += [loss for _, loss in curve["measured"]["points"]]
    for score in result.estimators:
        out += list(score["priority"])
    return np.asarray(out, dtype=float)


@pytest.fixture(scope="module")
def local_benchmark(tiny_llama64):
    return run_benchmark(tiny_llama64, _domains(), _small_config())


def test_benchmark_on_ray_gives_the_same_numbers_and_ships_the_weights_once(ray_executor, tiny_llama64,
                                                                           local_benchmark):
    progress = []
    ray_executor.telemetry.records.clear()
    result = run_benchmark(tiny_llama64, _domains(), _small_config(), executor=ray_executor,
                           progress=lambda p: progress.append(p))
    want, got = _numbers(local_benchmark), _numbers(result)
    assert len(got) == len(want) > 10 and np.ptp(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    records = [r for r in ray_executor.telemetry.records if not r.cached]
    families = [r for r in records if r.key.startswith("estimators/")]
    # each estimator family is a unit beside the fine-tunes: the baseline, and per domain one run per dose and
    # one adding its sample (the curves read the doses: no units of their own)
    assert sorted(r.key for r in families) == ["estimators/alignment", "estimators/subspace"]
    assert len(records) == result.execution["units"] == 1 + len(_domains()) * (len(DOSES) + 1) + len(families)
    assert len({r.pid for r in records}) == 2  # both workers took units
    # one payload in the object store per batch: the estimators' context and the trainer
    assert len(ray_executor._refs) == 2
    assert result.execution["resources"]["CPU"] == 2
    truth_progress = [p for p in progress if p.stage == "ground truth"]
    fine_tunes = len(records) - len(families)
    assert len(truth_progress) == fine_tunes and truth_progress[-1].message.startswith(
        f"fine-tune {fine_tunes} of {fine_tunes}")
    assert [p.message for p in progress if p.stage == "estimators"][-1].startswith("estimators 2 of 2 families")


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ray_workers_running_units() -> list:
    """PIDs of this test session's Ray workers busy with a unit (Ray titles
    them ray::<function>; its workers descend from this process, through the
    raylet, so other Ray instances on the machine are left alone)."""
    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if not title.startswith("ray::_run_remote"):
            continue
        pid, ancestor = int(proc.name), int(proc.name)
        while ancestor > 1 and ancestor != me:
            ancestor = _parent(ancestor)
        if ancestor == me:
            pids.append(pid)
    return pids


def test_a_worker_killed_mid_run_is_retried_and_the_numbers_do_not_change(ray_executor, tiny_llama64,
                                                                         local_benchmark):
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = _ray_workers_running_units()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    # a different payload name (resume=False, new executor refs) so workers rebuild from scratch
    result = run_benchmark(tiny_llama64, _domains(), _small_config(), executor=ray_executor)
    thread.join()
    assert killed, "no worker was seen running a unit"
    np.testing.assert_allclose(_numbers(result), _numbers(local_benchmark), rtol=1e-6, atol=1e-12)


def test_cancel_stops_the_ray_tasks_and_keeps_what_finished(ray_executor, tiny_llama64, tmp_path):
    from dowsing.kernels.training import TailTrainer, build_trainer
    from dowsing.validation.protocol import collection_split, protocol_unit, protocol_units
    from dowsing.kernels.forward import split_pass

    # the benchmark's ground-truth trainer: every domain's sample then its pool, its test facts held out
    protocol = collection_split(_domains(), 0, SAMPLE, TEST)
    grown = [Domain(s.name, s.facts + p.facts) for s, p in zip(protocol["sample"], protocol["pool"])]
    split = split_pass(tiny_llama64, grown, protocol["test"], capture_block=0)
    trainer = TailTrainer(tiny_llama64, split)
    recipe = Recipe("slow", "adamw", lr=3e-4, steps=12, blocks=2)
    units = [u for seed in (0, 1) for u in protocol_units(recipe, seed, len(grown), DOSES, SAMPLE, True)]
    store = UnitStore("cancel-run", folder=tmp_path / "units")
    finished = []
    with pytest.raises(RunCancelled):
        ray_executor.run(protocol_unit, units, Shared("cancel-tail", payload=trainer.payload(), build=build_trainer),
                         store=store, on_done=lambda key, value, done, total: finished.append(key),
                         should_stop=lambda: len(finished) >= 2)
    deadline = time.time() + 30
    while _ray_workers_running_units() and time.time() < deadline:
        time.sleep(0.2)
    assert not _ray_workers_running_units()  # nothing runs on after Cancel
    assert 2 <= store.count() < len(units)  # what finished is kept, the rest is not
    assert set(finished) <= {u.key for u in units}


def test_analysis_per_domain_solves_on_ray_equal_the_in_process_ones(ray_executor, tiny_llama64):
    from dowsing.pipelines.analysis import analyze
    from dowsing.config import AnalysisConfig

    # the exact route through Hessian-vector products: the one whose per-domain work is worth shipping
    domains = [Domain(d.name, d.facts[:3]) for d in benchmark_domains(quick=True)[:2]]
    config = AnalysisConfig(blocks=1, solver="exact", dtype="float64", bootstrap_resamples=200)
    local = analyze(tiny_llama64, domains, config)
    remote = analyze(tiny_llama64, domains, config, executor=ray_executor)
    for a, b in zip(local.domains, remote.domains):
        assert b.mean == pytest.approx(a.mean, rel=1e-6, abs=1e-14)
        assert b.priority == pytest.approx(a.priority, rel=1e-6)
        assert (b.delta_n_10pct is None) == (a.delta_n_10pct is None)
        if a.delta_n_10pct is not None:
            assert b.delta_n_10pct == pytest.approx(a.delta_n_10pct, rel=1e-6)
    la = [e["influence"] for e in local.per_example]
    assert [e["influence"] for e in remote.per_example] == pytest.approx(la, rel=1e-6, abs=1e-14)
    assert remote.extras["bootstrap"]["domains"][0]["mean_interval"] == pytest.approx(
        local.extras["bootstrap"]["domains"][0]["mean_interval"], rel=1e-6, abs=1e-14)


def test_several_models_are_one_unit_each_and_equal_their_own_analyses(ray_executor, tiny_gpt2_dir,
                                                                       tiny_llama_dir):
    from dowsing.pipelines.analysis import run_analyses, run_analysis
    from dowsing.config import AnalysisConfig
    from dowsing.access.models import ModelError

    domains = [Domain(d.name, d.facts[:4]) for d in benchmark_domains(quick=True)[:3]]
    config = AnalysisConfig(dtype="float64")
    models = [str(tiny_gpt2_dir), str(tiny_llama_dir)]
    remote = run_analyses(models, domains, config, executor=ray_executor)
    for model, result in zip(models, remote):
        alone = run_analysis(model, domains, config, use_cache=False)
        assert result.model["id"] == alone.model["id"]
        assert [d.mean for d in result.domains] == pytest.approx([d.mean for d in alone.domains], rel=1e-6)
        assert [d.priority for d in result.domains] == pytest.approx([d.priority for d in alone.domains], rel=1e-6)
    with pytest.raises(ModelError):
        run_analyses([str(tiny_gpt2_dir), "/no/such/model"], domains, config, executor=ray_executor)


def test_validation_fine_tunes_on_ray_equal_the_in_process_ones(ray_executor, tiny_llama64):
    from dowsing.validation.validate import ValidationConfig, validate

    domains = [Domain(d.name, d.facts[:6]) for d in benchmark_domains(quick=True)[:4]]
    config = ValidationConfig(subspace=False, estimators=("mean_loss",), finetune_steps=3, finetune_blocks=2,
                              finetune_lr=3e-4, bootstrap=50)
    local = validate(tiny_llama64, domains, config).finetune
    remote = validate(tiny_llama64, domains, config, executor=ray_executor).finetune
    assert np.ptp(local["gain"]) > 0
    np.testing.assert_allclose(remote["drop_matrix"], local["drop_matrix"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(remote["baseline"], local["baseline"], rtol=1e-6)


def test_execution_is_described_in_one_line():
    from dowsing.pipelines.executor import cli_arguments, execution_text

    assert cli_arguments(ExecutorConfig()) == []
    assert cli_arguments(ExecutorConfig(kind="ray", address="auto", num_cpus=4)) == [
        "--executor", "ray", "--ray-address", "auto", "--ray-cpus", "4"]
    ray_run = {"executor": {"kind": "ray"}, "resources": {"nodes": 2, "CPU": 4, "GPU": 0}, "units": 175,
               "cached_units": 12}
    text = execution_text(ray_run, {"ground_truth": 1500.0, "learning_curves": 339.0, "units_wall": 640.0,
                                    "total": 900.0})
    assert text == ("Ran on Ray (2 node(s), 4 CPU, 0 GPU): 175 fine-tunes, 12 reused from an interrupted run, "
                    "1839 s of fine-tuning in 640 s beside the estimators; total 900 s.")
    assert execution_text({"executor": {"kind": "local"}, "units": 3}, {"ground_truth": 2.0, "total": 5.0}) == \
        "Ran in one process: 3 fine-tunes, 2 s of fine-tuning; total 5 s."


# --- the command line ---------------------------------------------------------------------------------------


# In this process: the real `python -m dowsing benchmark` and `cluster --executor ray` run in
# test_benchmark.py (quick_run) and test_app.py (the Run page's Connect and the benchmark page).


def _cli(capsys, *args):
    from dowsing.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_executor_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import ray

    out = tmp_path / "out.json"
    code, _, err = _cli(capsys, "benchmark", "--quick", "--ray-address", "auto", "--out", str(out))
    assert code == 2 and err.strip().splitlines() == [
        "error: --ray-address needs --executor ray"] and not out.exists()
    # As in a fresh CLI process: this one may hold the session's Ray head, which connect_ray would reuse.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for address in ("ray://127.0.0.1:1", "127.0.0.1:1"):  # nothing listens on port 1
        code, _, err = _cli(capsys, "cluster", "--executor", "ray", "--ray-address", address)
        assert code == 2 and err.strip().splitlines() == [
            f"error: could not reach Ray at {address}: nothing answers there ([Errno 111] Connection refused)"]


def test_cli_cluster_describes_this_machine(capsys):
    code, out, _ = _cli(capsys, "cluster")
    assert code == 0
    assert json.loads(out) == {"kind": "local", "CPU": os.cpu_count(), "GPU": 0, "nodes": 1}
